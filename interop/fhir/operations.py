"""FHIR operations for people acting on AI reports: `$review`, `$acknowledge-critical`,
`$transfer-decision` on a DiagnosticReport. Inputs are FHIR `Parameters` (validated as R4 like
any resource); the answer is the updated resource, or an OperationOutcome with the refusal's
status."""
from __future__ import annotations

from typing import Any

import orjson
from flask import Blueprint, Response, request

from .. import access
from ..domain import audit
from ..services import critical, review
from ..services.errors import ReviewError
from .api import hub, respond, version_headers
from .errors import BadRequest, FhirError, InvalidResource
from .validation import MAX_DEPTH, depth

bp = Blueprint("operations", __name__, url_prefix="/fhir")
CODES = {404: "not-found", 409: "conflict", 412: "conflict", 422: "business-rule"}


def error(exc: ReviewError) -> FhirError:
    wrapped = FhirError(exc.reason)
    wrapped.status = exc.status
    wrapped.code = CODES.get(exc.status, "invalid")
    return wrapped


def parameters() -> dict[str, list[dict[str, Any]]]:
    """name -> list of parameter entries, from a valid FHIR Parameters body."""
    try:
        body = orjson.loads(request.get_data(cache=False) or b"{}")
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise BadRequest("the body must be a FHIR Parameters resource")
    if depth(body) > MAX_DEPTH or not _well_formed(body.get("parameter", [])):
        raise InvalidResource("Parameters.parameter must be a list of objects, each with a name (and parts likewise)")
    out: dict[str, list[dict[str, Any]]] = {}
    for p in body.get("parameter") or []:
        out.setdefault(str(p.get("name")), []).append(p)
    return out


def _well_formed(entries: Any) -> bool:
    """Parameters' shape: a list of objects with a string name, whose parts are the same."""
    return isinstance(entries, list) and all(
        isinstance(e, dict) and isinstance(e.get("name"), str) and _well_formed(e.get("part", [])) for e in entries)


def _value(entry: dict[str, Any]) -> Any:
    for key, v in entry.items():
        if key.startswith("value"):
            return v.get("reference", v) if isinstance(v, dict) and key == "valueReference" else v
    return None


def value(params: dict[str, list[dict[str, Any]]], name: str) -> Any:
    for entry in params.get(name, []):
        found = _value(entry)
        if found is not None:
            return found
    return None


def text(params: dict[str, list[dict[str, Any]]], name: str) -> str:
    """A parameter that must be text (a name, a code): '' when absent; 400 when of another type."""
    found = value(params, name)
    if found is None:
        return ""
    if not isinstance(found, str):
        raise BadRequest(f"parameter `{name}` must be a string or a code")
    return found


def _parts(entry: dict[str, Any]) -> dict[str, Any]:
    return {str(p.get("name")): _value(p) for p in entry.get("part") or []}


def review_arguments(params: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    findings: dict[str, bool] = {}
    for entry in params.get("finding", []):
        parts = _parts(entry)
        ref = parts.get("observation")
        if not isinstance(ref, str) or not isinstance(parts.get("present"), bool):
            raise BadRequest("each finding needs an observation reference and a present boolean")
        findings[ref.split("/")[-1]] = parts["present"]
    added = []
    for entry in params.get("added", []):
        parts = _parts(entry)
        code = parts.get("code")
        coding: dict[str, Any] = code if isinstance(code, dict) else {}
        label = parts.get("text") if isinstance(parts.get("text"), str) else coding.get("display")
        added.append({"system": coding.get("system"), "code": coding.get("code"), "text": label})
    conclusion = value(params, "conclusion")
    if conclusion is not None and not isinstance(conclusion, str):
        raise BadRequest("parameter `conclusion` must be a string")
    return {"action": text(params, "action"), "reviewer": text(params, "reviewer"), "conclusion": conclusion,
            "findings": findings, "added": added}


def _if_match() -> int | None:
    match = (request.headers.get("If-Match") or "").replace("W/", "").strip('"')
    return int(match) if match.isascii() and match.isdigit() and len(match) < 10 else None


@bp.post("/DiagnosticReport/<rid>/$review")
def review_report(rid: str) -> Response:
    args = review_arguments(parameters())
    if not args["action"]:
        raise BadRequest("parameter `action` is required (sign, edit, reject, amend, correct)")
    access.note(audit.operation(f"review-{args['action']}"[:64]), "U", what=[f"DiagnosticReport/{rid}"])
    with hub().pool.connection() as conn, conn.transaction():
        try:
            report = review.apply_review(conn, hub().ctx, rid, if_version=_if_match(), **args)
        except ReviewError as exc:
            raise error(exc) from None
        _audited(conn, f"review-{args['action']}", report, f"by {args['reviewer'] or 'unnamed'}")
    return respond(report, 200, version_headers(report))


def _audited(conn: Any, operation: str, changed: dict[str, Any], description: str) -> None:
    ref = f"{changed['resourceType']}/{changed['id']}/_history/{changed.get('meta', {}).get('versionId', '1')}"
    access.audit_change(conn, audit.operation(operation), "U", what=[ref], patients=audit.patients_of(changed),
                        description=description[:200])


@bp.post("/DiagnosticReport/<rid>/$acknowledge-critical")
def acknowledge(rid: str) -> Response:
    by = text(parameters(), "by")
    access.note(audit.operation("acknowledge-critical"), "U", what=[f"DiagnosticReport/{rid}"])
    with hub().pool.connection() as conn, conn.transaction():
        try:
            task = critical.acknowledge(conn, hub().ctx, rid, by=by)
        except ReviewError as exc:
            raise error(exc) from None
        _audited(conn, "acknowledge-critical", task, f"by {by or 'unnamed'}")
    return respond(task, 200, version_headers(task))


@bp.post("/DiagnosticReport/<rid>/$transfer-decision")
def transfer_decision(rid: str) -> Response:
    params = parameters()
    access.note(audit.operation("transfer-decision"), "U", what=[f"DiagnosticReport/{rid}"])
    with hub().pool.connection() as conn, conn.transaction():
        try:
            referral = critical.decide_transfer(conn, hub().ctx, rid, decision=text(params, "decision"),
                                                by=text(params, "by"))
        except ReviewError as exc:
            raise error(exc) from None
        _audited(conn, "transfer-decision", referral, f"{text(params, 'decision')} by {text(params, 'by') or 'unnamed'}")
    return respond(referral, 200, version_headers(referral))
