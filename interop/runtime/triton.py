"""Start and stop the tritonserver binary that ships in the `nvidia-pytriton` wheel.

The hub runs without a container: `pip install nvidia-pytriton` brings the real Triton server
(with only the Python backend). Three details make it work from a virtual environment:
- the Python backend looks for `triton_python_backend_stub` beside `libtriton_python.so`; the
  wheel keeps one stub per Python version elsewhere, so the one for this interpreter is copied in;
- the stub finds the environment's packages (onnxruntime, numpy) only when the environment's
  `bin/` comes first on PATH (PYTHONPATH is not passed through);
- the server binds loopback only, on free ports, and logs to a file whose tail goes into errors.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from .processes import PidFile, die_with_parent, free_port

STUB = "triton_python_backend_stub"


PORT_TRIES = 3
log = logging.getLogger("interop.runtime.triton")


class TritonStartError(RuntimeError):
    """The bundled tritonserver is missing, or did not become ready (message has the log tail)."""


def _pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError as exc:
        raise TritonStartError(
            "the bundled tritonserver needs the nvidia-pytriton package: "
            "pip install 'interop-hub[embedded]' (or set TRITON_URL to a running Triton)"
        ) from exc
    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def find_tritonserver() -> Path:
    """Path of the tritonserver binary inside the installed nvidia-pytriton package."""
    binary = _pytriton_root() / "bin" / "tritonserver"
    if not binary.is_file():
        raise TritonStartError(f"nvidia-pytriton is installed but {binary} is missing")
    return binary


def backend_directory() -> Path:
    """The wheel's backends/ folder, with the Python stub for this interpreter in place."""
    root = _pytriton_root()
    python_backend = root / "backends" / "python"
    stub = python_backend / STUB
    if not stub.is_file():
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        source = root / "python_backend_stubs" / version / STUB
        if not source.is_file():
            raise TritonStartError(f"nvidia-pytriton has no Python backend stub for Python {version} ({source})")
        tmp = stub.with_name(f"{STUB}.{os.getpid()}.tmp")
        shutil.copy2(source, tmp)
        os.chmod(tmp, 0o755)
        tmp.replace(stub)  # atomic: parallel starters never see a half-copied stub
    return root / "backends"


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class BundledTriton:
    """The bundled tritonserver on loopback: `with BundledTriton(repo, log_dir) as t: t.url`."""

    def __init__(
        self,
        model_repository: Path,
        log_dir: Path,
        *,
        ready_timeout_s: float = 120.0,
        models: tuple[str, ...] = (),
        extra_args: tuple[str, ...] = (),
        environ: Mapping[str, str] | None = None,
        load_only: tuple[str, ...] = (),
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.log_dir = Path(log_dir)
        self.ready_timeout_s = ready_timeout_s
        self.models = models  # models that must be ready too (all loaded ones are checked by /v2/health/ready)
        self.extra_args = extra_args
        self.load_only = load_only  # empty: every model of the repository
        self.environ = dict(environ or {})  # the settings' environment, handed to the server
        # The server runs in its own session (a Ctrl-C in the shell reaches the supervisor, which
        # stops it in order); the pid file lets the next start end one a crashed supervisor left.
        self.pid_file = PidFile(self.log_dir / "tritonserver.pid", "tritonserver", str(self.model_repository))
        self.http_port = 0
        self.grpc_port = 0
        self.metrics_port = 0
        self.log_path = self.log_dir / "tritonserver.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """host:port of the HTTP endpoint, as tritonclient.http expects it."""
        if not self.http_port:
            raise RuntimeError("BundledTriton is not started")
        return f"127.0.0.1:{self.http_port}"

    def command(self) -> list[str]:
        return [
            str(find_tritonserver()),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_directory()}",
            "--http-address=127.0.0.1", f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--exit-timeout-secs=5",
            # A CT volume batch is tens of MB: with the Python backend's default 1 MB shared
            # memory region, which then grows, responses came back empty after large requests.
            "--backend-config=python,shm-default-byte-size=67108864",
            f"--log-file={self.log_path}",
            *(["--model-control-mode=explicit", *(f"--load-model={name}" for name in self.load_only)]
              if self.load_only else []),
            *self.extra_args,
        ]

    def start(self) -> None:
        """Start the server and block until it (and every loaded model) is ready. Its three ports are
        chosen free just before it binds them: another program may take one in that moment, and then
        it starts again on new ones (PORT_TRIES times)."""
        for attempt in range(1, PORT_TRIES + 1):
            try:
                self._start_once()
                return
            except TritonStartError as exc:
                if attempt == PORT_TRIES or "already in use" not in str(exc):
                    raise
                log.warning("a port chosen for the bundled Triton was taken meanwhile; starting it on new ports")

    def _start_once(self) -> None:
        if self._proc is not None:
            raise RuntimeError("BundledTriton already started")
        if not self.model_repository.is_dir():
            raise TritonStartError(f"model repository {self.model_repository} does not exist")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.pid_file.end_orphan()
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        env = dict(self.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        with open(self.log_dir / "tritonserver.stdout.log", "ab") as out:
            self._proc = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True, preexec_fn=die_with_parent(),
            )
        self.pid_file.write(self._proc.pid)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        paths = ["/v2/health/ready"] + [f"/v2/models/{name}/ready" for name in self.models]
        assert self._proc is not None
        while True:
            code = self._proc.poll()
            if code is not None:
                raise TritonStartError(
                    f"tritonserver exited with status {code} before it was ready; log {self.log_path}:\n"
                    f"{_tail(self.log_path)}\n{_tail(self.log_dir / 'tritonserver.stdout.log', 10)}"
                )
            if all(self._get(path) == 200 for path in paths):
                return
            if time.monotonic() > deadline:
                raise TritonStartError(
                    f"tritonserver not ready after {self.ready_timeout_s:.0f} s; log {self.log_path}:\n"
                    f"{_tail(self.log_path)}"
                )
            time.sleep(0.1)

    def _get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.url}{path}", timeout=2) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return 0

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (Triton unloads models and exits), then SIGKILL the group if it hangs.

        Triton also waits for open HTTP keep-alive connections: close clients first for a
        quick (about 3 s) stop, otherwise this falls through to SIGKILL after `timeout_s`.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        self.pid_file.remove()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the server and its Python stubs
                except ProcessLookupError:
                    pass
                proc.wait(timeout=5)

    def __enter__(self) -> BundledTriton:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
