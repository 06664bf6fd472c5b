"""The EMR's transaction Bundle for a report version or a notice, and what the EMR's answer means.
Pure: resources in, JSON out (the channel, `interop.services.delivery.fhir`, reads and sends).

* Device: conditional create (`request.ifNoneExist = identifier=system|value`): the model and
  version is created once, then found.
* Observations and the DiagnosticReport: conditional update (`PUT Observation?identifier=...`):
  created the first time, updated in place by every later version (preliminary -> final,
  amended), so a retry, a replay or a re-delivery never makes a second report.
* References between them are `urn:uuid:` fullUrls, which the EMR rewrites to the ids it assigns
  (FHIR R4 transaction processing rules).
* References to what the EMR owns and the hub only mirrors (Patient, ServiceRequest,
  ImagingStudy) and to anything else outside the Bundle become *logical* references
  (`Reference.identifier`, with `type` and `display`): the patient's identifier (MR first), the
  order's placer number (PLAC first) and the study's DICOM UID. The hub never creates patients or
  orders in the EMR and never sends its own ids, which mean nothing there.
* A critical result's `Communication` goes as a one-entry transaction (`build_notice`:
  conditional create on its identifier).
* A site whose server caps transaction size (`max_bundle_entries`; Medplum allows 8 entries in a
  transaction with conditional entries) gets the entries as consecutive transactions (`split`), in
  order, references to earlier parts made literal from their answers (`resolve`, `locations`);
  the report goes last, so the EMR never holds a report whose results are missing.
* Answers (`classify`): 2xx sent; 401/403 a new token once, then refused; 408/429/5xx retried;
  any other 4xx refused with the OperationOutcome kept.
"""
from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

from .vocabulary import DICOM_UID_SYSTEM, HUB_SYSTEM

# Preferred identifier types (v2 table 0203) for a logical reference to each resource type.
PREFERRED_TYPES = {"Patient": ("MR", "PI"), "ServiceRequest": ("PLAC", "FILL", "ACSN")}


class BuildError(Exception):
    """The Bundle cannot be built from what is stored (no retry helps; the delivery is `dead`)."""


class Outcome(enum.Enum):
    SENT = "sent"
    REJECTED = "rejected"
    UNAUTHORIZED = "unauthorized"  # refresh the token once, then rejected
    RETRY = "retry"


def classify(status: int) -> Outcome:
    if 200 <= status < 300:
        return Outcome.SENT
    if status in (401, 403):
        return Outcome.UNAUTHORIZED
    if status in (408, 429) or status >= 500:
        return Outcome.RETRY
    return Outcome.REJECTED


# -- the Bundle (pure) ------------------------------------------------------------------------
def search_identifier(identifier: dict[str, Any]) -> str:
    """`system|value` for a search URL, URL-encoded (values hold '/' and ':')."""
    token = f"{identifier.get('system', '')}|{identifier['value']}" if identifier.get("system") else identifier["value"]
    return quote(token, safe="")


def _identifier(resource: dict[str, Any]) -> dict[str, Any]:
    for ident in resource.get("identifier") or []:
        if ident.get("value"):
            return {k: ident[k] for k in ("system", "value") if k in ident}
    raise BuildError(f"{resource.get('resourceType')} has no identifier to address it in the EMR")


def logical_identifier(resource: dict[str, Any] | None, rtype: str, rid: str) -> dict[str, Any]:
    """The identifier a receiver knows `resource` by (preferred type first), or the hub's own."""
    idents = [i for i in (resource or {}).get("identifier") or [] if i.get("value")]
    if rtype == "ImagingStudy":
        idents = [i for i in idents if i.get("system") == DICOM_UID_SYSTEM] or idents
    for wanted in PREFERRED_TYPES.get(rtype, ()):
        for ident in idents:
            if any(c.get("code") == wanted for c in (ident.get("type") or {}).get("coding") or []):
                return _clean_identifier(ident)
    if idents:
        return _clean_identifier(idents[0])
    return {"system": HUB_SYSTEM + rtype, "value": rid}


def _clean_identifier(ident: dict[str, Any]) -> dict[str, Any]:
    return {k: ident[k] for k in ("use", "type", "system", "value", "assigner") if k in ident}


