"""The outbox: results waiting to go out, one row per (channel, destination, resource version).

Same pattern as the job queue (`interop.store.jobs`): rows are claimed with FOR UPDATE SKIP
LOCKED under a lease that counts as an attempt, every state change is checked against the
lease holder (`LeaseLost` otherwise), back-off doubles from a base and is capped (the job
queue's `backoff_seconds`). What differs is ordering and the end states:

* Claim order: priority (0 = a critical finding), then due time, then id; and never a version
  while an older version of the same resource for the same destination is still pending or
  being sent, so a hospital sees P before F, never F then a stale P.
* End states: `sent` (AA), `rejected` (the peer answered AE/AR and we stopped; its answer is
  kept in `last_answer`), `dead` (no acceptable answer after `MAX_ATTEMPTS` tries, or the
  message could not be built). `dead_letters()` lists both kinds; `replay()` puts one back.

Rules for negative acknowledgements (HL7 v2.5.1 chapter 2, original acknowledgement mode):

* AE (application error: the receiver found an error in the message content). Sending the same
  message again gets the same answer, so the row is `rejected` at once, with the answer kept;
  an operator fixes the data or the mapping and calls `replay()`.
* AR (application reject: the header failed validation, or the receiving application could not
  process the message "for reasons unrelated to its content or format (system down, internal
  error)", which the standard says the sender may resend later). Retried with back-off up to
  `REJECT_ATTEMPTS['AR']` attempts in all, then `rejected` with the last answer kept.
* CE / CR (the enhanced-mode commit codes, should a peer use them) are treated as AE / AR.
No answer (refused, reset, timeout) or a garbage answer is transient: retried with back-off.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from ..hl7.errors import AckCode
from ..store.jobs import LeaseLost, backoff_seconds

CHANNEL = "interop_outbox"  # NOTIFY channel: a sender can LISTEN to wake up at once
MAX_ATTEMPTS = 100          # transient failures before `dead` (~16 h with the 10-minute cap)
# Attempts in all (transient failures included) before an AE/AR answer makes the row `rejected`.
REJECT_ATTEMPTS = {AckCode.AE: 1, AckCode.CE: 1, AckCode.AR: 3, AckCode.CR: 3}

CHANNELS = ("hl7", "fhir", "rest-hook")
STATUSES = ("pending", "sending", "sent", "rejected", "dead")

__all__ = ["OutboxItem", "LeaseLost", "enqueue", "claim", "set_message", "mark_sent", "mark_rejected",
           "retry_later", "mark_dead", "dead_letters", "replay", "items", "depth", "listing",
           "newer_sent_version", "keep_answer", "fail_transient"]


@dataclass(frozen=True)
class OutboxItem:
    id: int
    channel: str
    destination: str
    resource_type: str
    resource_id: str
    version: int
    priority: int
    attempts: int
    worker: str
    payload: str | None
    control_id: str | None
    created_at: datetime

    @property
    def site_code(self) -> str:
        """The site part of a `<SITE>:<name>` destination."""
        return self.destination.split(":", 1)[0]


def enqueue(
    conn: psycopg.Connection[Any],
    channel: str,
    destination: str,
    resource_type: str,
    resource_id: str,
    version: int,
    priority: int = 5,
) -> int | None:
    """Queue one resource version for one destination, in the caller's transaction.
    None when that version is already queued (or sent) for that destination."""
    row = conn.execute(
        "INSERT INTO outbox (channel, destination, resource_type, resource_id, version, priority)"
        " VALUES (%s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (channel, destination, resource_type, resource_id, version) DO NOTHING RETURNING id",
        (channel, destination, resource_type, resource_id, int(version), int(priority)),
    ).fetchone()
    if row is None:
        return None
    conn.execute(f"NOTIFY {CHANNEL}")  # delivered at commit, only if it commits
    return int(row["id"] if isinstance(row, dict) else row[0])


_COLUMNS = "id, channel, destination, resource_type, resource_id, version, priority, attempts, payload," \
           " control_id, created_at"


def _item(row: Any, worker: str) -> OutboxItem:
    r = row if isinstance(row, dict) else dict(zip([c.strip() for c in _COLUMNS.split(",")], row))
    return OutboxItem(
        id=r["id"], channel=r["channel"], destination=r["destination"], resource_type=r["resource_type"],
        resource_id=r["resource_id"], version=r["version"], priority=r["priority"], attempts=r["attempts"],
        worker=worker, payload=r["payload"], control_id=r["control_id"], created_at=r["created_at"],
    )


def claim(
    conn: psycopg.Connection[Any], worker: str, lease_seconds: int, *, channel: str | None = None
) -> OutboxItem | None:
    """Take the most urgent ready row (pending and due, or sending with an expired lease)."""
    with conn.transaction():
        row = conn.execute(
            f"""
            WITH next AS (
                SELECT o.id FROM outbox o
                WHERE ((o.status = 'pending' AND o.run_after <= now())
                       OR (o.status = 'sending' AND o.leased_until < now()))
                  AND (%(channel)s::text IS NULL OR o.channel = %(channel)s::text)
                  AND NOT EXISTS (
                      SELECT 1 FROM outbox older
                      WHERE older.channel = o.channel AND older.destination = o.destination
                        AND older.resource_type = o.resource_type AND older.resource_id = o.resource_id
                        AND older.version < o.version AND older.status IN ('pending', 'sending'))
                ORDER BY o.priority, o.run_after, o.id
                LIMIT 1
                FOR UPDATE SKIP LOCKED
            )
            UPDATE outbox SET status = 'sending', attempts = outbox.attempts + 1, worker = %(worker)s,
                   leased_until = now() + make_interval(secs => %(lease)s)
            FROM next WHERE outbox.id = next.id
            RETURNING {", ".join("outbox." + c.strip() for c in _COLUMNS.split(","))}
            """,
            {"channel": channel, "worker": worker, "lease": lease_seconds},
        ).fetchone()
    return None if row is None else _item(row, worker)


def _update(conn: psycopg.Connection[Any], item: OutboxItem, sql: str, args: tuple[Any, ...]) -> None:
    cur = conn.execute(f"UPDATE outbox SET {sql} WHERE id = %s AND worker = %s AND status = 'sending'",
                       (*args, item.id, item.worker))
    if cur.rowcount != 1:
        raise LeaseLost(f"outbox item {item.id} is no longer held by {item.worker}")


def set_message(conn: psycopg.Connection[Any], item: OutboxItem, control_id: str, payload: str) -> None:
    """Record the message about to be sent (commit before sending: a retry after a crash or a
    lost ACK sends the same bytes with the same MSH-10, so the receiver can spot the duplicate)."""
    _update(conn, item, "control_id = %s, payload = %s", (control_id, payload))


def mark_sent(conn: psycopg.Connection[Any], item: OutboxItem, answer: str, control_id: str) -> None:
    """The peer accepted (AA): done for good; its ACK is kept."""
    _update(conn, item, "status = 'sent', sent_at = now(), leased_until = NULL, last_answer = %s,"
                        " control_id = %s, last_error = NULL", (answer, control_id))
    if item.resource_type == "DiagnosticReport":  # the province's turnaround counts delivery
        from ..analytics import facts

        facts.record(conn, item.resource_id, event="delivered")


def mark_rejected(
    conn: psycopg.Connection[Any],
    item: OutboxItem,
    answer: str,
    reason: str,
    *,
    code: AckCode | str | None = None,
    base_seconds: int = 5,
) -> str:
    """The peer answered AE/AR (`code`, else MSA-1 read from `answer`). Keeps the answer and
    applies the rules in the module docstring; returns the new status ('pending' or 'rejected')."""
    if code is None:
        from .mllp_client import parse_ack  # pure; imported here to keep this module channel-neutral

        code = parse_ack(answer).code
    limit = REJECT_ATTEMPTS.get(code if isinstance(code, AckCode) else AckCode(code.strip().upper()), 1)
    if item.attempts < limit:
        delay = backoff_seconds(item.attempts, base_seconds)
        _update(conn, item, "status = 'pending', leased_until = NULL, worker = NULL, last_answer = %s,"
                            " last_error = %s, run_after = now() + make_interval(secs => %s)",
                (answer, reason, delay))
        return "pending"
    _update(conn, item, "status = 'rejected', leased_until = NULL, last_answer = %s, last_error = %s",
            (answer, reason))
    return "rejected"


def retry_later(conn: psycopg.Connection[Any], item: OutboxItem, error: str, base_seconds: int) -> int:
    """No (usable) answer: back to pending with exponential back-off; returns the delay."""
    delay = backoff_seconds(item.attempts, base_seconds)
    _update(conn, item, "status = 'pending', leased_until = NULL, worker = NULL, last_error = %s,"
                        " run_after = now() + make_interval(secs => %s)", (error, delay))
    return delay


def mark_dead(conn: psycopg.Connection[Any], item: OutboxItem, error: str) -> None:
    """Give up (too many attempts, or the message cannot be built); `error` holds no patient data."""
    _update(conn, item, "status = 'dead', leased_until = NULL, last_error = %s", (error,))


_VISIBLE = ("id, channel, destination, resource_type, resource_id, version, priority, status, attempts,"
            " control_id, last_answer, last_error, created_at, sent_at, run_after")


def dead_letters(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Rows that stopped without an AA (`rejected` with the peer's answer, or `dead`), oldest first."""
    rows = conn.execute(
        f"SELECT {_VISIBLE} FROM outbox WHERE status IN ('rejected', 'dead') ORDER BY id").fetchall()
    return [dict(r) for r in rows]


