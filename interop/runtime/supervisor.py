"""`interop serve`: start what is not given (PostgreSQL, Triton), then the API, the analysis
workers, the delivery runner and the HL7 v2 MLLP listener.

Children are separate processes (gunicorn for the API, one process per analysis worker, one
delivery runner, one MLLP listener) so that a crash in one is contained; a worker, the delivery
runner or the listener that dies is restarted. Every child dies with the supervisor, even when
it is killed with SIGKILL, and the next start ends the Triton and recovers the PostgreSQL a
crashed supervisor left. The supervisor refuses to start, naming the port, when the HTTP or
MLLP port is taken. SIGTERM or SIGINT stops everything this process started, in reverse order;
SIGHUP makes every process read the sites file again.

With INTEROP_TLS_CERT and INTEROP_TLS_KEY the API is HTTPS (gunicorn's --certfile/--keyfile) and
the MLLP listener speaks TLS; TLS settings that cannot be used (a certificate without its key, a
file that does not load) stop the start before anything runs, so nothing serves plain text by
mistake.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from threading import Event

from .. import tls
from ..config import Settings
from ..store import db
from . import checks
from .processes import die_with_parent, port_in_use

log = logging.getLogger("interop.serve")

EXIT_PORT_IN_USE = 3  # what `interop mllp` exits with when its port is taken


class StartError(RuntimeError):
    """The hub cannot start (a port is taken, a dependency failed); the message says why."""


def build_script() -> Path:
    """The reference-model builder of the source checkout."""
    return Path(__file__).resolve().parents[2] / "scripts" / "build_reference_models.py"


def ensure_models(repo: Path) -> None:
    """Build the reference weights when they are missing (deterministic; skips when current)."""
    script = build_script()
    if not script.is_file():
        raise StartError(f"the reference models are built by {script}, which is part of the source checkout;"
                         " set TRITON_URL to a Triton serving the models instead")
    subprocess.run([sys.executable, str(script), "--repo", str(repo)], check=True)


def start_dependencies(settings: Settings, stack: ExitStack) -> Settings:
    """Embedded PostgreSQL and bundled Triton for whatever the environment does not name."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if not settings.database_url:
        from .postgres import EmbeddedPostgres

        os.chmod(settings.data_dir, 0o755)  # the embedded server runs as its own user
        pg = stack.enter_context(EmbeddedPostgres(settings.data_dir / "postgres"))
        settings = replace(settings, database_url=pg.url)
        log.info("embedded PostgreSQL started")
    applied = db.migrate(settings.database_url or "")
    if applied:
        log.info("migrations applied: %s", ", ".join(applied))
    if not settings.triton_url:
        from .triton import BundledTriton

        ensure_models(settings.triton_repo)
        models = tuple(m.strip() for m in (settings.triton_models or "").split(",") if m.strip())
        triton = stack.enter_context(BundledTriton(settings.triton_repo, settings.data_dir / "triton",
                                                   environ=settings.environ, models=models, load_only=models))
        settings = replace(settings, triton_url=triton.url, triton_shared_memory="system"
                           if settings.triton_shared_memory == "auto" else settings.triton_shared_memory)
        log.info("bundled Triton started on %s", triton.url)
    return settings


def check_tls(settings: Settings) -> None:
    try:
        tls.check(settings)
    except tls.TlsError as exc:
        raise StartError(f"TLS: {exc}") from None


def check_ports(settings: Settings) -> None:
    for what, host, port in (("HTTP (INTEROP_HTTP_PORT)", settings.http_host, settings.http_port),
                             ("MLLP (INTEROP_MLLP_PORT)", settings.mllp_host, settings.mllp_port),
                             ("DICOM (INTEROP_DICOM_PORT)", settings.dicom_host, settings.dicom_port)):
        if port_in_use(host, port):
            raise StartError(f"the {what} port {host}:{port} is already in use by another process;"
                             " stop it or choose another port")


def check_addresses(settings: Settings) -> None:
    """The database(s) and the Triton the environment names answer, before anything starts
    (unset ones are started here instead, and need no check)."""
    try:
        for name, url in (("DATABASE_URL", settings.database_url),
                          ("ANALYTICS_DATABASE_URL", settings.analytics_database_url)):
            if url:
                checks.check_database(url, name)
        if settings.triton_url:
            checks.check_triton(settings.triton_url)
    except checks.CheckError as exc:
        raise StartError(str(exc)) from None


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, env=env, preexec_fn=die_with_parent())


