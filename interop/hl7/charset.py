"""Bytes of an HL7 v2 message to text, tolerating what real senders send.

Pure. Handles a UTF-8 byte-order mark, LF or CRLF between segments, the character set named
in MSH-18, and UTF-8 bytes under an 8859/1 (or missing) label, which is common for Vietnamese
names from senders configured for Latin-1.
"""
from __future__ import annotations

BOM = b"\xef\xbb\xbf"

# HL7 table 0211 (alternate character sets) -> Python codec.
CODECS = {
    "": "ascii",
    "ASCII": "ascii",
    "8859/1": "latin-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
    "UNICODE": "utf-8",
    "UTF-8": "utf-8",
    "ISO IR192": "utf-8",
    "ISO IR6": "ascii",
    "ISO IR100": "latin-1",
    "GB 18030-2000": "gb18030",
    "BIG-5": "big5",
    "KS X 1001": "euc-kr",
    "ISO IR87": "iso2022_jp",
    # UNICODE UTF-16 and UTF-32 are not taken: their bytes collide with MLLP's framing (a 0x0B or
    # 0x1C inside a character), so a message that says it is one is refused (ERR 103).
}


class CharsetError(ValueError):
    """MSH-18 names a character set the hub does not know."""


def normalise_segments(data: bytes) -> bytes:
    """Strip a BOM and surrounding whitespace; make CR the only segment separator."""
    if data.startswith(BOM):
        data = data[len(BOM):]
    data = data.replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    return data.strip(b"\r \t\x00")


def declared_charset(data: bytes) -> str:
    """MSH-18 (first repetition), read from the raw bytes: it is ASCII in every real charset."""
    if not data.startswith(b"MSH") or len(data) < 8:
        return ""
    sep = data[3:4]
    first = data.split(b"\r", 1)[0]
    fields = first.split(sep)
    if len(fields) <= 17:
        return ""
    rep = data[5:6] if len(data) > 5 else b"~"
    return fields[17].split(rep)[0].decode("ascii", "replace").strip().upper()


def decode(data: bytes) -> tuple[str, str]:
    """(text with CR separators, codec used). Valid UTF-8 wins over a Latin-1/ASCII label."""
    data = normalise_segments(data)
    label = declared_charset(data)
    if label not in CODECS:
        raise CharsetError(f"MSH-18 names an unsupported character set: {label!r}")
    codec = CODECS[label]
    if codec in ("ascii", "latin-1"):
        try:
            return data.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            return data.decode("latin-1"), "latin-1"
    return data.decode(codec, errors="replace"), codec
