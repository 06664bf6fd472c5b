"""Transaction and batch Bundles POSTed to the FHIR base (R4 http.html#transaction).

A transaction is all or nothing, in one PostgreSQL transaction: its entries are processed in
the order R4 sets (DELETE, then POST, then PUT and PATCH, then GET; ImagingStudies are written
after the other writes, as their intake reads the Endpoint they name), a conditional create
(`ifNoneExist`) or conditional update (`PUT Type?criteria`) is resolved first, and every
reference to an entry's `fullUrl` (`urn:uuid:...`, or the resource's absolute URL) is rewritten
to the `Type/id` it resolved to before anything is written. The first refusal rolls everything
back and is the answer (its OperationOutcome names the entry). A batch runs each entry in its own
transaction, in the Bundle's order, each with its own status; a batch entry may not refer to
another (`urn:uuid:`), as R4 asks.

Each entry is the same interaction as its REST form (`interactions`), with the same checks, the
token's scope for it, and an audit record in its transaction. The answer's entries are in the
request's order; a resource is returned with `Prefer: return=representation`, as HAPI FHIR does.
"""
from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import psycopg

from .. import access
from ..domain.scopes import INTERACTION_LETTER
from ..store import resources
from . import interactions
from .errors import BadRequest, FhirError, Forbidden, MethodNotAllowed, NotFoundError, PreconditionFailed
from .interactions import Result, Target, entry_error

ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
KINDS = ("transaction", "batch")


@dataclass
class Entry:
    """One Bundle entry's request, checked."""

    index: int
    method: str
    rtype: str
    rid: str | None = None
    vid: str | None = None                    # GET Type/id/_history/vid
    query: list[tuple[str, str]] = field(default_factory=list)
    conditional: bool = False                 # Type?criteria (or bare Type) on PUT, PATCH, DELETE
    resource: dict[str, Any] | None = None
    full_url: str | None = None
    if_match: int | None = None
    if_none_exist: str | None = None
    patch: tuple[str, Any] | None = None      # (kind, document) of a PATCH

    @property
    def where(self) -> str:
        return f"Bundle.entry[{self.index}]"

    @property
    def interaction(self) -> str:
        if self.method == "GET":
            return "vread" if self.vid else "read" if self.rid else "search-type"
        return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[self.method]


# GET entries (read, vread, search) are answered by the API's own read and search: (status, resource)
Getter = Callable[[psycopg.Connection[Any], "Entry"], tuple[int, dict[str, Any]]]
Done = Result | tuple[int, dict[str, Any]]  # a write's result, or a GET's (status, resource)


