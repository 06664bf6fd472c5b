"""De-identified facts from the store: one `analytics.study_fact` row per AI report and one
`analytics.finding_fact` row per finding, upserted by `record` inside the caller's transaction.

`record` recomputes the whole row from what the store holds now (the report and its
observations, the ImagingStudy, the ServiceRequest, the Patient, the sites file, the review
verdicts, the outbox, the critical alert), so calling it once or ten times for the same event
leaves the same single row: exactly once per report, whatever the retries.

What leaves the store is reduced here, by construction: a keyed hash for the patient, an age
band, sex, district/commune, facility and codes. Names, identifiers, dates of birth, address
lines and free text are read only to be hashed or banded, and never written.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import psycopg
from psycopg.rows import dict_row

from ..sites import Site
from ..store import resources
from .pseudonym import Pseudonymizer, current

log = logging.getLogger("interop.analytics")

EVENTS = frozenset({"ai_result", "reviewed", "delivered", "acknowledged", "transfer", "backfill"})
AI_DEVICE_EXTENSION = "urn:interop-hub:fhir:StructureDefinition:ai-device"
SITE_TAG = "urn:interop-hub:site"
PATIENT_REF_SYSTEM = "urn:interop-hub:patient-reference"
AGE_BANDS = ((0, 4), (5, 14), (15, 24), (25, 34), (35, 44), (45, 54), (55, 64), (65, 74))
UNCODED = "uncoded"


@dataclass(frozen=True)
class LabelInfo:
    label: str
    critical: bool


@lru_cache(maxsize=4)
def _labels_from(mappings_dir: Path) -> dict[tuple[str, str], LabelInfo]:
    """(system, code) -> label, and ('', display) for uncoded labels, from mappings/models."""
    from inference_client.models import load_models

    out: dict[tuple[str, str], LabelInfo] = {}
    for model in load_models(mappings_dir).values():
        for label in model.labels:
            info = LabelInfo(label.display.en, label.critical)
            if label.code:
                out[(label.system, label.code)] = info
            out[("", label.display.en)] = info
    return out


def known_labels() -> dict[tuple[str, str], LabelInfo]:
    from ..config import Settings

    return _labels_from(Settings.from_env().mappings_dir)


def _sites() -> dict[str, Site]:
    from ..config import Settings
    from ..sites import load

    return load(Settings.from_env().sites_file)


def age_band(birth: str | None, on: date | None) -> str | None:
    if not birth or on is None:
        return None
    try:
        parts = [int(p) for p in birth[:10].split("-")]
    except ValueError:
        return None
    year, month, day = (parts + [7, 1])[:3] if len(parts) == 1 else (parts + [1])[:3]
    age = on.year - year - ((on.month, on.day) < (month, day))
    if age < 0:
        return None
    for low, high in AGE_BANDS:
        if low <= age <= high:
            return f"{low}-{high}"
    return "75+"


def _time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _q(conn: psycopg.Connection[Any], sql: str, args: Any = None) -> psycopg.Cursor[dict[str, Any]]:
    """Rows as dicts whatever the connection's row factory."""
    return conn.cursor(row_factory=dict_row).execute(sql, args)  # type: ignore[arg-type]


def _read(conn: psycopg.Connection[Any], ref: str | None) -> dict[str, Any] | None:
    if not ref or "/" not in ref:
        return None
    rtype, rid = ref.split("/", 1)
    try:
        return resources.read(conn, rtype, rid)
    except (resources.NotFound, resources.Gone):
        return None


def _first_stored(conn: psycopg.Connection[Any], rtype: str, rid: str) -> datetime | None:
    row = _q(conn, "SELECT min(last_updated) AS t FROM resource_history WHERE type = %s AND id = %s",
           (rtype, rid)).fetchone()
    return row["t"] if row else None


def _codes(concept: dict[str, Any] | None) -> list[dict[str, Any]]:
    return list((concept or {}).get("coding") or [])


def _has(concept_list: Iterable[dict[str, Any]], code: str) -> bool:
    return any(c.get("code") == code for cc in concept_list for c in cc.get("coding", []))


def _site_code(resource: dict[str, Any]) -> str | None:
    for tag in resource.get("meta", {}).get("tag", []):
        if tag.get("system") == SITE_TAG and tag.get("code"):
            return str(tag["code"])
    return None


def _model(conn: psycopg.Connection[Any], report: dict[str, Any]) -> tuple[str, str]:
    ref: dict[str, Any] = next((e.get("valueReference", {}) for e in report.get("extension", [])
                if e.get("url") == AI_DEVICE_EXTENSION), {})
    device = _read(conn, ref.get("reference"))
    if device:
        version = next((v.get("value") for v in device.get("version", []) if v.get("value")), None)
        name = device.get("modelNumber")
        if name and version:
            return str(name), str(version)
    name, _, version = str(ref.get("display") or "unknown").partition(" ")
    return name, version or "unknown"


