"""The HL7 v2 MLLP listener: bytes on a socket -> one durable row -> ACK.

For each frame: read the MSH by plain splitting and check the message against
mappings/hl7v2/accepted_messages.yaml (microseconds; the full parse and the FHIR mapping run
later, in a `process-hl7` job). Then ONE statement on an autocommit connection stores the
message and, when it is accepted, queues its job and notifies the workers: one round trip,
one commit. Only after that statement returns is the ACK written. A message acknowledged AA
(or CA) is therefore in the database even if this process dies the next instant.

Duplicates (the same MSH-10 from the same MSH-3/MSH-4) are not stored or queued again: they
get the code stored the first time. Rejected messages (AR/AE) are stored too, with the
reason; an ACK received is neither stored nor answered.

Database unavailable: the connection is closed without an answer. Every MLLP sender treats a
missing ACK as "not delivered" and sends again (on a new connection), which is exactly what
is wanted; an AE or AR would make many senders give up on the message or park it for a
person. Nothing is acknowledged before it is stored.

Logs carry the row id, message type, sizes and the ACK code: never patient data, and never
the control id itself (a short hash when there is no row).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ..config import Settings
from . import ack, mllp
from .errors import AckCode, Hl7Error, TooLarge
from .header import Accepted, Header, check, load_table, read, table_path

log = logging.getLogger("interop.hl7.listener")

READ_BYTES = 256 * 1024
DB_TIMEOUT_SECONDS = 5.0  # waiting for a pooled connection before giving up on a message
STATEMENT_TIMEOUT_MS = 10_000  # a store that hangs longer is abandoned (no ACK; the sender retries)
POOL_MAX = 8
JOB_KIND = "process-hl7"

# One statement: store, queue (accepted only), notify; or find the earlier copy of a duplicate.
STORE_SQL = """
WITH ins AS (
    INSERT INTO hl7_message (sending_application, sending_facility, receiving_application,
        receiving_facility, control_id, message_type, message_structure, version, processing_id,
        accept_ack_type, app_ack_type, charset, raw, ack_code, ack_error, status)
    VALUES (%(sa)s, %(sf)s, %(ra)s, %(rf)s, %(cid)s, %(type)s, %(structure)s, %(version)s,
        %(processing)s, %(accept)s, %(app)s, %(charset)s, %(raw)b, %(ack)s, %(ack_error)s, %(status)s)
    ON CONFLICT (sending_application, sending_facility, control_id) DO NOTHING
    RETURNING id, status
), queued AS (
    INSERT INTO job (kind, payload, dedupe_key, max_attempts)
    SELECT %(kind)s, jsonb_build_object('message', ins.id), 'hl7:' || ins.id, %(max_attempts)s
    FROM ins WHERE ins.status = 'accepted'
    RETURNING id
), notified AS (
    SELECT pg_notify('interop_jobs', '') FROM queued
)
SELECT ins.id, true AS inserted, NULL::text AS ack_code, (SELECT count(*) FROM notified) AS notified
FROM ins
UNION ALL
SELECT m.id, false, m.ack_code, 0 FROM hl7_message m
WHERE NOT EXISTS (SELECT 1 FROM ins)
  AND m.sending_application = %(sa)s AND m.sending_facility = %(sf)s AND m.control_id = %(cid)s
