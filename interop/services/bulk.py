"""FHIR Bulk Data export (`$export`, Bulk Data Access IG v2): what a client may export, the
`bulk-export` job that writes the NDJSON files, and the manifest its status URL answers.

Two uses, decided by the client's token, never by a parameter it could change:

* **De-identified analytics** (a system-level `GET /fhir/$export` by a client with `hub:analytics`,
  e.g. the provincial CDC): Patient, DiagnosticReport and Observation built from the analytics
  facts (`interop.services.analytics.facts`), which hold no names, identifiers, birth dates,
  addresses or free text. Ids are keyed hashes (the patient's is the analytics patient key, under
  INTEROP_PSEUDONYM_KEY); a patient is its gender and district, a report its day, modality, age
  band, facility and findings. Nothing of the resource store is read.
* **Resources** (`GET /fhir/[type]/$export`, or a system-level export by a client without
  `hub:analytics`): the stored resources of the types asked for, each needing the `system/[type].r`
  scope; a client registered for a site (`interop clients add --site`, e.g. an EMR back-filling its
  reports) gets only that site's DiagnosticReports, ImagingStudies and ServiceRequests, and the
  Observations its reports hold.

The export runs as a job of the one queue (analysis pool: `interop worker`), so it survives a
restart: a job retried after a crash starts its export again from the same transaction time.
Files are rows in PostgreSQL (see migration 0020 for why), FILE_LINES resources each.
"""
from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg

from ..domain.quality import NOT_ANALYSABLE
from ..domain.scopes import Grant
from ..domain.vocabulary import SITE_TAG
from ..store import bulk as store
from ..store import queue
from .analytics.pseudonym import Pseudonymizer
from .context import Context

log = logging.getLogger("interop.bulk")

EXPORT = "bulk-export"
ANALYTICS = "analytics"
RESOURCES = "resources"
ANALYTICS_TYPES = ("Patient", "DiagnosticReport", "Observation")
SITE_TYPES = ("DiagnosticReport", "Observation", "ImagingStudy", "ServiceRequest")
NEVER = ("AuditEvent", "Subscription")  # the audit trail and clients' callbacks are not data to export
OUTPUT_FORMATS = ("application/fhir+ndjson", "application/ndjson", "ndjson")
PARAMETERS = ("_type", "_since", "_outputFormat")
FILE_LINES = 10_000
PAGE = 500
KEEP_SECONDS = 24 * 3600   # a completed export's files are kept this long (the manifest's Expires)
MAX_ACTIVE = 3             # exports one client may have waiting or running
REPORT_KEY_SYSTEM = "urn:interop-hub:analytics:report"
OBSERVATION_KEY_SYSTEM = "urn:interop-hub:analytics:observation"
AGE_BAND = "urn:interop-hub:fhir:StructureDefinition:age-band"
AI_MODEL = "urn:interop-hub:fhir:StructureDefinition:ai-model"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
PSEUDONYMIZED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "PSEUDED",
                 "display": "pseudonymized"}


