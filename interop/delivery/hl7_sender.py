"""The HL7 channel: build the ORU^R01 for an outbox row, send it over MLLP, record the answer.

At-least-once with duplicate detection left possible: the message and its control id are
committed on the row before the first send, and a retry (after no answer, a lost ACK, or a
sender that died mid-send and lost its lease) sends the same bytes with the same MSH-10. A
report version is queued once per destination (the outbox's unique key), and once a row is
`sent` it is never claimed again. The lease must outlast connect + ACK timeouts, which the
defaults do (10 s + 30 s against INTEROP_JOB_LEASE_SECONDS, 120 s).
"""
from __future__ import annotations

import logging
import secrets
from datetime import datetime, timezone
from typing import Any

import psycopg

from ..config import Settings
from ..hl7 import oru
from ..sites import Site
from ..store import resources
from . import outbox
from .mllp_client import BadAck, MllpClient, PeerUnavailable

log = logging.getLogger("interop.delivery")

SENDING_FACILITY = "INTEROP_HUB"  # MSH-4 of what the hub sends


class RenderError(Exception):
    """The message cannot be built from what is stored (no retry helps; `dead`)."""


def _ref_id(ref: dict[str, Any] | None, rtype: str) -> str | None:
    value = (ref or {}).get("reference") or ""
    prefix = rtype + "/"
    return value[len(prefix):].split("/_history/")[0] if value.startswith(prefix) else None


def _read(conn: psycopg.Connection[Any], rtype: str, rid: str | None) -> dict[str, Any] | None:
    if not rid:
        return None
    try:
        return resources.read(conn, rtype, rid)
    except (resources.NotFound, resources.Gone):
        return None


def render(
    conn: psycopg.Connection[Any], item: outbox.OutboxItem, site: Site, control_id: str, now: datetime,
    *, sending_facility: str = SENDING_FACILITY,
) -> str:
    """The ORU^R01 for one outbox row: the report as it was at `item.version`, its current
    Observations and Device, the ServiceRequest it is based on, its Patient, its ImagingStudy."""
    if item.resource_type != "DiagnosticReport":
        raise RenderError(f"no HL7 message for {item.resource_type}")
    if site.hl7 is None:
        raise RenderError(f"site {site.code} has no hl7 destination")
    try:
        report = resources.vread(conn, "DiagnosticReport", item.resource_id, item.version)
    except resources.NotFound as exc:
        raise RenderError(f"DiagnosticReport/{item.resource_id} has no version {item.version}") from exc
    observations = []
    for ref in report.get("result") or []:
        obs = _read(conn, "Observation", _ref_id(ref, "Observation"))
        if obs is None:
            raise RenderError(f"a result of DiagnosticReport/{item.resource_id} is missing")
        observations.append(obs)
    device = _read(conn, "Device", _ref_id({"reference": oru.device_reference(report, observations)}, "Device"))
    if device is None:
        raise RenderError(f"the Device of DiagnosticReport/{item.resource_id} is missing")
    service_request = next((sr for sr in (_read(conn, "ServiceRequest", _ref_id(ref, "ServiceRequest"))
                                          for ref in report.get("basedOn") or []) if sr), None)
    study = next((s for s in (_read(conn, "ImagingStudy", _ref_id(ref, "ImagingStudy"))
                              for ref in report.get("imagingStudy") or []) if s), None)
    patient = _read(conn, "Patient", _ref_id(report.get("subject"), "Patient"))
    try:
        return oru.build_oru(
            report, observations, device, oru.order_context(service_request, study=study),
            sending_facility=sending_facility, receiving_application=site.hl7.receiving_application,
            receiving_facility=site.hl7.receiving_facility or site.code, control_id=control_id, now=now,
            patient=patient,
        )
    except oru.OruError as exc:
        raise RenderError(str(exc)) from exc


def new_control_id(item: outbox.OutboxItem) -> str:
    """MSH-10 (ST, at most 20 characters): the row id and a random part, unique per build."""
    return f"{item.id}.{secrets.token_hex(8)}"[:20]



class Hl7Channel:
    """Delivers one claimed `hl7` row (the dispatcher, `sender.OutboxSender`, claims it)."""

    def __init__(self, settings: Settings, sites: Any, *, connect_timeout: float = 10.0, ack_timeout: float = 30.0,
                 max_attempts: int = outbox.MAX_ATTEMPTS, sending_facility: str = SENDING_FACILITY):
        self.settings = settings
        self.sites = sites  # () -> dict[str, Site]
        self.connect_timeout = connect_timeout
        self.ack_timeout = ack_timeout
        self.max_attempts = max_attempts
        self.sending_facility = sending_facility

    def deliver(self, conn: psycopg.Connection[Any], item: outbox.OutboxItem) -> None:
        site = self.sites().get(item.site_code)
        if site is None or site.hl7 is None:
            with conn.transaction():
                outbox.mark_dead(conn, item, f"no hl7 destination for site {item.site_code} in the sites file")
            return
        newer = outbox.newer_sent_version(conn, item)
        if newer is not None:  # e.g. an old version replayed after a newer one went
            with conn.transaction():
                outbox.mark_dead(conn, item, f"superseded: version {newer} was already sent")
            return
        if item.attempts > self.max_attempts:  # e.g. senders that kept dying mid-send
            with conn.transaction():
                outbox.mark_dead(conn, item, f"gave up after {item.attempts - 1} attempts")
            return
        control_id, payload = item.control_id, item.payload
        if not payload or not control_id:
            control_id = new_control_id(item)
            try:
                payload = render(conn, item, site, control_id, datetime.now(timezone.utc),
                                 sending_facility=self.sending_facility)
            except RenderError as exc:
                with conn.transaction():
                    outbox.mark_dead(conn, item, f"cannot build the message: {exc}"[:500])
                log.warning("outbox %s: cannot build the message: %s", item.id, exc)
                return
            with conn.transaction():
                outbox.set_message(conn, item, control_id, payload)
        client = MllpClient(site.hl7.host, site.hl7.port, connect_timeout=self.connect_timeout,
                            ack_timeout=self.ack_timeout)
        try:
            ack = client.exchange(payload, control_id)
        except (PeerUnavailable, BadAck) as exc:
            error = f"{type(exc).__name__}: {exc}"
            delay = outbox.fail_transient(conn, item, error, self.settings.retry_base_seconds, self.max_attempts,
                                          getattr(exc, "answer", None))
            log.warning("outbox %s: %s; %s", item.id, error,
                        "dead" if delay is None else f"retry in {delay}s")
            return
        with conn.transaction():
            if ack.accepted:
                outbox.mark_sent(conn, item, ack.raw, control_id)
                log.info("outbox %s: %s v%s sent to %s", item.id, item.resource_id, item.version, item.destination)
            else:
                status = outbox.mark_rejected(conn, item, ack.raw, f"{ack.code.value}: {ack.text}"[:500], code=ack.code,
                                              base_seconds=self.settings.retry_base_seconds)
                log.warning("outbox %s: %s from %s; now %s", item.id, ack.code.value, item.destination, status)
