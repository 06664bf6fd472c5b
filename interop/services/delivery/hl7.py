"""The HL7 channel: the ORU^R01 of a report version, over MLLP, to the site's `hl7` destination.

At-least-once with duplicate detection left possible: the message and its control id are
committed on the job before the first send, and a retry (after no answer, a lost ACK, or a
runner that died mid-send and lost its lease) sends the same bytes with the same MSH-10.
Answers (HL7 v2.5.1 chapter 2, original mode): AA sent; AE refused for good (the same message
gets the same answer: an operator fixes the data and replays it); AR refused for now (the
receiver may be down "for reasons unrelated to content"): tried again a few times
(`refused_attempts` in queue.yaml); CE/CR as AE/AR; no answer, a garbage answer, a timeout: retry.
Connect and answer timeouts are the destination's (`hl7.connect_timeout_seconds`,
`hl7.ack_timeout_seconds` in the sites file), so a silent peer holds only its own lane.
A destination with `tls: true` is reached over TLS, its certificate verified against
INTEROP_TLS_CA_FILE (else the system's trust store) and its host name checked, the hub's
INTEROP_TLS_CLIENT_CERT presented when set; one that does not verify is retried, never sent to.
"""
from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

import psycopg

from ...domain.vocabulary import reference_id
from ...hl7 import oru
from ...hl7.client import BadAck, MllpClient, PeerUnavailable
from ...hl7.errors import AckCode
from ...sites import Site
from ...store import queue, resources
from ...tls import ClientTls, TlsError, client_context
from ..context import Context
from . import Message, Outcome, Unbuildable, report_version, site_of_lane

SENDING_FACILITY = "INTEROP_HUB"  # MSH-4 of what the hub sends
FINAL_REFUSALS = (AckCode.AE, AckCode.CE)




def _find(conn: psycopg.Connection[Any], rtype: str, ref: dict[str, Any] | str | None) -> dict[str, Any] | None:
    """The stored resource of type `rtype` that `ref` points at, or None."""
    rid = reference_id(ref, rtype)
    return resources.find(conn, f"{rtype}/{rid}") if rid else None


def render(conn: psycopg.Connection[Any], report_id: str, version: int, site: Site, control_id: str, now: datetime,
           *, sending_facility: str = SENDING_FACILITY) -> str:
    """The ORU^R01 for one report version: the report as it was at `version`, its current
    Observations and Device, the ServiceRequest it is based on, its Patient, its ImagingStudy."""
    if site.hl7 is None:
        raise Unbuildable(f"site {site.code} has no hl7 destination")
    report, observations = report_version(conn, report_id, version)
    device = _find(conn, "Device", oru.device_reference(report, observations))
    if device is None:
        raise Unbuildable(f"the Device of DiagnosticReport/{report_id} is missing")
    service_request = next((sr for sr in (_find(conn, "ServiceRequest", ref)
                                          for ref in report.get("basedOn") or []) if sr), None)
    study = next((s for s in (_find(conn, "ImagingStudy", ref)
                              for ref in report.get("imagingStudy") or []) if s), None)
    patient = _find(conn, "Patient", report.get("subject"))
    try:
        return oru.build_oru(
            report, observations, device, oru.order_context(service_request, study=study),
            sending_facility=sending_facility, receiving_application=site.hl7.receiving_application,
            receiving_facility=site.hl7.receiving_facility or site.code, control_id=control_id, now=now,
            patient=patient, version=site.hl7.version,
        )
    except oru.OruError as exc:
        raise Unbuildable(str(exc)) from exc


def new_control_id(job_id: int) -> str:
    """MSH-10 (ST, at most 20 characters): the job id and a random part, unique per build."""
    return f"{job_id}.{secrets.token_hex(8)}"[:20]


def answer_outcome(ack: Any) -> Outcome:
    """What an ACK means for the delivery (shared by the ORU and application-ack channels)."""
    if ack.accepted:
        return Outcome.sent(ack.raw)
    return Outcome.refused(f"{ack.code.value}: {ack.text}"[:500], ack.raw, final=ack.code in FINAL_REFUSALS)


def exchange(host: str, port: int, connect_timeout: float, ack_timeout: float, message: Message, *,
             tls: ClientTls | None = None) -> Outcome:
    """Send one message over MLLP (over TLS with `tls`) and classify the ACK (or its absence)."""
    try:
        context = client_context(tls) if tls is not None else None
    except TlsError as exc:  # the hub's own TLS files: fixed by an operator, then sent
        return Outcome.retry(f"TlsError: {exc}")
    client = MllpClient(host, port, connect_timeout=connect_timeout, ack_timeout=ack_timeout, ssl_context=context)
    try:
        ack = client.exchange(message.text, message.id)
    except BadAck as exc:
        return Outcome.retry(f"BadAck: {exc}", exc.answer or None)
    except PeerUnavailable as exc:
        return Outcome.retry(f"PeerUnavailable: {exc}")
    return answer_outcome(ack)


class Hl7Channel:
    """`deliver-hl7` jobs: a report version as ORU^R01 to `SITE:hl7`."""

    def __init__(self, ctx: Context, *, sending_facility: str = SENDING_FACILITY):
        self.ctx = ctx
        self.sending_facility = sending_facility
        self.tls = ClientTls.from_settings(ctx.settings)

    def _site(self, job: queue.Job) -> Site | None:
        site = site_of_lane(self.ctx, job.lane)
        return site if site is not None and site.hl7 is not None else None

    def prepare(self, conn: psycopg.Connection[Any], job: queue.Job) -> Message | Outcome:
        site = self._site(job)
        if site is None:
            return Outcome.dead(f"no hl7 destination for {job.lane} in the sites file")
        if job.message and job.message_id:
            return Message(job.message_id, job.message)
        if job.payload.get("resource_type") != "DiagnosticReport":
            return Outcome.dead(f"no HL7 message for {job.payload.get('resource_type')}")
        control_id = new_control_id(job.id)
        try:
            text = render(conn, job.payload["resource_id"], int(job.payload["version"]), site, control_id,
                          datetime.now(UTC), sending_facility=self.sending_facility)
        except Unbuildable as exc:
            return Outcome.dead(f"cannot build the message: {exc}"[:500])
        return Message(control_id, text)

    def send(self, job: queue.Job, message: Message) -> Outcome:
        site = self._site(job)
        if site is None or site.hl7 is None:
            return Outcome.dead(f"no hl7 destination for {job.lane} in the sites file")
        dest = site.hl7
        return exchange(dest.host, dest.port, dest.connect_timeout_seconds, dest.ack_timeout_seconds, message,
                        tls=self.tls if dest.tls else None)

    def ended(self, conn: psycopg.Connection[Any], job: queue.Job, outcome: Outcome, status: str) -> None:
        pass
