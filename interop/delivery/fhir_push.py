"""The FHIR channel: push a report version to the site's HIS/EMR as one FHIR R4 transaction Bundle.

The Bundle (built by `build_bundle`, pure) holds the Device, every Observation and the
DiagnosticReport, each addressed so that sending it again changes nothing in the EMR:

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
  orders in the EMR and never sends its own ids, which mean nothing there. An EMR that needs
  literal references resolves the identifier on its side.

A critical result's `Communication` rows go the same way, each as a one-entry transaction
(`build_notice`: conditional create on its `urn:interop-hub:communication` identifier).

A site whose server caps transaction size (`max_bundle_entries` in the sites file; Medplum allows
8 entries in a transaction with conditional entries) gets the same entries as consecutive
transactions (`split`), in order, with references to earlier parts made literal from the
`response.location`s they answered (`resolve`); the report goes last, so the EMR never holds a
report whose results are missing.

Answers (`classify`, pure): 2xx -> sent (the transaction-response is kept); 401/403 -> fetch a
new token once and resend, then rejected; 408/429/5xx, timeouts and refused connections ->
retried with back-off; any other 4xx (400, 404, 409, 412, 422, ...) -> rejected at once with the
OperationOutcome kept in `last_answer`, for an operator to fix and replay.
"""
from __future__ import annotations

import enum
import json
import logging
import uuid
from typing import Any, Callable, Iterator
from urllib.parse import quote

import psycopg
import requests

from ..config import Settings
from ..hl7.errors import AckCode
from ..sites import FhirDestination, Site
from ..store import resources
from . import outbox
from .fhir_auth import AuthError, TokenCache

log = logging.getLogger("interop.delivery")

FHIR_JSON = "application/fhir+json"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
HUB_SYSTEM = "urn:interop-hub:"  # + resource type: identifier system for hub-only resources
# Preferred identifier types (v2 table 0203) for a logical reference to each resource type.
PREFERRED_TYPES = {"Patient": ("MR", "PI"), "ServiceRequest": ("PLAC", "FILL", "ACSN")}
MAX_ANSWER = 20000


class BuildError(Exception):
    """The Bundle cannot be built from what is stored (no retry helps; `dead`)."""


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
        idents = [i for i in idents if i.get("system") == "urn:dicom:uid"] or idents
    for wanted in PREFERRED_TYPES.get(rtype, ()):
        for ident in idents:
            if any(c.get("code") == wanted for c in (ident.get("type") or {}).get("coding") or []):
                return _clean_identifier(ident)
    if idents:
        return _clean_identifier(idents[0])
    return {"system": HUB_SYSTEM + rtype, "value": rid}


def _clean_identifier(ident: dict[str, Any]) -> dict[str, Any]:
    return {k: ident[k] for k in ("use", "type", "system", "value", "assigner") if k in ident}


