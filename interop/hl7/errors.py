"""Why a message is not accepted, as exceptions that know their HL7 wire form.

Each class carries its acknowledgement code (HL7 table 0008), its error code (HL7 table
0357) and where the problem is (segment, sequence, field), and renders itself as an ERR
segment. Texts are ours and fixed: they never contain data from the message (no patient data
in an ACK or a log).
"""
from __future__ import annotations

from enum import Enum
from typing import Any


class AckCode(str, Enum):
    """HL7 table 0008, acknowledgment code."""

    AA = "AA"  # original mode: application accept
    AE = "AE"  # original mode: application error
    AR = "AR"  # original mode: application reject
    CA = "CA"  # enhanced mode: commit accept
    CE = "CE"  # enhanced mode: commit error
    CR = "CR"  # enhanced mode: commit reject

    @property
    def commit(self) -> AckCode:
        """The enhanced-mode (commit) counterpart of an original-mode code."""
        return _COMMIT.get(self, self)

    @property
    def accepted(self) -> bool:
        return self in (AckCode.AA, AckCode.CA)


_COMMIT = {AckCode.AA: AckCode.CA, AckCode.AE: AckCode.CE, AckCode.AR: AckCode.CR}


class ErrorCode(int, Enum):
    """HL7 table 0357, message error condition codes (the ones the listener uses)."""

    ACCEPTED = 0
    SEGMENT_SEQUENCE = 100  # also: a required segment is missing
    REQUIRED_FIELD_MISSING = 101
    DATA_TYPE = 102
    TABLE_VALUE_NOT_FOUND = 103
    UNSUPPORTED_MESSAGE_TYPE = 200
    UNSUPPORTED_EVENT_CODE = 201
    UNSUPPORTED_PROCESSING_ID = 202
    UNSUPPORTED_VERSION_ID = 203
    DUPLICATE_KEY = 205
    APPLICATION_INTERNAL_ERROR = 207

    @property
    def text(self) -> str:
        return _TEXT[self]


_TEXT = {
    ErrorCode.ACCEPTED: "Message accepted",
    ErrorCode.SEGMENT_SEQUENCE: "Segment sequence error",
    ErrorCode.REQUIRED_FIELD_MISSING: "Required field missing",
    ErrorCode.DATA_TYPE: "Data type error",
    ErrorCode.TABLE_VALUE_NOT_FOUND: "Table value not found",
    ErrorCode.UNSUPPORTED_MESSAGE_TYPE: "Unsupported message type",
    ErrorCode.UNSUPPORTED_EVENT_CODE: "Unsupported event code",
    ErrorCode.UNSUPPORTED_PROCESSING_ID: "Unsupported processing id",
    ErrorCode.UNSUPPORTED_VERSION_ID: "Unsupported version id",
    ErrorCode.DUPLICATE_KEY: "Duplicate key identifier",
    ErrorCode.APPLICATION_INTERNAL_ERROR: "Application internal error",
}


def version_key(version: str) -> tuple[int, ...]:
    """'2.5.1' -> (2, 5, 1), for comparing HL7 versions; stops at the first part that is not ASCII
    digits ('2.5.²' -> (2, 5): a superscript is a digit to Python, never to HL7)."""
    out = []
    for part in version.split("."):
        if not (part.isascii() and part.isdigit()):
            break
        out.append(int(part))
    return tuple(out)


