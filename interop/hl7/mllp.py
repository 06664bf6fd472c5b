"""MLLP framing (HL7 v2 Minimal Lower Layer Protocol), sans I/O: bytes in, frames out.

A frame is <VT> payload <FS><CR> (0x0B ... 0x1C 0x0D). The framer is fed whatever a socket
read returned (part of a frame, several frames, garbage between them) and hands back the
complete payloads in order. Bytes outside a frame are discarded and counted. A start block
inside an unfinished frame means the sender gave up on it and started again: the partial
frame is discarded (counted as garbage) and the new one is read.

A frame longer than `max_bytes` is never held in memory: as soon as it passes the limit the
framer returns a `FrameTooLarge` (with the first bytes, enough to read an MSH) in place of
the frame and skips the rest of it up to its end block.
"""
from __future__ import annotations

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
_SB = 0x0B
HEAD_BYTES = 4096  # kept from an oversize frame: enough for the MSH segment


class FrameTooLarge(Exception):
    """A frame passed the size limit. Returned by `Framer.feed` in the frame's place."""

    def __init__(self, head: bytes, size: int, limit: int):
        super().__init__(f"MLLP frame of at least {size} bytes exceeds the limit of {limit} bytes")
        self.head = head  # the first bytes of the payload
        self.size = size  # bytes seen so far (the whole frame when its end was seen)
        self.limit = limit


def frame(payload: bytes) -> bytes:
    """Wrap a payload in an MLLP frame."""
    return START_BLOCK + payload + END_BLOCK


class Framer:
    """Incremental MLLP decoder for one connection."""

    def __init__(self, max_bytes: int):
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self.garbage_bytes = 0  # discarded outside frames (and abandoned partial frames)
        self._buf = bytearray()
        self._in_frame = False
        self._skipping = False  # inside an oversize frame, waiting for its end block
        self._scanned = 0  # bytes of _buf already searched for an end or start block

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame held (0 between frames)."""
        return len(self._buf) if self._in_frame and not self._skipping else 0

    @property
    def in_frame(self) -> bool:
        return self._in_frame

    def feed(self, data: bytes) -> list[bytes | FrameTooLarge]:
        """Frames completed by `data`, in order; FrameTooLarge in place of an oversize one."""
        out: list[bytes | FrameTooLarge] = []
        buf = self._buf
        buf += data
        while buf:
            if not self._in_frame:
                start = buf.find(_SB)
                if start < 0:
                    self.garbage_bytes += len(buf)
                    buf.clear()
                    break
                self.garbage_bytes += start
                del buf[: start + 1]
                self._in_frame = True
                self._scanned = 0
                continue
            if self._skipping:
                end = buf.find(END_BLOCK)
                if end < 0:
                    keep = 1 if buf[-1:] == b"\x1c" else 0  # an end block split across reads
                    del buf[: len(buf) - keep]
                    break
                del buf[: end + 2]
                self._skipping = False
                self._in_frame = False
                continue
            # Inside a frame: look for its end, and for a restart before it.
            from_ = max(0, self._scanned - 1)  # the byte before may be the FS of a split end block
            end = buf.find(END_BLOCK, from_)
            restart = buf.find(_SB, self._scanned, end if end >= 0 else len(buf))
            if restart >= 0:
                self.garbage_bytes += restart + 1  # the abandoned partial frame and its start block
                del buf[: restart + 1]
                self._scanned = 0
                continue
            if end >= 0:
                if end > self.max_bytes:
                    out.append(FrameTooLarge(bytes(buf[:HEAD_BYTES]), end, self.max_bytes))
                else:
                    out.append(bytes(buf[:end]))
                del buf[: end + 2]
                self._in_frame = False
                continue
            if len(buf) > self.max_bytes + 1:  # +1: the last byte may be the FS of the end block
                out.append(FrameTooLarge(bytes(buf[:HEAD_BYTES]), len(buf), self.max_bytes))
                self._skipping = True
                keep = 1 if buf[-1:] == b"\x1c" else 0
                del buf[: len(buf) - keep]
                continue
            self._scanned = len(buf)
            break
        return out
