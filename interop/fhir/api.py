"""FHIR REST interactions: create, update, read, vread, history, search.

Writes are validated, then stored with their search index (and, for an available
ImagingStudy, its analysis Task and queue entry) in one transaction. Reads serve stored JSON.
An ImagingStudy posted again with a DICOM Study Instance UID the hub holds (a client's retry
without If-None-Exist) updates the stored one: one study, one analysis, one report lineage.
"""
from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson
import psycopg
from flask import Blueprint, Response, current_app, request

from .. import access
from ..domain import audit, search, subscriptions
from ..domain.vocabulary import study_uid
from ..services import intake
from ..services.errors import IntakeError
from ..services.security import audit as audit_trail
from ..services.security import urls
from ..store import resources
from . import capability
from .errors import (
    BadRequest,
    BusinessRule,
    FhirError,
    GoneError,
    MethodNotAllowed,
    NotAcceptable,
    NotFoundError,
    PreconditionFailed,
    UnsupportedMediaType,
    issue,
    outcome,
)
from .validation import validate

FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")  # FHIR R4 id

FHIR_JSON = "application/fhir+json; charset=utf-8"
JSON_TYPES = ("application/fhir+json", "application/json")

bp = Blueprint("fhir", __name__, url_prefix="/fhir")


def hub() -> Any:
    return current_app.extensions["interop"]


