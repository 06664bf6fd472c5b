"""FHIR REST interactions: create, update, patch, delete (and their conditional forms), read,
vread, history (instance, type, system), search, and transaction and batch Bundles at the base.

Writes are validated, then stored with their search index (and, for an available
ImagingStudy, its analysis Task and queue entry) in one transaction (`interactions` holds the
writes, `transaction` the Bundles). Reads serve stored JSON.
An ImagingStudy posted again with a DICOM Study Instance UID the hub holds (a client's retry
without If-None-Exist) updates the stored one: one study, one analysis, one report lineage.

Every answer is JSON (`_format=json` or a JSON media type; XML is 406), indented with
`_pretty=true`, with `ETag: W/"n"` and `Last-Modified` as an HTTP date for a version. Browsers on
the origins INTEROP_CORS_ORIGINS lists may call the API (CORS, preflight included).
"""
from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any
from urllib.parse import urlencode

import orjson
import psycopg
from flask import Blueprint, Response, current_app, request

from .. import access
from ..domain import audit, elements, search
from ..services.security import audit as audit_trail
from ..store import resources
from . import capability, interactions, transaction
from .errors import (
    BadRequest,
    FhirError,
    Forbidden,
    GoneError,
    MethodNotAllowed,
    NotAcceptable,
    NotFoundError,
    UnsupportedMediaType,
    issue,
    outcome,
)

FHIR_JSON = "application/fhir+json; charset=utf-8"
JSON_TYPES = ("application/fhir+json", "application/json")

bp = Blueprint("fhir", __name__, url_prefix="/fhir")


def hub() -> Any:
    return current_app.extensions["interop"]