class ExportError(ValueError):
    """A kick-off the hub refuses: `status` (400, 403, 429) and a message safe to show."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Plan:
    kind: str
    types: tuple[str, ...]
    since: datetime | None
    site: str | None


def _instant(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ExportError("_since must be a FHIR instant, e.g. 2026-12-01T00:00:00Z") from None
    if when.tzinfo is None:
        raise ExportError("_since must be an instant with its time zone, e.g. 2026-12-01T00:00:00Z")
    return when


def plan(args: list[tuple[str, str]], grant: Grant, *, rtype: str | None, site: str | None,
         exportable: tuple[str, ...], lenient: bool = False) -> Plan:
    """What a kick-off exports, or ExportError. `rtype`: the type of `[type]/$export` (None: system
    level); `site`: the client's facility; `exportable`: the types the API serves."""
    unknown = sorted({k for k, _ in args if k not in PARAMETERS})
    if unknown and not lenient:
        raise ExportError(f"unsupported parameters: {', '.join(u[:40] for u in unknown)} (the hub takes"
                          f" {', '.join(PARAMETERS)})")
    values = {k: v for k, v in args if k in PARAMETERS}
    if len([k for k, _ in args if k in PARAMETERS]) != len(values):
        raise ExportError("each of _type, _since and _outputFormat may be given once")
    output = values.get("_outputFormat")
    if output is not None and output.strip() not in OUTPUT_FORMATS:
        raise ExportError(f"_outputFormat must be application/fhir+ndjson, not {output[:60]!r}")
    since = _instant(values["_since"]) if "_since" in values else None
    asked = [t.strip() for t in values["_type"].split(",")] if "_type" in values else []
    if any(not t for t in asked):
        raise ExportError("_type is a comma-separated list of resource types")
    if rtype is None and "hub:analytics" in grant.hub:
        for t in asked:
            if t not in ANALYTICS_TYPES:
                raise ExportError(f"the de-identified analytics export holds {', '.join(ANALYTICS_TYPES)}, not {t[:40]}")
        return Plan(ANALYTICS, tuple(dict.fromkeys(asked)) or ANALYTICS_TYPES, since, None)
    allowed = tuple(t for t in exportable if t not in NEVER and (site is None or t in SITE_TYPES))
    if rtype is not None and rtype not in allowed:
        raise ExportError(f"{rtype[:40]} cannot be exported" + (f" by a client of site {site}" if site else ""))
    for t in asked:
        if t not in allowed:
            raise ExportError(f"{t[:40]} cannot be exported" + (f" by a client of site {site}" if site else ""))
        if not grant.allows(t, "r"):
            raise ExportError(f"the token's scopes do not allow read on {t[:40]}", 403)
    if asked:
        types = tuple(dict.fromkeys(asked))
    elif rtype is not None:
        types = (rtype,)
    else:
        types = tuple(t for t in allowed if grant.allows(t, "r"))
    if not types or not all(grant.allows(t, "r") for t in types):
        raise ExportError("the token's scopes allow reading none of the types asked for (system/[type].rs)", 403)
    return Plan(RESOURCES, types, since, site)


def start(conn: psycopg.Connection[Any], ctx: Context, client_id: str, chosen: Plan, request_url: str) -> str:
    """Record the export and queue its job (in the caller's transaction); returns its id."""
    store.forget_expired(conn)
    if store.active(conn, client_id) >= MAX_ACTIVE:
        raise ExportError(f"this client already has {MAX_ACTIVE} exports waiting or running; poll or cancel one", 429)
    export_id = secrets.token_hex(16)
    store.create(conn, export_id, client_id, chosen.kind, chosen.site, request_url, chosen.types, chosen.since)
    policy = ctx.policies.kind(EXPORT)
    queue.enqueue(conn, EXPORT, {"export": export_id}, dedupe_key=f"{EXPORT}:{export_id}",
                  max_attempts=policy.max_attempts, priority=policy.priority)
    return export_id


def cancel(conn: psycopg.Connection[Any], export_id: str) -> None:
    """DELETE on the status URL: the export is cancelled, its files deleted, its job withdrawn (a
    running one stops at its next page)."""
    store.cancel(conn, export_id)
    queue.cancel(conn, f"{EXPORT}:{export_id}")


# -- the job -------------------------------------------------------------------------------------------
class _Files:
    """NDJSON files as they fill, FILE_LINES lines each, each stored in its own transaction (an
    export of millions never holds one open). `grouped`: resources come one type after another, so
    a type's last file is written when the next type begins (the manifest lists types in order)."""

    def __init__(self, conn: psycopg.Connection[Any], export_id: str, *, grouped: bool):
        self.conn, self.export_id, self.grouped = conn, export_id, grouped
        self.n = 0
        self.lines: dict[str, list[bytes]] = {}
        self.last: str | None = None

    def add(self, resource: dict[str, Any]) -> None:
        rtype = resource["resourceType"]
        if self.grouped and self.last is not None and self.last != rtype:
            self.flush(self.last)
        self.last = rtype
        lines = self.lines.setdefault(rtype, [])
        lines.append(orjson.dumps({"resourceType": rtype, **resource}))
        if len(lines) >= FILE_LINES:
            self.flush(rtype)

    def flush(self, rtype: str | None = None) -> None:
        for name in [rtype] if rtype is not None else sorted(self.lines):
            lines = self.lines.pop(name, [])
            if lines:
                self.n += 1
                with self.conn.transaction():
                    store.add_file(self.conn, self.export_id, self.n, name, len(lines),
                                   (b"\n".join(lines) + b"\n").decode("utf-8"))


