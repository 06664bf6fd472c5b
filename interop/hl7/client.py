"""A small MLLP client: one framed message out, one ACK back.

Every socket operation has a deadline (connect, send, and each recv against one overall ACK
deadline) and the answer has a size limit, so a silent or babbling peer can never hold a
sender. Framing (<VT> message <FS><CR>) is the listener's sans-I/O framer, `interop.hl7.mllp`.

With an `ssl_context` (a destination with `tls: true`; `interop.tls.ClientTls.context()`) the
connection is TLS: the peer's certificate is verified with that context and its host name
checked, within the connect deadline. A peer whose certificate does not verify is
`PeerUnavailable` (nothing was sent; the delivery is retried, and an operator sees why).

Errors: `PeerUnavailable` (transient: refused, unreachable, reset, closed without an answer,
timeout) and `BadAck` (an answer came but is not an ACK for our message).
"""
from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass

from .errors import AckCode
from .mllp import Framer, FrameTooLarge
from .mllp import frame as mllp_frame

MAX_ACK_BYTES = 1024 * 1024  # an ACK is a few hundred bytes; anything near this is not one


class MllpError(Exception):
    """Base of the client's errors; messages hold no patient data."""


class PeerUnavailable(MllpError):
    """Transient: the peer could not be reached or did not answer in time. Retry later."""


class BadAck(MllpError):
    """The peer answered something that is not an acknowledgement of our message."""

    def __init__(self, message: str, answer: str = ""):
        super().__init__(message)
        self.answer = answer


@dataclass(frozen=True)
class Ack:
    code: AckCode    # MSA-1: AA, AE, AR (CA, CE, CR in enhanced mode)
    control_id: str  # MSA-2: the MSH-10 it acknowledges
    text: str        # MSA-3: text message (may be empty)
    raw: str         # the whole ACK as received

    @property
    def accepted(self) -> bool:
        return self.code.accepted


def frame(message: str, encoding: str = "utf-8") -> bytes:
    return mllp_frame(message.encode(encoding))


def parse_ack(text: str) -> Ack:
    """MSA-1/2/3 with a plain split on the separators MSH declares. Raises BadAck."""
    segments = [s for s in text.replace("\r\n", "\r").replace("\n", "\r").split("\r") if s.strip()]
    if not segments or not segments[0].startswith("MSH") or len(segments[0]) < 8:
        raise BadAck("the answer does not start with an MSH segment", text)
    field_sep = segments[0][3]
    for segment in segments[1:]:
        fields = segment.split(field_sep)
        if fields[0] == "MSA":
            value = fields[1].strip().upper() if len(fields) > 1 else ""
            try:
                code = AckCode(value)
            except ValueError:
                raise BadAck(f"MSA-1 is {value[:4]!r}, not an acknowledgement code", text) from None
            return Ack(code=code, control_id=fields[2] if len(fields) > 2 else "",
                       text=fields[3] if len(fields) > 3 else "", raw=text)
    raise BadAck("the answer has no MSA segment", text)


class MllpClient:
    """Connect, send one message, read one ACK, close. One connection per message keeps
    the failure modes simple; a persistent connection can come when volume asks for it."""

    def __init__(self, host: str, port: int, *, connect_timeout: float = 10.0, ack_timeout: float = 30.0,
                 max_ack_bytes: int = MAX_ACK_BYTES, encoding: str = "utf-8",
                 ssl_context: ssl.SSLContext | None = None):
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.ack_timeout = ack_timeout
        self.max_ack_bytes = max_ack_bytes
        self.encoding = encoding
        self.ssl_context = ssl_context

    def _connect(self, where: str) -> socket.socket:
        """A connected socket (TLS: handshake done, the peer verified) within the connect deadline."""
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except TimeoutError as exc:
            raise PeerUnavailable(f"{where}: connect timed out after {self.connect_timeout}s") from exc
        except OSError as exc:
            raise PeerUnavailable(f"{where}: cannot connect ({type(exc).__name__})") from exc
        if self.ssl_context is None:
            return sock
        try:
            return self.ssl_context.wrap_socket(sock, server_hostname=self.host)
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            raise PeerUnavailable(f"{where}: TLS: the peer's certificate does not verify"
                                  f" ({exc.verify_message or exc.reason})") from exc
        except TimeoutError as exc:
            sock.close()
            raise PeerUnavailable(f"{where}: TLS handshake timed out after {self.connect_timeout}s") from exc
        except OSError as exc:  # ssl.SSLError is one
            sock.close()
            raise PeerUnavailable(f"{where}: TLS handshake failed ({getattr(exc, 'reason', None) or type(exc).__name__})") \
                from exc

    def send(self, message: str) -> str:
        """Send `message` framed; return the ACK text (frame removed). Checks nothing inside it:
        `exchange` does."""
        where = f"{self.host}:{self.port}"
        sock = self._connect(where)
        with sock:
            deadline = time.monotonic() + self.ack_timeout
            try:
                sock.settimeout(self.ack_timeout)
                sock.sendall(frame(message, self.encoding))
                data = self._read_block(sock, deadline, where)
            except TimeoutError as exc:
                raise PeerUnavailable(f"{where}: no complete answer within {self.ack_timeout}s") from exc
            except OSError as exc:
                raise PeerUnavailable(f"{where}: connection failed ({type(exc).__name__})") from exc
        return data.decode(self.encoding, errors="replace")

    def _read_block(self, sock: socket.socket, deadline: float, where: str) -> bytes:
        """The first complete frame; bytes outside frames are dropped by the framer (and make
        a BadAck if the peer then hangs up without a frame). Total bytes read are bounded."""
        framer = Framer(self.max_ack_bytes)
        total = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError()
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if not chunk:
                if framer.garbage_bytes:
                    raise BadAck(f"{where}: the answer is not MLLP-framed ({framer.garbage_bytes} bytes)")
                raise PeerUnavailable(f"{where}: connection closed before an answer")
            total += len(chunk)
            for found in framer.feed(chunk):
                if isinstance(found, FrameTooLarge):
                    raise BadAck(f"{where}: answer larger than {self.max_ack_bytes} bytes")
                return found
            if total > 2 * self.max_ack_bytes:
                raise BadAck(f"{where}: more than {2 * self.max_ack_bytes} bytes without an answer")

    def exchange(self, message: str, control_id: str) -> Ack:
        """Send and parse the ACK; BadAck when it acknowledges another control id."""
        answer = self.send(message)
        ack = parse_ack(answer)
        if ack.control_id != control_id:
            raise BadAck(f"the ACK is for control id {ack.control_id[:20]!r}, not {control_id!r}", answer)
        return ack
