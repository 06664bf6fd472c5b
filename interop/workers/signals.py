"""How a runner waits for work and stops at once: it sleeps in select() on its LISTEN connection
(a job queued anywhere wakes it) and on the wake-up fd: SIGTERM/SIGINT set an event and, through
`signal.set_wakeup_fd`, make that select() return immediately (no idle poll to sit out), so
`interop serve` and a pod stop in well under a second. SIGHUP reloads the sites file."""
from __future__ import annotations

import logging
import os
import select
import signal
from collections.abc import Callable
from pathlib import Path
from threading import Event
from typing import Any

import psycopg

from ..store import db, queue

log = logging.getLogger("interop.worker")


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


def listen(database_url: str) -> psycopg.Connection[Any]:
    """A connection told of every job queued (NOTIFY at commit)."""
    conn = db.connect(database_url, autocommit=True)
    conn.execute(f"LISTEN {queue.CHANNEL}")
    return conn


def sleep(listener: psycopg.Connection[Any], wake_fd: int | None, timeout: float) -> None:
    """Until a job is queued, a signal arrives, or `timeout` seconds pass."""
    select.select([listener.fileno(), *([wake_fd] if wake_fd is not None else [])], [], [], timeout)
    drain(wake_fd)
    for _ in listener.notifies(timeout=0):
        pass


def beat(path: Path | None) -> None:
    """Touch the heartbeat file (INTEROP_HEARTBEAT_FILE): the loop is turning. A liveness probe
    that finds it old knows the process hangs, which a process-state check cannot see."""
    if path is None:
        return
    try:
        path.touch()
    except OSError as exc:  # a probe will say so; the work goes on
        log.warning("heartbeat file %s cannot be touched (%s)", path, exc.strerror)
