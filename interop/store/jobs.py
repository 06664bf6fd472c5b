"""The job queue: a PostgreSQL table shared by every worker of every hub replica.

A worker claims the oldest ready job with FOR UPDATE SKIP LOCKED and holds a lease on it. A
worker that dies stops renewing the lease; when it runs out the job is ready again and the
crash counts as an attempt. Completion is checked against the lease holder inside the
caller's transaction, so a job whose lease was taken over can never be completed twice.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

CHANNEL = "interop_jobs"
MAX_BACKOFF_SECONDS = 600


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    payload: dict[str, Any]
    attempts: int
    max_attempts: int
    worker: str
    created_at: datetime


class LeaseLost(Exception):
    """Another worker took the job over (our lease ran out): drop our result."""


def enqueue(
    conn: psycopg.Connection[Any],
    kind: str,
    payload: dict[str, Any],
    *,
    dedupe_key: str | None = None,
    max_attempts: int = 8,
) -> int | None:
    """Queue a job in the caller's transaction; None when `dedupe_key` is already queued."""
    row = conn.execute(
        "INSERT INTO job (kind, payload, dedupe_key, max_attempts) VALUES (%s, %s, %s, %s)"
        " ON CONFLICT (dedupe_key) DO NOTHING RETURNING id",
        (kind, Jsonb(payload), dedupe_key, max_attempts),
    ).fetchone()
    conn.execute(f"NOTIFY {CHANNEL}")  # delivered at commit, only if it commits
    if row is None:
        return None
    return int(row["id"] if isinstance(row, dict) else row[0])


def claim(conn: psycopg.Connection[Any], worker: str, lease_seconds: int) -> Job | None:
    """Take the oldest ready job (queued and due, or running with an expired lease)."""
    with conn.transaction():
        row = conn.execute(
            """
            WITH next AS (
                SELECT id FROM job
                WHERE (status = 'queued' AND run_after <= now())
                   OR (status = 'running' AND leased_until < now())
                ORDER BY run_after, id
                LIMIT 1
                FOR UPDATE SKIP LOCKED
            )
            UPDATE job SET status = 'running', attempts = job.attempts + 1, worker = %s,
                   leased_until = now() + make_interval(secs => %s),
                   started_at = coalesce(job.started_at, now())
            FROM next WHERE job.id = next.id
            RETURNING job.id, job.kind, job.payload, job.attempts, job.max_attempts, job.created_at
            """,
            (worker, lease_seconds),
        ).fetchone()
    if row is None:
        return None
    return Job(
        id=row["id"], kind=row["kind"], payload=row["payload"], attempts=row["attempts"],
        max_attempts=row["max_attempts"], worker=worker, created_at=row["created_at"],
    )


def renew(conn: psycopg.Connection[Any], job: Job, lease_seconds: int) -> None:
    """Extend our lease between stages of a long job."""
    with conn.transaction():
        cur = conn.execute(
            "UPDATE job SET leased_until = now() + make_interval(secs => %s)"
            " WHERE id = %s AND worker = %s AND status = 'running'",
            (lease_seconds, job.id, job.worker),
        )
        if cur.rowcount != 1:
            raise LeaseLost(f"job {job.id} is no longer held by {job.worker}")


def _finish(
    conn: psycopg.Connection[Any], job: Job, status: str, error: str | None, timings: dict[str, float]
) -> None:
    cur = conn.execute(
        "UPDATE job SET status = %s, last_error = %s, finished_at = now(), leased_until = NULL,"
        " timings = timings || %s WHERE id = %s AND worker = %s AND status = 'running'",
        (status, error, Jsonb(timings), job.id, job.worker),
    )
    if cur.rowcount != 1:
        raise LeaseLost(f"job {job.id} is no longer held by {job.worker}")


def complete(conn: psycopg.Connection[Any], job: Job, timings: dict[str, float]) -> None:
    """Mark done in the caller's transaction (the one that stores the job's result)."""
    _finish(conn, job, "done", None, timings)


def fail(conn: psycopg.Connection[Any], job: Job, error: str, timings: dict[str, float]) -> None:
    """Mark failed for good; `error` must hold no patient data."""
    _finish(conn, job, "failed", error, timings)


def backoff_seconds(attempts: int, base: int) -> int:
    return int(min(MAX_BACKOFF_SECONDS, base * 2 ** max(0, attempts - 1)))


def retry_later(conn: psycopg.Connection[Any], job: Job, error: str, base_seconds: int) -> int:
    """Put the job back with exponential back-off; returns the delay in seconds."""
    delay = backoff_seconds(job.attempts, base_seconds)
    cur = conn.execute(
        "UPDATE job SET status = 'queued', last_error = %s, leased_until = NULL, worker = NULL,"
        " run_after = now() + make_interval(secs => %s)"
        " WHERE id = %s AND worker = %s AND status = 'running'",
        (error, delay, job.id, job.worker),
    )
    if cur.rowcount != 1:
        raise LeaseLost(f"job {job.id} is no longer held by {job.worker}")
    return delay


def cancel(conn: psycopg.Connection[Any], dedupe_key: str) -> bool:
    """Withdraw a job that has not finished (e.g. the order was cancelled)."""
    cur = conn.execute(
        "UPDATE job SET status = 'cancelled', finished_at = now()"
        " WHERE dedupe_key = %s AND status IN ('queued', 'running')",
        (dedupe_key,),
    )
    return cur.rowcount > 0


def depth(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Jobs per status, for /metrics and /readyz."""
    rows = conn.execute("SELECT status, count(*) AS n FROM job GROUP BY status").fetchall()
    return {r["status"]: int(r["n"]) for r in rows}
