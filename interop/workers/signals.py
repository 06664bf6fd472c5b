"""How a runner process stops at once: SIGTERM/SIGINT set an event and, through
`signal.set_wakeup_fd`, make a select() on the runner's wait return immediately (no idle poll to
sit out), so `interop serve` and a pod stop in well under a second. SIGHUP reloads the sites file."""
from __future__ import annotations

import os
import signal
from collections.abc import Callable
from threading import Event


def install(on_hup: Callable[[], None]) -> tuple[Event, int]:
    """(the stop event, the fd to add to select) for this process's main thread."""
    stop = Event()
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: on_hup())
    return stop, read


def drain(fd: int | None) -> None:
    """Empty the wake-up pipe after a select() returned."""
    if fd is None:
        return
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass
