"""The reading worklist at /worklist: server-rendered pages for the reviewing radiologists.

* `GET /worklist/` — reports waiting for review (preliminary), critical first, then the longest
  waiting; per study the patient reference, modality, body part, date, facility, the AI findings
  above threshold and a thumbnail.
* `GET /worklist/<report>` — the study: the image, every AI finding with its probability and a
  present/absent choice, the conclusion, and Sign / Edit & sign / Reject / Acknowledge critical.
* `POST /worklist/<report>/review` — the form: calls the same review actions as the FHIR
  `$review` and `$acknowledge-critical` operations, then back to the list (or the page again with
  the refusal and its HTTP status).
* `GET /worklist/<report>/image.png[?size=thumb]` — the image, rendered by the hub from the PACS.
* `GET /worklist/<report>/viewer.json` and `GET /worklist/<report>/dicom-web/studies/<study>/series/
  <series>/instances/<instance>` — for radiologists: the study page's DICOM viewer (Cornerstone3D,
  static/vendor) reads the report's own study through this read-only WADO-RS proxy.

Labels in Vietnamese (default) and English (`?lang=en`). Refusal messages are the review
module's own (never an exception's text from elsewhere).

People log in first (`interop.access`): radiologists read and sign, and the signature is the
logged-in person; clinicians see their own site's reports and may acknowledge a critical finding.
Every form carries the login's CSRF token; what each person opened and did is audited.
"""
from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import replace
from datetime import UTC, date, datetime
from typing import Any

from flask import Blueprint, Response, current_app, redirect, render_template, request, url_for
from werkzeug.wrappers import Response as BaseResponse

from .. import access
from ..domain import audit
from ..services import critical
from ..services import review as reviews
from ..services.errors import ReviewError
from ..store import resources
from ..store.reviews import open_alerts
from ..tls import ClientTls
from . import image, waiting
from .labels import LABELS

log = logging.getLogger("interop.web")
bp = Blueprint("worklist", __name__, url_prefix="/worklist", template_folder="templates",
               static_folder="static", static_url_path="/static")
ACTIONS = ("sign", "edit", "reject", "acknowledge")
STATUSES = ("preliminary", "final", "amended", "corrected", "cancelled")
_CODE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _hub() -> Any:
    return current_app.extensions["interop"]


def _lang() -> str:
    lang = request.values.get("lang", "vi")
    return lang if lang in LABELS else "vi"


def _context(**extra: Any) -> dict[str, Any]:
    lang = _lang()
    return {"lang": lang, "labels": LABELS[lang], "now": datetime.now(UTC),
            "waited_text": waiting.waited_text, **extra}


class BadFilter(Exception):
    """A filter the page cannot apply (its text is safe to show)."""


def _filters() -> waiting.Filters:
    """The worklist's filters from the query (or, on a form post, the form); BadFilter names a wrong one."""
    given = {k: (request.values.get(k) or "").strip() for k in ("site", "modality", "priority", "status",
                                                                 "date_from", "date_to")}
    if given["status"] and given["status"] not in STATUSES:
        raise BadFilter(f"status: one of {', '.join(STATUSES)}")
    if given["priority"] and given["priority"] not in waiting.PRIORITIES:
        raise BadFilter(f"priority: one of {', '.join(waiting.PRIORITIES)}")
    for key in ("site", "modality"):
        if given[key] and not _CODE.match(given[key]):
            raise BadFilter(f"{key}: a code (letters, digits, . _ -)")
    for key in ("date_from", "date_to"):
        if given[key]:
            try:
                date.fromisoformat(given[key])
            except ValueError:
                raise BadFilter(f"{key}: a date as YYYY-MM-DD") from None
    return waiting.Filters(**{k: v for k, v in given.items() if v})


def _bad_filter(exc: BadFilter) -> Response:
    return Response(f"worklist filter refused: {exc}", status=400, content_type="text/plain; charset=utf-8")


def _lookups() -> dict[str, Any]:
    ctx = _hub().ctx
    return {"models": ctx.models, "sites": ctx.sites.current()}


@bp.after_request
def _headers(response: Response) -> Response:
    # Everything the pages use is the hub's own: no inline script, no third party, not framed.
    # The DICOM viewer (Cornerstone3D): its image decoders are WebAssembly ('wasm-unsafe-eval', no JS
    # eval), it makes its helper workers and tool cursors from blob: URLs it creates itself.
    response.headers.setdefault("Content-Security-Policy", "default-src 'self'; script-src 'self' 'wasm-unsafe-eval';"
                                " worker-src 'self' blob:; img-src 'self' blob: data:;"
                                " form-action 'self'; frame-ancestors 'none'")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    if response.mimetype == "text/html":
        response.headers.setdefault("Cache-Control", "no-store")  # the list changes with every review
    return response


def _own_site() -> str | None:
    """A clinician's site (they see only its reports); None for radiologists (every site)."""
    person = access.principal()
    return (person.site or "-") if person is not None and person.role == "clinician" else None


def _visible(entry: waiting.Entry) -> bool:
    site = _own_site()
    return site is None or entry.site == site


def _visible_id(conn: Any, report_id: str) -> bool:
    try:
        return _visible(waiting.one(conn, report_id, alerts={}, **_lookups()))
    except resources.StoreError:
        return False


def _seen(filters: waiting.Filters) -> waiting.Filters | None:
    """The filters narrowed to what this person may see: a clinician's own site (None: nothing)."""
    site = _own_site()
    if site is None:
        return filters
    if filters.site and filters.site.upper() != site.upper():
        return None
    return replace(filters, site=site)


def _listed(conn: Any, filters: waiting.Filters, alerts: dict[str, dict[str, Any]]) -> tuple[int, list[waiting.Entry]]:
    seen = _seen(filters)
    return waiting.waiting(conn, alerts=alerts, filters=seen, **_lookups()) if seen is not None else (0, [])


@bp.get("/")
def worklist() -> Response:
    try:
        filters = _filters()
    except BadFilter as exc:
        return _bad_filter(exc)
    with _hub().pool.connection() as conn:
        total, found = _listed(conn, filters, open_alerts(conn))
    access.note(audit.interaction("search-type"), "E", what=["DiagnosticReport"], query="worklist",
                patients=[e.patient for e in found if e.patient.startswith("Patient/")])
    done = request.args.get("done")
    return Response(render_template("worklist/list.html", **_context(
        total=total, entries=found, done=done if done in ACTIONS else None, filters=filters,
        sites=sorted(_hub().ctx.sites.current().items()), priorities=waiting.PRIORITIES, statuses=STATUSES)),
        content_type="text/html; charset=utf-8")


def _study_page(report_id: str, *, error: ReviewError | None = None, form: Any = None) -> Response:
    try:
        filters = _filters()
    except BadFilter as exc:
        return _bad_filter(exc)
    following: str | None = None
    with _hub().pool.connection() as conn:
        try:
            entry = waiting.one(conn, report_id, alerts=open_alerts(conn), **_lookups())
        except resources.StoreError:
            entry = None
        seen = _seen(filters)
        if entry is not None and _visible(entry) and seen is not None:  # the "next" shortcut: in the same list
            following = waiting.following(conn, report_id, seen)
    if entry is None or not _visible(entry):  # another site's report is as absent as an unknown one
        return Response(render_template("worklist/missing.html", **_context(report_id=report_id)), status=404,
                        content_type="text/html; charset=utf-8")
    access.note(audit.interaction("read"), "R", what=[f"DiagnosticReport/{entry.id}/_history/{entry.version}"],
                patients=[entry.patient] if entry.patient.startswith("Patient/") else [])
    body = render_template("worklist/study.html", **_context(entry=entry, error=error, form=form, filters=filters,
                                                              following=following))
    return Response(body, status=error.status if error else 200, content_type="text/html; charset=utf-8")


@bp.get("/<report_id>")
def study(report_id: str) -> Response:
    return _study_page(report_id)


def _text(value: str | None) -> str:
    return (value or "").replace("\r\n", "\n").strip()