def _patient_key(patient: dict[str, Any] | None, subject_ref: str | None,
                 pseudonymizer: Pseudonymizer) -> str | None:
    idents = [i for i in (patient or {}).get("identifier", []) if i.get("value")]
    if idents:
        mr = [i for i in idents if any(c.get("code") == "MR" for c in i.get("type", {}).get("coding", []))]
        chosen = (mr or idents)[0]
        return pseudonymizer.patient_key(chosen.get("system"), str(chosen["value"]))
    if subject_ref:
        return pseudonymizer.patient_key(PATIENT_REF_SYSTEM, subject_ref)
    return None


def _address(patient: dict[str, Any] | None) -> tuple[str | None, str | None]:
    addresses = (patient or {}).get("address") or []
    home = [a for a in addresses if a.get("use") in (None, "home")] or addresses
    for address in home:
        if address.get("district"):
            return str(address["district"]), (str(address["city"]) if address.get("city") else None)
    return None, None


def _study_facts(study: dict[str, Any] | None) -> tuple[str, str | None, str | None]:
    if not study:
        return "unknown", None, None
    modality = next((m.get("code") for m in study.get("modality", []) if m.get("code")), None)
    series = study.get("series") or []
    modality = modality or next((s.get("modality", {}).get("code") for s in series
                                 if s.get("modality", {}).get("code")), None)
    body = next((s.get("bodySite", {}).get("code") for s in series if s.get("bodySite", {}).get("code")), None)
    procedure = next((c.get("code") for pc in study.get("procedureCode", []) for c in _codes(pc)
                      if c.get("code")), None)
    return str(modality or "unknown"), (str(body) if body else None), (str(procedure) if procedure else None)


def _finding(conn: psycopg.Connection[Any], ref: str, verdicts: dict[str, dict[str, Any]],
             labels: dict[tuple[str, str], LabelInfo], reviewed: bool) -> tuple[Any, ...] | None:
    oid = ref.split("/", 1)[1]
    obs = _read(conn, ref)
    if obs is None:
        return None
    first = obs if obs.get("meta", {}).get("versionId") == "1" else resources.vread(conn, "Observation", oid, 1)
    is_ai = "valueQuantity" in first
    coding = next((c for c in _codes(first.get("code")) if c.get("code")), None)
    if coding:
        system, code = coding.get("system"), str(coding["code"])
        info = labels.get((system or "", code))
        label = info.label if info else code
    else:
        text = str(first.get("code", {}).get("text") or "")
        info = labels.get(("", text)) if is_ai else None
        system, code, label = None, (text if info else UNCODED), (info.label if info else "uncoded finding")
    ai_positive = _has(first.get("interpretation", []), "POS") if is_ai else None
    probability = first.get("valueQuantity", {}).get("value") if is_ai else None
    verdict = verdicts.get(oid)
    said = verdict["radiologist_positive"] if verdict and verdict["verdict"] != "rejected" else None
    kind = verdict["verdict"] if verdict and verdict["verdict"] in ("agree", "disagree", "added") else None
    final = said if said is not None else (None if reviewed and verdict and kind is None else ai_positive)
    critical = _has(obs.get("interpretation", []), "AA") or _has(first.get("interpretation", []), "AA")
    return (oid, system, code, label, probability, ai_positive, kind, said, final, critical)


