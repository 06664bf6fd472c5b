"""Owning child processes: they die with `interop serve`, and what a crash left behind is found
and ended at the next start.

* `die_with_parent`: a child started with it gets SIGTERM from the kernel the moment its parent
  dies, even of SIGKILL (Linux PR_SET_PDEATHSIG), so a `kill -9` of the supervisor leaves no API,
  worker or listener running.
* `PidFile`: a process the supervisor starts in its own session (tritonserver) is recorded with
  what it runs; the next start ends a recorded process that is still alive and still that program.
* `port_in_use`: the supervisor refuses to start, saying which, when a port it needs is taken.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger("interop.runtime")

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child receive `sig` when its parent dies (None off Linux)."""
    if not sys.platform.startswith("linux"):
        return None

    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig)
        if os.getppid() == 1:  # the parent died before prctl: do not outlive it
            os.kill(os.getpid(), sig)

    return preexec


def free_port() -> int:
    """A loopback port that is free now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    """Whether binding host:port fails because something holds it (as a server binds: SO_REUSEADDR)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno in (errno.EADDRINUSE, errno.EACCES)
    return False


class PidFile:
    """`path` records the pid of a process running `program` with `marker` on its command line."""

    def __init__(self, path: Path, program: str, marker: str):
        self.path = Path(path)
        self.program = program
        self.marker = marker

    def write(self, pid: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(f"{pid}\n", encoding="ascii")

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def recorded(self) -> psutil.Process | None:
        """The recorded process, if it is alive and still runs `program` with `marker` (a pid the
        system gave to another program since is not ours)."""
        try:
            pid = int(self.path.read_text(encoding="ascii").split()[0])
            proc = psutil.Process(pid)
            cmdline = " ".join(proc.cmdline())
        except (OSError, ValueError, IndexError, psutil.Error):
            return None
        if self.program in cmdline and self.marker in cmdline:
            return proc
        return None

    def end_orphan(self, timeout_s: float = 10.0) -> bool:
        """End the recorded process and its group if it outlived its supervisor; True if one was."""
        proc = self.recorded()
        if proc is None:
            self.remove()
            return False
        log.warning("ending %s (pid %d) left running by an earlier hub", self.program, proc.pid)
        try:
            group = os.getpgid(proc.pid)
            os.killpg(group, signal.SIGTERM) if group == proc.pid else proc.terminate()
            proc.wait(timeout_s)
        except psutil.TimeoutExpired:
            try:
                os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
        deadline = time.monotonic() + timeout_s
        while proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.05)
        self.remove()
        return True


def wait_listening(port: int, proc: Any, timeout: float = 60, host: str = "127.0.0.1") -> None:
    """Wait until `proc` (a Popen) accepts connections on `port`; RuntimeError if it exits or never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not listen")
