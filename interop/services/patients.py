"""The hub's Patient records follow the HIS's: found by identifier, updated by ADT, merged by A40.

An order or an ADT^A01/A04/A08/A31 updates the Patient that shares an identifier with its PID
(its demographics replaced by what the message says, identifiers kept together; an ADT field
sent as "" removes what the hub holds). An ADT^A40
(merge) marks the prior patient (MRG-1) inactive with a `replaced-by` link to the PID's patient,
which gets a `replaces` link and the prior identifiers (use `old`), and points every order,
study, report, finding, task and message of the prior patient at the one that stays, so a search
by the surviving patient finds them all (as FHIR R5's Patient $merge does). A later message
naming the prior patient's identifier reaches the surviving patient.
"""
from __future__ import annotations

from typing import Any

import psycopg

from ..domain.vocabulary import reference_id, without_meta
from ..hl7.errors import ErrorCode
from ..hl7.message import MessageError
from ..hl7.order import PatientMerge, PatientUpdate
from ..store import resources
from ..store.resources import ANY_SYSTEM, Criterion, Query
from .context import Context

MOST_LINKS = 5  # replaced-by links followed before giving up (a loop written by hand)
REPOINT_PAGE = 100


def find_by_identifier(conn: psycopg.Connection[Any], ctx: Context, rtype: str, identifiers: list[dict[str, Any]],
                       count: int = 2) -> list[dict[str, Any]]:
    """Resources of `rtype` sharing any of these identifiers (system and value)."""
    values: list[tuple[Any, str]] = [(i.get("system") or ANY_SYSTEM, str(i["value"]))
                                     for i in identifiers if i.get("value")]
    if not values:
        return []
    query = Query(criteria=[Criterion(ctx.params[rtype]["identifier"], values)], count=count)
    return resources.search(conn, rtype, query)[1]


def merged_into(current: dict[str, Any], new: dict[str, Any],
                merge_lists: tuple[str, ...] = ("identifier",)) -> dict[str, Any]:
    """The next version of `current` with what `new` says: its valued elements replace, lists in
    `merge_lists` are joined; "unknown" (a status a message gives when it says nothing) never
    replaces a status."""
    merged = {**without_meta(current), **{k: v for k, v in new.items()
                                          if v not in (None, [], {}) and not (k == "status" and v == "unknown")}}
    for key in merge_lists:
        seen = {(i.get("system"), i.get("value")) for i in new.get(key, [])}
        merged[key] = new.get(key, []) + [i for i in current.get(key, []) if (i.get("system"), i.get("value")) not in seen]
    merged["id"] = current["id"]
    return merged


def upsert(conn: psycopg.Connection[Any], ctx: Context, new: dict[str, Any],
           merge_lists: tuple[str, ...] = ("identifier",)) -> dict[str, Any]:
    """Create, or update the resource that shares an identifier (identifiers are merged)."""
    rtype = new["resourceType"]
    found = find_by_identifier(conn, ctx, rtype, new.get("identifier", []))
    if not found:
        return resources.create(conn, new, ctx.params[rtype])
    return resources.update(conn, merged_into(found[0], new, merge_lists), ctx.params[rtype])[0]


def _replaced_by(patient: dict[str, Any]) -> str | None:
    for link in patient.get("link") or []:
        if link.get("type") == "replaced-by":
            return reference_id(link.get("other"), "Patient")
    return None


def _current(conn: psycopg.Connection[Any], patient: dict[str, Any]) -> dict[str, Any]:
    """The patient that stays when this one was merged into another (its replaced-by links)."""
    for _ in range(MOST_LINKS):
        target = _replaced_by(patient)
        found = resources.find(conn, f"Patient/{target}") if target else None
        if found is None:
            return patient
        patient = found
    return patient


def upsert_patient(conn: psycopg.Connection[Any], ctx: Context, patient: dict[str, Any],
                   cleared: tuple[str, ...] = ()) -> dict[str, Any]:
    """The stored Patient for a PID: created, or the one sharing an identifier updated (the
    surviving one when that one was merged away); `cleared` elements removed (fields sent as "")."""
    if not patient.get("identifier"):
        raise MessageError("the message names no patient identifier (PID-3)", "PID", 3,
                           error_code=ErrorCode.REQUIRED_FIELD_MISSING)
    found = find_by_identifier(conn, ctx, "Patient", patient["identifier"], count=5)
    if not found:
        return resources.create(conn, patient, ctx.params["Patient"])
    stored = next((p for p in found if _replaced_by(p) is None), None) or _current(conn, found[0])
    retired = {(i.get("system"), i.get("value")) for i in stored.get("identifier") or [] if i.get("use") == "old"}
    if retired:  # a late message with a merged-away number: the number stays `old`, not first
        patient = {**patient, "identifier": [i for i in patient["identifier"]
                                             if (i.get("system"), i.get("value")) not in retired]}
    merged = merged_into(stored, patient)
    for key in cleared:
        merged.pop(key, None)
    return resources.update(conn, merged, ctx.params["Patient"])[0]