def build(conn: psycopg.Connection[Any], report: dict[str, Any], sites: dict[str, Site],
          pseudonymizer: Pseudonymizer, labels: dict[tuple[str, str], LabelInfo]) -> tuple[dict[str, Any], list[tuple[Any, ...]]]:
    """(study_fact row, finding_fact rows) for one stored AI report."""
    rid = report["id"]
    study = _read(conn, next((s.get("reference") for s in report.get("imagingStudy", [])), None))
    based_on = [b.get("reference") for b in (report.get("basedOn") or (study or {}).get("basedOn") or [])]
    order = next((o for o in (_read(conn, b) for b in based_on if b and b.startswith("ServiceRequest/")) if o), None)
    subject_ref = (report.get("subject") or (study or {}).get("subject") or {}).get("reference")
    patient = _read(conn, subject_ref) if subject_ref and subject_ref.startswith("Patient/") else None
    site_code = _site_code(report) or (_site_code(study) if study else None)
    site = sites.get(site_code.upper()) if site_code else None
    modality, body_part, procedure = _study_facts(study)
    if procedure is None and order:
        procedure = next((str(c["code"]) for c in _codes(order.get("code")) if c.get("code")), None)
    name, version = _model(conn, report)
    ai_result_at = _first_stored(conn, "DiagnosticReport", rid) or _time(report.get("issued"))
    images_at = _first_stored(conn, "ImagingStudy", study["id"]) if study else None
    when = _time((study or {}).get("started")) or _time(report.get("effectiveDateTime")) or ai_result_at
    residence, commune = _address(patient)
    review = _q(conn, 
        "SELECT min(reviewed_at) AS first_at, min(report_version) AS first_version FROM review_verdict"
        " WHERE report_id = %s", (rid,)).fetchone() or {}
    rows = _q(conn, 
        "SELECT DISTINCT ON (observation_id) observation_id, verdict, radiologist_positive FROM review_verdict"
        " WHERE report_id = %s AND observation_id IS NOT NULL ORDER BY observation_id, id DESC", (rid,)).fetchall()
    verdicts = {r["observation_id"]: r for r in rows}
    reviewed_version = review.get("first_version")
    sent = _q(conn, 
        "SELECT min(sent_at) FILTER (WHERE %(v)s::int IS NULL OR version < %(v)s::int) AS ai_at,"
        " min(sent_at) FILTER (WHERE version >= %(v)s::int) AS reviewed_at FROM outbox"
        " WHERE resource_type = 'DiagnosticReport' AND resource_id = %(id)s AND status = 'sent'"
        # delivered means to the ordering facility (a critical report also goes to its referral hospital)
        "   AND split_part(destination, ':', 1) = %(site)s",
        {"v": reviewed_version, "id": rid, "site": (site_code or "").upper()}).fetchone() or {}
    alert = _q(conn, "SELECT acknowledged_at, referral_id, transfer_decision FROM critical_alert"
                         " WHERE report_id = %s", (rid,)).fetchone()
    findings = [f for f in (_finding(conn, r["reference"], verdicts, labels, reviewed_version is not None)
                            for r in report.get("result", []) if "/" in r.get("reference", "")) if f]
    cancelled = report.get("status") == "cancelled"
    fact = {
        "report_id": rid,
        "patient_key": _patient_key(patient, subject_ref, pseudonymizer),
        "key_id": pseudonymizer.key_id,
        "age_band": age_band((patient or {}).get("birthDate"), when.date() if when else None),
        "sex": (patient or {}).get("gender"),
        "district": residence or (site.district if site and site.district else "unknown"),
        "commune": commune,
        "province": (site.province if site and site.province else "unknown"),
        "facility": site.code.upper() if site else (site_code.upper() if site_code else "unknown"),
        "facility_district": site.district if site else None,
        "modality": modality, "body_part": body_part, "procedure_code": procedure,
        "model_name": name, "model_version": version,
        "report_status": str(report.get("status", "unknown")),
        "critical": alert is not None or _has(report.get("conclusionCode", []), "AA"),
        "positives": 0 if cancelled else sum(1 for f in findings if f[8]),
        "ordered_at": _time((order or {}).get("authoredOn")),
        "images_at": images_at, "ai_result_at": ai_result_at,
        "ai_delivered_at": sent.get("ai_at"), "reviewed_at": review.get("first_at"),
        "delivered_at": sent.get("reviewed_at"),
        "acknowledged_at": alert["acknowledged_at"] if alert else None,
        "reviewer_group": str(site.extra.get("review_group")) if site and site.extra.get("review_group") else "hub",
        "transfer_recommended": bool(alert and alert["referral_id"]),
        "transfer_done": bool(alert and alert["transfer_decision"] == "transfer"),
    }
    return fact, findings


COLUMNS = ("report_id", "patient_key", "key_id", "age_band", "sex", "district", "commune", "province", "facility",
           "facility_district", "modality", "body_part", "procedure_code", "model_name", "model_version",
           "report_status", "critical", "positives", "ordered_at", "images_at", "ai_result_at", "ai_delivered_at",
           "reviewed_at", "delivered_at", "acknowledged_at", "reviewer_group", "transfer_recommended",
           "transfer_done")
FINDING_COLUMNS = ("report_id", "observation_id", "code_system", "code", "label", "probability", "ai_positive",
                   "verdict", "radiologist_positive", "final_positive", "critical")
