"""A parsed HL7 v2 message with access by HL7 position (segment, field, repetition, component,
subcomponent), escape sequences undone. Pure: text in, values out.

Why not hl7apy: its tolerant parse (`find_groups=False`) keeps Z-segments, but it does not keep
positions outside its own tables. Measured with hl7apy 1.3.5: a field past the last one the
standard defines for the segment comes back with no name (its field number is lost), and
components past the last one of the field's datatype are squeezed together
(`1^^^X^^^…^9` with `9` as CX.27 comes back as `1^^^X^^^9`, i.e. CX.7). Senders put data in
such places (dcm4che's ZDS, site extensions), so the hub splits the text itself: HL7's own
rules (MSH-1 and MSH-2 give the delimiters), nothing else. The tests check that both readings
agree wherever hl7apy does name the position.

Errors are `MessageError`: a fixed reason and the location (segment id, its occurrence, the
field), never a value from the message, so they are safe in an ERR segment, a log or a FHIR
`OperationOutcome`.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from .errors import AckCode, ErrorCode, Hl7Error

SEGMENT_ID = re.compile(r"^[A-Z][A-Z0-9]{2}$")


class MessageError(Hl7Error):
    """The message cannot be read or mapped. `reason` is ours (no message content)."""

    ack_code = AckCode.AE

    def __init__(self, reason: str, segment: str = "MSH", field: int | None = None, sequence: int = 1,
                 error_code: ErrorCode = ErrorCode.APPLICATION_INTERNAL_ERROR):
        super().__init__(reason, segment, field, sequence)
        self.reason = reason
        self.error_code = error_code

    def __str__(self) -> str:
        where = self.segment if self.field is None else f"{self.segment}-{self.field}"
        if self.sequence > 1:
            where += f" (occurrence {self.sequence})"
        return f"{self.reason} [{where}]"


class MissingSegmentError(MessageError):
    """A segment the mapping needs is absent."""

    def __init__(self, segment: str, message_type: str):
        super().__init__(f"required segment {segment} missing from {message_type}", segment,
                         error_code=ErrorCode.SEGMENT_SEQUENCE)

    def location(self, comp: str = "^") -> str:
        return self.segment


@dataclass(frozen=True)
class Encoding:
    """MSH-1 and MSH-2."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"


class Component(str):
    """A component's text (subcomponents joined by '&' as on the wire, each unescaped), with
    `subs`, the unescaped subcomponents, for exact access."""

    subs: tuple[str, ...]

    def __new__(cls, subs: tuple[str, ...]) -> Component:
        obj = super().__new__(cls, "&".join(subs) if len(subs) > 1 else (subs[0] if subs else ""))
        obj.subs = subs
        return obj

    def sub(self, n: int) -> str:
        """Subcomponent n (1-based); '' when absent."""
        return self.subs[n - 1] if 0 < n <= len(self.subs) else ""


class Repetition(tuple[Component, ...]):
    """One repetition of a field: its components (index 0 is component 1)."""

    def component(self, n: int, sub: int = 1) -> str:
        """Component n, subcomponent `sub` (1-based); '' when absent."""
        return self[n - 1].sub(sub) if 0 < n <= len(self) else ""

    def comp(self, n: int) -> Component:
        return self[n - 1] if 0 < n <= len(self) else Component(())

    @property
    def valued(self) -> bool:
        return any(s and s != '""' for c in self for s in c.subs)


@dataclass(frozen=True)
class Segment:
    """One segment. `index`: its place in the message (1-based); `sequence`: which occurrence of
    its id it is (1-based), as an ERR segment counts them."""

    id: str
    index: int
    sequence: int
    fields: tuple[tuple[Repetition, ...], ...] = field(repr=False)  # fields[n - 1] is field n

    def get(self, n: int) -> list[Repetition]:
        """Field n as its repetitions (empty list when not valued)."""
        if n < 1 or n > len(self.fields):
            return []
        return [r for r in self.fields[n - 1] if r.valued]

    def value(self, n: int, component: int = 1, subcomponent: int = 1, repetition: int = 1) -> str:
        reps = self.fields[n - 1] if 0 < n <= len(self.fields) else ()
        if repetition < 1 or repetition > len(reps):
            return ""
        v = reps[repetition - 1].component(component, subcomponent)
        return "" if v == '""' else v

    def valued(self, n: int, component: int | None = None) -> bool:
        if component is None:
            return bool(self.get(n))
        return any(r.component(component) not in ("", '""') for r in self.get(n))

    def error(self, reason: str, n: int | None = None,
              code: ErrorCode = ErrorCode.DATA_TYPE) -> MessageError:
        return MessageError(reason, self.id, n, self.sequence, code)