def update(conn: psycopg.Connection[Any], ctx: Context, message: PatientUpdate) -> dict[str, Any]:
    """ADT^A01/A04/A08/A31: the Patient's demographics as the HIS has them now, and the visit
    (PV1) when it has a visit number."""
    patient = upsert_patient(conn, ctx, message.patient, message.cleared)
    if message.encounter and message.encounter.get("identifier"):
        encounter = {k: v for k, v in message.encounter.items() if v is not None}
        upsert(conn, ctx, {**encounter, "subject": {"reference": f"Patient/{patient['id']}"}})
    return patient


def _with_link(patient: dict[str, Any], other: str, kind: str) -> dict[str, Any]:
    links = [link for link in patient.get("link") or []
             if not (reference_id(link.get("other"), "Patient") == other and link.get("type") == kind)]
    return {**without_meta(patient), "link": [*links, {"other": {"reference": f"Patient/{other}"}, "type": kind}]}


def merge(conn: psycopg.Connection[Any], ctx: Context, message: PatientMerge) -> list[tuple[str, str]]:
    """ADT^A40: for each PID/MRG pair, the prior patient into the surviving one. Returns the
    (prior id, surviving id) pairs merged; a prior patient the hub never saw is nothing to merge."""
    done = []
    for survivor_in, prior_identifiers in message.merges:
        survivor = upsert_patient(conn, ctx, survivor_in)
        # the prior identifiers stay findable on the survivor, as `old` (HAPI's $merge does the same):
        # a late message naming them reaches it even when the hub never saw the prior patient
        held = {(i.get("system"), i.get("value")) for i in survivor.get("identifier") or []}
        old = [{**i, "use": "old"} for i in prior_identifiers if (i.get("system"), i.get("value")) not in held]
        if old:
            survivor = resources.update(conn, {**without_meta(survivor), "identifier": [
                *survivor.get("identifier", []), *old]}, ctx.params["Patient"])[0]
        priors = [p for p in find_by_identifier(conn, ctx, "Patient", prior_identifiers, count=10)
                  if p["id"] != survivor["id"]]
        for prior in priors:
            if not (prior.get("active") is False and _replaced_by(prior) == survivor["id"]):  # not merged yet
                retired = {**_with_link(prior, survivor["id"], "replaced-by"), "active": False}
                retired["link"] = [link for link in retired["link"] if link["type"] != "replaced-by"
                                   or link["other"]["reference"] == f"Patient/{survivor['id']}"]
                resources.update(conn, retired, ctx.params["Patient"])
                survivor = resources.update(conn, {**_with_link(survivor, prior["id"], "replaces"), "active": True},
                                            ctx.params["Patient"])[0]
            _repoint(conn, ctx, prior["id"], survivor["id"])  # also what arrived for the prior since
            done.append((prior["id"], survivor["id"]))
    return done


def _repoint(conn: psycopg.Connection[Any], ctx: Context, prior: str, survivor: str) -> None:
    """Every resource whose `patient` search parameter names the prior patient now names the
    surviving one (ServiceRequest, ImagingStudy, DiagnosticReport, Observation, Encounter, Task,
    Communication...)."""
    old = f"Patient/{prior}"
    for rtype, params in ctx.params.items():
        param = params.get("patient")
        if param is None or param.type != "reference" or len(param.path) != 1:
            continue
        element = param.path[0]
        for _ in range(10_000 // REPOINT_PAGE):  # updated resources no longer match: the search shrinks
            query = Query(criteria=[Criterion(param, [(ANY_SYSTEM, old)])], count=REPOINT_PAGE)
            found = resources.search(conn, rtype, query)[1]
            if not found:
                break
            for resource in found:
                ref = resource.get(element)
                if not isinstance(ref, dict) or reference_id(ref, "Patient") != prior:
                    raise MessageError(f"{rtype} refers to the prior patient in a form the merge cannot rewrite",
                                       "MRG", 1, error_code=ErrorCode.APPLICATION_INTERNAL_ERROR)
                resources.update(conn, {**without_meta(resource), element: {**ref, "reference": f"Patient/{survivor}"}},
                                 ctx.params[rtype])