def items(conn: psycopg.Connection[Any], resource_type: str, resource_id: str) -> list[dict[str, Any]]:
    """Every delivery of one resource (all versions, all destinations), for operators and the API."""
    rows = conn.execute(
        f"SELECT {_VISIBLE} FROM outbox WHERE resource_type = %s AND resource_id = %s ORDER BY version, id",
        (resource_type, resource_id)).fetchall()
    return [dict(r) for r in rows]


def replay(conn: psycopg.Connection[Any], item_id: int) -> bool:
    """An operator puts a `dead` or `rejected` row back to pending (attempts reset). The message
    is built again with a new control id; the old answer stays in `last_answer` until the next one.
    False when the row does not exist or is not dead/rejected."""
    cur = conn.execute(
        "UPDATE outbox SET status = 'pending', attempts = 0, run_after = now(), leased_until = NULL,"
        " worker = NULL, payload = NULL, control_id = NULL WHERE id = %s AND status IN ('rejected', 'dead')",
        (item_id,),
    )
    if cur.rowcount != 1:
        return False
    conn.execute(f"NOTIFY {CHANNEL}")
    return True


def listing(conn: psycopg.Connection[Any], statuses: tuple[str, ...] = ("rejected", "dead"), *,
            channel: str | None = None, limit: int = 500) -> list[dict[str, Any]]:
    """Rows in the given statuses (oldest first), for the operators' API. No payload: it holds
    patient data; the peer's answer (`last_answer`) is kept, being what an operator acts on."""
    rows = conn.execute(
        f"SELECT {_VISIBLE} FROM outbox WHERE status = ANY(%s)"
        " AND (%s::text IS NULL OR channel = %s::text) ORDER BY id LIMIT %s",
        (list(statuses), channel, channel, limit)).fetchall()
    return [dict(r) for r in rows]


