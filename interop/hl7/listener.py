"""The HL7 v2 MLLP listener: bytes on a socket -> one durable row -> ACK.

For each frame: read the MSH by plain splitting and check the message against
mappings/hl7v2/accepted_messages.yaml (microseconds; the full parse and the FHIR mapping run
later, in a `process-hl7` job). Then ONE statement on an autocommit connection stores the
message and, when it is accepted, queues its job and notifies the workers
(`interop.store.hl7_messages`). Only after that statement returns is the ACK written. A message
acknowledged AA (or CA) is therefore in the database even if this process dies the next instant.

Every frame gets an answer unless the database is down: a header the hub cannot take (too long,
odd characters, an unknown version) is AR with an ERR naming the field, and a fault of the hub's
own while reading one message is AR with ERR 207, that message stored as rejected; the
connection stays open for the next message. Only messages that were accepted hold their control
id (MSH-3/MSH-4/MSH-10): the same message sent again gets the first answer and is not processed
again; another message with a held control id is refused (AR, ERR 205); a rejected message can
be sent again once fixed.

Database unavailable: the connection is closed without an answer. Every MLLP sender treats a
missing ACK as "not delivered" and sends again (on a new connection), which is exactly what
is wanted; an AE or AR would make many senders give up on the message or park it for a
person. Nothing is acknowledged before it is stored.

TLS (INTEROP_TLS_CERT/KEY): every connection starts with a TLS handshake (1.2 at least), done
by the listener itself so that a failed one (a plain-text sender, a certificate the hub does not
trust, none where INTEROP_TLS_CLIENT_CA asks for one, a silent peer) is logged in one line with
the peer's address and the reason, and costs that connection only. With INTEROP_TLS_CLIENT_CA a
sender must present a certificate signed by it. A site that pins certificates in the sites file
(`tls_client_certs`, SHA-256 fingerprints) takes messages in its name (MSH-4) only from a
connection whose certificate is one of them: any other is answered AR with an ERR and stored as
rejected, like every refused message. Sites without pins are not affected.

Logs carry the row id, message type, sizes and the ACK code: never patient data, and never
the control id itself.
"""
from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import signal
import ssl
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from .. import policies
from .. import tls as hub_tls
from ..config import Settings
from ..sites import Sites
from ..store import hl7_messages
from . import ack, charset, mllp
from .errors import AckCode, DuplicateControlId, ErrorCode, Hl7Error, InternalError, TooLarge
from .header import Accepted, Header, check, load_table, read, table_path

log = logging.getLogger("interop.hl7.listener")

READ_BYTES = 256 * 1024
DB_TIMEOUT_SECONDS = 5.0  # waiting for a pooled connection before giving up on a message
STATEMENT_TIMEOUT_MS = 10_000  # a store that hangs longer is abandoned (no ACK; the sender retries)
POOL_MAX = 8
STORED_CHARS = 256  # header values kept in columns (a refused, longer one stays whole in `raw`)
EXIT_PORT_IN_USE = 3  # `interop mllp` exit status when its port is taken (the supervisor stops then)
EXIT_BAD_SETTINGS = 2  # `interop mllp` exit status when its TLS settings cannot be used
HANDSHAKE_SECONDS = 30.0  # a TLS handshake not done in this long closes the connection (at most the idle timeout)
PLAIN_TEXT = {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST"}  # OpenSSL's words for "that was no TLS"

_TRANSIENT = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)


class DatabaseUnavailable(Exception):
    """The message could not be stored now; the sender must send it again."""


class SenderNotAllowed(Hl7Error):
    """The site named in MSH-4 pins client certificates (`tls_client_certs`) and this connection's
    certificate is not one of them (or there is none). HL7 table 0357 has no code for it: 207,
    with the place (MSH-4) and the reason in the text."""

    error_code = ErrorCode.APPLICATION_INTERNAL_ERROR

    def __init__(self) -> None:
        # at most 80 characters: MSA-3 of a v2.3 ACK holds no more
        super().__init__("TLS client certificate not allowed to send for the site in MSH-4", "MSH", 4)


