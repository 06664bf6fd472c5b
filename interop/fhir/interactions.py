"""The FHIR write interactions as functions of a connection: create, update, conditional update,
patch and delete, with their conditional forms.

The REST routes (`api`) and the entries of a transaction or batch Bundle (`transaction`) both
call these, so a resource is checked, validated, tagged, indexed and audited the same whichever
way it came. Each runs in the caller's transaction and raises a `FhirError` to refuse.

Deletion keeps the hub whole:
* types the hub writes itself (reports, observations, Tasks, Provenance, ...) are not deleted
  by clients, as they are not created or updated by them (405);
* a resource that another current resource references through a search parameter (a study its
  analysis Task or report points at, a Patient with studies, an Endpoint a study names) is not
  deleted (409, naming up to three of them), as HAPI FHIR refuses by default: a report never
  loses its study, nor a study its patient;
* a deletion is a version: history shows it, read answers 410 Gone, older versions stay
  readable, searches no longer find it, and a PUT to the same id brings it back.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

import jsonpatch
import orjson
import psycopg
from flask import current_app

from .. import access
from ..domain import audit, search, subscriptions
from ..domain.vocabulary import study_uid
from ..services import delivery, intake
from ..services.errors import IntakeError
from ..services.security import urls
from ..store import queue, resources
from . import capability
from .errors import (
    BadRequest,
    BusinessRule,
    Conflict,
    FhirError,
    GoneError,
    MethodNotAllowed,
    NotFoundError,
    PreconditionFailed,
    UnsupportedMediaType,
    issue,
    outcome,
)
from .validation import validate

FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")  # FHIR R4 id
JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
# Parameters of the result, never criteria of a conditional interaction
FORMAT_PARAMS = ("_format", "_pretty")


def hub() -> Any:
    return current_app.extensions["interop"]


@dataclass
class Result:
    """What an interaction did: the HTTP status, and the version it wrote or found."""

    status: int
    resource: dict[str, Any]  # the stored body; a deletion's stub (resourceType, id, meta)
    deleted: bool = False
    message: str | None = None  # for an answer without a resource (a delete): an OperationOutcome's text

    @property
    def version(self) -> str:
        return str(self.resource.get("meta", {}).get("versionId", ""))

    @property
    def reference(self) -> str:
        return f"{self.resource['resourceType']}/{self.resource['id']}"

    def location(self) -> str:
        return f"{self.reference}/_history/{self.version}"


def known(rtype: str, rid: str | None = None) -> None:
    if rtype not in capability.RESOURCES:
        raise NotFoundError(f"resource type {rtype[:64]} is not supported here")
    if rid is not None and not FHIR_ID.fullmatch(rid):
        raise NotFoundError(f"{rtype}/{rid[:64]!r} is not a FHIR id, so there is no such resource")


def writable(rtype: str) -> None:
    if not capability.writable(rtype):
        raise MethodNotAllowed(f"{rtype} is written by the hub, not by clients")


def parse_json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON") from None


def prepare(rtype: str, body: Any) -> dict[str, Any]:
    """A submitted resource as it may be stored: of the URL's type, valid R4, its addresses allowed."""
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


def if_match(raw: Any) -> int | None:
    """The version an If-Match header (or a Bundle entry's ifMatch) names."""
    if raw is None:
        return None
    digits = raw.replace("W/", "").strip('"') if isinstance(raw, str) else ""
    if not digits.isdigit() or len(digits) > 9:
        raise BadRequest('If-Match must be a version ETag such as W/"3"')
    return int(digits)


def criteria_of(query: str | list[tuple[str, str]]) -> list[tuple[str, str]]:
    args = parse_qsl(query, keep_blank_values=True) if isinstance(query, str) else list(query)
    return [(k, v) for k, v in args if k not in FORMAT_PARAMS]


def lock_criteria(conn: psycopg.Connection[Any], rtype: str, query: str | list[tuple[str, str]]) -> None:
    """Serialise the conditional writes of the same criteria (create, update, in a Bundle or not) until
    the transaction ends, so that two of them at once make one resource, not two."""
    resources.lock(conn, f"{rtype}?{criteria_key(query)}")


def criteria_key(query: str | list[tuple[str, str]]) -> str:
    """The criteria as one string, whatever their order or spelling."""
    return urlencode(sorted(criteria_of(query)))