def newer_sent_version(conn: psycopg.Connection[Any], item: OutboxItem) -> int | None:
    """The newest version of the same resource already sent to the same destination after this
    one (e.g. an old version replayed after a newer one went): sending it would go backwards."""
    row = conn.execute(
        "SELECT max(version) AS v FROM outbox WHERE channel = %s AND destination = %s AND resource_type = %s"
        " AND resource_id = %s AND version > %s AND status = 'sent'",
        (item.channel, item.destination, item.resource_type, item.resource_id, item.version),
    ).fetchone()
    value = None if row is None else (row["v"] if isinstance(row, dict) else row[0])
    return None if value is None else int(value)


def keep_answer(conn: psycopg.Connection[Any], item: OutboxItem, answer: str) -> None:
    """Record the peer's answer on a row still held (a transient failure's body, say)."""
    _update(conn, item, "last_answer = %s", (answer[:20000],))


def fail_transient(conn: psycopg.Connection[Any], item: OutboxItem, error: str, base_seconds: int,
                   max_attempts: int, answer: str | None = None) -> int | None:
    """A transient failure: back off, or `dead` once `max_attempts` are spent. Returns the delay,
    None when the row is now dead. One transaction."""
    with conn.transaction():
        if answer:
            keep_answer(conn, item, answer)
        if item.attempts >= max_attempts:
            mark_dead(conn, item, f"gave up after {item.attempts} attempts: {error}"[:500])
            return None
        return retry_later(conn, item, error[:500], base_seconds)


def depth(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Rows per status, for /metrics."""
    rows = conn.execute("SELECT status, count(*) AS n FROM outbox GROUP BY status").fetchall()
    return {(r["status"] if isinstance(r, dict) else r[0]): int(r["n"] if isinstance(r, dict) else r[1])
            for r in rows}
