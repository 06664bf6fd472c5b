"""What /metrics reads from the shared database at scrape time (every replica reports the same)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg


def jobs_by_status(conn: psycopg.Connection[Any], kinds: Sequence[str]) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT status, count(*) AS n FROM job WHERE kind = ANY(%s) GROUP BY status ORDER BY 1",
                        (list(kinds),)).fetchall()
    return [dict(r) for r in rows]


def stage_seconds(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Per pipeline stage: jobs that finished in the last hour and their total seconds."""
    rows = conn.execute("SELECT key AS stage, count(*) AS n, sum(value::float) AS total"
                        " FROM job, jsonb_each_text(timings)"
                        " WHERE finished_at > now() - interval '1 hour' GROUP BY key ORDER BY key").fetchall()
    return [dict(r) for r in rows]


def deliveries(conn: psycopg.Connection[Any], kinds: Sequence[str]) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT kind, status, count(*) AS n FROM job WHERE kind = ANY(%s) GROUP BY kind, status"
                        " ORDER BY 1, 2", (list(kinds),)).fetchall()
    return [dict(r) for r in rows]


def check(conn: psycopg.Connection[Any]) -> None:
    """Raises unless the database answers and the queue is there (readiness)."""
    conn.execute("SELECT 1 FROM job LIMIT 1")