def matching(conn: psycopg.Connection[Any], rtype: str, query: str | list[tuple[str, str]],
             most: int = 2) -> list[dict[str, Any]]:
    """Up to `most` current resources a conditional interaction's criteria find (strict: an
    unknown parameter is refused, never ignored, as it would widen the match)."""
    args = criteria_of(query)
    if not args:
        raise BadRequest("a conditional interaction needs search criteria")
    try:
        parsed = search.parse(rtype, args, hub().params.get(rtype, {}))
    except search.SearchError as exc:
        raise BadRequest(str(exc)) from None
    parsed.query.count, parsed.query.total = most, "none"
    return resources.search(conn, rtype, parsed.query).found


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
    elif stored["resourceType"] == "Subscription":  # a topic-based one waiting: its handshake (R4 backport)
        delivery.subscription_stored(conn, hub().ctx, stored)


def _write(conn: psycopg.Connection[Any], body: dict[str, Any], version: int | None = None,
           rid: str | None = None) -> tuple[dict[str, Any], bool]:
    """Store a new version (a new resource when `body` has no id; under `rid` when given); (stored, created)."""
    try:
        if "id" not in body:
            return resources.create(conn, body, hub().params[body["resourceType"]], rid=rid), True
        return resources.update(conn, body, hub().params[body["resourceType"]], version)
    except resources.VersionConflict as exc:
        raise PreconditionFailed(str(exc)) from None
    except resources.NotIndexable as exc:
        raise BusinessRule(str(exc)) from None


def ref_of(body: dict[str, Any]) -> str:
    return f"{body['resourceType']}/{body['id']}/_history/{body.get('meta', {}).get('versionId', '1')}"


def audit_write(conn: psycopg.Connection[Any], interaction: str, stored: dict[str, Any],
                about: dict[str, Any] | None = None) -> None:
    """The change's audit record, in its transaction (`about`: the body whose patients it concerns)."""
    access.audit_change(conn, audit.interaction(interaction), audit.ACTIONS[interaction], what=[ref_of(stored)],
                        patients=audit.patients_of(about or stored))


def _content(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k not in ("id", "meta")}


# -- create --------------------------------------------------------------------------------------
@dataclass
class Target:
    """Where a create lands, decided before anything is written (a transaction resolves its
    `urn:uuid:` references to it): a new id, or a stored resource it finds."""

    rid: str
    found: dict[str, Any] | None = None   # If-None-Exist matched it: nothing is written
    same: dict[str, Any] | None = None    # an ImagingStudy the hub holds under the same DICOM UID


def target(conn: psycopg.Connection[Any], rtype: str, body: dict[str, Any], criteria: str | None) -> Target:
    """Resolve a create: If-None-Exist (0 matches: create, 1: that one, more: 412), or the same
    ImagingStudy posted again (a client's retry, or news of the study: it updates that one)."""
    if criteria:
        lock_criteria(conn, rtype, criteria)
        found = matching(conn, rtype, criteria)
        if len(found) > 1:
            raise PreconditionFailed("If-None-Exist matches more than one resource")
        if found:
            return Target(found[0]["id"], found=found[0])
    if rtype == "ImagingStudy" and study_uid(body):
        resources.lock(conn, f"ImagingStudy?uid={study_uid(body)}")
        same = intake.same_study(conn, hub().ctx, body)
        if same is not None:
            return Target(same["id"], same=same)
    return Target(resources.new_id())


def create(conn: psycopg.Connection[Any], rtype: str, body: dict[str, Any], criteria: str | None = None,
           to: Target | None = None) -> Result:
    """Create (201), or answer the resource If-None-Exist found (200) or the same study (200)."""
    writable(rtype)
    body = {k: v for k, v in body.items() if k != "id"}
    to = to or target(conn, rtype, body, criteria)
    if to.found is not None:
        access.note(audit.interaction("create"), "R", what=[ref_of(to.found)], patients=audit.patients_of(to.found))
        return Result(200, to.found)
    body = _before_write(conn, body)
    if to.same is not None:
        stored, status = to.same, 200
        if _content(to.same) != _content(body):
            stored = _write(conn, {**body, "id": to.same["id"]})[0]
    else:
        stored, status = _write(conn, body, rid=to.rid)[0], 201
    _after_write(conn, stored)
    audit_write(conn, "create", stored)
    return Result(status, stored)


