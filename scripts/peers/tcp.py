"""A loopback TCP server on a thread, one thread per connection: the base of the stand-in peers
(the demo's RIS, the tests' hung hospital)."""
from __future__ import annotations

import socket
import threading


class LoopbackServer:
    """Listens on a free loopback port (`port`) and calls `serve(conn)` for each connection in a
    thread of its own until `close()`; connections still open are closed with it."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.connections = 0
        self._open: list[socket.socket] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def _accept(self) -> None:
        self.server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            self._open.append(conn)
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self.server.close()
        for conn in self._open:
            try:
                conn.close()
            except OSError:
                pass