def references(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        if isinstance(value.get("reference"), str):
            yield value
        for child in value.values():
            yield from references(child)
    elif isinstance(value, list):
        for child in value:
            yield from references(child)


def split_reference(ref: str) -> tuple[str, str] | None:
    parts = [p for p in ref.split("/_history/")[0].split("/") if p]
    return (parts[-2], parts[-1]) if len(parts) >= 2 else None


def _for_emr(resource: dict[str, Any], local: dict[str, str], known: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A copy without the hub's id/meta, its references rewritten (module docstring)."""
    out: dict[str, Any] = json.loads(json.dumps(resource))
    out.pop("id", None)
    out.pop("meta", None)
    out.pop("text", None)
    for ref in references(out):
        target = split_reference(ref["reference"])
        key = "/".join(target) if target else ref["reference"]
        if key in local:
            ref["reference"] = local[key]
        elif target is not None:
            rtype, rid = target
            del ref["reference"]
            ref["type"] = rtype
            ref["identifier"] = logical_identifier(known.get(key), rtype, rid)
    return out


def build_bundle(
    report: dict[str, Any],
    observations: list[dict[str, Any]],
    device: dict[str, Any] | None,
    *,
    context: list[dict[str, Any]] | None = None,
    bundle_id: str | None = None,
) -> dict[str, Any]:
    """The transaction Bundle for one report version. `context`: the hub's Patient,
    ServiceRequest and ImagingStudy the report points at (for their identifiers); those not
    given are referenced by the hub's own identifier. Pure."""
    entries: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (stored resource, request)
    if device is not None:
        entries.append((device, {"method": "POST", "url": "Device",
                                 "ifNoneExist": f"identifier={search_identifier(_identifier(device))}"}))
    for obs in observations:
        entries.append((obs, {"method": "PUT", "url": f"Observation?identifier={search_identifier(_identifier(obs))}"}))
    entries.append((report, {"method": "PUT",
                             "url": f"DiagnosticReport?identifier={search_identifier(_identifier(report))}"}))
    return _transaction(entries, context, bundle_id)


def build_notice(resource: dict[str, Any], *, context: list[dict[str, Any]] | None = None,
                 bundle_id: str | None = None) -> dict[str, Any]:
    """A transaction Bundle for one resource that is sent once and never changes (a critical
    result's Communication): conditional create on its identifier, so a resend finds it. Pure."""
    request = {"method": "POST", "url": resource["resourceType"],
               "ifNoneExist": f"identifier={search_identifier(_identifier(resource))}"}
    return _transaction([(resource, request)], context, bundle_id)


def _transaction(entries: list[tuple[dict[str, Any], dict[str, Any]]], context: list[dict[str, Any]] | None,
                 bundle_id: str | None) -> dict[str, Any]:
    local = {f"{r['resourceType']}/{r['id']}": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, r['resourceType'] + '/' + r['id'])}"
             for r, _ in entries}
    known = {f"{r['resourceType']}/{r['id']}": r for r in context or [] if r}
    return {
        "resourceType": "Bundle",
        "id": bundle_id or str(uuid.uuid4()),
        "type": "transaction",
        "entry": [{"fullUrl": local[f"{r['resourceType']}/{r['id']}"], "resource": _for_emr(r, local, known),
                   "request": request} for r, request in entries],
    }


def split(bundle: dict[str, Any], max_entries: int) -> list[dict[str, Any]]:
    """The Bundle as consecutive transactions of at most `max_entries` entries (0: as it is), for
    servers that cap conditional transactions. Order is kept (Device, Observations, report), so a
    part only points at entries of its own or of earlier parts; `resolve` rewrites the latter. Pure."""
    entries = bundle["entry"]
    if max_entries <= 0 or len(entries) <= max_entries:
        return [bundle]
    return [dict(bundle, id=f"{bundle.get('id', 'b')}-{n}", entry=entries[i:i + max_entries])
            for n, i in enumerate(range(0, len(entries), max_entries), start=1)]


def resolve(part: dict[str, Any], locations: dict[str, str]) -> dict[str, Any]:
    """`part` with references to entries of earlier parts (`locations`: fullUrl -> 'Type/id' in
    the EMR) made literal. Pure."""
    if not locations:
        return part
    out: dict[str, Any] = json.loads(json.dumps(part))
    for ref in references([e.get("resource") for e in out["entry"]]):
        if ref["reference"] in locations:
            ref["reference"] = locations[ref["reference"]]
    return out


def locations(part: dict[str, Any], answer: dict[str, Any]) -> dict[str, str]:
    """fullUrl -> 'Type/id' from a transaction-response (its entries follow the request's order)."""
    out = {}
    for sent, got in zip(part["entry"], answer.get("entry") or []):
        where = (got.get("response") or {}).get("location") or ""
        target = split_reference(where)
        if target is not None:
            out[sent["fullUrl"]] = "/".join(target)
    return out


