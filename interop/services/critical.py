"""Critical findings: notify at once, recommend a transfer, escalate until someone acknowledges.

The first time a version of a report is critical (a finding `mappings/` marks critical, from the
AI or from the radiologist), in the same transaction as that version: a `Communication`
(category alert, priority stat) to the ordering facility and to its higher-level hospital
(`referral` in the sites file), a transfer recommendation (`ServiceRequest`, intent proposal,
SNOMED CT 3457005 patient referral), and a `Task` that tracks acknowledgement, owned by the
site's first critical contact. An `escalate-critical` job runs after
INTEROP_CRITICAL_ESCALATE_MINUTES: if nobody acknowledged, the Task goes to the next contact
with a new Communication, and so on down the list. Acknowledgement, escalation and the transfer
decision are recorded (table critical_alert, the FHIR resources' history and, in the same
transaction, the analytics facts).

Each Communication is also queued, first in line, for the FHIR server of the hospital it is
addressed to; the report itself goes to both hospitals (`delivery.queue_report`).
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any

import psycopg

from ..domain.vocabulary import (
    ACK_TASK,
    ALERT_CATEGORY,
    COMMUNICATION_SYSTEM,
    REFERRAL,
    is_critical,
    is_critical_finding,
    reference_id,
    without_meta,
)
from ..sites import Site
from ..store import queue, resources, reviews
from . import delivery
from .analytics import facts
from .context import Context
from .errors import ReviewError
from .tasks import utc_now

ESCALATE = "escalate-critical"



def _contacts(site: Site | None) -> list[str]:
    raw = (site.extra.get("critical_contacts") if site else None) or []
    return [str(c) for c in raw] or [f"{site.name if site else 'ordering facility'}: duty physician"]


def _summary(conn: psycopg.Connection[Any], report: dict[str, Any]) -> str:
    found = []
    for ref in report.get("result") or []:
        obs = resources.read(conn, "Observation", reference_id(ref, "Observation") or "")
        if is_critical_finding(obs):
            p = (obs.get("valueQuantity") or {}).get("value")
            found.append(f"{obs['code'].get('text')}" + (f" (p={p:.2f})" if isinstance(p, (int, float)) else ""))
    return ", ".join(found) or "critical finding"


def _communication(conn: psycopg.Connection[Any], ctx: Context, report: dict[str, Any], recipient: str, text: str,
                   to: Site | None) -> dict[str, Any]:
    """Store the notice and queue it for the FHIR server of `to` (the hospital it is for)."""
    rid = resources.new_id()
    body: dict[str, Any] = {
        "resourceType": "Communication", "status": "completed", "priority": "stat",
        "identifier": [{"system": COMMUNICATION_SYSTEM, "value": rid}],
        "category": [{"coding": [ALERT_CATEGORY]}],
        "basedOn": [{"reference": f"DiagnosticReport/{report['id']}"}],
        "sent": utc_now().isoformat(), "recipient": [{"display": recipient}],
        "sender": {"display": "Imaging AI hub"},
        "payload": [{"contentString": text}],
        "reasonCode": [{"text": "Critical finding suspected by AI"}],
    }
    if report.get("subject"):
        body["subject"] = report["subject"]
    stored = resources.create(conn, body, ctx.params["Communication"], rid=rid)
    delivery.queue_notice(conn, ctx, stored, to)
    return stored


def raise_alert(conn: psycopg.Connection[Any], ctx: Context, report: dict[str, Any],
                site: Site | None) -> dict[str, Any] | None:
    """Create the notifications for a critical report version (conclusionCode AA: an AI finding,
    or one a radiologist added or confirmed), once per report; returns the ack Task."""
    if not is_critical(report) or reviews.has_alert(conn, report["id"]):
        return None
    higher = ctx.sites.referral(site)
    referral_code = site.referral if site else None
    higher_name = higher.name if higher else (referral_code or "the higher-level hospital")
    findings = _summary(conn, report)
    text = (f"CRITICAL: {findings}. Preliminary AI result, pending radiologist review; act on clinical judgement. "
            f"Recommendation: consider transfer to {higher_name}. / KHẨN: {findings}. Kết quả AI sơ bộ; "
            f"cân nhắc chuyển bệnh nhân lên {higher_name}.")
    contacts = _contacts(site)
    _communication(conn, ctx, report, contacts[0], text, site)
    if referral_code:
        _communication(conn, ctx, report, higher_name, text, higher)
    referral_body: dict[str, Any] = {
        "resourceType": "ServiceRequest", "status": "draft", "intent": "proposal", "priority": "stat",
        "code": {"coding": [REFERRAL], "text": f"Transfer to {higher_name}"},
        "reasonReference": [{"reference": f"DiagnosticReport/{report['id']}"}],
        "performer": [{"display": higher_name}], "authoredOn": utc_now().isoformat(),
        "note": [{"text": "Recommended by the hub on an AI-suspected critical finding; a clinician decides."}],
        "subject": report.get("subject") or {"display": "unknown patient"},
    }
    if report.get("basedOn"):
        referral_body["basedOn"] = report["basedOn"]
    referral = resources.create(conn, referral_body, ctx.params["ServiceRequest"])
    minutes = ctx.settings.critical_escalate_minutes
    task_body: dict[str, Any] = {
        "resourceType": "Task", "status": "requested", "intent": "order", "priority": "stat",
        "code": {"coding": [ACK_TASK], "text": ACK_TASK["display"]},
        "focus": {"reference": f"DiagnosticReport/{report['id']}"}, "owner": {"display": contacts[0]},
        "authoredOn": utc_now().isoformat(),
        "restriction": {"period": {"end": (utc_now() + timedelta(minutes=minutes)).isoformat()}},
        "businessStatus": {"text": f"notified {contacts[0]}"},
    }
    if report.get("subject"):
        task_body["for"] = report["subject"]
    task = resources.create(conn, task_body, ctx.params["Task"])
    reviews.add_alert(conn, report["id"], site.code if site else None, task["id"], referral["id"])
    _schedule(conn, ctx, report["id"], 1)
    return task


def _schedule(conn: psycopg.Connection[Any], ctx: Context, report_id: str, step: int) -> None:
    policy = ctx.policies.kind(ESCALATE)
    queue.enqueue(conn, ESCALATE, {"report": report_id, "step": step}, dedupe_key=f"{ESCALATE}:{report_id}:{step}",
                  max_attempts=policy.max_attempts, priority=policy.priority,
                  delay_seconds=ctx.settings.critical_escalate_minutes * 60)


def escalate(conn: psycopg.Connection[Any], ctx: Context, job: queue.Job, _timings: object = None) -> None:
    """`escalate-critical` job: hand an unacknowledged alert to the next contact."""
    with conn.transaction():
        alert = reviews.lock_alert(conn, job.payload["report"])
        if alert is None or alert["acknowledged_at"] is not None:
            queue.complete(conn, job)
            return
        site = ctx.sites.get(alert["site"])
        contacts = _contacts(site)
        task = without_meta(resources.read(conn, "Task", alert["task_id"]))
        step = int(job.payload["step"])
        if step >= len(contacts):
            task["businessStatus"] = {"text": f"not acknowledged; all {len(contacts)} contacts notified"}
            resources.update(conn, task, ctx.params["Task"])
            reviews.escalated(conn, alert["id"])
            queue.complete(conn, job)
            return
        report = resources.read(conn, "DiagnosticReport", alert["report_id"])
        _communication(conn, ctx, report, contacts[step], f"ESCALATED (not acknowledged): {_summary(conn, report)}. "
                       "Preliminary AI result, pending radiologist review.", site)
        task["owner"] = {"display": contacts[step]}
        task["businessStatus"] = {"text": f"escalated to {contacts[step]}"}
        minutes = ctx.settings.critical_escalate_minutes
        task["restriction"] = {"period": {"end": (utc_now() + timedelta(minutes=minutes)).isoformat()}}
        resources.update(conn, task, ctx.params["Task"])
        reviews.escalated(conn, alert["id"], step)
        _schedule(conn, ctx, alert["report_id"], step + 1)
        queue.complete(conn, job)


def _locked_alert(conn: psycopg.Connection[Any], report_id: str, by: str, what: str) -> dict[str, Any]:
    """The report's alert, locked for a person's action on it (named: `what` needs a `by`)."""
    if not by.strip():
        raise ReviewError(f"{what} needs the name of who acts", 422)
    alert = reviews.lock_alert(conn, report_id)
    if alert is None:
        raise ReviewError(f"DiagnosticReport/{report_id} has no critical alert", 404)
    return alert


def acknowledge(conn: psycopg.Connection[Any], ctx: Context, report_id: str, *, by: str) -> dict[str, Any]:
    """Someone took responsibility for the critical result: stop escalating. Idempotent.
    Returns the acknowledgement Task."""
    with conn.transaction():
        alert = _locked_alert(conn, report_id, by, "an acknowledgement")
        task = resources.read(conn, "Task", alert["task_id"])
        if alert["acknowledged_at"] is None:
            reviews.acknowledged(conn, alert["id"], by)
            body = without_meta(task)
            body.update(status="completed", businessStatus={"text": f"acknowledged by {by}"},
                        lastModified=utc_now().isoformat())
            task = resources.update(conn, body, ctx.params["Task"])[0]
            queue.cancel_queued(conn, f"{ESCALATE}:{report_id}:")
        facts.record(conn, ctx, report_id, event="acknowledged")
        return task


def decide_transfer(conn: psycopg.Connection[Any], ctx: Context, report_id: str, *, decision: str,
                    by: str) -> dict[str, Any]:
    """Record the clinician's transfer decision on the recommendation (active order or revoked);
    returns the ServiceRequest."""
    if decision not in ("transfer", "no-transfer"):
        raise ReviewError("decision must be 'transfer' or 'no-transfer'", 400)
    with conn.transaction():
        alert = _locked_alert(conn, report_id, by, "a transfer decision")
        referral = without_meta(resources.read(conn, "ServiceRequest", alert["referral_id"]))
        if decision == "transfer":
            referral.update(status="active", intent="order")
        else:
            referral.update(status="revoked")
        referral["note"] = [*referral.get("note", []), {"text": f"{decision} decided by {by}", "time": utc_now().isoformat()}]
        stored = resources.update(conn, referral, ctx.params["ServiceRequest"])[0]
        reviews.decided(conn, alert["id"], decision, by)
        facts.record(conn, ctx, report_id, event="transfer")
        return stored
