"""Studies pushed to the hub over HTTP, and the admins' view of those no order matched (issue 13).

* `POST /dicom-web/studies` (STOW-RS, PS3.18 10.5): a `multipart/related; type="application/dicom"`
  body of instances, read part by part; each is kept (archive PACS or local storage) and recorded
  before it is acknowledged, exactly as a C-STORE (`interop.services.inbound`). Answers the DICOM
  JSON store response: 200 all kept, 202 some refused, 409 none kept, each refusal with its
  status (00081197) and reason. Authenticated like the FHIR API: a backend client needs
  `system/ImagingStudy.c` (the access rules treat it as creating an ImagingStudy).
* `GET /admin/dicom/unmatched` -> `{"studies": [...]}`: pushed studies waiting for an order or for
  a person (a held site, or instances that name different patients).
* `POST /admin/dicom/unmatched/<study_uid>/release` -> analyse it as it is;
  `POST /admin/dicom/unmatched/<study_uid>/match` with `{"service_request": "<id>"}` -> analyse
  it as that order's study. 404 when the study is not waiting.
* `GET /admin/dicom/queue` -> the same queue as a page for a logged-in admin (each study's site,
  patient, accession, modalities, instances, why it waits, a link to its `registered` FHIR
  ImagingStudy), with a Release button and a Match form per study; `POST /admin/dicom/queue/<uid>`
  is that form (CSRF-checked like every form), then back to the page (303) or the page again
  with the refusal and its status.

The queue is also a FHIR search: `ImagingStudy?_tag=urn:interop-hub:dicom-in|unmatched&status=registered`.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import orjson
from flask import Blueprint, Response, current_app, redirect, render_template, request, url_for
from werkzeug.wrappers import Response as BaseResponse

from .. import access
from ..dicom.dicomweb import iter_multipart, multipart_boundary
from ..dicom.errors import DicomError
from ..domain import audit
from ..fhir.errors import BadRequest, NotFoundError, UnsupportedMediaType
from ..services import inbound
from ..services.security import clients
from .admin import bp as admin

stow = Blueprint("stow", __name__, url_prefix="/dicom-web")
DICOM_JSON = "application/dicom+json"
CHUNK = 1 << 20


def _hub() -> Any:
    return current_app.extensions["interop"]


def _json(body: Any, status: int = 200, content_type: str = "application/json") -> Response:
    return Response(orjson.dumps(body), status=status, content_type=content_type)


def _item(sop_class: str | None, sop_instance: str | None, status: int | None = None,
          reason: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if sop_class:
        item["00081150"] = {"vr": "UI", "Value": [sop_class]}
    if sop_instance:
        item["00081155"] = {"vr": "UI", "Value": [sop_instance]}
    if status is not None:
        item["00081197"] = {"vr": "US", "Value": [status]}  # Failure Reason
    if reason:
        item["00000902"] = {"vr": "LO", "Value": [reason]}  # Error Comment: why, for people
    return item


@stow.post("/studies", defaults={"rtype": "ImagingStudy"})
def store(rtype: str) -> Response:
    del rtype  # the access rules' resource type: a STOW creates (the material of) an ImagingStudy
    ctype = request.headers.get("Content-Type", "")
    if request.mimetype != "multipart/related" or "application/dicom" not in ctype.lower():
        raise UnsupportedMediaType('STOW-RS takes multipart/related; type="application/dicom"')
    try:
        boundary = multipart_boundary(ctype)
    except DicomError:
        raise BadRequest("the multipart body names no boundary") from None
    hub = _hub()
    ctx = hub.ctx
    request.max_content_length = None  # each part is bounded by INTEROP_DICOM_MAX_BYTES instead
    kept: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    chunks = iter(lambda: request.stream.read(CHUNK), b"")
    try:
        with tempfile.TemporaryDirectory(prefix="interop-stow-") as tmp:
            for i, (_headers, body) in enumerate(iter_multipart(chunks, boundary)):
                path = Path(tmp) / f"{i}.dcm"
                path.write_bytes(body)
                del body
                try:
                    item = inbound.read_header(path, sender=access.who().client or "stow",
                                               max_bytes=ctx.settings.dicom_max_bytes)
                    with hub.pool.connection() as conn:
                        inbound.keep(conn, ctx, path, item, site=ctx.sites.get(clients.site_of(conn, access.who().client)),
                                     who=access.who())
                    kept.append(_item(item.sop_class_uid, item.sop_instance_uid))
                except inbound.Refused as exc:
                    failed.append(_item(None, None, exc.status, exc.reason))
                finally:
                    path.unlink(missing_ok=True)
    except DicomError:
        raise BadRequest("the multipart body ends inside a part") from None
    access.mark_audited()  # each kept instance was audited with its row
    answer: dict[str, Any] = {}
    if kept:
        answer["00081199"] = {"vr": "SQ", "Value": kept}
    if failed:
        answer["00081198"] = {"vr": "SQ", "Value": failed}
    status = 200 if not failed else (202 if kept else 409)
    if not kept and not failed:
        raise BadRequest("the body holds no instance")
    return _json(answer, status, DICOM_JSON)


@admin.get("/admin/dicom/unmatched")
def unmatched() -> Response:
    with _hub().pool.connection() as conn:
        return _json({"studies": inbound.unmatched(conn)})


def _decide(study_uid: str, decision: str, service_request: str | None) -> None:
    """Release or match a waiting study, audited; BadRequest / NotFoundError say why not."""
    if decision not in ("release", "match"):
        raise NotFoundError("decide release or match")
    with _hub().pool.connection() as conn, conn.transaction():
        try:
            done = inbound.decide(conn, _hub().ctx, study_uid, decision, service_request)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        if not done:
            raise NotFoundError("no pushed study with this UID is waiting")
        access.audit_change(conn, audit.operation(f"unmatched-{decision}"), "U",
                            what=[f"urn:dicom:uid:{study_uid}"], patients=[])


@admin.post("/admin/dicom/unmatched/<study_uid>/<decision>")
def decide(study_uid: str, decision: str) -> Response:
    body = request.get_json(silent=True) or {}
    _decide(study_uid, decision, str(body.get("service_request") or "") or None)
    return _json({"study_uid": study_uid, "decision": decision})


def _queue_page(*, done: str | None = None, error: str | None = None, status: int = 200) -> Response:
    with _hub().pool.connection() as conn:
        rows = inbound.unmatched(conn)
    access.note(audit.interaction("search-type"), "E", what=["ImagingStudy"], query="unmatched-queue",
                patients=[])
    body = render_template("admin/unmatched.html", studies=rows, done=done, error=error)
    return Response(body, status=status, content_type="text/html; charset=utf-8")


@admin.get("/admin/dicom/queue")
def queue_page() -> Response:
    done = request.args.get("done")
    return _queue_page(done=done if done in ("release", "match") else None)


@admin.post("/admin/dicom/queue/<study_uid>")
def queue_decide(study_uid: str) -> BaseResponse:
    decision = request.form.get("decision", "")
    try:
        _decide(study_uid, decision, request.form.get("service_request", "").strip() or None)
    except (BadRequest, NotFoundError) as exc:
        return _queue_page(error=str(exc), status=exc.status)
    return redirect(url_for("admin.queue_page", done=decision), code=303)
