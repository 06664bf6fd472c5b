"""The outbox sender: claim the most urgent ready row of any channel and hand it to that
channel's module. Per channel: `hl7_sender` (ORU^R01 over MLLP), `fhir_push` (transaction Bundle
to the site's HIS/EMR FHIR server), `subscriptions` (FHIR R4 rest-hook notifications).

Also here: `queue_report_delivery`, which queues a report version for its site's HL7 destination
(`deliver.on_report_changed` is the one entry point that queues every channel).
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
from typing import Any, Callable

import psycopg

from ..config import Settings
from ..sites import Site
from ..sites import load as load_sites
from ..store import db
from . import outbox
from .hl7_sender import SENDING_FACILITY, Hl7Channel, RenderError, new_control_id, render

log = logging.getLogger("interop.delivery")

HL7 = "hl7"
FHIR = "fhir"
REST_HOOK = "rest-hook"
CRITICAL_PRIORITY = 0
DEFAULT_PRIORITY = 5

__all__ = ["OutboxSender", "queue_report_delivery", "destination", "is_critical", "render", "RenderError",
           "new_control_id", "SENDING_FACILITY", "HL7", "FHIR", "REST_HOOK"]


def destination(site_code: str, channel: str = HL7) -> str:
    return f"{site_code.upper()}:{channel}"


def is_critical(report: dict[str, Any]) -> bool:
    return any(c.get("code") == "AA" for cc in report.get("conclusionCode") or [] for c in cc.get("coding") or [])


def priority(report: dict[str, Any]) -> int:
    return CRITICAL_PRIORITY if is_critical(report) else DEFAULT_PRIORITY


def report_version(report: dict[str, Any]) -> int:
    version = int((report.get("meta") or {}).get("versionId") or 0)
    if version < 1:
        raise ValueError("queue the report as stored: it needs meta.versionId")
    return version


def queue_report_delivery(
    conn: psycopg.Connection[Any], report: dict[str, Any], sites: dict[str, Site], site_code: str | None
) -> list[int]:
    """Queue the stored `report` (its meta.versionId) for its site's HL7 destination, in the
    caller's transaction. Priority 0 for a critical finding (conclusionCode AA). Returns the new
    row ids; a version already queued is not queued again."""
    site = sites.get((site_code or "").upper())
    if site is None:
        return []
    version = report_version(report)
    ids = []
    if site.hl7 is not None:
        new = outbox.enqueue(conn, HL7, destination(site.code), "DiagnosticReport", report["id"], version,
                             priority(report))
        if new is not None:
            ids.append(new)
    return ids


Handler = Callable[[psycopg.Connection[Any], outbox.OutboxItem], None]


class OutboxSender:
    """Claims outbox rows of every channel and dispatches each to its channel's module; the
    worker loop calls `run_once()`. Connects lazily. `channel` limits it to one channel."""

    def __init__(self, settings: Settings, worker_id: str | None = None, *, connect_timeout: float = 10.0,
                 ack_timeout: float = 30.0, max_attempts: int = outbox.MAX_ATTEMPTS,
                 sending_facility: str = SENDING_FACILITY, channel: str | None = None):
        if not settings.database_url:
            raise RuntimeError("the sender needs DATABASE_URL")
        from .fhir_push import FhirChannel
        from .subscriptions import RestHookChannel

        self.settings = settings
        self.id = worker_id or f"{socket.gethostname()}:{os.getpid()}:out:{secrets.token_hex(3)}"
        self.channel = channel
        sites = self.sites
        self.handlers: dict[str, Handler] = {
            HL7: Hl7Channel(settings, sites, connect_timeout=connect_timeout, ack_timeout=ack_timeout,
                            max_attempts=max_attempts, sending_facility=sending_facility).deliver,
            FHIR: FhirChannel(settings, sites, max_attempts=max_attempts).deliver,
            REST_HOOK: RestHookChannel(settings).deliver,
        }
        self._conn: psycopg.Connection[Any] | None = None

    def sites(self) -> dict[str, Site]:
        return load_sites(self.settings.sites_file)

    @property
    def conn(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = db.connect(self.settings.database_url or "", autocommit=True)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def run_once(self) -> bool:
        """Claim and deliver one row (any channel, most urgent first); False when none is ready."""
        item = outbox.claim(self.conn, self.id, self.settings.job_lease_seconds, channel=self.channel)
        if item is None:
            return False
        handler = self.handlers.get(item.channel)
        try:
            if handler is None:
                with self.conn.transaction():
                    outbox.mark_dead(self.conn, item, f"no sender for channel {item.channel}")
                return True
            handler(self.conn, item)
        except outbox.LeaseLost:
            log.warning("outbox %s: lease lost; another sender has it", item.id)
        return True