def _findings(entry: waiting.Entry) -> dict[str, bool]:
    """The radiologist's call per finding from the form: `finding-<observation id>` = present|absent."""
    calls = {}
    for f in entry.findings:
        said = request.form.get(f"finding-{f.observation_id}")
        if said in ("present", "absent"):
            calls[f.observation_id] = said == "present"
    return calls


def _apply(conn: Any, report_id: str, action: str, reviewer: str) -> dict[str, Any]:
    """Do the action; the resource it changed (the report's new version, or the alert's Task)."""
    ctx = _hub().ctx
    entry = waiting.one(conn, report_id, alerts={}, **_lookups())
    if not _visible(entry):
        raise ReviewError(f"DiagnosticReport/{report_id} is not known", 404)
    person = access.principal()
    if action != "acknowledge" and (person is None or person.role != "radiologist"):
        raise ReviewError(LABELS[_lang()]["radiologists_only"], 403)
    if action == "acknowledge":
        return critical.acknowledge(conn, ctx, report_id, by=reviewer)
    version = request.form.get("version", "")
    conclusion: str | None = None
    findings: dict[str, bool] = {}
    calls = _findings(entry)
    changed = any(calls.get(f.observation_id, f.positive) != f.positive for f in entry.findings) or \
        ("conclusion" in request.form and _text(request.form["conclusion"]) != _text(entry.report.get("conclusion")))
    if action == "sign" and changed:
        raise ReviewError(LABELS[_lang()]["changed"], 422)
    if action == "edit":
        findings, conclusion = calls, _text(request.form.get("conclusion")) or None
    elif action == "reject":
        conclusion = _text(request.form.get("reason")) or None
    return reviews.apply_review(conn, ctx, report_id, action=action, reviewer=reviewer, conclusion=conclusion,
                                findings=findings,
                                if_version=int(version) if version.isascii() and version.isdigit() else None)


@bp.post("/<report_id>/review")
def review(report_id: str) -> BaseResponse:
    action = request.form.get("action", "")
    person = access.principal()
    reviewer = person.name if person is not None else ""  # the logged-in person signs, never a typed name
    access.note(audit.operation(f"worklist-{action}"[:64]), "U", what=[f"DiagnosticReport/{report_id}"])
    try:
        if action not in ACTIONS:
            raise ReviewError(f"unknown action; one of {', '.join(ACTIONS)}", 400)
        with _hub().pool.connection() as conn, conn.transaction():
            try:
                changed = _apply(conn, report_id, action, reviewer)
            except resources.StoreError:
                raise ReviewError(f"DiagnosticReport/{report_id} is not known", 404) from None
            ref = f"{changed['resourceType']}/{changed['id']}/_history/{changed.get('meta', {}).get('versionId', '1')}"
            access.audit_change(conn, audit.operation(f"worklist-{action}"), "U", what=[ref],
                                patients=audit.patients_of(changed), description=f"{action} by {reviewer}")
    except ReviewError as exc:
        log.info("worklist %s on DiagnosticReport/%s refused (%s)", action, report_id, exc.status)
        return _study_page(report_id, error=exc, form=request.form)
    log.info("worklist %s on DiagnosticReport/%s", action, report_id)
    if action == "acknowledge" and request.form.get("back") != "list":
        return redirect(url_for("worklist.study", report_id=report_id, lang=_lang()), code=303)
    try:
        chosen = _filters().args()
    except BadFilter:
        chosen = {}
    kept: dict[str, Any] = {"lang": _lang(), "done": action, **chosen}
    following = request.form.get("next_report", "")
    if request.values.get("then") == "next" and _CODE.match(following):  # "sign and next": the next study
        return redirect(url_for("worklist.study", report_id=following, **kept), code=303)
    return redirect(url_for("worklist.worklist", **kept), code=303)


