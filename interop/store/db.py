"""Connections and migrations.

Migrations are numbered SQL files applied in order under an advisory lock, so several hub
replicas starting together against one PostgreSQL apply each exactly once.
"""
from __future__ import annotations

import re
import select
from importlib import resources as pkg_resources
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

MIGRATION_LOCK = 0x1A7E_0001  # pg_advisory_lock key shared by every replica
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def connect(url: str, **kwargs: Any) -> psycopg.Connection[dict[str, Any]]:
    """A plain connection returning rows as dicts."""
    return psycopg.connect(url, row_factory=dict_row, **kwargs)


def scalar(conn: psycopg.Connection[Any], query: str | sql.Composed, args: Any = None) -> Any:
    """The first column of the first row (None when there is no row), whatever the row factory."""
    row = conn.execute(query, args).fetchone()
    if row is None:
        return None
    return next(iter(row.values())) if isinstance(row, dict) else row[0]


def check_idle(conn: psycopg.Connection[Any]) -> None:
    """Raise if a pooled connection is no longer usable, without a round trip when it is.

    An idle connection has nothing to read; a server that ends it (a switchover, a restart,
    pg_terminate_backend) first sends its error and closes, which makes the socket readable. Only
    then is the connection asked, with the pool's own check, which raises if it is gone. The
    round trip every request paid for the check before was a tenth of a create's CPU."""
    if conn.closed:
        raise psycopg.OperationalError("the connection is closed")
    readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    if readable:
        ConnectionPool.check_connection(conn)


def pool(url: str, *, min_size: int = 1, max_size: int = 8) -> ConnectionPool:
    """A pool per process; opened by the caller (never at import time). A connection is checked
    as it is handed out (`check_idle`), so one cut by a database switchover is replaced, not used."""
    return ConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        kwargs={"row_factory": dict_row},
        check=check_idle,
        open=False,
        name="interop",
    )


def migrations() -> list[tuple[int, str, str]]:
    """(number, file name, SQL) of every shipped migration, in order."""
    found = []
    for entry in pkg_resources.files("interop.store").joinpath("migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found)


def migrate(url: str) -> list[str]:
    """Apply pending migrations; returns the names applied now."""
    applied_now: list[str] = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migration ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {row[0] for row in conn.execute("SELECT version FROM schema_migration")}
            for number, name, sql in migrations():
                if number in done:
                    continue
                with conn.transaction():
                    conn.execute(sql)
                    conn.execute(
                        "INSERT INTO schema_migration (version, name) VALUES (%s, %s)", (number, name)
                    )
                applied_now.append(name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
    return applied_now