# -- update ----------------------------------------------------------------------------------------
def update(conn: psycopg.Connection[Any], rtype: str, rid: str, body: dict[str, Any],
           version: int | None = None) -> Result:
    """Update (200), or create under the client's id (201); If-Match's version must be current (412)."""
    writable(rtype)
    if body.get("id") != rid:
        raise BadRequest("the resource id must match the URL")
    stored, created = _write(conn, _before_write(conn, body), version)
    _after_write(conn, stored)
    audit_write(conn, "create" if created else "update", stored)
    return Result(201 if created else 200, stored)


def conditional_update(conn: psycopg.Connection[Any], rtype: str, criteria: str | list[tuple[str, str]],
                       body: dict[str, Any], version: int | None = None) -> Result:
    """PUT Type?criteria: no match creates (under the body's id, if it has one), one match is
    updated (the body's id, if any, must be its id), more than one is 412."""
    writable(rtype)
    lock_criteria(conn, rtype, criteria)
    found = matching(conn, rtype, criteria)
    if len(found) > 1:
        raise PreconditionFailed("the criteria of the conditional update match more than one resource")
    if not found:
        if "id" in body:
            unclaimed(conn, rtype, str(body["id"]))
            return update(conn, rtype, str(body["id"]), body, version)
        return create(conn, rtype, body)
    if body.get("id", found[0]["id"]) != found[0]["id"]:
        raise BadRequest("the resource id differs from the id of the resource the criteria match")
    return update(conn, rtype, found[0]["id"], {**body, "id": found[0]["id"]}, version)


def unclaimed(conn: psycopg.Connection[Any], rtype: str, rid: str) -> None:
    """A conditional update that matches nothing may create under the body's id, not overwrite
    another resource that has it (409, as R5 made explicit)."""
    try:
        resources.read(conn, rtype, rid)
    except resources.NotFound:
        return
    raise Conflict(f"{rtype}/{rid} exists but does not match the criteria; it is not overwritten")


# -- patch -----------------------------------------------------------------------------------------
def patched(current: dict[str, Any], kind: str, patch: Any) -> Any:
    """The resource after a JSON Patch (RFC 6902, the `jsonpatch` library) or a JSON Merge Patch
    (RFC 7386, what fhirpy's `patch()` sends as plain JSON)."""
    if kind == JSON_PATCH:
        if not isinstance(patch, list):
            raise BadRequest("a JSON Patch is a list of operations")
        try:
            return jsonpatch.JsonPatch(patch).apply(current)
        except jsonpatch.JsonPatchTestFailed:
            raise PreconditionFailed("a test operation of the JSON Patch failed") from None
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError, KeyError, IndexError,
                ValueError):
            raise BadRequest("the JSON Patch cannot be applied to the resource (a path is missing or an"
                             " operation is malformed)") from None
    if not isinstance(patch, dict):
        raise BadRequest("a JSON Merge Patch is an object")
    if patch.get("resourceType") == "Parameters":
        raise UnsupportedMediaType("FHIRPath Patch is not supported: send a JSON Patch"
                                   f" (Content-Type: {JSON_PATCH})")
    return _merge(current, patch)