def gunicorn_args(settings: Settings) -> list[str]:
    """gunicorn's command line. HTTPS: its default context (Python's, TLS 1.2 at least) with the
    hub's certificate; client certificates are asked for on MLLP only."""
    https = ["--certfile", str(settings.tls_cert), "--keyfile", str(settings.tls_key)] if settings.tls else []
    return [sys.executable, "-m", "gunicorn", "--workers", str(settings.http_workers),
            "--bind", f"{settings.http_host}:{settings.http_port}", "--graceful-timeout", "10",
            "--no-control-socket", "--access-logfile", "-", "--access-logformat", '%(m)s %(U)s %(s)s %(L)ss',
            *https, "interop.app:create_app()"]


def _gunicorn(settings: Settings, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return _spawn(gunicorn_args(settings), env)


def _command(name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return _spawn([sys.executable, "-m", "interop.cli", name], env)


def _stop(procs: list[subprocess.Popen[bytes]], timeout: float = 15.0) -> None:
    """SIGTERM to all at once (each stops in its own time), then SIGKILL what is left at `timeout`."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve(settings: Settings, ready: Event | None = None) -> int:
    stop = Event()
    children: list[subprocess.Popen[bytes]] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def reload_sites(*_: object) -> None:  # every child reads the sites file again
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGHUP)

    signal.signal(signal.SIGHUP, reload_sites)
    try:
        check_tls(settings)
        check_ports(settings)
        check_addresses(settings)
    except StartError as exc:
        log.error("%s", exc)
        return 2
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="interop-metrics-") as metrics_dir:
        settings = start_dependencies(settings, stack)
        env = replace(settings, metrics_dir=Path(metrics_dir)).as_env()
        env.setdefault("PYTHONUNBUFFERED", "1")
        api = _gunicorn(settings, env)
        workers = [_command("worker", env) for _ in range(settings.workers)]
        deliver = _command("deliver", env)
        mllp = _command("mllp", env)
        scp = _command("dicom-scp", env)
        children[:] = [api, *workers, deliver, mllp, scp]
        log.info("hub serving FHIR on %s://%s:%s/fhir and HL7 v2 MLLP%s on %s:%s with %d worker(s)",
                 "https" if settings.tls else "http", settings.http_host, settings.http_port,
                 " over TLS" if settings.tls else "", settings.mllp_host, settings.mllp_port, len(workers))
        if ready is not None:
            ready.set()
        code = 0
        try:
            while not stop.wait(0.5):
                if api.poll() is not None:
                    log.error("the API server exited with %s; stopping", api.returncode)
                    code = 1
                    break
                if mllp.poll() == EXIT_PORT_IN_USE:
                    log.error("the MLLP listener cannot bind %s:%s; stopping", settings.mllp_host, settings.mllp_port)
                    code = 2
                    break
                for i, proc in enumerate(workers):
                    if proc.poll() is not None:
                        log.warning("worker exited with %s; restarting it", proc.returncode)
                        time.sleep(1)
                        workers[i] = _command("worker", env)
                if deliver.poll() is not None:
                    log.warning("delivery runner exited with %s; restarting it", deliver.returncode)
                    time.sleep(1)
                    deliver = _command("deliver", env)
                if mllp.poll() is not None:
                    log.warning("MLLP listener exited with %s; restarting it", mllp.returncode)
                    time.sleep(1)
                    mllp = _command("mllp", env)
                if scp.poll() == EXIT_PORT_IN_USE:
                    log.error("the DICOM Storage SCP cannot bind %s:%s; stopping", settings.dicom_host, settings.dicom_port)
                    code = 2
                    break
                if scp.poll() is not None:
                    log.warning("DICOM Storage SCP exited with %s; restarting it", scp.returncode)
                    time.sleep(1)
                    scp = _command("dicom-scp", env)
                children[:] = [api, *workers, deliver, mllp, scp]
        finally:
            _stop([scp, mllp, deliver, *workers, api])
            log.info("hub stopped")
        return code