def respond(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    if "resourceType" in body:  # JSONB keeps keys by length; people read resourceType first
        body = {"resourceType": body["resourceType"], **body}
    pretty = request.args.get("_pretty") == "true"
    data = orjson.dumps(body, option=orjson.OPT_INDENT_2 if pretty else 0)
    return Response(data, status=status, headers=headers or {}, content_type=FHIR_JSON)


def http_date(instant: str) -> str:
    """meta.lastUpdated (an ISO instant) as HTTP's Last-Modified wants it (RFC 7231 IMF-fixdate)."""
    return format_datetime(datetime.fromisoformat(instant.replace("Z", "+00:00")).astimezone(UTC), usegmt=True)


def _version_headers(body: dict[str, Any], location: bool = False) -> dict[str, str]:
    """ETag, Last-Modified, and the version's own URL (Content-Location; Location too for a create)."""
    meta = body.get("meta", {})
    headers = {"ETag": f'W/"{meta.get("versionId")}"'}
    if meta.get("lastUpdated"):
        headers["Last-Modified"] = http_date(meta["lastUpdated"])
    if body.get("id") and meta.get("versionId") and body.get("resourceType") != "AuditEvent":  # not versioned
        where = f"{hub().settings.public_base()}/{body['resourceType']}/{body['id']}/_history/{meta['versionId']}"
        headers["Content-Location"] = where
        if location:
            headers["Location"] = where
    return headers


version_headers = _version_headers  # the operations' answers carry them too (interop.fhir.operations)

XML_FORMATS = ("xml", "text/xml", "application/xml", "application/fhir+xml", "application/xml+fhir")


@bp.before_request
def negotiate() -> None:
    wanted = request.args.get("_format")
    if wanted is not None and ("json" not in wanted.lower() or wanted.lower() in XML_FORMATS):
        raise NotAcceptable("only JSON is served (_format=json or application/fhir+json)")
    accept = request.headers.get("Accept", "")
    if wanted is None and accept and "json" not in accept and "*/*" not in accept:
        raise NotAcceptable("only application/fhir+json is served")
    ctype = (request.mimetype or "").lower()
    if request.method in ("POST", "PUT") and not request.path.endswith("/_search") and ctype not in JSON_TYPES:
        raise UnsupportedMediaType(f"Content-Type must be application/fhir+json, not {ctype or 'missing'}")
    if request.method == "PATCH" and ctype not in (interactions.JSON_PATCH, interactions.MERGE_PATCH, *JSON_TYPES):
        raise UnsupportedMediaType(f"PATCH takes a JSON Patch ({interactions.JSON_PATCH}), not {ctype or 'missing'}")


def _known(rtype: str, rid: str | None = None) -> None:
    interactions.known(rtype, rid)


def _parse_body(rtype: str) -> dict[str, Any]:
    raw = request.get_data(cache=False)  # raises 413 past MAX_CONTENT_LENGTH
    return interactions.prepare(rtype, interactions.parse_json(raw))


def _if_match() -> int | None:
    return interactions.if_match(request.headers.get("If-Match"))


def _prefer_return() -> str:
    """What the client asked a write to answer with (FHIR's `Prefer: return=`): representation
    (the default), minimal or OperationOutcome."""
    for part in request.headers.get("Prefer", "").replace(";", ",").split(","):
        key, _, value = part.partition("=")
        value = value.strip().strip('"')
        if key.strip() == "return" and value in ("minimal", "OperationOutcome"):
            return value
    return "representation"


def _written(done: interactions.Result, location: bool) -> Response:
    """The answer to a write, as Prefer asks: the resource, nothing, or an OperationOutcome saying
    what was done; always with its version's headers."""
    headers = _version_headers(done.resource, location=location)
    wanted = _prefer_return()
    if wanted == "minimal":
        return Response(status=done.status, headers=headers)
    if wanted == "OperationOutcome":
        what = f"{done.resource['resourceType']}/{done.resource['id']}/_history/{done.version}"
        said = f"{what} {'created' if done.status == 201 else 'is the current version'}"
        return respond(outcome([issue("informational", said, severity="information")]), done.status, headers)
    return respond(done.resource, done.status, headers)


@bp.post("/<rtype>")
def create(rtype: str) -> Response:
    _known(rtype)
    interactions.writable(rtype)
    body = _parse_body(rtype)
    criteria = request.headers.get("If-None-Exist")
    # A plain create reads nothing before it writes: BEGIN and the write go in one round trip, the
    # audit record and COMMIT in another, and the answer waits for the COMMIT.
    plain = not criteria and rtype != "ImagingStudy"
    with hub().pool.connection() as conn, \
            resources.pipelined_transaction(conn) if plain else conn.transaction():
        done = interactions.create(conn, rtype, body, criteria)
    return _written(done, location=True)


_ref = interactions.ref_of


@bp.put("/<rtype>/<rid>")
def update(rtype: str, rid: str) -> Response:
    _known(rtype, rid)
    interactions.writable(rtype)
    body = _parse_body(rtype)
    with hub().pool.connection() as conn, conn.transaction():
        done = interactions.update(conn, rtype, rid, body, _if_match())
    return _written(done, location=done.status == 201)


@bp.put("/<rtype>")
def conditional_update(rtype: str) -> Response:
    """PUT Type?criteria (HAPI FHIR's conditional update): none found creates, one is updated, more is 412."""
    _known(rtype)
    interactions.writable(rtype)
    body = _parse_body(rtype)
    with hub().pool.connection() as conn, conn.transaction():
        done = interactions.conditional_update(conn, rtype, list(request.args.items(multi=True)), body, _if_match())
    return _written(done, location=True)


@bp.patch("/<rtype>/<rid>")
def patch(rtype: str, rid: str) -> Response:
    """JSON Patch (application/json-patch+json), or a JSON Merge Patch (what fhirpy's patch() sends)."""
    _known(rtype, rid)
    interactions.writable(rtype)
    kind = (request.mimetype or "").lower()
    document = interactions.parse_json(request.get_data(cache=False))
    with hub().pool.connection() as conn, conn.transaction():
        done = interactions.patch(conn, rtype, rid, kind, document, _if_match())
    return _written(done, location=False)


@bp.patch("/<rtype>")
def conditional_patch(rtype: str) -> Response:
    _known(rtype)
    interactions.writable(rtype)
    kind = (request.mimetype or "").lower()
    document = interactions.parse_json(request.get_data(cache=False))
    with hub().pool.connection() as conn, conn.transaction():
        done = interactions.conditional_patch(conn, rtype, list(request.args.items(multi=True)), kind, document,
                                              _if_match())
    return _written(done, location=False)


@bp.delete("/<rtype>/<rid>")
def delete(rtype: str, rid: str) -> Response:
    """Soft delete, as a version of its own (interop.fhir.interactions says what is refused and why)."""
    _known(rtype, rid)
    with hub().pool.connection() as conn, conn.transaction():
        done = interactions.delete(conn, rtype, rid, version=_if_match())
    return _deleted(done)


@bp.delete("/<rtype>")
def conditional_delete(rtype: str) -> Response:
    _known(rtype)
    with hub().pool.connection() as conn, conn.transaction():
        done = interactions.conditional_delete(conn, rtype, list(request.args.items(multi=True)))
    return _deleted(done)


def _deleted(done: interactions.Result) -> Response:
    headers = {"ETag": f'W/"{done.version}"'} if done.version else {}
    return respond(interactions.answer(done), 200, headers)


@bp.get("/<rtype>/<rid>")
def read(rtype: str, rid: str) -> Response:
    _known(rtype, rid)
    if rtype == "AuditEvent":
        return _audit_event(rid)
    with hub().pool.connection() as conn:  # a refusal (404, 410) is audited by interop.access.after
        body = _read(conn, rtype, rid)
        access.audit_read(audit.interaction("read"), "R", what=[_ref(body)], patients=audit.patients_of(body))
    if _not_modified(body):
        return Response(status=304, headers=_version_headers(body))
    return respond(_subset(body), 200, _version_headers(body))


def _not_modified(body: dict[str, Any]) -> bool:
    """A conditional read (R4 http.html#cread): the client's copy, named by If-None-Match (its ETag)
    or If-Modified-Since (an HTTP date), is the current version."""
    meta = body.get("meta", {})
    tags = request.headers.get("If-None-Match")
    if tags is not None:
        version = str(meta.get("versionId"))
        return tags.strip() == "*" or any(t.strip().removeprefix("W/").strip('"') == version for t in tags.split(","))
    since = request.headers.get("If-Modified-Since")
    if since is None or not meta.get("lastUpdated"):
        return False
    try:
        client_has = parsedate_to_datetime(since)
    except (TypeError, ValueError):
        return False  # not a date: answered in full, as HTTP says
    changed = datetime.fromisoformat(meta["lastUpdated"]).replace(microsecond=0)
    return client_has.tzinfo is not None and changed <= client_has


def _subset(body: dict[str, Any]) -> dict[str, Any]:
    """A read with _summary or _elements (interop.domain.elements)."""
    summary = request.args.get("_summary")
    wanted = request.args.get("_elements")
    if summary is None and wanted is None:
        return body
    if summary not in (None, "true", "false", "text", "data"):
        raise BadRequest("_summary on a read: one of true, text, data, false")
    fields = [e.strip() for e in wanted.split(",") if e.strip()] if wanted is not None else None
    return elements.subset(body, elements.load(hub().settings.mappings_dir),
                           None if summary == "false" else summary, fields)


def _read(conn: psycopg.Connection[Any], rtype: str, rid: str) -> dict[str, Any]:
    return interactions.read(conn, rtype, rid)


@bp.get("/<rtype>/<rid>/_history/<vid>")
def vread(rtype: str, rid: str, vid: str) -> Response:
    _known(rtype, rid)
    _versioned(rtype)
    if not (vid.isascii() and vid.isdigit()) or len(vid) > 9:
        raise NotFoundError(f"{rtype}/{rid} has no version {vid}")
    with hub().pool.connection() as conn:
        body = _vread(conn, rtype, rid, int(vid))
        access.audit_read(audit.interaction("vread"), "R", what=[_ref(body)], patients=audit.patients_of(body))
    if _not_modified(body):
        return Response(status=304, headers=_version_headers(body))
    return respond(body, 200, _version_headers(body))


def _vread(conn: psycopg.Connection[Any], rtype: str, rid: str, vid: int) -> dict[str, Any]:
    try:
        return resources.vread(conn, rtype, rid, vid)
    except resources.Gone as exc:  # the version that deleted it has no content
        raise GoneError(str(exc)) from None
    except resources.NotFound as exc:
        raise NotFoundError(str(exc)) from None


@bp.get("/<rtype>/<rid>/_history")
def history(rtype: str, rid: str) -> Response:
    _known(rtype, rid)
    _versioned(rtype)
    count, offset, since = _history_args()
    with hub().pool.connection() as conn:
        try:
            versions = resources.versions(conn, rtype, rid)
        except resources.NotFound as exc:
            raise NotFoundError(str(exc)) from None
        access.audit_read(audit.interaction("history-instance"), "R", what=[f"{rtype}/{rid}"],
                          patients=[p for v in versions if not v.deleted for p in audit.patients_of(v.body)][:1])
    if since is not None:
        versions = [v for v in versions if datetime.fromisoformat(v.body["meta"]["lastUpdated"]) >= since]
    links = _history_links(f"{rtype}/{rid}/_history", count, offset, len(versions) > offset + count)
    return respond(history_bundle(versions[offset:offset + count], total=len(versions), links=links))


def history_bundle(versions: list[resources.Version], total: int | None = None,
                   links: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """A history Bundle as R4 has it: each version with the request that made it and its response
    (a deletion: DELETE, and no resource), newest first."""
    base = hub().settings.public_base()
    entries = []
    for v in versions:
        meta = v.body.get("meta", {})
        where = f"{v.body['resourceType']}/{v.body['id']}"
        if v.deleted:
            request_, status = {"method": "DELETE", "url": where}, "200 OK"
        elif meta.get("versionId") == "1":
            request_, status = {"method": "POST", "url": v.body["resourceType"]}, "201 Created"
        else:
            request_, status = {"method": "PUT", "url": where}, "200 OK"
        entry: dict[str, Any] = {"fullUrl": f"{base}/{where}"}
        if not v.deleted:
            entry["resource"] = v.body
        entry["request"] = request_
        entry["response"] = {"status": status, "etag": f'W/"{meta.get("versionId")}"', "lastModified": meta.get("lastUpdated")}
        entries.append(entry)
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "history"}
    if total is not None:
        bundle["total"] = total
    if links:
        bundle["link"] = links
    bundle["entry"] = entries
    return bundle


HISTORY_PARAMS = ("_count", "_offset", "_since", *interactions.FORMAT_PARAMS)
MAX_HISTORY_COUNT = 1000


@bp.get("/<rtype>/_history")
def history_type(rtype: str) -> Response:
    """Every version of every resource of one type, newest first (_count, _since; pages by _offset)."""
    _known(rtype)
    _versioned(rtype)
    return _history_of([rtype], f"{rtype}/_history", "history-type")


@bp.get("/_history")
def history_system() -> Response:
    """Every version of the types the token may read (system/<type>.r), newest first."""
    caller = access.principal()
    types = [t for t in capability.RESOURCES if t != "AuditEvent" and caller is not None
             and caller.grant.allows(t, "r")]
    if not types:
        raise Forbidden("the token's scopes allow reading no resource type (system/<type>.r)")
    return _history_of(types, "_history", "history-system")


def _history_of(types: list[str], path: str, interaction: str) -> Response:
    count, offset, since = _history_args()
    with hub().pool.connection() as conn:
        versions = resources.changes(conn, types, count + 1, offset, since)
        access.audit_read(audit.interaction(interaction), "R", what=types if len(types) == 1 else [],
                          patients=[p for v in versions[:count] if not v.deleted for p in audit.patients_of(v.body)],
                          query=urlencode(list(request.args.items(multi=True))))
    return respond(history_bundle(versions[:count], links=_history_links(path, count, offset, len(versions) > count)))


def _history_args() -> tuple[int, int, datetime | None]:
    """_count, _offset and _since of a history request (anything else is refused, as search does)."""
    unknown = [k for k in request.args if k not in HISTORY_PARAMS]
    if unknown:
        raise BadRequest(f"unknown parameter {unknown[0][:64]} (history takes _count, _since, _offset)")
    count = _bounded("_count", request.args.get("_count", "20"), MAX_HISTORY_COUNT)
    offset = _bounded("_offset", request.args.get("_offset", "0"), 10**6)
    since = None
    if "_since" in request.args:
        try:
            since = datetime.fromisoformat(request.args["_since"].replace("Z", "+00:00"))
        except ValueError:
            raise BadRequest("_since must be an instant such as 2026-12-01T00:00:00Z") from None
        if since.tzinfo is None:
            raise BadRequest("_since needs a time zone (Z or +hh:mm)")
    return count, offset, since


def _history_links(path: str, count: int, offset: int, more: bool) -> list[dict[str, str]]:
    kept = [(k, v) for k, v in request.args.items(multi=True) if k not in ("_count", "_offset")]
    return _page_links(path, kept, count, offset, more)


def _page_links(path: str, kept: list[tuple[str, str]], count: int, offset: int, more: bool) -> list[dict[str, str]]:
    """A page's self link, next (when more follow) and previous, by _count and _offset after the `kept` parameters."""
    base = hub().settings.public_base()

    def link(relation: str, at: int) -> dict[str, str]:
        return {"relation": relation, "url": f"{base}/{path}?{urlencode([*kept, ('_count', str(count)), ('_offset', str(at))])}"}

    links = [link("self", offset)]
    if more:
        links.append(link("next", offset + count))
    if offset > 0:
        links.append(link("previous", max(0, offset - count)))
    return links


def _bounded(name: str, raw: str, most: int) -> int:
    if not raw.isascii() or not raw.isdigit() or int(raw) > most:
        raise BadRequest(f"{name} must be a whole number up to {most}")
    return int(raw)


# -- transaction and batch at the base --------------------------------------------------------------
@bp.post("")
@bp.post("/")
def transaction_or_batch() -> Response:
    """POST [base] with a transaction or batch Bundle (interop.fhir.transaction)."""
    base = hub().settings.public_base()
    kind, entries = transaction.entries(interactions.parse_json(request.get_data(cache=False)), base)
    representation = "return=representation" in request.headers.get("Prefer", "")
    with hub().pool.connection() as conn:
        if kind == "transaction":
            results: list[Any] = list(transaction.transaction(conn, entries, _entry_get))
        else:
            results = list(transaction.batch(conn, entries, _entry_get))
    return respond(transaction.answer(kind, base, results, representation))


def _entry_get(conn: psycopg.Connection[Any], entry: transaction.Entry) -> tuple[int, dict[str, Any]]:
    """A GET entry of a Bundle: read, vread, or a search (its searchset)."""
    if entry.rid is not None and entry.vid is not None:
        if not (entry.vid.isascii() and entry.vid.isdigit()) or len(entry.vid) > 9:
            raise NotFoundError(f"{entry.rtype}/{entry.rid} has no version {entry.vid[:16]}")
        body = _vread(conn, entry.rtype, entry.rid, int(entry.vid))
    elif entry.rid is not None:
        body = _read(conn, entry.rtype, entry.rid)
    else:
        parsed, found, page = _search(conn, entry.rtype, entry.query)
        included = _included(conn, entry.rtype, parsed, found)
        access.audit_read(audit.interaction("search-type"), "E", what=[entry.rtype], query=urlencode(entry.query),
                          patients=[p for b in found + included for p in audit.patients_of(b)])
        return 200, _bundle(entry.rtype, entry.query, parsed, page, included)
    access.audit_read(audit.interaction(entry.interaction), "R", what=[_ref(body)], patients=audit.patients_of(body))
    return 200, body


def _search(
    conn: psycopg.Connection[Any], rtype: str, args: list[tuple[str, str]], count: int | None = None
) -> tuple[search.Search, list[dict[str, Any]], resources.Page]:
    lenient = "handling=lenient" in request.headers.get("Prefer", "")
    try:
        parsed = search.parse(rtype, args, hub().params.get(rtype, {}), lenient=lenient, table=hub().params)
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
        included = _included(conn, rtype, parsed, found)
        access.audit_read(audit.interaction("search-type"), "E", what=[rtype], query=urlencode(args),
                          patients=[p for b in found + included for p in audit.patients_of(b)])
    return respond(_bundle(rtype, args, parsed, page, included))


def _included(conn: psycopg.Connection[Any], rtype: str, parsed: search.Search,
              found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What _include and _revinclude add to a page (a search, or a Bundle's GET entry), within the token's scopes."""
    included: list[dict[str, Any]] = []
    for _source, pname in parsed.includes:
        param = hub().params[rtype][pname]
        refs = [r["reference"] for body in found for path in param.paths for r in _refs(body, path)]
        included.extend(resources.read_many(conn, refs))
    for source, pname in parsed.revincludes:  # the resources that refer to this page's
        referring = resources.read_referring(conn, source, pname, [f"{rtype}/{b['id']}" for b in found])
        caller = access.principal()
        if len(referring) >= resources.REVINCLUDE_MOST and caller is not None and caller.grant.allows(source, "r"):
            parsed.notes.append(f"_revinclude={source}:{pname} gave its first {resources.REVINCLUDE_MOST}"
                                " resources only; ask for fewer matches per page (_count)")
        included.extend(referring)
    caller = access.principal()
    return [b for b in included if caller is not None and caller.grant.allows(b["resourceType"], "r")]  # in scope


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
    links = _page_links(rtype, kept, q.count, q.offset, page.more and q.count > 0)
    shapes = elements.load(hub().settings.mappings_dir)
    entries = [{"fullUrl": f"{base}/{b['resourceType']}/{b['id']}",
                "resource": elements.subset(b, shapes, parsed.summary, parsed.elements),
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
    if parsed.summary == "count":  # how many, and no entries
        bundle["entry"] = []
    if parsed.ignored:
        bundle["entry"].append({"resource": outcome([issue(
            "not-supported", f"ignored unknown parameters: {', '.join(parsed.ignored)}", "warning")]),
            "search": {"mode": "outcome"}})
    if parsed.notes:
        bundle["entry"].append({"resource": outcome([issue("too-costly", note, "warning") for note in parsed.notes]),
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



# -- CORS: web pages of the origins INTEROP_CORS_ORIGINS lists may call the API --------------------
CORS_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
CORS_REQUEST_HEADERS = ("Authorization, Content-Type, Accept, If-Match, If-None-Match, If-None-Exist,"
                        " If-Modified-Since, Prefer, X-Requested-With")
CORS_EXPOSED = "Location, ETag, Last-Modified, Content-Location"
CORS_PATHS = ("/fhir", "/.well-known/smart-configuration")  # the API, and how a SMART client finds its token endpoint


def _cors_origin() -> str | None:
    """The request's Origin when it is one the operator listed and the path is the API's."""
    origin = request.headers.get("Origin")
    path = request.path
    if not origin or not any(path == p or path.startswith(p + "/") for p in CORS_PATHS):
        return None
    return origin if hub().settings.cors_allowed(origin) else None


@bp.before_app_request
def preflight() -> Response | None:
    """A CORS preflight (OPTIONS, sent by browsers without credentials) is answered before
    authentication, for listed origins only; it says which methods and headers may follow."""
    if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
        return None
    origin = _cors_origin()
    if origin is None:
        return None
    return Response(status=204, headers={
        "Access-Control-Allow-Origin": origin, "Access-Control-Allow-Methods": CORS_METHODS,
        "Access-Control-Allow-Headers": CORS_REQUEST_HEADERS, "Access-Control-Max-Age": "600", "Vary": "Origin"})


@bp.after_app_request
def cors(response: Response) -> Response:
    """Every answer to a listed origin (refusals too, so a page can read its 401) may be read by
    its page, headers included; other origins get nothing more (the browser keeps the answer from them)."""
    if request.headers.get("Origin"):
        response.vary.add("Origin")
    origin = _cors_origin()
    if origin is not None and "Access-Control-Allow-Origin" not in response.headers:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSED
    return response


def error_response(exc: FhirError) -> Response:
    return respond(exc.operation_outcome(), exc.status)