def _clean(value: str | None) -> str | None:
    return None if value is None else value.replace("\x00", "")[:STORED_CHARS]


_BASE = {AckCode.CA: AckCode.AA, AckCode.CE: AckCode.AE, AckCode.CR: AckCode.AR}


class Listener:
    """The per-message logic on top of the framer; one instance per process."""

    def __init__(self, settings: Settings, pool: AsyncConnectionPool[Any], table: dict[str, Accepted],
                 sites: Sites | None = None, ssl_context: ssl.SSLContext | None = None):
        self.settings = settings
        self.pool = pool
        self.table = table
        self.sites = sites if sites is not None else Sites(settings.sites_file)
        self.ssl_context = ssl_context
        self.max_bytes = settings.mllp_max_bytes
        self.idle = settings.mllp_idle_seconds
        process = policies.load(settings.mappings_dir, settings.job_max_attempts).kind(hl7_messages.PROCESS_KIND)
        self.job = {"kind": process.kind, "max_attempts": process.max_attempts, "priority": process.priority}
        self.counts = {"messages": 0, "accepted": 0, "rejected": 0, "duplicates": 0, "unavailable": 0,
                       "handshakes failed": 0}

    # -- storage ---------------------------------------------------------------------------
    def _params(self, raw: bytes, header: Header | None, problem: Hl7Error | None, code: AckCode) -> dict[str, Any]:
        h = header

        def field(value: str | None) -> str | None:
            return _clean(value) or None

        return {
            "sa": _clean(h.sending_application) if h else "", "sf": _clean(h.sending_facility) if h else "",
            "ra": _clean(h.receiving_application) if h else "", "rf": _clean(h.receiving_facility) if h else "",
            # no control id read: NULL, never a duplicate of anything
            "cid": field(h.control_id) if h else None, "type": field(h.message_type) if h else None,
            "structure": field(h.structure) if h else None, "version": field(h.version) if h else None,
            "processing": field(h.processing_id) if h else None, "accept": field(h.accept_ack_type) if h else None,
            "app": field(h.app_ack_type) if h else None, "charset": field(h.charset) if h else None,
            "raw": raw, "sha": hashlib.sha256(charset.normalise_segments(raw)).digest(),
            "ack": code.value, "ack_error": problem.message if problem else None,
            "status": "accepted" if problem is None else "rejected", **self.job,
        }

    async def store(self, params: dict[str, Any]) -> hl7_messages.Stored:
        """Store an accepted message and queue it (or find the earlier holder of its control id)."""
        try:
            async with self.pool.connection(timeout=DB_TIMEOUT_SECONDS) as conn:
                cur = await conn.execute(hl7_messages.ACCEPT_SQL, params)
                row = await cur.fetchone()
                if row is None:  # a concurrent copy committed while our statement ran
                    cur = await conn.execute(hl7_messages.FIND_SQL, params)
                    row = await cur.fetchone()
        except _TRANSIENT as exc:
            raise DatabaseUnavailable(type(exc).__name__) from exc
        if row is None:
            raise DatabaseUnavailable("the message was neither stored nor found")
        return hl7_messages.stored(row)

    async def store_rejected(self, params: dict[str, Any]) -> int:
        """Keep a refused message with its reason (it holds no control id)."""
        try:
            async with self.pool.connection(timeout=DB_TIMEOUT_SECONDS) as conn:
                cur = await conn.execute(hl7_messages.REJECT_SQL, params)
                row = await cur.fetchone()
        except _TRANSIENT as exc:
            raise DatabaseUnavailable(type(exc).__name__) from exc
        assert row is not None, "INSERT ... RETURNING gives a row"
        return int(row[0])

    # -- one message -----------------------------------------------------------------------
    async def message(self, raw: bytes, too_large: mllp.FrameTooLarge | None = None,
                      certificate: str | None = None) -> bytes | None:
        """The ACK for one frame (None: no answer). `certificate`: the SHA-256 fingerprint of the
        connection's client certificate (None: none). Raises DatabaseUnavailable, and nothing else:
        a fault of the hub's own in reading the message is answered AR (ERR 207)."""
        try:
            return await self._message(raw, too_large, certificate)
        except DatabaseUnavailable:
            raise
        except Exception as exc:  # a bug must cost one message an AR, never the connection
            log.error("MLLP message of %d bytes: unexpected %s; answered AR", len(raw), type(exc).__name__)
            log.debug("MLLP message failure", exc_info=exc)
        header: Header | None = None
        try:  # read again only on this rare path, to address the AR
            header = read(raw)[0]
        except Exception:
            header = None
        problem = InternalError()
        code = ack.answer_code(header, problem)
        try:
            await self.store_rejected(self._params(raw, header, problem, code))
        except DatabaseUnavailable:
            raise
        except Exception as exc:
            log.error("MLLP message: could not store the refused message (%s)", type(exc).__name__)
        return ack.build(header, code, problem) if ack.should_send(header, code) else None

    def _pinned_out(self, header: Header, certificate: str | None) -> bool:
        """Whether MSH-4 names a site that pins certificates, and this connection's is not one."""
        site = self.sites.find(header.sending_facility)
        return site is not None and bool(site.tls_client_certs) and certificate not in site.tls_client_certs

    async def _message(self, raw: bytes, too_large: mllp.FrameTooLarge | None,
                       certificate: str | None = None) -> bytes | None:
        header: Header | None
        problem: Hl7Error | None
        try:
            header, ids = read(raw)
            problem = check(header, ids, self.table)
        except Hl7Error as exc:
            header, problem = exc.header, exc
        if problem is None and header is not None and header.message_code != "ACK" \
                and self._pinned_out(header, certificate):
            problem = SenderNotAllowed()
            log.warning("MLLP message %s refused: client certificate %s is not pinned for its site",
                        header.message_type[:20], f"sha256 {certificate[:16]}..." if certificate else "(none)")
        if too_large is not None:
            problem = TooLarge(too_large.limit)
        if header is not None and header.message_code == "ACK":
            log.debug("ACK received and ignored (%d bytes)", len(raw))
            return None
        code = ack.answer_code(header, problem)
        params = self._params(raw, header, problem, code)
        self.counts["messages"] += 1
        text = ""
        duplicate = False
        if problem is None:
            stored = await self.store(params)
            row_id = stored.id
            if stored.duplicate and stored.same_content:  # a resend: the first answer, nothing processed again
                duplicate = True
                self.counts["duplicates"] += 1
                earlier = AckCode(stored.ack_code) if stored.ack_code in AckCode.__members__ else code
                base = _BASE.get(earlier, earlier)
                code = base.commit if ack.enhanced(header) else base
                text = "duplicate: already received"
            elif stored.duplicate:  # the same control id for another message: refused, kept, never dropped
                problem = DuplicateControlId()
                code = ack.answer_code(header, problem)
                row_id = await self.store_rejected(self._params(raw, header, problem, code))
        else:
            row_id = await self.store_rejected(params)
        if code.accepted:
            self.counts["accepted"] += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("message %d %s stored (%d bytes), %s%s", row_id, header.message_type if header else "",
                          len(raw), code.value, " (duplicate)" if duplicate else "")
        else:
            self.counts["rejected"] += 1
            log.info("message %d %s (%d bytes) answered %s: %s", row_id,
                     header.message_type[:20] if header else "(no header)",
                     too_large.size if too_large else len(raw), code.value, problem.message if problem else "")
        if not ack.should_send(header, code):
            return None
        return ack.build(header, code, None if code.accepted else problem, text)

    # -- one connection --------------------------------------------------------------------
    async def handshake(self, writer: asyncio.StreamWriter) -> tuple[bool, str | None]:
        """TLS on a new connection: (done, the client certificate's SHA-256 or None). A handshake
        that fails is logged in one line (peer address and reason, no traceback) and the
        connection closed; it never reaches the caller as an exception."""
        peer = writer.get_extra_info("peername")
        where = peer[0] if isinstance(peer, tuple) and peer else "unknown peer"
        assert self.ssl_context is not None
        try:
            await writer.start_tls(self.ssl_context, ssl_handshake_timeout=min(HANDSHAKE_SECONDS, float(self.idle)))
        except ssl.SSLError as exc:
            self.counts["handshakes failed"] += 1
            reason = str(exc.reason or type(exc).__name__)
            eof = isinstance(exc, ssl.SSLEOFError) or "EOF" in reason  # closed before a word: a port check
            log.log(logging.INFO if eof else logging.WARNING, "MLLP connection from %s refused: TLS handshake failed"
                    " (%s%s)", where, reason, "; a plain-text sender on the TLS port?" if reason in PLAIN_TEXT else "")
            writer.close()
            return False, None
        except OSError as exc:  # reset, closed, or no handshake in time (ConnectionAbortedError)
            self.counts["handshakes failed"] += 1
            log.info("MLLP connection from %s closed during the TLS handshake (%s)", where, type(exc).__name__)
            writer.close()
            return False, None
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        certificate = hub_tls.fingerprint(der) if der else None
        log.debug("MLLP connection from %s: %s, client certificate %s", where,
                  ssl_object.version() if ssl_object is not None else "TLS", certificate or "none")
        return True, certificate

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        certificate: str | None = None
        if self.ssl_context is not None:
            done, certificate = await self.handshake(writer)
            if not done:
                return
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
                        answer = await self.message(item.head, too_large=item, certificate=certificate)
                        close, reason = True, "message too large"
                    else:
                        answer = await self.message(item, certificate=certificate)
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
        except (OSError, asyncio.IncompleteReadError) as exc:  # OSError: a reset, or a TLS error (ssl.SSLError)
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
                async with asyncio.timeout(5):  # a TLS peer that never answers the close cannot hold us
                    await writer.wait_closed()
            except (OSError, TimeoutError, asyncio.CancelledError):
                pass


