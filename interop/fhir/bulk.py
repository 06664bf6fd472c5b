"""FHIR Bulk Data Access (IG v2), the asynchronous request pattern:

* kick-off: `GET /fhir/$export` or `GET /fhir/[type]/$export` with `Prefer: respond-async`
  (`_type`, `_since`, `_outputFormat=application/fhir+ndjson`; anything else is refused with an
  OperationOutcome unless `Prefer: handling=lenient`) -> 202 and `Content-Location`, the status URL;
* status: `GET` it -> 202 with `X-Progress` while the job runs, then 200 with the manifest
  (transactionTime, request, requiresAccessToken, output [{type, url, count}], error []);
  `DELETE` it -> 202, the export cancelled and its files deleted (404 after that);
* files: `GET /fhir/$export-file/[id]/[n].ndjson` -> `application/fhir+ndjson`.

Only the client that asked may poll, cancel and download (with its bearer token: the manifest says
`requiresAccessToken`); to anyone else an export does not exist. What is exported, and to whom, is
decided by `interop.services.bulk` from the token's scopes and the client's site.
"""
from __future__ import annotations

from datetime import UTC
from email.utils import format_datetime
from typing import Any

import orjson
from flask import Blueprint, Response, current_app, request

from .. import access
from ..domain import audit
from ..services import bulk
from ..services.security import clients
from ..services.security.principal import Principal
from ..store import bulk as store
from . import capability
from .errors import BadRequest, FhirError, Forbidden, NotAcceptable, NotFoundError

bp = Blueprint("bulk", __name__, url_prefix="/fhir")

NDJSON = "application/fhir+ndjson"
RETRY_AFTER_S = "2"


class TooMany(FhirError):
    status, code = 429, "throttled"


def _hub() -> Any:
    return current_app.extensions["interop"]


def _caller() -> Principal:
    """The client, if it may export at all (hub:analytics, or read on some type): 403 before anything else."""
    caller = access.principal()
    if caller is None:  # the guard lets no anonymous caller here; kept for the type checker
        raise Forbidden("a SMART backend access token is required")
    if "hub:analytics" not in caller.grant.hub and not any("r" in letters for letters in caller.grant.types.values()):
        raise Forbidden("exports need hub:analytics or a system/[type].r scope")
    return caller


def _json(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None,
          content_type: str = "application/json") -> Response:
    return Response(orjson.dumps(body), status=status, headers=headers or {}, content_type=content_type)


@bp.get("/$export")
def export_system() -> Response:
    return _kick_off(None)


@bp.get("/<rtype>/$export")
def export_type(rtype: str) -> Response:
    if not _caller().grant.allows(rtype, "r"):
        raise Forbidden(f"the token's scopes do not allow read on {rtype[:64]}")
    if rtype not in capability.RESOURCES:
        raise NotFoundError(f"resource type {rtype[:64]} is not supported here")
    return _kick_off(rtype)


def _kick_off(rtype: str | None) -> Response:
    caller = _caller()
    accept = request.headers.get("Accept", "")
    if accept and "json" not in accept and "*/*" not in accept:
        raise NotAcceptable("the kick-off answers application/fhir+json (an OperationOutcome when refused)")
    prefer = request.headers.get("Prefer", "")
    if "respond-async" not in prefer:
        raise BadRequest("a bulk export is asynchronous: send `Prefer: respond-async`")
    hub = _hub()
    with hub.pool.connection() as conn:
        site = clients.site_of(conn, caller.name)
        try:
            chosen = bulk.plan(list(request.args.items(multi=True)), caller.grant, rtype=rtype, site=site,
                               exportable=tuple(capability.RESOURCES), lenient="handling=lenient" in prefer)
            with conn.transaction():
                export_id = bulk.start(conn, hub.ctx, caller.name, chosen, _public_url())
        except bulk.ExportError as exc:
            kind = {403: Forbidden, 429: TooMany}.get(exc.status, BadRequest)
            raise kind(str(exc)) from None
    access.note(audit.operation("export"), "E", what=[f"$export/{export_id}"], query=request.query_string.decode()[:500])
    location = f"{hub.settings.public_base()}/$export-poll-status/{export_id}"
    return Response(status=202, headers={"Content-Location": location})


def _public_url() -> str:
    """The kick-off URL as the client sent it, on the hub's public base (behind a proxy too)."""
    path = request.path.removeprefix(bp.url_prefix or "")
    query = request.query_string.decode("utf-8", "replace")
    return f"{_hub().settings.public_base()}{path}" + (f"?{query}" if query else "")


def _mine(conn: Any, export_id: str) -> dict[str, Any]:
    caller = _caller()
    row = store.get(conn, export_id)
    if row is None or row["client_id"] != caller.name or row["status"] == "cancelled":
        raise NotFoundError("no such export (it was cancelled, has expired, or is another client's)")
    return row


@bp.get("/$export-poll-status/<export_id>")
def export_status(export_id: str) -> Response:
    hub = _hub()
    with hub.pool.connection() as conn:
        row = _mine(conn, export_id)
        files = store.files(conn, export_id) if row["status"] == "completed" else []
    if row["status"] in store.ACTIVE:
        progress = row["progress"] or ("waiting to start" if row["status"] == "accepted" else "started")
        return Response(status=202, headers={"X-Progress": progress, "Retry-After": RETRY_AFTER_S})
    if row["status"] == "failed":
        failed = FhirError(f"the export failed: {row['error'] or 'unknown error'}")
        failed.status, failed.code = 500, "exception"
        raise failed
    headers = {"Expires": format_datetime(row["expires_at"].astimezone(UTC), usegmt=True)} if row["expires_at"] else {}
    return _json(bulk.manifest(row, files, hub.settings.public_base()), 200, headers)


@bp.route("/$export-poll-status/<export_id>", methods=["DELETE"])
def export_cancel(export_id: str) -> Response:
    hub = _hub()
    with hub.pool.connection() as conn, conn.transaction():
        _mine(conn, export_id)
        bulk.cancel(conn, export_id)
    access.note(audit.operation("export-cancel"), "D", what=[f"$export/{export_id}"])
    return _json({"resourceType": "OperationOutcome", "issue": [
        {"severity": "information", "code": "informational", "diagnostics": "the export is cancelled"}]}, 202,
        content_type="application/fhir+json; charset=utf-8")


@bp.get("/$export-file/<export_id>/<int:n>.ndjson")
def export_file(export_id: str, n: int) -> Response:
    hub = _hub()
    with hub.pool.connection() as conn:
        row = _mine(conn, export_id)
        text = store.file(conn, export_id, n) if row["status"] == "completed" else None
        if text is None:
            raise NotFoundError(f"export {export_id[:40]} has no file {n}")
        access.audit_read(audit.operation("export-file"), "R", what=[f"$export/{export_id}/{n}"], patients=[])
    return Response(text, status=200, content_type=NDJSON)