@bp.get("/<report_id>/image.png")
def rendered(report_id: str) -> Response:
    settings = _hub().settings
    size = image.THUMB_PX if request.args.get("size") == "thumb" else image.MAX_PX
    try:
        with _hub().pool.connection() as conn:  # released before the PACS is called
            if _own_site() is not None and not _visible_id(conn, report_id):
                raise image.ImageUnavailable("no such report", 404)
            base, uid = image.source(conn, report_id, settings.dicomweb_url)
        body = image.png(base, uid, timeout_s=settings.dicomweb_timeout, tls=ClientTls.from_settings(settings), max_px=size)
    except image.ImageUnavailable as exc:
        log.info("worklist image of DiagnosticReport/%s unavailable (%s)", report_id, exc.status)
        return Response(exc.reason, status=exc.status, content_type="text/plain; charset=utf-8",
                        headers={"Cache-Control": "no-store"})
    return Response(body, content_type="image/png", headers={"Cache-Control": "private, max-age=600"})


def _radiologist_source(conn: Any, report_id: str) -> tuple[str, str]:
    """(DICOMweb base, Study Instance UID) of a report's study, for a logged-in radiologist only."""
    person = access.principal()
    if person is None or person.role != "radiologist":
        raise image.ImageUnavailable("the DICOM viewer is for radiologists", 403)
    return image.source(conn, report_id, _hub().settings.dicomweb_url)


def _unavailable(report_id: str, exc: image.ImageUnavailable) -> Response:
    log.info("worklist viewer data of DiagnosticReport/%s unavailable (%s)", report_id, exc.status)
    return Response(exc.reason, status=exc.status, content_type="text/plain; charset=utf-8",
                    headers={"Cache-Control": "no-store"})


@bp.get("/<report_id>/viewer.json")
def viewer_layout(report_id: str) -> Response:
    """What the study page's viewer shows: the series and their instances, the mammography views."""
    settings = _hub().settings
    try:
        with _hub().pool.connection() as conn:
            base, uid = _radiologist_source(conn, report_id)
        found = image.layout(image.instances(base, uid, timeout_s=settings.dicomweb_timeout,
                                             tls=ClientTls.from_settings(settings)))
    except image.ImageUnavailable as exc:
        return _unavailable(report_id, exc)
    found["wado"] = url_for("worklist.wado_study", report_id=report_id, study=found["study"])
    return Response(json.dumps(found), content_type="application/json", headers={"Cache-Control": "private, no-store"})


@bp.get("/<report_id>/dicom-web/studies/<study>")
def wado_study(report_id: str, study: str) -> Response:
    """The base of the read-only WADO-RS proxy; only its instance resources are served."""
    return Response("ask for an instance: studies/{study}/series/{series}/instances/{instance}", status=404,
                    content_type="text/plain; charset=utf-8")


@bp.get("/<report_id>/dicom-web/studies/<study>/series/<series>/instances/<sop>")
def wado_instance(report_id: str, study: str, series: str, sop: str) -> Response:
    """WADO-RS retrieve instance, read-only, for a radiologist, of the report's own study only:
    multipart/related; type="application/dicom" when asked for, else the bare Part 10 file (what
    the viewer's loader reads)."""
    settings = _hub().settings
    try:
        with _hub().pool.connection() as conn:
            base, uid = _radiologist_source(conn, report_id)
        if study != uid:
            raise image.ImageUnavailable("not the report's study", 404)
        body = image.instance(base, uid, series, sop, timeout_s=settings.dicomweb_timeout,
                              tls=ClientTls.from_settings(settings))
    except image.ImageUnavailable as exc:
        return _unavailable(report_id, exc)
    access.note(audit.interaction("read"), "R", what=[f"DiagnosticReport/{report_id}"], query="dicom-web instance")
    headers = {"Cache-Control": "private, max-age=600"}
    if "multipart/related" in request.headers.get("Accept", ""):
        boundary = f"hub-{uuid.uuid4().hex}"
        part = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").encode() + body + \
            f"\r\n--{boundary}--\r\n".encode()
        return Response(part, headers=headers,
                        content_type=f'multipart/related; type="application/dicom"; boundary={boundary}')
    return Response(body, content_type="application/dicom", headers=headers)
