"""FHIR operations for people acting on AI reports: `$review`, `$acknowledge-critical`,
`$transfer-decision` on a DiagnosticReport. Inputs are FHIR `Parameters`; the answer is the
updated resource (or an OperationOutcome with the ReviewError's status)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson
from flask import Blueprint, Response, request

from inference_client.models import load_models

from ..analytics import facts
from ..review import actions, critical
from ..review.errors import ReviewError
from .api import hub, respond
from .errors import BadRequest, FhirError

bp = Blueprint("review", __name__, url_prefix="/fhir")


def error(exc: ReviewError) -> FhirError:
    wrapped = FhirError(exc.reason)
    wrapped.status = exc.status
    wrapped.code = {404: "not-found", 409: "conflict", 412: "conflict", 422: "business-rule"}.get(exc.status, "invalid")
    return wrapped


@lru_cache(maxsize=4)
def critical_codes(mappings_dir: Path) -> frozenset[tuple[str | None, str]]:
    return actions.critical_codes(load_models(mappings_dir))


def parameters() -> dict[str, list[dict[str, Any]]]:
    """name -> list of parameter entries, from a FHIR Parameters body."""
    try:
        body = orjson.loads(request.get_data(cache=False) or b"{}")
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise BadRequest("the body must be a FHIR Parameters resource")
    out: dict[str, list[dict[str, Any]]] = {}
    for p in body.get("parameter", []):
        out.setdefault(str(p.get("name")), []).append(p)
    return out


def value(params: dict[str, list[dict[str, Any]]], name: str) -> Any:
    for entry in params.get(name, []):
        for key, v in entry.items():
            if key.startswith("value"):
                return v.get("reference", v) if isinstance(v, dict) and key == "valueReference" else v
    return None


def _parts(entry: dict[str, Any]) -> dict[str, Any]:
    return {p["name"]: next((v for k, v in p.items() if k.startswith("value")), None) for p in entry.get("part", [])}


def review_arguments(params: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    findings: dict[str, bool] = {}
    for entry in params.get("finding", []):
        parts = _parts(entry)
        ref = parts.get("observation")
        ref = ref.get("reference") if isinstance(ref, dict) else ref
        if not isinstance(ref, str) or not isinstance(parts.get("present"), bool):
            raise BadRequest("each finding needs an observation reference and a present boolean")
        findings[ref.split("/")[-1]] = parts["present"]
    added = []
    for entry in params.get("added", []):
        parts = _parts(entry)
        code = parts.get("code")
        coding: dict[str, Any] = code if isinstance(code, dict) else {}
        added.append({"system": coding.get("system", "http://snomed.info/sct"), "code": coding.get("code"),
                      "text": parts.get("text") or coding.get("display")})
    return {"action": value(params, "action"), "reviewer": value(params, "reviewer") or "",
            "conclusion": value(params, "conclusion"), "findings": findings, "added": added}


def redeliver(conn: Any, report: dict[str, Any]) -> None:
    """Queue the report's new version for its site (HL7 ORU, FHIR push, subscriptions)."""
    from ..delivery.deliver import on_report_changed
    from ..pipeline.orders import site_of
    from ..sites import load

    sites = load(hub().settings.sites_file)
    on_report_changed(conn, report, sites, site_of(report), hub().params)
    facts.record(conn, report["id"], event="reviewed", sites=sites)


@bp.post("/DiagnosticReport/<rid>/$review")
def review(rid: str) -> Response:
    args = review_arguments(parameters())
    if not args["action"]:
        raise BadRequest("parameter `action` is required (sign, edit, reject, amend, correct)")
    match = request.headers.get("If-Match")
    version = int(match.replace("W/", "").strip('"')) if match and match.replace("W/", "").strip('"').isdigit() else None
    with hub().pool.connection() as conn:
        try:
            report = actions.apply_review(conn, hub().params, rid, if_version=version,
                                          critical=critical_codes(hub().settings.mappings_dir),
                                          on_change=redeliver, **args)
        except ReviewError as exc:
            raise error(exc) from None
    return respond(report, 200, {"ETag": f'W/"{report["meta"]["versionId"]}"'})


@bp.post("/DiagnosticReport/<rid>/$acknowledge-critical")
def acknowledge(rid: str) -> Response:
    by = value(parameters(), "by") or ""
    with hub().pool.connection() as conn:
        try:
            alert = critical.acknowledge(conn, hub().params, rid, by=str(by))
            task = conn.execute("SELECT body FROM resource WHERE type = 'Task' AND id = %s",
                                (alert["task_id"],)).fetchone()
        except ReviewError as exc:
            raise error(exc) from None
    return respond(task["body"])


@bp.post("/DiagnosticReport/<rid>/$transfer-decision")
def transfer_decision(rid: str) -> Response:
    params = parameters()
    with hub().pool.connection() as conn:
        try:
            alert = critical.decide_transfer(conn, hub().params, rid, decision=str(value(params, "decision") or ""),
                                             by=str(value(params, "by") or ""))
            referral = conn.execute("SELECT body FROM resource WHERE type = 'ServiceRequest' AND id = %s",
                                    (alert["referral_id"],)).fetchone()
        except ReviewError as exc:
            raise error(exc) from None
    return respond(referral["body"])