def respond(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    if "resourceType" in body:  # JSONB keeps keys by length; people read resourceType first
        body = {"resourceType": body["resourceType"], **body}
    return Response(orjson.dumps(body), status=status, headers=headers or {}, content_type=FHIR_JSON)


def _version_headers(body: dict[str, Any], location: bool = False) -> dict[str, str]:
    meta = body.get("meta", {})
    headers = {"ETag": f'W/"{meta.get("versionId")}"', "Last-Modified": meta.get("lastUpdated", "")}
    if location:
        where = f"{body['resourceType']}/{body['id']}/_history/{meta.get('versionId')}"
        headers["Location"] = f"{hub().settings.public_base()}/{where}"
    return headers


@bp.before_request
def negotiate() -> None:
    accept = request.headers.get("Accept", "")
    if accept and "json" not in accept and "*/*" not in accept:
        raise NotAcceptable("only application/fhir+json is served")
    if request.method in ("POST", "PUT") and not request.path.endswith("/_search"):
        ctype = (request.mimetype or "").lower()
        if ctype not in JSON_TYPES:
            raise UnsupportedMediaType(f"Content-Type must be application/fhir+json, not {ctype or 'missing'}")


def _known(rtype: str, rid: str | None = None) -> None:
    if rtype not in capability.RESOURCES:
        raise NotFoundError(f"resource type {rtype[:64]} is not supported here")
    if rid is not None and not FHIR_ID.fullmatch(rid):
        raise NotFoundError(f"{rtype}/{rid[:64]!r} is not a FHIR id, so there is no such resource")


def _parse_body(rtype: str) -> dict[str, Any]:
    raw = request.get_data(cache=False)  # raises 413 past MAX_CONTENT_LENGTH
    try:
        body: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(body, dict) or "resourceType" not in body:
        raise BadRequest("the body is not a FHIR resource (no resourceType)")
    if body["resourceType"] != rtype:
        raise BadRequest(f"resourceType {str(body['resourceType'])[:64]!r} does not match the URL ({rtype})")
    validate(body, hub().settings.mappings_dir)
    if rtype == "Subscription":  # delivery: rest-hook only, criteria checked, requested -> active
        try:
            body = subscriptions.prepare(body, hub().params)
        except subscriptions.SubscriptionError as exc:
            raise BusinessRule(str(exc)) from None
        _may_call(str((body.get("channel") or {}).get("endpoint") or ""), "Subscription.channel.endpoint")
    if rtype == "Endpoint":
        _may_call(str(body.get("address") or ""), "Endpoint.address")
    return dict(body)


def _may_call(url: str, expression: str) -> None:
    """Refuse a URL the hub would call on the client's word unless the operator allowed it."""
    if not urls.allowed(hub().ctx, url):
        reason = (f"{expression} is not an address this hub may call; its operator allows addresses in"
                  " INTEROP_URL_ALLOW or the site's allow_urls")
        raise BusinessRule(reason, issues=[issue("security", reason, expression=expression)])


def _if_match() -> int | None:
    raw = request.headers.get("If-Match")
    if raw is None:
        return None
    digits = raw.replace("W/", "").strip('"')
    if not digits.isdigit():
        raise BadRequest('If-Match must be a version ETag such as W/"3"')
    return int(digits)


def _business(exc: IntakeError) -> BusinessRule:
    return BusinessRule(exc.reason, issues=[issue("business-rule", exc.reason, expression=exc.expression)])


def _before_write(conn: psycopg.Connection[Any], body: dict[str, Any]) -> dict[str, Any]:
    if body["resourceType"] != "ImagingStudy":
        return body
    try:
        return intake.tag_site(conn, hub().ctx, body)
    except IntakeError as exc:
        raise _business(exc) from None


def _after_write(conn: psycopg.Connection[Any], stored: dict[str, Any]) -> None:
    if stored["resourceType"] == "ImagingStudy":
        try:
            intake.accept_study(conn, hub().ctx, stored)
        except IntakeError as exc:
            raise _business(exc) from None


def _write(conn: psycopg.Connection[Any], body: dict[str, Any], if_match: int | None = None) -> tuple[dict[str, Any], bool]:
    """Store a new version (or a new resource when `body` has no id); (stored, created)."""
    try:
        if "id" not in body:
            return resources.create(conn, body, hub().params[body["resourceType"]]), True
        return resources.update(conn, body, hub().params[body["resourceType"]], if_match)
    except resources.VersionConflict as exc:
        raise PreconditionFailed(str(exc)) from None
    except resources.NotIndexable as exc:
        raise BusinessRule(str(exc)) from None


def _prefer_minimal() -> bool:
    return "return=minimal" in request.headers.get("Prefer", "")


@bp.post("/<rtype>")
def create(rtype: str) -> Response:
    _known(rtype)
    if not capability.writable(rtype):
        raise MethodNotAllowed(f"{rtype} is written by the hub, not by clients")
    body = _parse_body(rtype)
    body.pop("id", None)
    criteria = request.headers.get("If-None-Exist")
    status = 201
    # A plain create reads nothing before it writes: BEGIN and the write go in one round trip, the
    # audit record and COMMIT in another, and the answer waits for the COMMIT.
    plain = not criteria and rtype != "ImagingStudy"
    with hub().pool.connection() as conn, \
            resources.pipelined_transaction(conn) if plain else conn.transaction():
        if criteria:
            resources.lock(conn, f"{rtype}?{criteria}")
            found = _search(conn, rtype, parse_qsl(criteria, keep_blank_values=True), count=2)[1]
            if len(found) > 1:
                raise PreconditionFailed("If-None-Exist matches more than one resource")
            if found:
                access.note(audit.interaction("create"), "R", what=[_ref(found[0])], patients=audit.patients_of(found[0]))
                return respond(found[0], 200, _version_headers(found[0], location=True))
        body = _before_write(conn, body)
        same = None
        if rtype == "ImagingStudy" and study_uid(body):
            resources.lock(conn, f"ImagingStudy?uid={study_uid(body)}")
            same = intake.same_study(conn, hub().ctx, body)
        if same is not None:  # the same study again: a retry, or news of it (registered -> available)
            stored, status = same, 200
            if _content(same) != _content(body):
                stored = _write(conn, {**body, "id": same["id"]})[0]
        else:
            stored = _write(conn, body)[0]
        _after_write(conn, stored)
        _audit_write(conn, "create", stored)
    if _prefer_minimal():
        return Response(status=status, headers=_version_headers(stored, location=True))
    return respond(stored, status, _version_headers(stored, location=True))


def _ref(body: dict[str, Any]) -> str:
    return f"{body['resourceType']}/{body['id']}/_history/{body.get('meta', {}).get('versionId', '1')}"


def _audit_write(conn: psycopg.Connection[Any], interaction: str, stored: dict[str, Any]) -> None:
    access.audit_change(conn, audit.interaction(interaction), audit.ACTIONS[interaction], what=[_ref(stored)],
                        patients=audit.patients_of(stored))


def _content(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k not in ("id", "meta")}


@bp.put("/<rtype>/<rid>")
def update(rtype: str, rid: str) -> Response:
    _known(rtype, rid)
    if not capability.writable(rtype):
        raise MethodNotAllowed(f"{rtype} is written by the hub, not by clients")
    body = _parse_body(rtype)
    if body.get("id") != rid:
        raise BadRequest("the resource id must match the URL")
    with hub().pool.connection() as conn, conn.transaction():
        stored, created = _write(conn, _before_write(conn, body), _if_match())
        _after_write(conn, stored)
        _audit_write(conn, "create" if created else "update", stored)
    return respond(stored, 201 if created else 200, _version_headers(stored, location=created))


@bp.get("/<rtype>/<rid>")
def read(rtype: str, rid: str) -> Response:
    _known(rtype, rid)
    if rtype == "AuditEvent":
        return _audit_event(rid)
    with hub().pool.connection() as conn:  # a refusal (404, 410) is audited by interop.access.after
        body = _read(conn, rtype, rid)
        access.audit_read(audit.interaction("read"), "R", what=[_ref(body)], patients=audit.patients_of(body))
    return respond(body, 200, _version_headers(body))


def _read(conn: psycopg.Connection[Any], rtype: str, rid: str) -> dict[str, Any]:
    try:
        return resources.read(conn, rtype, rid)
    except resources.Gone as exc:
        raise GoneError(str(exc)) from None
    except resources.NotFound as exc:
        raise NotFoundError(str(exc)) from None


@bp.get("/<rtype>/<rid>/_history/<vid>")
def vread(rtype: str, rid: str, vid: str) -> Response:
    _known(rtype, rid)
    _versioned(rtype)
    if not (vid.isascii() and vid.isdigit()) or len(vid) > 9:
        raise NotFoundError(f"{rtype}/{rid} has no version {vid}")
    with hub().pool.connection() as conn:
        try:
            body = resources.vread(conn, rtype, rid, int(vid))
        except resources.NotFound as exc:
            raise NotFoundError(str(exc)) from None
        access.audit_read(audit.interaction("vread"), "R", what=[_ref(body)], patients=audit.patients_of(body))
    return respond(body, 200, _version_headers(body))


@bp.get("/<rtype>/<rid>/_history")
def history(rtype: str, rid: str) -> Response:
    _known(rtype, rid)
    _versioned(rtype)
    with hub().pool.connection() as conn:
        try:
            versions = resources.history(conn, rtype, rid)
        except resources.NotFound as exc:
            raise NotFoundError(str(exc)) from None
        access.audit_read(audit.interaction("history-instance"), "R", what=[f"{rtype}/{rid}"],
                          patients=[p for v in versions[:1] for p in audit.patients_of(v)])
    base = hub().settings.public_base()
    return respond({
        "resourceType": "Bundle", "type": "history", "total": len(versions),
        "entry": [{"fullUrl": f"{base}/{rtype}/{rid}", "resource": v,
                   "request": {"method": "PUT" if v["meta"]["versionId"] != "1" else "POST",
                               "url": f"{rtype}/{rid}"}} for v in versions],
    })


def _search(
    conn: psycopg.Connection[Any], rtype: str, args: list[tuple[str, str]], count: int | None = None
) -> tuple[search.Search, list[dict[str, Any]], resources.Page]:
    lenient = "handling=lenient" in request.headers.get("Prefer", "")
    try:
        parsed = search.parse(rtype, args, hub().params.get(rtype, {}), lenient=lenient)
    except search.SearchError as exc:
        raise BadRequest(str(exc)) from None
    if count is not None:
        parsed.query.count = count
    page = resources.search(conn, rtype, parsed.query)
    return parsed, page.found, page


@bp.route("/<rtype>", methods=["GET"])
@bp.route("/<rtype>/_search", methods=["POST"])
def search_type(rtype: str) -> Response:
    _known(rtype)
    args = list(request.args.items(multi=True))
    if request.method == "POST":
        args += list(request.form.items(multi=True))
    if rtype == "AuditEvent":
        return _audit_search(args)
    with hub().pool.connection() as conn:  # a refused search (400) is audited by interop.access.after
        parsed, found, page = _search(conn, rtype, args)
        included: list[dict[str, Any]] = []
        for _source, pname in parsed.includes:
            path = hub().params[rtype][pname].path
            refs = [r["reference"] for body in found for r in _refs(body, path)]
            included.extend(resources.read_many(conn, refs))
        caller = access.principal()
        included = [b for b in included if caller is not None and caller.grant.allows(b["resourceType"], "r")]  # in scope
        access.audit_read(audit.interaction("search-type"), "E", what=[rtype], query=urlencode(args),
                          patients=[p for b in found + included for p in audit.patients_of(b)])
    return respond(_bundle(rtype, args, parsed, page, included))


def _refs(body: dict[str, Any], path: tuple[str, ...]) -> list[dict[str, Any]]:
    value: Any = body
    for step in path:
        value = value.get(step) if isinstance(value, dict) else None
    items = value if isinstance(value, list) else [value]
    return [r for r in items if isinstance(r, dict) and isinstance(r.get("reference"), str)
            and not r["reference"].startswith("#")]


def _bundle(
    rtype: str, args: list[tuple[str, str]], parsed: search.Search,
    page: resources.Page, included: list[dict[str, Any]],
) -> dict[str, Any]:
    """The searchset: Bundle.total only when known (asked for with _total, or the first page holds
    every match); a next link whenever a further match exists."""
    found = page.found
    base = hub().settings.public_base()
    q = parsed.query
    kept = [(k, v) for k, v in args if k not in ("_offset", "_count") and k not in parsed.ignored]

    def link(relation: str, offset: int) -> dict[str, str]:
        query = urlencode([*kept, ("_count", str(q.count)), ("_offset", str(offset))])
        return {"relation": relation, "url": f"{base}/{rtype}?{query}"}

    links = [link("self", q.offset)]
    if page.more and q.count > 0:
        links.append(link("next", q.offset + q.count))
    if q.offset > 0:
        links.append(link("previous", max(0, q.offset - q.count)))
    entries = [{"fullUrl": f"{base}/{b['resourceType']}/{b['id']}", "resource": b,
                "search": {"mode": "match"}} for b in found]
    seen = {(b["resourceType"], b["id"]) for b in found}
    for b in included:
        if (b["resourceType"], b["id"]) not in seen:
            seen.add((b["resourceType"], b["id"]))
            entries.append({"fullUrl": f"{base}/{b['resourceType']}/{b['id']}", "resource": b,
                            "search": {"mode": "include"}})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if page.total is not None:
        bundle["total"] = page.total
    bundle.update(link=links, entry=entries)
    if parsed.ignored:
        bundle["entry"].append({"resource": outcome([issue(
            "not-supported", f"ignored unknown parameters: {', '.join(parsed.ignored)}", "warning")]),
            "search": {"mode": "outcome"}})
    return bundle


# -- the audit trail: its own append-only table, read and searched only ---------------------------
def _versioned(rtype: str) -> None:
    if rtype == "AuditEvent":
        raise MethodNotAllowed("AuditEvents are never changed: read or search them")


def _audit_event(rid: str) -> Response:
    with hub().pool.connection() as conn:
        found = audit_trail.read(conn, rid)
        if found is None:
            raise NotFoundError(f"AuditEvent/{rid[:64]} is not known")
        access.audit_read(audit.interaction("read"), "R", what=[f"AuditEvent/{rid}"], patients=[])
    return respond(found, 200, _version_headers(found))


def _audit_search(args: list[tuple[str, str]]) -> Response:
    try:
        query = audit.parse_query(args, lenient="handling=lenient" in request.headers.get("Prefer", ""))
    except audit.QueryError as exc:
        raise BadRequest(str(exc)) from None
    hub().audit.flush()  # this process's latest records are in the answer
    with hub().pool.connection() as conn:
        total, found = audit_trail.search(conn, query)
        access.audit_read(audit.interaction("search-type"), "E", what=["AuditEvent"], patients=[],
                          query=urlencode(args))
    base = hub().settings.public_base()
    kept = [(k, v) for k, v in args if k not in ("_offset", "_count")]

    def link(relation: str, offset: int) -> dict[str, str]:
        return {"relation": relation,
                "url": f"{base}/AuditEvent?{urlencode([*kept, ('_count', str(query.count)), ('_offset', str(offset))])}"}

    links = [link("self", query.offset)]
    if query.offset + query.count < total:
        links.append(link("next", query.offset + query.count))
    return respond({"resourceType": "Bundle", "type": "searchset", "total": total, "link": links,
                    "entry": [{"fullUrl": f"{base}/AuditEvent/{e['id']}", "resource": e, "search": {"mode": "match"}}
                              for e in found]})


@bp.get("/metadata")
def metadata() -> Response:
    return respond(capability.statement(hub().settings.public_base(), hub().settings.token_url(), hub().params, hub().started))


@bp.route("/<rtype>/<rid>", methods=["DELETE", "PATCH"])
@bp.route("/<rtype>", methods=["DELETE", "PUT", "PATCH"])
def not_supported(rtype: str, rid: str | None = None) -> Response:
    raise MethodNotAllowed(f"{request.method} is not supported on {request.path}")


def error_response(exc: FhirError) -> Response:
    return respond(exc.operation_outcome(), exc.status)
