"""Accepting a study for analysis: shared by the FHIR path and (later) the HL7 path.

Runs in the caller's transaction, so the study, its Task and its queue entry are stored
together: a study that was acknowledged is always either queued or visibly not analysed.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import psycopg

from ..store import jobs, resources
from ..store.search_params import SearchParam

DICOM_UID_SYSTEM = "urn:dicom:uid"
WADO_RS = "dicom-wado-rs"
TASK_CODE = {
    "system": "urn:interop-hub:task-type",
    "code": "ai-analysis",
    "display": "AI analysis of an imaging study",
}
ANALYSE = "analyse-study"


class IntakeError(Exception):
    """The study breaks a rule of the hub (HTTP 422 / HL7 AE); `reason` is safe to show."""

    def __init__(self, reason: str, expression: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.expression = expression


def study_uid(study: dict[str, Any]) -> str | None:
    """The DICOM Study Instance UID from identifier (system urn:dicom:uid, value urn:oid:…)."""
    for ident in study.get("identifier", []):
        if ident.get("system") == DICOM_UID_SYSTEM and ident.get("value"):
            value: str = ident["value"]
            return value[len("urn:oid:"):] if value.startswith("urn:oid:") else value
    return None


def _is_wado_rs(endpoint: dict[str, Any]) -> bool:
    return endpoint.get("connectionType", {}).get("code") == WADO_RS


def resolve_endpoint(conn: psycopg.Connection[Any], study: dict[str, Any]) -> str | None:
    """The DICOMweb base URL named by the study (contained or stored Endpoint), if any."""
    contained = {c.get("id"): c for c in study.get("contained", []) if c.get("resourceType") == "Endpoint"}
    for i, ref in enumerate(study.get("endpoint", [])):
        target = ref.get("reference", "")
        where = f"ImagingStudy.endpoint[{i}]"
        if target.startswith("#"):
            endpoint = contained.get(target[1:])
            if endpoint is None:
                raise IntakeError(f"{target} names no contained Endpoint", where)
        elif target.startswith("Endpoint/"):
            try:
                endpoint = resources.read(conn, "Endpoint", target.split("/", 1)[1])
            except resources.StoreError as exc:
                raise IntakeError(f"unknown endpoint {target}", where) from exc
        else:
            raise IntakeError("endpoint must reference a contained or stored Endpoint", where)
        if _is_wado_rs(endpoint):
            if endpoint.get("status", "active") != "active":
                raise IntakeError(f"endpoint {target} is not active", where)
            return str(endpoint["address"]).rstrip("/")
    return None


def _task(study: dict[str, Any], status: str, reason: str | None = None) -> dict[str, Any]:
    task: dict[str, Any] = {
        "resourceType": "Task",
        "status": status,
        "intent": "order",
        "priority": "routine",
        "code": {"coding": [TASK_CODE], "text": TASK_CODE["display"]},
        "focus": {"reference": f"ImagingStudy/{study['id']}"},
        "authoredOn": datetime.now(timezone.utc).isoformat(),
    }
    if "subject" in study:
        task["for"] = study["subject"]
    if study.get("basedOn"):
        task["basedOn"] = study["basedOn"]
    if reason:
        task["statusReason"] = {"text": reason}
    return task


def accept_study(
    conn: psycopg.Connection[Any],
    study: dict[str, Any],
    params: dict[str, dict[str, SearchParam]],
    default_dicomweb: str | None,
    max_attempts: int,
) -> dict[str, Any] | None:
    """Queue a stored, available study for analysis once; returns its Task (None: nothing to do)."""
    if study.get("status") != "available":
        return None
    uid = study_uid(study)
    if uid is None:
        raise IntakeError("an available ImagingStudy needs an identifier with system urn:dicom:uid",
                          "ImagingStudy.identifier")
    endpoint = resolve_endpoint(conn, study) or default_dicomweb
    key = f"{ANALYSE}:ImagingStudy/{study['id']}"
    if conn.execute("SELECT 1 FROM job WHERE dedupe_key = %s", (key,)).fetchone():
        return None  # already analysed or on its way: a resend does not analyse twice
    if endpoint is None:
        return resources.create(conn, _task(study, "rejected", "not analysed: no DICOMweb endpoint"),
                                params["Task"])
    task = resources.create(conn, _task(study, "requested"), params["Task"])
    jobs.enqueue(
        conn, ANALYSE,
        {"study": study["id"], "task": task["id"], "study_uid": uid, "dicomweb": endpoint},
        dedupe_key=key, max_attempts=max_attempts,
    )
    return task