def entries(bundle: Any, base: str) -> tuple[str, list[Entry | FhirError]]:
    """The Bundle's kind and its entries, each checked before anything is read or written (an
    entry that fails its check is its refusal, located)."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise BadRequest("POST to the FHIR base takes a Bundle of type transaction or batch")
    kind = bundle.get("type")
    if kind not in KINDS:
        raise BadRequest(f"a Bundle of type {str(kind)[:32]!r} cannot be processed; POST a transaction or batch Bundle")
    raw = bundle.get("entry", [])
    if not isinstance(raw, list):
        raise BadRequest("Bundle.entry must be a list")
    return kind, [_entry(i, e, base) for i, e in enumerate(raw)]


def _entry(index: int, raw: Any, base: str) -> Entry | FhirError:
    try:
        return _parse_entry(index, raw, base)
    except FhirError as exc:
        return entry_error(exc, f"Bundle.entry[{index}]")


def _parse_entry(index: int, raw: Any, base: str) -> Entry:
    if not isinstance(raw, dict) or not isinstance(raw.get("request"), dict):
        raise BadRequest("each entry needs a request (method and url)")
    request = raw["request"]
    method, url = request.get("method"), request.get("url")
    if not isinstance(method, str) or method not in ORDER or not isinstance(url, str) or not url:
        raise BadRequest("request.method must be GET, HEAD, POST, PUT, PATCH or DELETE, and request.url a relative URL")
    if url.startswith(base + "/"):
        url = url[len(base) + 1:]
    split = urlsplit(url)
    if split.scheme or split.netloc:
        raise BadRequest("request.url must be relative to this server's base")
    parts = [p for p in split.path.split("/") if p]
    if not parts:
        raise BadRequest("request.url names no resource type")
    entry = Entry(index, "GET" if method == "HEAD" else method, parts[0],
                  query=parse_qsl(split.query, keep_blank_values=True))
    interactions.known(entry.rtype)
    if entry.method != "GET":
        interactions.writable(entry.rtype)
    if len(parts) == 2 or (len(parts) == 4 and parts[2] == "_history" and entry.method == "GET"):
        entry.rid = parts[1]
        interactions.known(entry.rtype, entry.rid)
        entry.vid = parts[3] if len(parts) == 4 else None
    elif len(parts) != 1:
        raise BadRequest("request.url must be Type, Type/id, Type?criteria or (GET) Type/id/_history/version")
    entry.conditional = entry.rid is None and entry.method in ("PUT", "PATCH", "DELETE")
    if entry.conditional and not entry.query:
        raise BadRequest(f"{entry.method} needs Type/id or Type?criteria")
    if entry.method == "POST" and (entry.rid or entry.query):
        raise BadRequest("POST creates: its url is the resource type alone (conditions go in ifNoneExist)")
    full_url = raw.get("fullUrl")
    entry.full_url = full_url if isinstance(full_url, str) and full_url else None
    entry.if_match = interactions.if_match(request.get("ifMatch"))
    if request.get("ifNoneExist") is not None and not isinstance(request["ifNoneExist"], str):
        raise BadRequest("request.ifNoneExist must be search criteria such as identifier=system|value")
    entry.if_none_exist = request.get("ifNoneExist") or None
    if entry.method in ("POST", "PUT"):
        entry.resource = interactions.prepare(entry.rtype, raw.get("resource"))
    elif entry.method == "PATCH":
        entry.patch = _patch_document(raw.get("resource"))
    return entry


def _patch_document(binary: Any) -> tuple[str, Any]:
    """A PATCH entry carries its JSON Patch as a Binary (R4: the body of the PATCH)."""
    if not isinstance(binary, dict) or binary.get("resourceType") != "Binary":
        raise BadRequest("a PATCH entry's resource is a Binary holding a JSON Patch (FHIRPath Patch is not supported)")
    if binary.get("contentType") != interactions.JSON_PATCH:
        raise BadRequest(f"a PATCH entry's Binary.contentType must be {interactions.JSON_PATCH}")
    try:
        data = base64.b64decode(str(binary.get("data") or ""), validate=True)
    except ValueError:
        raise BadRequest("Binary.data is not base64") from None
    return interactions.JSON_PATCH, interactions.parse_json(data)


def check_scope(entry: Entry) -> None:
    caller = access.principal()
    letter = INTERACTION_LETTER[entry.interaction]
    if caller is None or caller.is_person or not caller.grant.allows(entry.rtype, letter):
        raise Forbidden(f"the token's scopes do not allow {entry.interaction} on {entry.rtype}")


# -- references to other entries --------------------------------------------------------------------
def _rewrite(value: Any, ids: dict[str, str], missing: list[str]) -> Any:
    """`value` with each reference to an entry's fullUrl replaced by the Type/id it resolved to."""
    if isinstance(value, list):
        return [_rewrite(v, ids, missing) for v in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for key, item in value.items():
        if key == "reference" and isinstance(item, str):
            if item in ids:
                item = ids[item]
            elif item.startswith("urn:uuid:") or item.startswith("urn:oid:"):
                missing.append(item)
        else:
            item = _rewrite(item, ids, missing)
        out[key] = item
    return out


def _internal_references(value: Any) -> bool:
    if isinstance(value, list):
        return any(_internal_references(v) for v in value)
    if isinstance(value, dict):
        return any((k == "reference" and isinstance(v, str) and v.startswith("urn:uuid:")) or _internal_references(v)
                   for k, v in value.items())
    return False


# -- running them ---------------------------------------------------------------------------------
def transaction(conn: psycopg.Connection[Any], checked: list[Entry | FhirError], get: Getter) -> list[Done]:
    """All entries in one transaction (the caller's connection, not in a transaction yet); raises
    the first entry's refusal, located, after rolling everything back."""
    items = [e for e in checked if isinstance(e, Entry)]
    for refused in (e for e in checked if isinstance(e, FhirError)):
        raise refused
    urls: dict[str, int] = {}
    for entry in (e for e in items if e.full_url):
        if urls.setdefault(str(entry.full_url), entry.index) != entry.index:
            raise entry_error(BadRequest(f"fullUrl {str(entry.full_url)[:80]} is also entry {urls[str(entry.full_url)]}'s;"
                                         " each entry has its own"), entry.where)
    _named_once([(e, f"{e.rtype}/{e.rid}") for e in items if e.rid is not None and e.method != "GET"])
    done: dict[int, Done] = {}
    with conn.transaction():
        current: Entry | None = None
        try:
            for current in items:
                check_scope(current)
            current = None
            # the conditional entries' locks, taken in one order: two transactions never wait on each other in a circle
            conditions = {(e.rtype, interactions.criteria_key(e.if_none_exist or "" if e.method == "POST" else e.query))
                          for e in items if (e.method == "POST" and e.if_none_exist) or e.conditional}
            for rtype, query in sorted(conditions):
                interactions.lock_criteria(conn, rtype, query)
            ordered = sorted(items, key=lambda e: (ORDER[e.method], e.index))
            for current in (e for e in ordered if e.method == "DELETE"):
                done[current.index] = _delete(conn, current, check=False)
            for current in (e for e in ordered if e.method == "DELETE"):  # what the others deleted no longer counts
                deleted = done[current.index]
                if isinstance(deleted, Result) and "id" in deleted.resource:
                    interactions.unreferenced(conn, deleted.reference)
            current = None  # each of the next two names its own entry
            targets, ids = _resolve(conn, ordered)
            _no_twice(items, targets, done)
            for current in items:
                if current.resource is not None:
                    missing: list[str] = []
                    current.resource = _rewrite(current.resource, ids, missing)
                    if missing:
                        raise BadRequest(f"a reference to {missing[0][:80]} names no entry of this Bundle")
            # ImagingStudies last: their intake reads the Endpoint (and site) they name, which may be an entry
            writes = sorted((e for e in items if e.method in ("POST", "PUT", "PATCH")),
                            key=lambda e: (e.rtype == "ImagingStudy", ORDER[e.method], e.index))
            for current in writes:
                done[current.index] = _write(conn, current, targets.get(current.index))
            for current in (e for e in ordered if e.method == "GET"):
                done[current.index] = get(conn, current)
        except FhirError as exc:
            raise (entry_error(exc, current.where) if current is not None else exc) from None
    return [done[e.index] for e in items]


def _delete(conn: psycopg.Connection[Any], entry: Entry, check: bool = True) -> Result:
    if entry.conditional:
        return interactions.conditional_delete(conn, entry.rtype, entry.query, check)
    assert entry.rid is not None
    return interactions.delete(conn, entry.rtype, entry.rid, check, entry.if_match)


def _resolve(conn: psycopg.Connection[Any], ordered: list[Entry]) -> tuple[dict[int, Target], dict[str, str]]:
    """Where each create and conditional update lands, and fullUrl -> Type/id for references."""
    targets: dict[int, Target] = {}
    ids: dict[str, str] = {}
    for entry in ordered:
        try:
            if entry.method == "POST":
                assert entry.resource is not None
                targets[entry.index] = interactions.target(conn, entry.rtype, entry.resource, entry.if_none_exist)
            elif entry.method in ("PUT", "PATCH") and entry.conditional:  # its criteria locked by transaction()
                found = interactions.matching(conn, entry.rtype, entry.query)
                if len(found) > 1:
                    raise PreconditionFailed("the criteria match more than one resource")
                if found:
                    targets[entry.index] = Target(found[0]["id"], found=found[0])
                elif entry.method == "PATCH":
                    raise NotFoundError("the criteria of the conditional patch match no resource")
                else:
                    rid = (entry.resource or {}).get("id")
                    if rid:
                        interactions.unclaimed(conn, entry.rtype, str(rid))
                    targets[entry.index] = Target(str(rid) if rid else resources.new_id())
            elif entry.rid is not None and entry.method in ("PUT", "PATCH"):
                targets[entry.index] = Target(entry.rid)
        except FhirError as exc:
            raise entry_error(exc, entry.where) from None
        if entry.index in targets and entry.full_url:
            ids[entry.full_url] = f"{entry.rtype}/{targets[entry.index].rid}"
    return targets, ids


def _no_twice(items: list[Entry], targets: dict[int, Target], done: dict[int, Any]) -> None:
    """R4: a transaction names each resource once (two writes of one resource would be ambiguous)."""
    named = []
    for entry in items:
        done_ = done.get(entry.index)
        to = targets.get(entry.index)
        if isinstance(done_, Result) and "id" in done_.resource:
            named.append((entry, done_.reference))
        elif to is not None and (to.found is None or entry.method in ("PUT", "PATCH")):
            named.append((entry, f"{entry.rtype}/{to.rid}"))
    _named_once(named)


def _named_once(named: list[tuple[Entry, str]]) -> None:
    seen: dict[str, int] = {}
    for entry, key in named:
        if key in seen:
            raise entry_error(BadRequest(f"{key} is written by entries {seen[key]} and {entry.index}; a transaction"
                                         " names each resource once"), entry.where)
        seen[key] = entry.index


def _write(conn: psycopg.Connection[Any], entry: Entry, to: Target | None) -> Result:
    assert to is not None
    if entry.method == "POST":
        assert entry.resource is not None
        return interactions.create(conn, entry.rtype, entry.resource, to=to)
    if entry.method == "PATCH":
        assert entry.patch is not None
        return interactions.patch(conn, entry.rtype, to.rid, *entry.patch, version=entry.if_match)
    assert entry.resource is not None
    body = entry.resource
    if entry.conditional:
        if body.get("id", to.rid) != to.rid:
            raise BadRequest("the resource id differs from the id of the resource the criteria match")
        if to.found is None and "id" not in body:
            return interactions.create(conn, entry.rtype, body, to=to)
        body = {**body, "id": to.rid}
    return interactions.update(conn, entry.rtype, to.rid, body, entry.if_match)


def batch(conn: psycopg.Connection[Any], checked: list[Entry | FhirError], get: Getter) -> list[Done | FhirError]:
    """Each entry on its own, in the Bundle's order: its own transaction, its own answer."""
    out: list[Done | FhirError] = []
    for entry in checked:
        if isinstance(entry, FhirError):
            out.append(entry)
            continue
        try:
            with conn.transaction():
                out.append(_one(conn, entry, get))
        except FhirError as exc:
            out.append(entry_error(exc, entry.where))
        except psycopg.DataError:
            out.append(entry_error(BadRequest("a value in the entry cannot be stored or searched"), entry.where))
    return out


def _one(conn: psycopg.Connection[Any], entry: Entry, get: Getter) -> Done:
    check_scope(entry)
    if entry.resource is not None and _internal_references(entry.resource):
        raise BadRequest("a batch entry may not refer to another entry (urn:uuid:); use a transaction")
    if entry.method == "GET":
        return get(conn, entry)
    if entry.method == "DELETE":
        return _delete(conn, entry)
    if entry.method == "POST":
        assert entry.resource is not None
        return interactions.create(conn, entry.rtype, entry.resource, entry.if_none_exist)
    if entry.method == "PATCH":
        assert entry.patch is not None
        if entry.conditional:
            return interactions.conditional_patch(conn, entry.rtype, entry.query, *entry.patch, version=entry.if_match)
        assert entry.rid is not None
        return interactions.patch(conn, entry.rtype, entry.rid, *entry.patch, version=entry.if_match)
    assert entry.resource is not None
    if entry.conditional:
        return interactions.conditional_update(conn, entry.rtype, entry.query, entry.resource, entry.if_match)
    if entry.rid is None:
        raise MethodNotAllowed("PUT needs Type/id or Type?criteria")
    return interactions.update(conn, entry.rtype, entry.rid, entry.resource, entry.if_match)


# -- the answer -------------------------------------------------------------------------------------
def status_line(status: int) -> str:
    return f"{status} {HTTPStatus(status).phrase}"


def response_entry(base: str, done: Done | FhirError, representation: bool) -> dict[str, Any]:
    """One entry of a transaction-response or batch-response."""
    if isinstance(done, FhirError):
        return {"response": {"status": status_line(done.status), "outcome": done.operation_outcome()}}
    if isinstance(done, tuple):
        status, body = done
        entry: dict[str, Any] = {"resource": body, "response": {"status": status_line(status)}}
        if "id" in body and "meta" in body and body.get("resourceType") != "Bundle":
            entry["fullUrl"] = f"{base}/{body['resourceType']}/{body['id']}"
            entry["response"].update(etag=f'W/"{body["meta"].get("versionId")}"',
                                     lastModified=body["meta"].get("lastUpdated"))
        return entry
    meta = done.resource.get("meta", {})
    response: dict[str, Any] = {"status": status_line(done.status)}
    if "id" in done.resource:
        if not done.deleted:
            response["location"] = done.location()
        response.update(etag=f'W/"{done.version}"', lastModified=meta.get("lastUpdated"))
    if done.deleted:
        response["outcome"] = interactions.answer(done)
        return {"response": response}
    entry = {"fullUrl": f"{base}/{done.reference}", "response": response}
    if representation:
        entry["resource"] = done.resource
    return entry


def answer(kind: str, base: str, results: list[Done | FhirError], representation: bool) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": f"{kind}-response",
            "entry": [response_entry(base, done, representation) for done in results]}
