"""The MSH segment and the segment ids of a raw message, read by plain splitting.

This is the listener's fast path (a few microseconds a message): no full parse here; the
worker parses the whole message later. Pure. Raises the errors of `interop.hl7.errors`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import charset
from .errors import (
    BadCharset,
    BadDelimiters,
    BadHeader,
    BadValue,
    ErrorCode,
    Hl7Error,
    MissingSegment,
    NotHl7,
    UnsupportedMessage,
    version_key,
)

DEFAULT_ENCODING = "^~\\&"
VERSION = re.compile(r"[0-9]+(\.[0-9]+)*")
CONTROL = re.compile(rb"[\x00-\x1f\x7f]")  # in a header value: never meant, often a broken sender
# Longest value taken in each MSH field the hub stores: an HD (MSH-3..6) is at most 227 characters,
# MSH-10 199 (v2.7's ST; v2.5 says 20, but senders use UUIDs), the codes far less. A longer value is
# refused (AR, ERR 102) rather than cut, so that what is stored and acknowledged is what was sent.
FIELD_LIMITS = {3: 227, 4: 227, 5: 227, 6: 227, 9: 64, 10: 199, 11: 16, 12: 64, 15: 16, 16: 16, 18: 64}


@dataclass(frozen=True)
class Header:
    field_sep: str
    encoding_chars: str  # MSH-2: component, repetition, escape, subcomponent (and truncation)
    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    control_id: str
    message_code: str  # MSH-9.1, e.g. ORM
    trigger: str  # MSH-9.2, e.g. O01
    structure: str  # MSH-9.3 when given, e.g. OMI_O23
    processing_id: str
    version: str  # MSH-12.1
    accept_ack_type: str  # MSH-15
    app_ack_type: str  # MSH-16
    charset: str  # MSH-18 (first repetition) as declared

    @property
    def message_type(self) -> str:
        return f"{self.message_code}^{self.trigger}" if self.trigger else self.message_code

    @property
    def comp(self) -> str:
        return self.encoding_chars[0]

    @property
    def sub(self) -> str:
        return self.encoding_chars[3] if len(self.encoding_chars) > 3 else "&"


def _field(fields: list[bytes], n: int) -> bytes:
    """MSH-n (MSH-1 is the separator itself, so MSH-n is fields[n - 1] for n >= 2)."""
    return fields[n - 1] if len(fields) > n - 1 else b""


def read(data: bytes) -> tuple[Header, list[str]]:
    """(MSH fields, segment ids in order) of a raw message, as received inside the frame.

    Raises an `Hl7Error`; when part of the MSH could be read, the error's `header` holds it
    (delimiters, control id, version...) so that the answer can still address the sender.
    """
    data = charset.normalise_segments(data)
    if not data.startswith(b"MSH"):
        raise NotHl7("the message does not begin with an MSH segment", "MSH")
    segments = data.split(b"\r")
    msh = segments[0]
    if len(msh) < 8:
        raise BadHeader("the MSH segment is too short", "MSH", 2)
    sep = msh[3:4]
    fields = msh.split(sep)
    enc = fields[1]
    if (sep.isalnum() or sep in b" \r\n\\" or not 4 <= len(enc) <= 5 or len(set(enc + sep)) != len(enc) + 1
            or any(chr(c).isalnum() or c in b" \r\n" for c in enc)):
        raise BadDelimiters("MSH-1/MSH-2 do not hold valid delimiters", "MSH", 2)
    label = charset.declared_charset(data)
    codec = charset.CODECS.get(label, "latin-1")
    if codec in ("ascii", "latin-1"):
        codec = "utf-8"  # valid UTF-8 wins over an ASCII/Latin-1 label (see charset.decode)
    comp = enc[0:1]

    def text(value: bytes) -> str:
        try:
            return value.decode(codec).strip()
        except (UnicodeDecodeError, LookupError):
            return value.decode("latin-1").strip()

    msh9 = _field(fields, 9).split(enc[1:2])[0].split(comp)  # first repetition, components
    header = Header(
        field_sep=sep.decode("latin-1"), encoding_chars=enc.decode("latin-1"),
        sending_application=text(_field(fields, 3)), sending_facility=text(_field(fields, 4)),
        receiving_application=text(_field(fields, 5)), receiving_facility=text(_field(fields, 6)),
        control_id=text(_field(fields, 10)), message_code=text(msh9[0]).upper(),
        trigger=text(msh9[1]).upper() if len(msh9) > 1 else "",
        structure=text(msh9[2]).upper() if len(msh9) > 2 else "",
        processing_id=text(_field(fields, 11)), version=text(_field(fields, 12).split(comp)[0]),
        accept_ack_type=text(_field(fields, 15)).upper(), app_ack_type=text(_field(fields, 16)).upper(),
        charset=label,
    )
    problem: Hl7Error | None = None
    too_long = next((n for n, limit in FIELD_LIMITS.items() if len(_field(fields, n)) > limit), None)
    if too_long is not None:
        problem = BadValue(f"MSH-{too_long} is longer than {FIELD_LIMITS[too_long]} characters", "MSH", too_long)
    elif b"\x00" in data:
        problem = BadValue("the message holds NUL characters, which HL7 v2 does not allow", "MSH")
    elif (odd := next((n for n in FIELD_LIMITS if CONTROL.search(_field(fields, n))), None)) is not None:
        problem = BadValue(f"MSH-{odd} holds control characters", "MSH", odd)
    elif not header.control_id:
        problem = BadHeader("MSH-10 (message control id) is empty", "MSH", 10)
    elif label not in charset.CODECS:
        problem = BadCharset()
    elif not header.message_code:
        problem = BadHeader("MSH-9 (message type) is empty", "MSH", 9)
    elif not header.version:
        problem = BadHeader("MSH-12 (version id) is empty", "MSH", 12)
    if problem is not None:
        problem.header = header
        raise problem
    ids = [seg[:3].decode("latin-1") for seg in segments if seg.strip()]
    return header, ids


@dataclass(frozen=True)
class Accepted:
    versions: tuple[tuple[int, ...], tuple[int, ...]]
    required: tuple[str, ...]


def load_table(path: Path) -> dict[str, Accepted]:
    """mappings/hl7v2/accepted_messages.yaml: message type -> versions and required segments."""
    raw: dict[str, Any] = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    table = {}
    for name, spec in (raw.get("messages") or {}).items():
        low, high = spec["versions"]
        table[str(name).upper()] = Accepted((version_key(str(low)), version_key(str(high))),
                                            tuple(str(s).upper() for s in spec.get("required") or ()))
    return table


def table_path(mappings_dir: Path) -> Path:
    return Path(mappings_dir) / "hl7v2" / "accepted_messages.yaml"


def _code(value: str) -> str:
    """A message code, version or trigger safe to quote in an ACK: short, plain characters."""
    return "".join(c for c in value[:16] if (c.isascii() and c.isalnum()) or c in "._-") or "(none)"


def check(header: Header, segment_ids: list[str], table: dict[str, Accepted]) -> Hl7Error | None:
    """The problem that stops this message being accepted, or None (AA)."""
    accepted = table.get(header.message_type)
    if accepted is None:
        if any(key.split("^")[0] == header.message_code for key in table):
            return UnsupportedMessage(f"trigger event {_code(header.trigger)} of {_code(header.message_code)} "
                                      "is not accepted here", ErrorCode.UNSUPPORTED_EVENT_CODE, 9)
        return UnsupportedMessage(f"message type {_code(header.message_code)} is not accepted here",
                                  ErrorCode.UNSUPPORTED_MESSAGE_TYPE, 9)
    low, high = accepted.versions
    if not VERSION.fullmatch(header.version) or not low <= version_key(header.version)[: len(high)] <= high:
        return UnsupportedMessage(f"version {_code(header.version)} of {header.message_type} is not accepted here",
                                  ErrorCode.UNSUPPORTED_VERSION_ID, 12)
    present = set(segment_ids)
    for seg in accepted.required:
        if seg not in present:
            return MissingSegment(seg, header.message_type)
    return None
