"""Critical findings: notify at once, recommend a transfer, escalate until someone acknowledges.

When a report carries a finding that `mappings/` marks critical, in the same transaction as
the report: a `Communication` (category alert, priority stat) to the ordering facility and to
its higher-level hospital (`referral` in the sites file), a transfer recommendation
(`ServiceRequest`, intent proposal, SNOMED CT 3457005 patient referral), and a `Task` that
tracks acknowledgement, owned by the site's first critical contact. An `escalate-critical` job
runs after INTEROP_CRITICAL_ESCALATE_MINUTES: if nobody acknowledged, the Task goes to the next
contact with a new Communication, and so on down the list. Acknowledgement, escalation and the
transfer decision are recorded (table critical_alert, the FHIR resources' history and, in the
same transaction, the analytics facts).

Each Communication is also queued, at the highest priority, for the FHIR server of the hospital
it is addressed to (the ordering site's, the higher-level hospital's), when the sites file names
one; the report itself goes to both as ORU and FHIR push (`delivery.deliver`).
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg

from ..analytics import facts
from ..delivery import outbox
from ..delivery.sender import CRITICAL_PRIORITY, FHIR, destination, is_critical
from ..sites import Site
from ..store import jobs, resources
from ..store.search_params import SearchParam
from .errors import ReviewError

ESCALATE = "escalate-critical"
ALERT_CATEGORY = {"system": "http://terminology.hl7.org/CodeSystem/communication-category", "code": "alert",
                  "display": "Alert"}
REFERRAL = {"system": "http://snomed.info/sct", "code": "3457005", "display": "Patient referral"}
COMMUNICATION_SYSTEM = "urn:interop-hub:communication"  # the identifier an EMR finds a notice by
ACK_TASK = {"system": "urn:interop-hub:task-type", "code": "acknowledge-critical-result",
            "display": "Acknowledge a critical result"}


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _contacts(site: Site | None) -> list[str]:
    raw = (site.extra.get("critical_contacts") if site else None) or []
    return [str(c) for c in raw] or [f"{site.name if site else 'ordering facility'}: duty physician"]


def _summary(conn: psycopg.Connection[Any], report: dict[str, Any]) -> str:
    found = []
    for ref in report.get("result", []):
        obs = resources.read(conn, "Observation", ref["reference"].split("/", 1)[1])
        if any(c.get("code") == "AA" for i in obs.get("interpretation", []) for c in i.get("coding", [])):
            p = obs.get("valueQuantity", {}).get("value")
            found.append(f"{obs['code'].get('text')}" + (f" (p={p:.2f})" if isinstance(p, (int, float)) else ""))
    return ", ".join(found) or "critical finding"


def _communication(report: dict[str, Any], recipient: str, text: str, params: Any,
                   conn: psycopg.Connection[Any], to: Site | None) -> dict[str, Any]:
    """Store the notice and queue it for the FHIR server of `to` (the hospital it is for)."""
    rid = resources.new_id()
    body: dict[str, Any] = {
        "resourceType": "Communication", "status": "completed", "priority": "stat",
        "identifier": [{"system": COMMUNICATION_SYSTEM, "value": rid}],
        "category": [{"coding": [ALERT_CATEGORY]}],
        "basedOn": [{"reference": f"DiagnosticReport/{report['id']}"}],
        "sent": _now().isoformat(), "recipient": [{"display": recipient}],
        "sender": {"display": "Imaging AI hub"},
        "payload": [{"contentString": text}],
        "reasonCode": [{"text": "Critical finding suspected by AI"}],
    }
    if report.get("subject"):
        body["subject"] = report["subject"]
    stored = resources.create(conn, body, params["Communication"], rid=rid)
    if to is not None and to.fhir is not None:
        outbox.enqueue(conn, FHIR, destination(to.code, FHIR), "Communication", rid, 1, CRITICAL_PRIORITY)
    return stored


def raise_alert(conn: psycopg.Connection[Any], params: dict[str, dict[str, SearchParam]], report: dict[str, Any],
                sites: dict[str, Site], site_code: str | None, escalate_minutes: int) -> dict[str, Any] | None:
    """Create the notifications for a critical report (once per report); returns the ack Task."""
    if not is_critical(report):
        return None
    if conn.execute("SELECT 1 FROM critical_alert WHERE report_id = %s", (report["id"],)).fetchone():
        return None
    site = sites.get((site_code or "").upper())
    referral_code = site.referral if site else None
    higher = sites.get(referral_code.upper()) if referral_code else None
    higher_name = higher.name if higher else (referral_code or "the higher-level hospital")
    findings = _summary(conn, report)
    text = (f"CRITICAL: {findings}. Preliminary AI result, pending radiologist review; act on clinical judgement. "
            f"Recommendation: consider transfer to {higher_name}. / KHẨN: {findings}. Kết quả AI sơ bộ; "
            f"cân nhắc chuyển bệnh nhân lên {higher_name}.")
    contacts = _contacts(site)
    _communication(report, contacts[0], text, params, conn, site)
    if referral_code:
        _communication(report, higher_name, text, params, conn, higher)
    referral_body: dict[str, Any] = {
        "resourceType": "ServiceRequest", "status": "draft", "intent": "proposal", "priority": "stat",
        "code": {"coding": [REFERRAL], "text": f"Transfer to {higher_name}"},
        "reasonReference": [{"reference": f"DiagnosticReport/{report['id']}"}],
        "performer": [{"display": higher_name}], "authoredOn": _now().isoformat(),
        "note": [{"text": "Recommended by the hub on an AI-suspected critical finding; a clinician decides."}],
        "subject": report.get("subject") or {"display": "unknown patient"},
    }
    if report.get("basedOn"):
        referral_body["basedOn"] = report["basedOn"]
    referral = resources.create(conn, referral_body, params["ServiceRequest"])
    deadline = _now() + timedelta(minutes=escalate_minutes)
    task_body: dict[str, Any] = {
        "resourceType": "Task", "status": "requested", "intent": "order", "priority": "stat",
        "code": {"coding": [ACK_TASK], "text": ACK_TASK["display"]},
        "focus": {"reference": f"DiagnosticReport/{report['id']}"}, "owner": {"display": contacts[0]},
        "authoredOn": _now().isoformat(), "restriction": {"period": {"end": deadline.isoformat()}},
        "businessStatus": {"text": f"notified {contacts[0]}"},
    }
    if report.get("subject"):
        task_body["for"] = report["subject"]
    task = resources.create(conn, task_body, params["Task"])
    conn.execute("INSERT INTO critical_alert (report_id, site, task_id, referral_id) VALUES (%s, %s, %s, %s)",
                 (report["id"], site.code if site else site_code, task["id"], referral["id"]))
    _schedule(conn, report["id"], 1, escalate_minutes)
    return task


def _schedule(conn: psycopg.Connection[Any], report_id: str, step: int, minutes: int) -> None:
    job = jobs.enqueue(conn, ESCALATE, {"report": report_id, "step": step},
                       dedupe_key=f"{ESCALATE}:{report_id}:{step}", max_attempts=5)
    if job is not None:
        conn.execute("UPDATE job SET run_after = now() + make_interval(mins => %s) WHERE id = %s", (minutes, job))


def escalate(conn: psycopg.Connection[Any], params: dict[str, dict[str, SearchParam]], job: jobs.Job,
             sites: dict[str, Site], escalate_minutes: int) -> None:
    """`escalate-critical` job: hand an unacknowledged alert to the next contact."""
    with conn.transaction():
        alert = conn.execute("SELECT * FROM critical_alert WHERE report_id = %s FOR UPDATE",
                             (job.payload["report"],)).fetchone()
        if alert is None or alert["acknowledged_at"] is not None:
            jobs.complete(conn, job, {})
            return
        site = sites.get((alert["site"] or "").upper())
        contacts = _contacts(site)
        task = {k: v for k, v in resources.read(conn, "Task", alert["task_id"]).items() if k != "meta"}
        step = int(job.payload["step"])
        if step >= len(contacts):
            task["businessStatus"] = {"text": f"not acknowledged; all {len(contacts)} contacts notified"}
            resources.update(conn, task, params["Task"])
            conn.execute("UPDATE critical_alert SET escalated_at = now() WHERE id = %s", (alert["id"],))
            jobs.complete(conn, job, {})
            return
        report = resources.read(conn, "DiagnosticReport", alert["report_id"])
        _communication(report, contacts[step], f"ESCALATED (not acknowledged): {_summary(conn, report)}. "
                       "Preliminary AI result, pending radiologist review.", params, conn, site)
        task["owner"] = {"display": contacts[step]}
        task["businessStatus"] = {"text": f"escalated to {contacts[step]}"}
        task["restriction"] = {"period": {"end": (_now() + timedelta(minutes=escalate_minutes)).isoformat()}}
        resources.update(conn, task, params["Task"])
        conn.execute("UPDATE critical_alert SET contact_index = %s, escalated_at = now() WHERE id = %s",
                     (step, alert["id"]))
        _schedule(conn, alert["report_id"], step + 1, escalate_minutes)
        jobs.complete(conn, job, {})


def acknowledge(conn: psycopg.Connection[Any], params: dict[str, dict[str, SearchParam]], report_id: str, *,
                by: str) -> dict[str, Any]:
    """Someone took responsibility for the critical result: stop escalating. Idempotent."""
    if not by.strip():
        raise ReviewError("an acknowledgement needs the name of who acknowledges", 422)
    with conn.transaction():
        alert = conn.execute("SELECT * FROM critical_alert WHERE report_id = %s FOR UPDATE", (report_id,)).fetchone()
        if alert is None:
            raise ReviewError(f"DiagnosticReport/{report_id} has no critical alert", 404)
        if alert["acknowledged_at"] is None:
            conn.execute("UPDATE critical_alert SET acknowledged_at = now(), acknowledged_by = %s WHERE id = %s",
                         (by, alert["id"]))
            task = {k: v for k, v in resources.read(conn, "Task", alert["task_id"]).items() if k != "meta"}
            task.update(status="completed", businessStatus={"text": f"acknowledged by {by}"},
                        lastModified=_now().isoformat())
            resources.update(conn, task, params["Task"])
            conn.execute("UPDATE job SET status = 'cancelled', finished_at = now()"
                         " WHERE dedupe_key LIKE %s AND status = 'queued'", (f"{ESCALATE}:{report_id}:%",))
        facts.record(conn, report_id, event="acknowledged")
        return _alert(conn, alert["id"])


def decide_transfer(conn: psycopg.Connection[Any], params: dict[str, dict[str, SearchParam]], report_id: str, *,
                    decision: str, by: str) -> dict[str, Any]:
    """Record the clinician's transfer decision on the recommendation (active order or revoked)."""
    if decision not in ("transfer", "no-transfer"):
        raise ReviewError("decision must be 'transfer' or 'no-transfer'", 400)
    with conn.transaction():
        alert = conn.execute("SELECT * FROM critical_alert WHERE report_id = %s FOR UPDATE", (report_id,)).fetchone()
        if alert is None:
            raise ReviewError(f"DiagnosticReport/{report_id} has no critical alert", 404)
        referral = {k: v for k, v in resources.read(conn, "ServiceRequest", alert["referral_id"]).items() if k != "meta"}
        referral.update(status="active", intent="order") if decision == "transfer" else referral.update(status="revoked")
        referral["note"] = [*referral.get("note", []), {"text": f"{decision} decided by {by}", "time": _now().isoformat()}]
        resources.update(conn, referral, params["ServiceRequest"])
        conn.execute("UPDATE critical_alert SET transfer_decision = %s, decided_at = now(), decided_by = %s"
                     " WHERE id = %s", (decision, by, alert["id"]))
        facts.record(conn, report_id, event="transfer")
        return _alert(conn, alert["id"])


def _alert(conn: psycopg.Connection[Any], alert_id: int) -> dict[str, Any]:
    row = conn.execute("SELECT * FROM critical_alert WHERE id = %s", (alert_id,)).fetchone()
    assert row is not None, "read in the transaction that locked it"
    return dict(row)


def open_alerts(conn: psycopg.Connection[Any]) -> dict[str, dict[str, Any]]:
    """report id -> alert row, for alerts nobody has acknowledged yet."""
    rows = conn.execute("SELECT * FROM critical_alert WHERE acknowledged_at IS NULL ORDER BY created_at").fetchall()
    return {r["report_id"]: dict(r) for r in rows}
