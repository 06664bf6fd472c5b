"""A stand-in for a hospital's RIS/integration engine in the demo: an MLLP server on loopback
that acknowledges (AA) and keeps every message it receives (the hub's ORU^R01 results)."""
from __future__ import annotations

import socket
import threading

from interop.hl7 import ack, header, mllp
from interop.hl7.errors import AckCode


class DemoRis:
    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.messages: list[str] = []
        self.received = threading.Event()
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        framer = mllp.Framer(4 * 1024 * 1024)
        conn.settimeout(30)
        with conn:
            while not self._stop.is_set():
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

    def close(self) -> None:
        self._stop.set()
        self.server.close()