"""

FIND_SQL = ("SELECT id, false, ack_code, 0 FROM hl7_message"
            " WHERE sending_application = %s AND sending_facility = %s AND control_id = %s")

_TRANSIENT = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)


class DatabaseUnavailable(Exception):
    """The message could not be stored now; the sender must send it again."""


@dataclass(frozen=True)
class Stored:
    id: int
    duplicate: bool
    ack_code: str | None  # the code stored with the earlier copy, for a duplicate


def _clean(value: str | None) -> str | None:
    return None if value is None else value.replace("\x00", "")


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:10]


_BASE = {AckCode.CA: AckCode.AA, AckCode.CE: AckCode.AE, AckCode.CR: AckCode.AR}


class Listener:
    """The per-message logic on top of the framer; one instance per process."""

    def __init__(self, settings: Settings, pool: AsyncConnectionPool[Any], table: dict[str, Accepted]):
        self.settings = settings
        self.pool = pool
        self.table = table
        self.max_bytes = settings.mllp_max_bytes
        self.idle = settings.mllp_idle_seconds
        self.counts = {"messages": 0, "accepted": 0, "rejected": 0, "duplicates": 0, "unavailable": 0}

    # -- storage ---------------------------------------------------------------------------
    async def store(self, raw: bytes, header: Header | None, problem: Hl7Error | None, code: AckCode) -> Stored:
        h = header
        params = {
            "sa": _clean(h.sending_application) if h else "", "sf": _clean(h.sending_facility) if h else "",
            "ra": _clean(h.receiving_application) if h else "", "rf": _clean(h.receiving_facility) if h else "",
            # no control id read: NULL, never a duplicate of anything
            "cid": _clean(h.control_id) or None if h else None,
            "type": _clean(h.message_type) or None if h else None,
            "structure": _clean(h.structure) or None if h else None,
            "version": _clean(h.version) or None if h else None,
            "processing": _clean(h.processing_id) or None if h else None,
            "accept": _clean(h.accept_ack_type) or None if h else None,
            "app": _clean(h.app_ack_type) or None if h else None,
            "charset": _clean(h.charset) or None if h else None,
            "raw": raw, "ack": code.value, "ack_error": problem.message if problem else None,
            "status": "accepted" if problem is None else "rejected",
            "kind": JOB_KIND, "max_attempts": self.settings.job_max_attempts,
        }
        try:
            async with self.pool.connection(timeout=DB_TIMEOUT_SECONDS) as conn:
                cur = await conn.execute(STORE_SQL, params)
                row = await cur.fetchone()
                if row is None:  # a concurrent copy committed while our statement ran
                    cur = await conn.execute(FIND_SQL, (params["sa"], params["sf"], params["cid"]))
                    row = await cur.fetchone()
        except _TRANSIENT as exc:
            raise DatabaseUnavailable(type(exc).__name__) from exc
        if row is None:
            raise DatabaseUnavailable("the message was neither stored nor found")
        return Stored(id=int(row[0]), duplicate=not row[1], ack_code=row[2])

    # -- one message -----------------------------------------------------------------------
    async def message(self, raw: bytes, too_large: mllp.FrameTooLarge | None = None) -> bytes | None:
        """The ACK for one frame (None: no answer). Raises DatabaseUnavailable."""
        header: Header | None
        problem: Hl7Error | None
        try:
            header, ids = read(raw)
            problem = check(header, ids, self.table)
        except Hl7Error as exc:
            header, problem = exc.header, exc
        if too_large is not None:
            problem = TooLarge(too_large.limit)
        if header is not None and header.message_code == "ACK":
            log.debug("ACK received and ignored (%d bytes)", len(raw))
            return None
        code = ack.answer_code(header, problem)
        stored = await self.store(raw, header, problem, code)
        self.counts["messages"] += 1
        text = ""
        if stored.duplicate:
            self.counts["duplicates"] += 1
            earlier = AckCode(stored.ack_code) if stored.ack_code in AckCode.__members__ else code
            base = _BASE.get(earlier, earlier)
            code = base.commit if ack.enhanced(header) else base
            if code.accepted:
                problem = None
                text = "duplicate: already received"
            elif problem is None or problem.ack_code != base:
                problem = Hl7Error("duplicate of a message rejected earlier")
                problem.ack_code = base
        if code.accepted:
            self.counts["accepted"] += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("message %d %s stored (%d bytes), %s%s", stored.id, header.message_type if header else "",
                          len(raw), code.value, " (duplicate)" if stored.duplicate else "")
        else:
            self.counts["rejected"] += 1
            log.info("message %d %s (%d bytes) answered %s: %s%s", stored.id,
                     header.message_type if header else "(no header)", too_large.size if too_large else len(raw),
                     code.value, problem.message if problem else "", " (duplicate)" if stored.duplicate else "")
        if not ack.should_send(header, code):
            return None
        return ack.build(header, code, None if code.accepted else problem, text)

    # -- one connection --------------------------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        framer = mllp.Framer(self.max_bytes)
        frames = 0
        reason = "closed by peer"
        try:
            while True:
                try:
                    async with asyncio.timeout(self.idle):
                        data = await reader.read(READ_BYTES)
                except TimeoutError:
                    reason = "idle timeout"
                    break
                if not data:
                    if framer.pending:
                        reason = f"closed by peer inside a frame ({framer.pending} bytes dropped)"
                    break
                close = False
                for item in framer.feed(data):
                    frames += 1
                    if isinstance(item, mllp.FrameTooLarge):
                        answer = await self.message(item.head, too_large=item)
                        close, reason = True, "message too large"
                    else:
                        answer = await self.message(item)
                    if answer is not None:
                        writer.write(mllp.frame(answer))
                    if close:
                        break
                await writer.drain()
                if close:
                    break
                if frames == 0 and framer.garbage_bytes > self.max_bytes:
                    reason = "no MLLP frame"
                    break
        except DatabaseUnavailable as exc:
            self.counts["unavailable"] += 1
            reason = f"database unavailable ({exc}): closed without ACK so that the sender retries"
            log.warning("MLLP connection %s", reason)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            reason = f"connection error {type(exc).__name__}"
        except asyncio.CancelledError:
            reason = "listener stopping"
            raise
        except Exception:  # a bug must cost one connection, never the listener
            log.exception("MLLP connection failed")
            reason = "internal error"
        finally:
            if framer.garbage_bytes:
                log.info("MLLP connection: %d bytes outside frames discarded", framer.garbage_bytes)
            level = logging.DEBUG if reason == "closed by peer" else logging.INFO
            log.log(level, "MLLP connection done: %d frame(s), %s", frames, reason)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, asyncio.CancelledError):
                pass


async def serve(settings: Settings, ready: asyncio.Event | None = None) -> None:
    """Listen on INTEROP_MLLP_HOST:INTEROP_MLLP_PORT until cancelled."""
    if not settings.database_url:
        raise RuntimeError("the MLLP listener needs DATABASE_URL")
    table = load_table(table_path(settings.mappings_dir))
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        settings.database_url, min_size=1, max_size=POOL_MAX, kwargs={"autocommit": True, "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"},
        open=False, name="interop-mllp", timeout=DB_TIMEOUT_SECONDS,
    )
    await pool.open(wait=False)  # start even while the database is down: messages wait for it
    listener = Listener(settings, pool, table)
    connections: set[asyncio.Task[Any]] = set()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connections.add(task)
        try:
            await listener.handle(reader, writer)
        finally:
            connections.discard(task)

    server = await asyncio.start_server(on_connect, settings.mllp_host, settings.mllp_port, limit=READ_BYTES)
    log.info("MLLP listener on %s:%s (max %d bytes a message, idle timeout %ss)", settings.mllp_host,
             settings.mllp_port, settings.mllp_max_bytes, settings.mllp_idle_seconds)
    if ready is not None:
        ready.set()
    try:
        await server.serve_forever()
    finally:
        server.close()
        for task in list(connections):
            task.cancel()  # a message stored but not yet ACKed is answered as a duplicate when resent
        if connections:
            await asyncio.gather(*connections, return_exceptions=True)
        await pool.close()
        log.info("MLLP listener stopped: %s", ", ".join(f"{k} {v}" for k, v in listener.counts.items()))


def main(settings: Settings) -> None:
    """Run the listener until SIGTERM or SIGINT."""

    async def run() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await serve(settings)
        except asyncio.CancelledError:
            pass

    asyncio.run(run())