_UPSERT = (
    f"INSERT INTO analytics.study_fact ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * len(COLUMNS))})"
    " ON CONFLICT (report_id) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in COLUMNS[1:] if c not in ("patient_key", "key_id"))
    + ", patient_key = CASE WHEN %s OR analytics.study_fact.patient_key IS NULL THEN EXCLUDED.patient_key"
      " ELSE analytics.study_fact.patient_key END"
    + ", key_id = CASE WHEN %s OR analytics.study_fact.patient_key IS NULL THEN EXCLUDED.key_id"
      " ELSE analytics.study_fact.key_id END"
    + ", updated_at = now()"
)


def record(conn: psycopg.Connection[Any], report_id: str, *, event: str, sites: dict[str, Site] | None = None,
           rekey: bool = False, pseudonymizer: Pseudonymizer | None = None) -> None:
    """Upsert the analytics facts of one report, in the caller's transaction.

    `event` says why (ai_result, reviewed, delivered, acknowledged, transfer, backfill); the row is
    recomputed from the store whatever it is. A report that is not an AI report, or is unknown,
    is skipped. The patient key of an existing row is kept unless `rekey` (see pseudonym.py).
    """
    if event not in EVENTS:
        raise ValueError(f"unknown analytics event {event!r}; one of {', '.join(sorted(EVENTS))}")
    try:
        report = resources.read(conn, "DiagnosticReport", report_id)
    except (resources.NotFound, resources.Gone):
        log.warning("analytics: DiagnosticReport/%s is not stored; %s not recorded", report_id, event)
        return
    if not any(e.get("url") == AI_DEVICE_EXTENSION for e in report.get("extension", [])):
        return
    fact, findings = build(conn, report, _sites() if sites is None else sites, pseudonymizer or current(),
                           known_labels())
    with conn.transaction():  # a savepoint inside the caller's transaction
        conn.execute(_UPSERT, [*(fact[c] for c in COLUMNS), rekey, rekey])  # type: ignore[arg-type]
        conn.execute("DELETE FROM analytics.finding_fact WHERE report_id = %s", (report_id,))
        if findings:
            with conn.cursor() as cur:
                cur.executemany(
                    f"INSERT INTO analytics.finding_fact ({', '.join(FINDING_COLUMNS)})"
                    f" VALUES ({', '.join(['%s'] * len(FINDING_COLUMNS))})",
                    [(report_id, *f) for f in findings])


def backfill(conn: psycopg.Connection[Any], *, sites: dict[str, Site] | None = None, rekey: bool = False,
             batch: int = 500) -> int:
    """Rebuild the facts of every stored AI report (idempotent); returns how many reports."""
    sites = _sites() if sites is None else sites
    pseudonymizer = current()
    ids = [r["id"] for r in _q(conn, 
        "SELECT id FROM resource WHERE type = 'DiagnosticReport' AND NOT deleted"
        " AND body->'extension' @> %s::jsonb ORDER BY last_updated, id",
        (f'[{{"url": "{AI_DEVICE_EXTENSION}"}}]',)).fetchall()]
    for start in range(0, len(ids), batch):
        with conn.transaction():
            for rid in ids[start:start + batch]:
                record(conn, rid, event="backfill", sites=sites, rekey=rekey, pseudonymizer=pseudonymizer)
    # Facts whose report is gone (deleted) are removed too.
    conn.execute("DELETE FROM analytics.study_fact s WHERE NOT EXISTS (SELECT 1 FROM resource r WHERE"
                 " r.type = 'DiagnosticReport' AND r.id = s.report_id AND NOT r.deleted)"
                 " AND s.report_id NOT LIKE 'synthetic-%%'")
    return len(ids)


MATERIALISED = ("analytics.mv_study_daily", "analytics.mv_finding_weekly")


def refresh(conn: psycopg.Connection[Any]) -> dict[str, float]:
    """Refresh the materialised views (CONCURRENTLY once populated); seconds per view.

    Needs an autocommit connection or runs in the caller's transaction (then not concurrently).
    """
    import time

    out: dict[str, float] = {}
    for name in MATERIALISED:
        start = time.perf_counter()
        populated = _q(conn, "SELECT ispopulated FROM pg_matviews WHERE schemaname || '.' || matviewname = %s",
                                 (name,)).fetchone()
        concurrently = " CONCURRENTLY" if populated and populated["ispopulated"] else ""
        conn.execute(f"REFRESH MATERIALIZED VIEW{concurrently} {name}")
        out[name] = round(time.perf_counter() - start, 3)
        conn.execute("INSERT INTO analytics.refresh_log (name, refreshed_at, seconds) VALUES (%s, now(), %s)"
                     " ON CONFLICT (name) DO UPDATE SET refreshed_at = EXCLUDED.refreshed_at,"
                     " seconds = EXCLUDED.seconds", (name, out[name]))
    return out