def _references(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        if isinstance(value.get("reference"), str):
            yield value
        for child in value.values():
            yield from _references(child)
    elif isinstance(value, list):
        for child in value:
            yield from _references(child)


def _split(ref: str) -> tuple[str, str] | None:
    parts = [p for p in ref.split("/_history/")[0].split("/") if p]
    return (parts[-2], parts[-1]) if len(parts) >= 2 else None


def _for_emr(resource: dict[str, Any], local: dict[str, str], known: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A copy without the hub's id/meta, its references rewritten (module docstring)."""
    out = json.loads(json.dumps(resource))
    out.pop("id", None)
    out.pop("meta", None)
    out.pop("text", None)
    for ref in _references(out):
        target = _split(ref["reference"])
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
    out = json.loads(json.dumps(part))
    for ref in _references([e.get("resource") for e in out["entry"]]):
        if ref["reference"] in locations:
            ref["reference"] = locations[ref["reference"]]
    return out


def locations(part: dict[str, Any], answer: dict[str, Any]) -> dict[str, str]:
    """fullUrl -> 'Type/id' from a transaction-response (its entries follow the request's order)."""
    out = {}
    for sent, got in zip(part["entry"], answer.get("entry") or []):
        where = (got.get("response") or {}).get("location") or ""
        target = _split(where)
        if target is not None:
            out[sent["fullUrl"]] = "/".join(target)
    return out


# -- from the store ---------------------------------------------------------------------------
def _read(conn: psycopg.Connection[Any], ref: str | None) -> dict[str, Any] | None:
    target = _split(ref or "")
    if target is None:
        return None
    try:
        return resources.read(conn, *target)
    except (resources.NotFound, resources.Gone):
        return None


def bundle_for(conn: psycopg.Connection[Any], report_id: str, version: int, bundle_id: str | None = None) -> dict[str, Any]:
    """The Bundle for a stored report version: the report as it was at `version`, its current
    Observations and Device, and the Patient/ServiceRequest/ImagingStudy for their identifiers."""
    try:
        report = resources.vread(conn, "DiagnosticReport", report_id, version)
    except resources.NotFound as exc:
        raise BuildError(f"DiagnosticReport/{report_id} has no version {version}") from exc
    observations = []
    for ref in report.get("result") or []:
        obs = _read(conn, ref.get("reference"))
        if obs is None:
            raise BuildError(f"a result of DiagnosticReport/{report_id} is missing")
        observations.append(obs)
    device_refs = [r["reference"] for r in _references([report.get("extension"), [o.get("device") for o in observations]])
                   if r["reference"].startswith("Device/")]
    device = _read(conn, device_refs[0]) if device_refs else None
    if device_refs and device is None:
        raise BuildError(f"the Device of DiagnosticReport/{report_id} is missing")
    context_refs = {r["reference"] for r in _references([report, observations])
                    if r["reference"].split("/")[0] in ("Patient", "ServiceRequest", "ImagingStudy")}
    context = [c for c in (_read(conn, ref) for ref in sorted(context_refs)) if c]
    return build_bundle(report, observations, device, context=context, bundle_id=bundle_id)


def notice_for(conn: psycopg.Connection[Any], rtype: str, rid: str, version: int,
               bundle_id: str | None = None) -> dict[str, Any]:
    """The Bundle for a stored notice (a Communication), with what it points at for identifiers."""
    try:
        resource = resources.vread(conn, rtype, rid, version)
    except resources.NotFound as exc:
        raise BuildError(f"{rtype}/{rid} has no version {version}") from exc
    context = [c for c in (_read(conn, r["reference"]) for r in _references(resource)) if c]
    return build_notice(resource, context=context, bundle_id=bundle_id)


def item_bundle(conn: psycopg.Connection[Any], item: outbox.OutboxItem, bundle_id: str) -> dict[str, Any]:
    """The Bundle an outbox row stands for: a report version with its results, or a notice."""
    if item.resource_type == "DiagnosticReport":
        return bundle_for(conn, item.resource_id, item.version, bundle_id)
    return notice_for(conn, item.resource_type, item.resource_id, item.version, bundle_id)


# -- sending ----------------------------------------------------------------------------------
class FhirChannel:
    """Delivers one claimed `fhir` row (the dispatcher, `sender.OutboxSender`, claims it)."""

    def __init__(self, settings: Settings, sites: Callable[[], dict[str, Site]], *,
                 max_attempts: int = outbox.MAX_ATTEMPTS, tokens: TokenCache | None = None,
                 session: requests.Session | None = None):
        self.settings = settings
        self.sites = sites
        self.max_attempts = max_attempts
        self.tokens = tokens or _TOKENS
        self.session = session or requests.Session()

    def deliver(self, conn: psycopg.Connection[Any], item: outbox.OutboxItem) -> None:
        site = self.sites().get(item.site_code)
        if site is None or site.fhir is None:
            return self._dead(conn, item, f"no fhir destination for site {item.site_code} in the sites file")
        newer = outbox.newer_sent_version(conn, item)
        if newer is not None:
            return self._dead(conn, item, f"superseded: version {newer} was already sent")
        if item.attempts > self.max_attempts:
            return self._dead(conn, item, f"gave up after {item.attempts - 1} attempts")
        payload, bundle_id = item.payload, item.control_id
        if not payload or not bundle_id:
            bundle_id = str(uuid.uuid4())
            try:
                payload = json.dumps(item_bundle(conn, item, bundle_id), ensure_ascii=False)
            except BuildError as exc:
                log.warning("outbox %s: cannot build the Bundle: %s", item.id, exc)
                return self._dead(conn, item, f"cannot build the Bundle: {exc}"[:500])
            with conn.transaction():
                outbox.set_message(conn, item, bundle_id, payload)
        try:
            status, answer = self._push(site.fhir, json.loads(payload))
            outcome = classify(status)
            if outcome is Outcome.UNAUTHORIZED and site.fhir.auth.type == "client_credentials":
                status, answer = self._push(site.fhir, json.loads(payload), refresh=True)
                outcome = classify(status)
        except AuthError as exc:
            if exc.transient:
                return self._retry(conn, item, f"AuthError: {exc}", None)
            with conn.transaction():
                outbox.mark_rejected(conn, item, "", f"AuthError: {exc}"[:500], code=AckCode.AE)
            log.warning("outbox %s: credentials for %s: %s", item.id, item.destination, exc)
            return None
        except requests.RequestException as exc:
            return self._retry(conn, item, f"{type(exc).__name__}: the FHIR server did not answer", None)
        if outcome is Outcome.SENT:
            with conn.transaction():
                outbox.mark_sent(conn, item, answer, bundle_id)
            log.info("outbox %s: %s v%s pushed to %s", item.id, item.resource_id, item.version, item.destination)
        elif outcome is Outcome.RETRY:
            self._retry(conn, item, f"HTTP {status}", answer)
        else:  # a 4xx: the same Bundle gets the same answer; an operator fixes it and replays
            with conn.transaction():
                outbox.mark_rejected(conn, item, answer, f"HTTP {status}: {_diagnostics(answer)}"[:500],
                                     code=AckCode.AE)
            log.warning("outbox %s: HTTP %s from %s; rejected", item.id, status, item.destination)
        return None

    def _push(self, dest: FhirDestination, bundle: dict[str, Any], *, refresh: bool = False) -> tuple[int, str]:
        """POST the Bundle (in parts when the site caps transactions); the first answer that is not
        2xx stops it. Every part is conditional, so a retry after a partial push repeats nothing."""
        found: dict[str, str] = {}
        status, text = 0, ""
        for part in split(bundle, dest.max_bundle_entries):
            part = resolve(part, found)
            status, text = self._post(dest, part, refresh=refresh)
            refresh = False
            if classify(status) is not Outcome.SENT:
                break
            try:
                found.update(locations(part, json.loads(text)))
            except ValueError:
                pass
        return status, text

    def _post(self, dest: FhirDestination, bundle: dict[str, Any], *, refresh: bool = False) -> tuple[int, str]:
        headers = {"Content-Type": f"{FHIR_JSON}; charset=utf-8", "Accept": FHIR_JSON,
                   "X-Request-Id": str(bundle.get("id", ""))}
        headers.update(self.tokens.headers(dest.auth, dest.timeout_seconds, refresh=refresh))
        answer = self.session.post(dest.base, data=json.dumps(bundle, ensure_ascii=False).encode("utf-8"),
                                   headers=headers, timeout=(min(10.0, dest.timeout_seconds), dest.timeout_seconds),
                                   allow_redirects=False)
        return answer.status_code, answer.text[:MAX_ANSWER]

    def _retry(self, conn: psycopg.Connection[Any], item: outbox.OutboxItem, error: str, answer: str | None) -> None:
        delay = outbox.fail_transient(conn, item, error, self.settings.retry_base_seconds, self.max_attempts, answer)
        log.warning("outbox %s: %s from %s; %s", item.id, error, item.destination,
                    "dead" if delay is None else f"retry in {delay}s")

    def _dead(self, conn: psycopg.Connection[Any], item: outbox.OutboxItem, error: str) -> None:
        with conn.transaction():
            outbox.mark_dead(conn, item, error)


def _diagnostics(answer: str) -> str:
    """The first issue of an OperationOutcome answer, for `last_error` (the whole answer is kept)."""
    try:
        issue = (json.loads(answer).get("issue") or [{}])[0]
    except (ValueError, AttributeError):
        return "no OperationOutcome"
    return str(issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code") or "")


_TOKENS = TokenCache()  # one per process: tokens are reused across rows and senders
