"""What the benchmarks share: a fresh database on a PostgreSQL server they started, and where they write their figures."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

BENCHMARKS = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"


def append_to_benchmarks(text: str) -> None:
    """Add a bench's section to docs/BENCHMARKS.md (its `--write`)."""
    with open(BENCHMARKS, "a", encoding="utf-8") as handle:
        handle.write(text)


def fresh_database(server_url: str, name: str) -> str:
    """Drop and create database `name` on the server; its URL (not migrated: the caller decides which code does)."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))


@contextmanager
def migrated_database(name: str) -> Iterator[str]:
    """A fresh database `name` migrated to this checkout: on DATABASE_URL's server, or on an
    embedded PostgreSQL started for the run (under /var/tmp, which the server's user can reach)
    and stopped after it."""
    from interop.store import db

    server = None
    base = os.environ.get("DATABASE_URL")
    if not base:
        from interop.runtime.postgres import EmbeddedPostgres

        directory = Path(tempfile.mkdtemp(prefix=f"{name}-", dir="/var/tmp"))
        os.chmod(directory, 0o755)
        server = EmbeddedPostgres(directory / "pg")
        base = server.start()
    try:
        url = fresh_database(base, name)
        db.migrate(url)
        yield url
    finally:
        if server is not None:
            server.stop()
