"""The one queue: analyses, HL7 order processing and result deliveries, in one PostgreSQL table.

A runner claims the most urgent ready job of the kinds it serves with FOR UPDATE SKIP LOCKED and
holds a lease on it. A runner that dies stops renewing the lease; when it runs out the job is
ready again and the crash counts as an attempt. Every state change is checked against the lease
holder inside the caller's transaction (`LeaseLost` otherwise), so a job whose lease was taken
over can never be finished twice.

Deliveries add three things, all plain columns, so one engine serves both:

* a **lane** (the destination, e.g. `BVDKDN:hl7`): at most `lane_limit` jobs of a lane run at
  once across every replica, and a lane whose destination keeps failing is closed for a while
  (its circuit breaker, table `lane`): nothing of it is claimed meanwhile, nothing else waits;
* a **series** and **seq** (a resource and its version): a job is not claimed while an earlier
  seq of the same series in the same lane is still queued or running (v2 never overtakes v1);
* the **message** as built before the first send, its id (MSH-10, Bundle id) and the peer's
  last **answer**, so a retry sends the same bytes and an operator sees what the peer said.

End states: `done`; `failed` (an analysis that cannot succeed); `rejected` (the peer refused
it; its answer is kept); `dead` (a delivery given up); `cancelled` (withdrawn). The policies
(attempts, priorities, back-off caps, breaker) are data, `mappings/queue.yaml`, passed in.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, LiteralString, Protocol

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from .db import scalar

CHANNEL = "interop_jobs"  # NOTIFY channel: runners LISTEN to wake up at once
MAX_BACKOFF_SECONDS = 600
ENDED_BADLY = ("failed", "rejected", "dead")

_COLUMNS = ("id", "kind", "payload", "attempts", "max_attempts", "priority", "lane", "series", "seq",
            "message", "message_id")
_RETURNING = ", ".join(f"job.{c}" for c in _COLUMNS)
_VISIBLE = ("id, kind, lane, series, seq, payload, priority, status, attempts, max_attempts, message_id, answer,"
            " last_error, created_at, finished_at, run_after")


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    payload: dict[str, Any]
    attempts: int
    max_attempts: int
    worker: str
    priority: int = 5
    lane: str | None = None
    series: str | None = None
    seq: int | None = None
    message: str | None = None
    message_id: str | None = None


class LeaseLost(Exception):
    """Another runner took the job over (our lease ran out): drop our result."""


class BreakerPolicy(Protocol):
    def open_for(self, failures: int) -> int | None: ...


def backoff_seconds(attempts: int, base: int, cap: int = MAX_BACKOFF_SECONDS) -> int:
    """The wait before try `attempts + 1`: `base`, doubling each attempt, at most `cap`."""
    return int(min(cap, base * 2 ** max(0, attempts - 1)))


# -- queueing ---------------------------------------------------------------------------------
def enqueue(
    conn: psycopg.Connection[Any],
    kind: str,
    payload: dict[str, Any],
    *,
    dedupe_key: str | None = None,
    max_attempts: int = 8,
    priority: int = 5,
    lane: str | None = None,
    series: str | None = None,
    seq: int | None = None,
    delay_seconds: float = 0,
) -> int | None:
    """Queue a job in the caller's transaction; None when `dedupe_key` was queued before (in
    any state: a key is never queued twice, whatever became of the first)."""
    row = conn.execute(
        "INSERT INTO job (kind, payload, dedupe_key, max_attempts, priority, lane, series, seq, run_after)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, now() + make_interval(secs => %s))"
        " ON CONFLICT (dedupe_key) DO NOTHING RETURNING id",
        (kind, Jsonb(payload), dedupe_key, max_attempts, priority, lane, series, seq, delay_seconds),
    ).fetchone()
    if row is None:
        return None
    conn.execute(f"NOTIFY {CHANNEL}")  # delivered at commit, only if it commits
    return int(row["id"])


def exists(conn: psycopg.Connection[Any], dedupe_key: str) -> bool:
    """Whether a job was ever queued under this key."""
    return conn.execute("SELECT 1 FROM job WHERE dedupe_key = %s", (dedupe_key,)).fetchone() is not None


# -- claiming ---------------------------------------------------------------------------------
_OF_KINDS = "(%(kinds)s::text[] IS NULL OR kind = ANY(%(kinds)s::text[]))"  # every kind when kinds is NULL


def _kinds(kinds: Sequence[str] | None) -> list[str] | None:
    return list(kinds) if kinds is not None else None


_READY = "((j.status = 'queued' AND j.run_after <= now()) OR (j.status = 'running' AND j.leased_until < now()))"
_IN_ORDER = ("(j.series IS NULL OR NOT EXISTS (SELECT 1 FROM job o WHERE o.lane IS NOT DISTINCT FROM j.lane"
             " AND o.series = j.series AND o.seq < j.seq AND o.status IN ('queued', 'running')))")
_LANE_OPEN = ("(j.lane IS NULL OR (NOT EXISTS (SELECT 1 FROM lane l WHERE l.name = j.lane AND l.open_until > now())"
              " AND (SELECT count(*) FROM job r WHERE r.lane = j.lane AND r.status = 'running'"
              " AND r.leased_until >= now()) < %(limit)s))")


def claim(
    conn: psycopg.Connection[Any],
    worker: str,
    lease_seconds: int,
    *,
    kinds: Sequence[str] | None = None,
    lane: str | None = None,
    lane_limit: int = 1,
) -> Job | None:
    """Take the most urgent ready job (queued and due, or running with an expired lease) of
    `kinds` (all when None), in `lane` when given. A job in a lane is only taken while its lane is
    closed to neither the breaker nor its limit of `lane_limit` running jobs."""
    with conn.transaction():
        row = conn.execute(
            f"""
            SELECT j.id, j.lane FROM job j
            WHERE {_READY}
              AND {_OF_KINDS}
              AND (%(lane)s::text IS NULL OR j.lane = %(lane)s::text)
              AND {_IN_ORDER} AND {_LANE_OPEN}
            ORDER BY j.priority, j.run_after, j.id
            LIMIT 1
            FOR UPDATE OF j SKIP LOCKED
            """,
            {"kinds": _kinds(kinds), "lane": lane, "limit": lane_limit},
        ).fetchone()
        if row is None:
            return None
        job_id, job_lane = row["id"], row["lane"]
        if job_lane is not None and not _lane_has_room(conn, job_lane, job_id, lane_limit):
            return None
        claimed = conn.execute(
            f"""
            UPDATE job SET status = 'running', attempts = job.attempts + 1, worker = %s,
                   leased_until = now() + make_interval(secs => %s),
                   started_at = coalesce(job.started_at, now())
            WHERE job.id = %s RETURNING {_RETURNING}
            """,
            (worker, lease_seconds, job_id),
        ).fetchone()
    assert claimed is not None, "the row was locked by this transaction"
    return _job(claimed, worker)


def _lane_has_room(conn: psycopg.Connection[Any], lane: str, job_id: int, limit: int) -> bool:
    """Under the lane's row lock (one claimer per lane at a time, across replicas): not closed by
    the breaker, and fewer than `limit` jobs running."""
    conn.execute("INSERT INTO lane (name) VALUES (%s) ON CONFLICT (name) DO NOTHING", (lane,))
    closed = scalar(conn, "SELECT open_until > now() FROM lane WHERE name = %s FOR UPDATE", (lane,))
    if closed:
        return False
    running = scalar(conn, "SELECT count(*) FROM job WHERE lane = %s AND status = 'running' AND id <> %s"
                           " AND leased_until >= now()", (lane, job_id))
    return int(running or 0) < limit


def _job(row: Any, worker: str) -> Job:
    r = row
    return Job(id=r["id"], kind=r["kind"], payload=r["payload"], attempts=r["attempts"],
               max_attempts=r["max_attempts"], worker=worker, priority=r["priority"],
               lane=r["lane"], series=r["series"], seq=r["seq"], message=r["message"], message_id=r["message_id"])


def renew(conn: psycopg.Connection[Any], job: Job, lease_seconds: int) -> None:
    """Extend our lease between stages of a long job."""
    with conn.transaction():
        _update(conn, job, "leased_until = now() + make_interval(secs => %s)", (lease_seconds,))


# -- ending or postponing a claimed job (in the caller's transaction) --------------------------------
def _update(conn: psycopg.Connection[Any], job: Job, changes: LiteralString, args: tuple[Any, ...]) -> None:
    """Change a job we hold; anything else means our lease was lost."""
    cur = conn.execute(sql.SQL("UPDATE job SET {} WHERE id = %s AND worker = %s AND status = 'running'").format(
        sql.SQL(changes)), (*args, job.id, job.worker))
    if cur.rowcount != 1:
        raise LeaseLost(f"job {job.id} is no longer held by {job.worker}")


def complete(conn: psycopg.Connection[Any], job: Job, timings: dict[str, float] | None = None, *,
             answer: str | None = None) -> None:
    """Done (in the transaction that stores the job's result); a peer's answer is kept."""
    _update(conn, job, "status = 'done', last_error = NULL, finished_at = now(), leased_until = NULL,"
                       " timings = timings || %s, answer = coalesce(%s, answer)", (Jsonb(timings or {}), answer))


def finish(conn: psycopg.Connection[Any], job: Job, status: str, error: str, *,
           timings: dict[str, float] | None = None, answer: str | None = None) -> None:
    """End for good without success: `failed`, `rejected` or `dead`. `error` holds no patient data."""
    if status not in ENDED_BADLY:
        raise ValueError(f"finish() ends a job {', '.join(ENDED_BADLY)}, not {status}")
    _update(conn, job, "status = %s, last_error = %s, finished_at = now(), leased_until = NULL,"
                       " timings = timings || %s, answer = coalesce(%s, answer)",
            (status, error[:500], Jsonb(timings or {}), answer))


def retry_later(conn: psycopg.Connection[Any], job: Job, error: str, delay_seconds: int, *,
                answer: str | None = None, refund: bool = False) -> int:
    """Back to queued, due in `delay_seconds`; returns the delay. `refund`: this try did not count
    (the job was not ready to run: the images are not in the PACS yet)."""
    _update(conn, job, "status = 'queued', last_error = %s, leased_until = NULL, worker = NULL,"
                       " run_after = now() + make_interval(secs => %s), answer = coalesce(%s, answer),"
                       " attempts = attempts - %s", (error[:500], delay_seconds, answer, 1 if refund else 0))
    return delay_seconds


def set_message(conn: psycopg.Connection[Any], job: Job, message_id: str, message: str) -> None:
    """Record the message about to be sent (commit before sending: a retry after a crash or a lost
    answer sends the same bytes with the same id, so the receiver can spot the duplicate)."""
    _update(conn, job, "message_id = %s, message = %s", (message_id, message))


def newer_done(conn: psycopg.Connection[Any], job: Job) -> int | None:
    """The newest seq of the same series already done in the same lane (e.g. an old version
    replayed after a newer one went): sending this one would go backwards."""
    if job.series is None or job.seq is None:
        return None
    value = scalar(conn, "SELECT max(seq) FROM job WHERE lane IS NOT DISTINCT FROM %s AND series = %s AND seq > %s"
                         " AND status = 'done'", (job.lane, job.series, job.seq))
    return None if value is None else int(value)


# -- operators ----------------------------------------------------------------------------------
def cancel(conn: psycopg.Connection[Any], dedupe_key: str) -> bool:
    """Withdraw a job that has not finished (e.g. the order was cancelled)."""
    cur = conn.execute("UPDATE job SET status = 'cancelled', finished_at = now(), leased_until = NULL"
                       " WHERE dedupe_key = %s AND status IN ('queued', 'running')", (dedupe_key,))
    return cur.rowcount > 0


def cancel_queued(conn: psycopg.Connection[Any], key_prefix: str) -> int:
    """Withdraw every queued job whose key starts with `key_prefix` (e.g. an alert's escalations)."""
    cur = conn.execute("UPDATE job SET status = 'cancelled', finished_at = now()"
                       " WHERE dedupe_key LIKE %s AND status = 'queued'", (key_prefix.replace("%", r"\%") + "%",))
    return cur.rowcount


def bury(conn: psycopg.Connection[Any], lane: str, series_prefix: str, error: str) -> int:
    """End as `dead` every queued job of a lane (e.g. a Subscription put into error)."""
    cur = conn.execute("UPDATE job SET status = 'dead', last_error = %s, finished_at = now(), leased_until = NULL"
                       " WHERE lane = %s AND status = 'queued' AND coalesce(series, '') LIKE %s",
                       (error, lane, series_prefix + "%"))
    return cur.rowcount


def replay(conn: psycopg.Connection[Any], job_id: int, kinds: Sequence[str] | None = None) -> bool:
    """An operator puts a `failed`, `rejected` or `dead` job back (attempts reset; a delivery is
    built again, with a new id). False when there is no such job or it did not end badly."""
    cur = conn.execute(
        "UPDATE job SET status = 'queued', attempts = 0, run_after = now(), leased_until = NULL, worker = NULL,"
        f" message = NULL, message_id = NULL, finished_at = NULL WHERE id = %(id)s AND status = ANY(%(ended)s)"
        f" AND {_OF_KINDS}", {"id": job_id, "ended": list(ENDED_BADLY), "kinds": _kinds(kinds)})
    if cur.rowcount != 1:
        return False
    conn.execute(f"NOTIFY {CHANNEL}")
    return True


def status_of(conn: psycopg.Connection[Any], job_id: int, kinds: Sequence[str] | None = None) -> str | None:
    status: str | None = scalar(conn, f"SELECT status FROM job WHERE id = %(id)s AND {_OF_KINDS}",
                                {"id": job_id, "kinds": _kinds(kinds)})
    return status


def listing(conn: psycopg.Connection[Any], statuses: Sequence[str], kinds: Sequence[str], *,
            limit: int = 500) -> list[dict[str, Any]]:
    """Jobs in the given statuses (oldest first), for operators. Never the message (patient data);
    the peer's answer is kept, being what an operator acts on."""
    rows = conn.execute(f"SELECT {_VISIBLE} FROM job WHERE status = ANY(%s) AND kind = ANY(%s) ORDER BY id LIMIT %s",
                        (list(statuses), list(kinds), limit)).fetchall()
    return [dict(r) for r in rows]


def series_jobs(conn: psycopg.Connection[Any], series: str) -> list[dict[str, Any]]:
    """Every job of one series (all versions, all lanes), for operators and tests."""
    rows = conn.execute(f"SELECT {_VISIBLE} FROM job WHERE series = %s ORDER BY seq, id", (series,)).fetchall()
    return [dict(r) for r in rows]


def job_row(conn: psycopg.Connection[Any], job_id: int) -> dict[str, Any] | None:
    """One job, every column (the message too): for the runner's own checks and for tests."""
    row = conn.execute("SELECT * FROM job WHERE id = %s", (job_id,)).fetchone()
    return None if row is None else dict(row)


def depth(conn: psycopg.Connection[Any], kinds: Sequence[str] | None = None) -> dict[str, int]:
    """Jobs per status (of `kinds`, or all), for /metrics and tests."""
    rows = conn.execute(f"SELECT status, count(*) AS n FROM job WHERE {_OF_KINDS} GROUP BY status",
                        {"kinds": _kinds(kinds or None)}).fetchall()
    return {r["status"]: int(r["n"]) for r in rows}


# -- lanes: one per destination, with a circuit breaker ------------------------------------------
def lane_succeeded(conn: psycopg.Connection[Any], lane: str) -> None:
    """The destination answered: close the breaker."""
    conn.execute("INSERT INTO lane (name, last_success_at) VALUES (%s, now()) ON CONFLICT (name) DO UPDATE"
                 " SET failures = 0, open_until = NULL, last_success_at = now()", (lane,))


def lane_failed(conn: psycopg.Connection[Any], lane: str, error: str, breaker: BreakerPolicy) -> int | None:
    """One more transport failure in a row; returns the seconds the lane is now closed (None: open)."""
    conn.execute("INSERT INTO lane (name) VALUES (%s) ON CONFLICT (name) DO NOTHING", (lane,))
    failures = int(scalar(conn, "UPDATE lane SET failures = failures + 1, last_error = %s, last_failure_at = now()"
                                " WHERE name = %s RETURNING failures", (error[:500], lane)) or 0)
    closed_for = breaker.open_for(failures)
    if closed_for is not None:
        conn.execute("UPDATE lane SET open_until = now() + make_interval(secs => %s) WHERE name = %s",
                     (closed_for, lane))
    return closed_for


def ready_lanes(conn: psycopg.Connection[Any], kinds: Sequence[str], lane_limit: int) -> list[str]:
    """Lanes with a job ready to claim now (breaker not open, below the limit), most urgent first."""
    rows = conn.execute(
        f"SELECT j.lane, min(j.priority) AS p FROM job j WHERE j.lane IS NOT NULL AND {_READY}"
        f" AND j.kind = ANY(%(kinds)s) AND {_LANE_OPEN} GROUP BY j.lane ORDER BY 2, 1",
        {"kinds": list(kinds), "limit": lane_limit}).fetchall()
    return [r["lane"] for r in rows]


def lanes(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Every lane's breaker state and waiting jobs, for /metrics and operators."""
    rows = conn.execute(
        "SELECT l.name, l.failures, l.open_until > now() AS open, l.open_until, l.last_error, l.last_success_at,"
        " (SELECT count(*) FROM job j WHERE j.lane = l.name AND j.status IN ('queued', 'running')) AS waiting"
        " FROM lane l ORDER BY l.name").fetchall()
    return [dict(r) for r in rows]