def _merge(target_: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return patch
    out = dict(target_) if isinstance(target_, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(out.get(key), value)
    return out


def patch(conn: psycopg.Connection[Any], rtype: str, rid: str, kind: str, document: Any,
          version: int | None = None) -> Result:
    """Apply a patch to the current version; the result is checked like any update."""
    writable(rtype)
    current = read(conn, rtype, rid)
    if version is not None and current["meta"]["versionId"] != str(version):
        raise PreconditionFailed(f"{rtype}/{rid} is at version {current['meta']['versionId']}, not {version}")
    result = patched(current, kind, document)
    if not isinstance(result, dict) or result.get("resourceType") != rtype or result.get("id") != rid:
        raise BadRequest("a patch may not change the resource's type or id")
    meta = result.pop("meta", None)  # tags and profiles may be patched; the version is the hub's to set
    if isinstance(meta, dict) and any(k not in ("versionId", "lastUpdated") for k in meta):
        result["meta"] = {k: v for k, v in meta.items() if k not in ("versionId", "lastUpdated")}
    body = prepare(rtype, result)
    stored = _write(conn, _before_write(conn, body), int(current["meta"]["versionId"]))[0]
    _after_write(conn, stored)
    audit_write(conn, "patch", stored)
    return Result(200, stored)


def conditional_patch(conn: psycopg.Connection[Any], rtype: str, criteria: str | list[tuple[str, str]], kind: str,
                      document: Any, version: int | None = None) -> Result:
    """PATCH Type?criteria: the one match is patched; none is 404, more than one is 412."""
    found = matching(conn, rtype, criteria)
    if len(found) != 1:
        raise (NotFoundError("the criteria match no resource") if not found else
               PreconditionFailed("the criteria of the conditional patch match more than one resource"))
    return patch(conn, rtype, found[0]["id"], kind, document, version)


def read(conn: psycopg.Connection[Any], rtype: str, rid: str) -> dict[str, Any]:
    try:
        return resources.read(conn, rtype, rid)
    except resources.Gone as exc:
        raise GoneError(str(exc)) from None
    except resources.NotFound as exc:
        raise NotFoundError(str(exc)) from None


# -- delete ----------------------------------------------------------------------------------------
def delete(conn: psycopg.Connection[Any], rtype: str, rid: str, check: bool = True,
           version: int | None = None) -> Result:
    """Delete (200 with an OperationOutcome, as HAPI FHIR answers); deleting again changes nothing.
    404 for an id never stored; 405 for types the hub writes; 409 while referenced (module docstring);
    412 when If-Match names another version than the current one."""
    writable(rtype)
    try:
        current = resources.read(conn, rtype, rid)
    except resources.Gone:
        return Result(200, resources.versions(conn, rtype, rid)[0].body, deleted=True,
                      message=f"{rtype}/{rid} was deleted already; nothing changed")
    except resources.NotFound as exc:
        raise NotFoundError(str(exc)) from None
    if version is not None and current["meta"]["versionId"] != str(version):
        raise PreconditionFailed(f"{rtype}/{rid} is at version {current['meta']['versionId']}, not {version}")
    if check:
        unreferenced(conn, f"{rtype}/{rid}")
    try:
        stub, was = resources.delete(conn, rtype, rid)
    except resources.NotFound as exc:
        raise NotFoundError(str(exc)) from None
    if was is None:
        return Result(200, stub, deleted=True, message=f"{rtype}/{rid} was deleted already; nothing changed")
    if rtype == "Subscription":  # its pending notifications are not sent
        queue.bury(conn, f"Subscription/{rid}", "", "the Subscription was deleted")
    audit_write(conn, "delete", stub, about=was)
    return Result(200, stub, deleted=True, message=f"{rtype}/{rid} is deleted (version {stub['meta']['versionId']})")


def unreferenced(conn: psycopg.Connection[Any], reference: str) -> None:
    """409 while current resources refer to `reference` (a transaction checks once all its deletes are done)."""
    dependants = resources.referrers(conn, reference, hub().params)
    if dependants:
        reason = (f"{reference} cannot be deleted: {', '.join(dependants)} refer to it (delete or change"
                  " those first)")
        raise Conflict(reason, issues=[issue("conflict", reason)])


def conditional_delete(conn: psycopg.Connection[Any], rtype: str, criteria: str | list[tuple[str, str]],
                       check: bool = True) -> Result:
    """DELETE Type?criteria: one match is deleted, none changes nothing (200), more than one is 412."""
    writable(rtype)
    found = matching(conn, rtype, criteria)
    if len(found) > 1:
        raise PreconditionFailed("the criteria of the conditional delete match more than one resource")
    if not found:
        return Result(200, {"resourceType": rtype}, deleted=True, message="no resource matches; nothing was deleted")
    return delete(conn, rtype, found[0]["id"], check)


def answer(result: Result) -> dict[str, Any]:
    """The OperationOutcome a delete answers with."""
    return outcome([issue("informational", result.message or "done", "information")])


def entry_error(exc: FhirError, where: str) -> FhirError:
    """The same refusal, its issues located at a Bundle entry."""
    issues = [{**i, "expression": [where, *i.get("expression", [])]} for i in exc.operation_outcome()["issue"]]
    located = type(exc)(f"{where}: {exc.diagnostics}", issues=issues)
    located.status, located.code = exc.status, exc.code
    return located