def run(conn: psycopg.Connection[Any], ctx: Context, job: queue.Job, _timings: object = None) -> None:
    """The `bulk-export` job: write the export's files, then mark it completed with the job done."""
    export_id = str(job.payload["export"])
    with conn.transaction():
        row = store.get(conn, export_id)
        until = store.begin(conn, export_id) if row is not None else None
    if row is None or until is None:  # cancelled (or expired) before it ran
        with conn.transaction():
            queue.complete(conn, job)
        return
    files = _Files(conn, export_id, grouped=row["kind"] == RESOURCES)
    since = row["since"]
    pages = _analytics(conn, ctx.pseudonymizer, since, until) if row["kind"] == ANALYTICS else \
        _resources(conn, row["types"], since, until, row["site"])
    written = 0
    for page in pages:
        for resource in page:
            if resource["resourceType"] in row["types"]:
                files.add(resource)
                written += 1
        queue.renew(conn, job, ctx.settings.job_lease_seconds)
        with conn.transaction():
            if store.status(conn, export_id) != "in-progress":
                queue.complete(conn, job)
                log.info("export %s stopped: cancelled", export_id)
                return
            store.set_progress(conn, export_id, f"{written} resources written")
    files.flush()
    with conn.transaction():
        store.complete(conn, export_id, KEEP_SECONDS)
        queue.complete(conn, job)
    log.info("export %s completed: %d resources in %d files", export_id, written, files.n)


def export_failed(conn: psycopg.Connection[Any], _ctx: Context, job: queue.Job, reason: str,
                  _exc: BaseException | None) -> None:
    """The job failed for good (in the transaction that fails it): so does the export."""
    store.fail(conn, str(job.payload["export"]), reason)


def _resources(conn: psycopg.Connection[Any], types: list[str], since: datetime | None, until: datetime,
               site: str | None) -> Iterator[list[dict[str, Any]]]:
    for rtype in types:
        after = ""
        while True:
            rows = store.resources_page(conn, rtype, until=until, since=since, site=site, tag_system=SITE_TAG,
                                        after=after, limit=PAGE)
            if not rows:
                break
            after = rows[-1]["id"]
            yield [r["body"] for r in rows]


def _analytics(conn: psycopg.Connection[Any], keys: Pseudonymizer, since: datetime | None,
               until: datetime) -> Iterator[list[dict[str, Any]]]:
    seen: set[str] = set()
    after = ""
    while True:
        rows = store.facts_page(conn, until=until, since=since, after=after, limit=PAGE)
        if not rows:
            return
        after = rows[-1]["report_id"]
        page: list[dict[str, Any]] = []
        for fact in rows:
            page.extend(deidentified(fact, keys, seen))
        yield page


