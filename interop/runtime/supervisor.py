"""`interop serve`: start what is not given (PostgreSQL, Triton), then the API, the workers and
the HL7 v2 MLLP listener.

Children are separate processes (gunicorn for the API, one process per worker, one for the
MLLP listener) so that a crash in one is contained; a worker or the listener that dies is
restarted. SIGTERM or SIGINT stops everything this process started, in reverse order.
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

from ..config import Settings
from ..store import db

log = logging.getLogger("interop.serve")


def ensure_models(repo: Path) -> None:
    """Build the reference weights when they are missing (deterministic; skips when current)."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "build_reference_models.py"
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
        triton = stack.enter_context(BundledTriton(settings.triton_repo, settings.data_dir / "triton"))
        settings = replace(settings, triton_url=triton.url)
        log.info("bundled Triton started on %s", triton.url)
    return settings


def _child_env(settings: Settings, metrics_dir: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(settings.as_env())
    env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _gunicorn(settings: Settings, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--workers", str(settings.http_workers),
         "--bind", f"{settings.http_host}:{settings.http_port}", "--graceful-timeout", "10",
         "--no-control-socket",
         "--access-logfile", "-", "--access-logformat", '%(m)s %(U)s %(s)s %(L)ss',
         "interop.fhir.app:create_app()"],
        env=env,
    )


def _worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "interop.cli", "worker"], env=env)


def _mllp(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "interop.cli", "mllp"], env=env)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve(settings: Settings, ready: Event | None = None) -> int:
    stop = Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="interop-metrics-") as metrics_dir:
        settings = start_dependencies(settings, stack)
        env = _child_env(settings, metrics_dir)
        api = _gunicorn(settings, env)
        workers = [_worker(env) for _ in range(settings.workers)]
        mllp = _mllp(env)
        log.info("hub serving FHIR on http://%s:%s/fhir and HL7 v2 MLLP on %s:%s with %d worker(s)",
                 settings.http_host, settings.http_port, settings.mllp_host, settings.mllp_port, len(workers))
        if ready is not None:
            ready.set()
        code = 0
        try:
            while not stop.wait(0.5):
                if api.poll() is not None:
                    log.error("the API server exited with %s; stopping", api.returncode)
                    code = 1
                    break
                for i, proc in enumerate(workers):
                    if proc.poll() is not None:
                        log.warning("worker exited with %s; restarting it", proc.returncode)
                        time.sleep(1)
                        workers[i] = _worker(env)
                if mllp.poll() is not None:
                    log.warning("MLLP listener exited with %s; restarting it", mllp.returncode)
                    time.sleep(1)
                    mllp = _mllp(env)
        finally:
            for proc in [mllp, *workers, api]:
                _stop(proc)
            log.info("hub stopped")
        return code