async def serve(settings: Settings, ready: asyncio.Event | None = None, *, sites: Sites | None = None) -> None:
    """Listen on INTEROP_MLLP_HOST:INTEROP_MLLP_PORT until cancelled (over TLS when configured;
    raises interop.tls.TlsError when the TLS settings cannot be used)."""
    if not settings.database_url:
        raise RuntimeError("the MLLP listener needs DATABASE_URL")
    found = hub_tls.problems(settings)
    if found:
        raise hub_tls.TlsError("; ".join(found))
    ssl_context = hub_tls.server_context(settings)
    table = load_table(table_path(settings.mappings_dir))
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        settings.database_url, min_size=1, max_size=POOL_MAX,
        kwargs={"autocommit": True, "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"},
        open=False, name="interop-mllp", timeout=DB_TIMEOUT_SECONDS,
    )
    listener = Listener(settings, pool, table, sites, ssl_context)
    pinned = [code for code, site in listener.sites.current().items() if site.tls_client_certs]
    if pinned and settings.tls_client_ca is None:
        log.warning("sites %s pin client certificates (tls_client_certs) but INTEROP_TLS_CLIENT_CA is not set:"
                    " no sender presents one, so their messages are refused", ", ".join(sorted(pinned)))
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
    await pool.open(wait=False)  # serve even while the database is down: messages wait for it
    log.info("MLLP listener on %s:%s%s (max %d bytes a message, idle timeout %ss)", settings.mllp_host,
             settings.mllp_port, "" if ssl_context is None else " over TLS" + (
                 ", client certificates required" if settings.tls_client_ca else ""),
             settings.mllp_max_bytes, settings.mllp_idle_seconds)
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
    """Run the listener until SIGTERM or SIGINT; SIGHUP reads the sites file again."""
    sites = Sites(settings.sites_file)

    async def run() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        loop.add_signal_handler(signal.SIGHUP, sites.reload)
        try:
            await serve(settings, sites=sites)
        except asyncio.CancelledError:
            pass

    try:
        asyncio.run(run())
    except hub_tls.TlsError as exc:
        log.error("MLLP listener: TLS settings cannot be used: %s", exc)
        raise SystemExit(EXIT_BAD_SETTINGS) from None
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        log.error("MLLP port %s:%s is already in use: the listener cannot start", settings.mllp_host,
                  settings.mllp_port)
        raise SystemExit(EXIT_PORT_IN_USE) from None