# -- de-identified resources, from the analytics facts (pure) --------------------------------------------
def deidentified(fact: dict[str, Any], keys: Pseudonymizer, seen: set[str]) -> list[dict[str, Any]]:
    """A study fact as FHIR: its patient (once per export: `seen`), the report and its findings.
    Only the fact's de-identified columns are read; ids are keyed hashes."""
    out: list[dict[str, Any]] = []
    meta = {"security": [PSEUDONYMIZED]}
    subject = None
    if fact.get("patient_key"):
        patient_id = str(fact["patient_key"])[:64]
        subject = {"reference": f"Patient/{patient_id}"}
        if patient_id not in seen:
            seen.add(patient_id)
            patient: dict[str, Any] = {"resourceType": "Patient", "id": patient_id, "meta": meta}
            if fact.get("sex"):
                patient["gender"] = fact["sex"]
            address = {k: v for k, v in (("city", fact.get("commune")), ("district", fact.get("district")),
                                         ("state", fact.get("province"))) if v and v != "unknown"}
            if address:
                patient["address"] = [{"use": "home", **address}]
            out.append(patient)
    report_id = keys.patient_key(REPORT_KEY_SYSTEM, str(fact["report_id"]))
    day = fact["study_day"].isoformat() if fact.get("study_day") else None
    status = "final" if fact["report_status"] in ("final", "amended", "corrected") else \
        "cancelled" if fact["report_status"] == "cancelled" else "preliminary"
    observations = []
    for finding in fact.get("findings") or []:
        obs_id = keys.patient_key(OBSERVATION_KEY_SYSTEM, f"{fact['report_id']}|{finding['observation_id']}")
        coding = {"code": str(finding["code"]), "display": str(finding["label"])}
        if finding.get("code_system"):
            coding = {"system": str(finding["code_system"]), **coding}
        obs: dict[str, Any] = {"resourceType": "Observation", "id": obs_id, "meta": meta, "status": status,
                               "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                                         "code": "imaging"}]}],
                               "code": {"coding": [coding], "text": str(finding["label"])}}
        if subject:
            obs["subject"] = subject
        if day:
            obs["effectiveDateTime"] = day
        if finding.get("final_positive") is not None:
            positive = bool(finding["final_positive"])
            obs["valueBoolean"] = positive
            obs["interpretation"] = [{"coding": [{"system": INTERPRETATION, "code": "POS" if positive else "NEG"}]}]
        else:
            obs["dataAbsentReason"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                                                   "code": "not-performed"}]}
        if finding.get("probability") is not None:
            obs["component"] = [{"code": {"text": "AI probability"},
                                 "valueQuantity": {"value": round(float(finding["probability"]), 4), "unit": "1",
                                                   "system": "http://unitsofmeasure.org", "code": "1"}}]
        observations.append(obs)
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport", "id": report_id, "meta": meta, "status": status,
        "category": [{"coding": [{"system": V2_0074, "code": "RAD"}]}],
        "code": {"coding": [{"system": DCM, "code": str(fact["modality"])}] if fact.get("modality") not in (None, "unknown")
                 else [], "text": f"{fact.get('modality') or 'unknown'} study"
                                  + (f", {fact['body_part']}" if fact.get("body_part") else "")},
        "extension": [{"url": AI_MODEL, "valueString": f"{fact['model_name']} {fact['model_version']}"}],
        "performer": [{"identifier": {"system": SITE_TAG, "value": str(fact["facility"])}}],
        "result": [{"reference": f"Observation/{o['id']}"} for o in observations],
    }
    if not report["code"]["coding"]:
        del report["code"]["coding"]
    if fact.get("age_band"):
        report["extension"].append({"url": AGE_BAND, "valueString": str(fact["age_band"])})
    if subject:
        report["subject"] = subject
    if day:
        report["effectiveDateTime"] = day
    positives = [o["code"] for o in observations if o.get("valueBoolean")]
    if fact.get("analysable") is False:  # the AI read nothing: not a study with no finding (kept out of rates)
        positives.insert(0, {"coding": [dict(NOT_ANALYSABLE)], "text": "Not analysable by the AI"})
    if positives:
        report["conclusionCode"] = positives
    if not report["result"]:
        del report["result"]
    out.append(report)
    out.extend(observations)
    return out


# -- the manifest ----------------------------------------------------------------------------------------
def manifest(row: dict[str, Any], files: list[dict[str, Any]], base: str) -> dict[str, Any]:
    """The completed export's manifest (Bulk Data IG: the status request's 200 body)."""
    out: dict[str, Any] = {
        "transactionTime": _instant_text(row["transaction_time"]),
        "request": row["request"],
        "requiresAccessToken": True,
        "output": [{"type": f["type"], "url": f"{base}/$export-file/{row['id']}/{f['n']}.ndjson", "count": f["count"]}
                   for f in files],
        "error": [],
    }
    if row["kind"] == ANALYTICS:
        out["extension"] = {"urn:interop-hub:deidentified": True}
    return out


def _instant_text(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
