"""A stand-in for a hospital's RIS/integration engine in the demo: an MLLP server on loopback
that acknowledges (AA) and keeps every message it receives (the hub's ORU^R01 results)."""
from __future__ import annotations

import socket
import threading

from interop.hl7 import ack, header, mllp
from interop.hl7.errors import AckCode

from .tcp import LoopbackServer


class DemoRis(LoopbackServer):
    def __init__(self) -> None:
        self.messages: list[str] = []
        self.received = threading.Event()
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        framer = mllp.Framer(4 * 1024 * 1024)
        conn.settimeout(30)
        with conn:
            while not self.stopping:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                for item in framer.feed(data):
                    if isinstance(item, mllp.FrameTooLarge):
                        return
                    self.messages.append(item.decode("utf-8", "replace"))
                    self.received.set()
                    head, _ids = header.read(item)
                    conn.sendall(mllp.frame(ack.build(head, AckCode.AA)))
