"""Audit records: FHIR AuditEvents in the append-only audit table, searchable at /fhir/AuditEvent
by admins.

A change is recorded in the transaction that makes it (`record`: both or neither). Reads,
searches and refusals, many per second, go through the process's `AuditWriter`: a thread that
writes them in batches, one transaction per batch, within `INTERVAL_SECONDS`. A record waits in
memory at most that long (a process killed in that window loses it, the price of not paying a
database round trip and a disk flush on every read); while the database cannot take records,
they wait, and past `MAX_PENDING` the hub stops serving reads (`AuditBacklog`) rather than serve
them unrecorded.
"""
from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import psycopg

from ...domain.audit import AuditQuery, Event, from_row, row_of
from ...store import audit as store

log = logging.getLogger("interop.audit")

INTERVAL_SECONDS = 0.05
BATCH = 500
MAX_PENDING = 20_000
RETRY_SECONDS = 1.0


class AuditBacklog(Exception):
    """Records cannot be written now and too many wait: do not serve what cannot be recorded."""


def record(conn: psycopg.Connection[Any], event: Event) -> None:
    """Store the AuditEvent for `event` in the caller's transaction."""
    store.insert(conn, row_of(event))


def read(conn: psycopg.Connection[Any], event_id: str) -> dict[str, Any] | None:
    if not (event_id.isascii() and event_id.isdigit() and len(event_id) < 19):
        return None
    found = store.read(conn, int(event_id))
    return from_row(found) if found is not None else None


def search(conn: psycopg.Connection[Any], query: AuditQuery) -> tuple[int, list[dict[str, Any]]]:
    total, rows = store.search(conn, query)
    return total, [from_row(r) for r in rows]


class AuditWriter:
    """One per process: records of reads, written in batches by a thread of its own."""

    def __init__(self, connect: Callable[[], AbstractContextManager[psycopg.Connection[Any]]]):
        self._connect = connect
        self._pending: deque[dict[str, Any]] = deque()
        self._lock = threading.Condition()
        self._written = 0   # records written so far
        self._taken = 0     # records submitted so far
        self._thread: threading.Thread | None = None
        self._stopping = False

    def submit(self, event: Event) -> None:
        row = row_of(event)
        with self._lock:
            if len(self._pending) >= MAX_PENDING:
                raise AuditBacklog("the audit trail cannot be written now")
            self._pending.append(row)
            self._taken += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
                self._thread.start()
                atexit.register(self.close)
            if len(self._pending) >= BATCH:  # otherwise the writer takes them all at its next turn
                self._lock.notify()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every record submitted so far is written; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            target = self._taken
            self._lock.notify_all()
            while self._written < target:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None:
                    return self._written >= target
                self._lock.wait(min(left, INTERVAL_SECONDS))
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Write what waits (up to `timeout`), then stop the thread."""
        self.flush(timeout)
        with self._lock:
            self._stopping = True
            self._lock.notify()

    def _run(self) -> None:
        while True:
            with self._lock:
                if len(self._pending) < BATCH and not self._stopping:
                    self._lock.wait(INTERVAL_SECONDS)  # gather a batch: one transaction for many records
                if not self._pending:
                    if self._stopping:
                        return
                    continue
                batch = [self._pending[i] for i in range(min(BATCH, len(self._pending)))]
            try:
                with self._connect() as conn, conn.transaction():
                    store.copy(conn, batch)
            except Exception as exc:  # the database is away: keep the records, try again
                log.error("audit records not written yet (%s); %d waiting", type(exc).__name__, len(self._pending))
                if self._stopping:  # the process is ending and the database is still away
                    log.error("%d audit records could not be written before the process ended", len(self._pending))
                    return
                time.sleep(RETRY_SECONDS)
                continue
            with self._lock:
                for _ in batch:
                    self._pending.popleft()
                self._written += len(batch)
                self._lock.notify_all()
