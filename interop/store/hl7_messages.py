"""HL7 v2 messages as received over MLLP: stored before they are acknowledged, then processed.

The listener's write is ONE statement on an autocommit connection: the message and, when it is
accepted, its `process-hl7` job and the NOTIFY that wakes a worker (one round trip, one commit).
Only messages that were accepted hold their control id (MSH-3, MSH-4, MSH-10): a rejected message
may be sent again once fixed, and an operator may `release` an accepted one. A second message
with a held control id is a duplicate when its content is the same, and is refused otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from .queue import CHANNEL

PROCESS_KIND = "process-hl7"
_HELD = "status <> 'rejected' AND released_at IS NULL AND control_id IS NOT NULL"  # as the unique index says

_INSERT = """
    INSERT INTO hl7_message (sending_application, sending_facility, receiving_application,
        receiving_facility, control_id, message_type, message_structure, version, processing_id,
        accept_ack_type, app_ack_type, charset, raw, content_sha256, ack_code, ack_error, status)
    VALUES (%(sa)s, %(sf)s, %(ra)s, %(rf)s, %(cid)s, %(type)s, %(structure)s, %(version)s,
        %(processing)s, %(accept)s, %(app)s, %(charset)s, %(raw)b, %(sha)b, %(ack)s, %(ack_error)s, %(status)s)
"""

# Accepted: store, queue, notify; or, when the control id is held, find the holder. The job is in
# its sender's series, ordered by arrival: several workers still process one sender's messages in
# the order they came (an order and then its cancel), as HL7's sequential interfaces expect.
ACCEPT_SQL = f"""
WITH ins AS (
    {_INSERT}
    ON CONFLICT (sending_application, sending_facility, control_id) WHERE {_HELD} DO NOTHING
    RETURNING id
), queued AS (
    INSERT INTO job (kind, payload, dedupe_key, max_attempts, priority, series, seq)
    SELECT %(kind)s, jsonb_build_object('message', ins.id), 'hl7:' || ins.id, %(max_attempts)s, %(priority)s,
           'hl7:' || coalesce(%(sa)s, '') || '|' || coalesce(%(sf)s, ''), ins.id FROM ins
    RETURNING id
), notified AS (
    SELECT pg_notify('{CHANNEL}', '') FROM queued
)
SELECT ins.id, true AS inserted, NULL::text AS ack_code, true AS same, (SELECT count(*) FROM notified) AS n FROM ins
UNION ALL
SELECT m.id, false, m.ack_code, m.content_sha256 = %(sha)b, 0 FROM hl7_message m
WHERE NOT EXISTS (SELECT 1 FROM ins)
  AND m.sending_application = %(sa)s AND m.sending_facility = %(sf)s AND m.control_id = %(cid)s AND {_HELD}
"""

FIND_SQL = (f"SELECT id, false, ack_code, content_sha256 = %(sha)b, 0 FROM hl7_message WHERE sending_application = %(sa)s"
            f" AND sending_facility = %(sf)s AND control_id = %(cid)s AND {_HELD}")

REJECT_SQL = _INSERT + " RETURNING id"


@dataclass(frozen=True)
class Stored:
    id: int
    duplicate: bool          # the control id was held by an earlier message
    same_content: bool       # ... whose content is the same (a resend), not another message
    ack_code: str | None     # what the earlier message was answered


def stored(row: Any) -> Stored:
    return Stored(id=int(row[0]), duplicate=not row[1], same_content=bool(row[3]), ack_code=row[2])


# -- the worker's side ----------------------------------------------------------------------------
def read(conn: psycopg.Connection[Any], message_id: int) -> dict[str, Any] | None:
    """What the worker needs of a stored message (its raw bytes, type, sender and ack wishes)."""
    row = conn.execute("SELECT id, message_type, sending_application, sending_facility, receiving_application,"
                       " receiving_facility, control_id, version, processing_id, accept_ack_type, app_ack_type,"
                       " charset, raw FROM hl7_message WHERE id = %s", (message_id,)).fetchone()
    return None if row is None else dict(row)


def mark_processed(conn: psycopg.Connection[Any], message_id: int, app_ack: str | None = None) -> None:
    conn.execute("UPDATE hl7_message SET status = 'processed', processed_at = now(), error = NULL,"
                 " app_ack_code = %s WHERE id = %s", (app_ack, message_id))


def mark_failed(conn: psycopg.Connection[Any], message_id: int, reason: str, app_ack: str | None = None) -> None:
    conn.execute("UPDATE hl7_message SET status = 'failed', processed_at = now(), error = %s, app_ack_code = %s"
                 " WHERE id = %s", (reason[:500], app_ack, message_id))


# -- operators ------------------------------------------------------------------------------------
_LISTED = ("id, received_at, processed_at, status, sending_application, sending_facility, control_id, message_type,"
           " version, ack_code, ack_error, app_ack_type, app_ack_code, error, released_at")


def listing(conn: psycopg.Connection[Any], statuses: tuple[str, ...], limit: int = 500) -> list[dict[str, Any]]:
    """Messages in the given statuses, newest first: what and why, never the content."""
    rows = conn.execute(f"SELECT {_LISTED} FROM hl7_message WHERE status = ANY(%s) ORDER BY id DESC LIMIT %s",
                        (list(statuses), limit)).fetchall()
    return [dict(r) for r in rows]


def release(conn: psycopg.Connection[Any], message_id: int) -> bool:
    """Let a held control id be used again (the sender resends a message it fixed or lost).
    False when the message does not hold one (unknown, rejected, or already released)."""
    cur = conn.execute(f"UPDATE hl7_message SET released_at = now() WHERE id = %s AND {_HELD}", (message_id,))
    return cur.rowcount == 1


def counts(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Messages per status, for /metrics."""
    return {r["status"]: int(r["n"]) for r in
            conn.execute("SELECT status, count(*) AS n FROM hl7_message GROUP BY status").fetchall()}