@dataclass(frozen=True)
class Message:
    encoding: Encoding
    segments: tuple[Segment, ...]

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.segments)

    def all(self, segment_id: str) -> list[Segment]:
        return [s for s in self.segments if s.id == segment_id]

    def first(self, segment_id: str) -> Segment | None:
        return next((s for s in self.segments if s.id == segment_id), None)

    def get(self, segment_id: str, n: int, occurrence: int = 1) -> list[Repetition]:
        """Field n of the occurrence-th segment with this id, as repetitions of components."""
        found = self.all(segment_id)
        return found[occurrence - 1].get(n) if 0 < occurrence <= len(found) else []

    def value(self, segment_id: str, n: int, component: int = 1, subcomponent: int = 1, repetition: int = 1,
              occurrence: int = 1) -> str:
        found = self.all(segment_id)
        if not 0 < occurrence <= len(found):
            return ""
        return found[occurrence - 1].value(n, component, subcomponent, repetition)

    # -- MSH, for convenience ------------------------------------------------------------------
    @property
    def msh(self) -> Segment:
        return self.segments[0]

    @property
    def message_code(self) -> str:
        return self.msh.value(9, 1)

    @property
    def trigger(self) -> str:
        return self.msh.value(9, 2)

    @property
    def structure(self) -> str:
        return self.msh.value(9, 3)

    @property
    def message_type(self) -> str:
        return f"{self.message_code}^{self.trigger}" if self.trigger else self.message_code

    @property
    def control_id(self) -> str:
        return self.msh.value(10)

    @property
    def version(self) -> str:
        return self.msh.value(12)

    @property
    def sending_facility(self) -> str:
        """MSH-4 as a code: the namespace (HD.1), else the universal id (HD.2)."""
        return self.msh.value(4, 1) or self.msh.value(4, 2)


# -- escape sequences ------------------------------------------------------------------------
def unescape(text: str, enc: Encoding) -> str:
    r"""Undo \F\ \S\ \T\ \R\ \E\, \Xhh..\ (hex bytes, UTF-8 else Latin-1) and \.br\ (line
    break). Formatting and character-set switches (\H\ \N\ \.sp\ \C..\ \M..\ …) are dropped."""
    e = enc.escape
    if not e or e not in text:
        return text
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        end = text.find(e, i + 1) if ch == e else -1
        if ch != e or end < 0:
            out.append(ch)
            i += 1
            continue
        code = text[i + 1:end]
        simple = {"F": enc.field, "S": enc.component, "T": enc.subcomponent, "R": enc.repetition, "E": e}
        if code in simple:
            out.append(simple[code])
        elif code.startswith("X") and re.fullmatch(r"X([0-9A-Fa-f]{2})+", code):
            raw = bytes.fromhex(code[1:])
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(raw.decode("latin-1"))
        elif code == ".br":
            out.append("\n")
        elif code == "":
            out.append("")  # "\\" is not an escape sequence; keep nothing rather than guess
        i = end + 1
    return "".join(out)


# -- parsing ---------------------------------------------------------------------------------
def normalise(text: str) -> str:
    """CR as the only segment separator (senders use LF or CRLF too); no BOM, no blank lines."""
    text = text.lstrip("\ufeff").replace("\r\n", "\r").replace("\n", "\r")
    return "\r".join(line for line in text.split("\r") if line.strip())


def _repetitions(raw: str, enc: Encoding) -> tuple[Repetition, ...]:
    reps = []
    for rep in raw.split(enc.repetition) if raw else []:
        comps = tuple(Component(tuple(unescape(s, enc) for s in c.split(enc.subcomponent)))
                      for c in rep.split(enc.component))
        reps.append(Repetition(comps))
    return tuple(reps)


def parse(text: str) -> Message:
    """Parse a whole message (text as given by `interop.hl7.charset.decode`, LF also accepted)."""
    text = normalise(text)
    if not text.startswith("MSH") or len(text) < 8:
        raise MessageError("the message does not start with an MSH segment", "MSH",
                           error_code=ErrorCode.SEGMENT_SEQUENCE)
    fsep = text[3]
    msh2 = text[4:].split(fsep, 1)[0]
    if len(msh2) < 4 or fsep in msh2 or fsep.isalnum() or len(set(msh2[:4] + fsep)) != 5:
        raise MessageError("MSH-1/MSH-2 do not give five distinct delimiters", "MSH", 2,
                           error_code=ErrorCode.DATA_TYPE)
    enc = Encoding(fsep, msh2[0], msh2[1], msh2[2], msh2[3])
    segments: list[Segment] = []
    counts: dict[str, int] = {}
    for index, line in enumerate(text.split("\r"), start=1):
        seg_id = line[:3]
        if not SEGMENT_ID.match(seg_id) or (len(line) > 3 and line[3] != fsep):
            raise MessageError(f"segment {index} does not start with a segment id", "MSH" if index == 1 else "",
                               error_code=ErrorCode.SEGMENT_SEQUENCE, sequence=index)
        if seg_id == "MSH" and index > 1:
            raise MessageError("a second MSH segment (batches are not accepted)", "MSH", sequence=2,
                               error_code=ErrorCode.SEGMENT_SEQUENCE)
        counts[seg_id] = counts.get(seg_id, 0) + 1
        raw_fields = line.split(fsep)[1:]
        if seg_id == "MSH":
            # MSH-1 is the separator itself and MSH-2 the encoding characters: neither is split.
            fields: list[tuple[Repetition, ...]] = [(Repetition((Component((fsep,)),)),),
                                                   (Repetition((Component((msh2,)),)),)]
            fields += [_repetitions(f, enc) for f in raw_fields[1:]]
        else:
            fields = [_repetitions(f, enc) for f in raw_fields]
        segments.append(Segment(seg_id, index, counts[seg_id], tuple(fields)))
    return Message(enc, tuple(segments))