class Hl7Error(Exception):
    """A message the listener does not accept. `message` must be free of message content."""

    ack_code = AckCode.AR
    error_code = ErrorCode.APPLICATION_INTERNAL_ERROR
    header: Any = None  # the part of the MSH that could be read (interop.hl7.header.Header)

    def __init__(self, message: str, segment: str = "MSH", field: int | None = None, sequence: int = 1):
        super().__init__(message)
        self.message = message
        self.segment = segment
        self.sequence = sequence
        self.field = field

    def location(self, comp: str = "^") -> str:
        """ERL: segment^sequence^field (as much as is known)."""
        parts = [self.segment, str(self.sequence)]
        if self.field is not None:
            parts.append(str(self.field))
        return comp.join(parts)

    def err_segment(self, version: str = "2.5", field_sep: str = "|", comp: str = "^", sub: str = "&") -> str:
        """The ERR segment: v2.5+ layout (ERR-2, ERR-3, ERR-4, ERR-8); ERR-1 for v2.3/2.4 senders."""
        text = escape(self.message, field_sep, comp, sub)
        if version_key(version) < (2, 5):
            # ERR-1 (ELD): segment^sequence^field^code&text&HL70357
            eld = comp.join([self.segment, str(self.sequence), "" if self.field is None else str(self.field),
                             sub.join([str(int(self.error_code)), self.error_code.text, "HL70357"])])
            return field_sep.join(["ERR", eld])
        code = comp.join([str(int(self.error_code)), self.error_code.text, "HL70357"])
        return field_sep.join(["ERR", "", self.location(comp), code, "E", "", "", "", text])


def escape(text: str, field_sep: str = "|", comp: str = "^", sub: str = "&", rep: str = "~",
           esc: str = "\\") -> str:
    """HL7 escape sequences for the delimiters, so our texts cannot break the message."""
    out = text.replace(esc, f"{esc}E{esc}")
    for char, code in ((field_sep, "F"), (comp, "S"), (sub, "T"), (rep, "R")):
        out = out.replace(char, f"{esc}{code}{esc}")
    return out.replace("\r", " ").replace("\n", " ")


class NotHl7(Hl7Error):
    """The frame does not hold an HL7 v2 message (no MSH segment first)."""

    error_code = ErrorCode.SEGMENT_SEQUENCE


class BadHeader(Hl7Error):
    """The MSH segment cannot be read (delimiters, or a required field missing)."""

    error_code = ErrorCode.REQUIRED_FIELD_MISSING


class BadDelimiters(BadHeader):
    error_code = ErrorCode.DATA_TYPE


class BadCharset(Hl7Error):
    """MSH-18 names a character set the hub does not support (HL7 table 0211)."""

    error_code = ErrorCode.TABLE_VALUE_NOT_FOUND

    def __init__(self, message: str = "MSH-18 names a character set that is not supported"):
        super().__init__(message, "MSH", 18)


class UnsupportedMessage(Hl7Error):
    """Message type, trigger event or version not accepted here (mappings/hl7v2/accepted_messages.yaml)."""

    def __init__(self, message: str, error_code: ErrorCode, field: int):
        super().__init__(message, "MSH", field)
        self.error_code = error_code


class MissingSegment(Hl7Error):
    """A supported message without a segment its type requires: an application error."""

    ack_code = AckCode.AE
    error_code = ErrorCode.SEGMENT_SEQUENCE

    def __init__(self, segment_id: str, message_type: str):
        super().__init__(f"required segment {segment_id} missing from {message_type}", segment_id)

    def location(self, comp: str = "^") -> str:
        return self.segment  # the segment is absent: no sequence or field to point at


class BadValue(Hl7Error):
    """A header field that cannot be taken as it is: too long, or with control characters."""

    error_code = ErrorCode.DATA_TYPE


class DuplicateControlId(Hl7Error):
    """The control id was used before by the same sender for a message with other content."""

    error_code = ErrorCode.DUPLICATE_KEY

    def __init__(self) -> None:
        super().__init__("MSH-10 was already used by this sender for a different message; "
                         "send it with a new control id", "MSH", 10)


class InternalError(Hl7Error):
    """Something in the hub went wrong reading this message; the sender may resend it later."""

    def __init__(self) -> None:
        super().__init__("the message could not be read by the hub; it was stored, send it again later")


class TooLarge(Hl7Error):
    """The MLLP frame exceeds INTEROP_MLLP_MAX_BYTES."""

    error_code = ErrorCode.APPLICATION_INTERNAL_ERROR

    def __init__(self, limit: int):
        super().__init__(f"message larger than the limit of {limit} bytes")
