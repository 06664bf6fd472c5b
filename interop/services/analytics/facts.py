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
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import psycopg

from ...domain.report import is_not_analysable
from ...domain.vocabulary import AI_DEVICE_EXTENSION, PATIENT_REF_SYSTEM, site_of
from ...sites import Site
from ...store import analytics as store
from ...store import queue, resources, reviews
from ..context import Context
from . import forecasting
from .pseudonym import Pseudonymizer

log = logging.getLogger("interop.analytics")

EVENTS = frozenset({"ai_result", "reviewed", "delivered", "acknowledged", "transfer", "backfill"})
AGE_BANDS = ((0, 4), (5, 14), (15, 24), (25, 34), (35, 44), (45, 54), (55, 64), (65, 74))
UNCODED = "uncoded"


@dataclass(frozen=True)
class LabelInfo:
    label: str
    critical: bool


def labels(ctx: Context) -> dict[tuple[str, str], LabelInfo]:
    """(system, code) -> label, and ('', display) for uncoded labels, from mappings/models."""
    out: dict[tuple[str, str], LabelInfo] = {}
    for model in ctx.models.values():
        for label in model.labels:
            info = LabelInfo(label.display.en, label.critical)
            if label.code:
                out[(label.system, label.code)] = info
            out[("", label.display.en)] = info
    return out


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


def _codes(concept: dict[str, Any] | None) -> list[dict[str, Any]]:
    return list((concept or {}).get("coding") or [])


def _has(concept_list: Iterable[dict[str, Any]], code: str) -> bool:
    return any(c.get("code") == code for cc in concept_list for c in cc.get("coding", []))


def _model(conn: psycopg.Connection[Any], report: dict[str, Any]) -> tuple[str, str]:
    ref: dict[str, Any] = next((e.get("valueReference", {}) for e in report.get("extension", [])
                if e.get("url") == AI_DEVICE_EXTENSION), {})
    device = resources.find(conn, ref.get("reference"))
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
    obs = resources.find(conn, ref)
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
    study = resources.find(conn, next((s.get("reference") for s in report.get("imagingStudy", [])), None))
    based_on = [b.get("reference") for b in (report.get("basedOn") or (study or {}).get("basedOn") or [])]
    order = next((o for o in (resources.find(conn, b) for b in based_on if b and b.startswith("ServiceRequest/")) if o), None)
    subject_ref = (report.get("subject") or (study or {}).get("subject") or {}).get("reference")
    patient = resources.find(conn, subject_ref) if subject_ref and subject_ref.startswith("Patient/") else None
    site_code = site_of(report) or (site_of(study) if study else None)
    site = sites.get(site_code.upper()) if site_code else None
    modality, body_part, procedure = _study_facts(study)
    if procedure is None and order:
        procedure = next((str(c["code"]) for c in _codes(order.get("code")) if c.get("code")), None)
    name, version = _model(conn, report)
    ai_result_at = resources.first_stored(conn, "DiagnosticReport", rid) or _time(report.get("issued"))
    images_at = resources.first_stored(conn, "ImagingStudy", study["id"]) if study else None
    when = _time((study or {}).get("started")) or _time(report.get("effectiveDateTime")) or ai_result_at
    residence, commune = _address(patient)
    review = reviews.first_review(conn, rid)
    verdicts = reviews.latest_verdicts(conn, rid)
    reviewed_version = review.get("first_version")
    # delivered means to the ordering facility (a critical report also goes to its referral hospital)
    sent = store.delivered(conn, f"DiagnosticReport/{rid}", (site_code or "").upper(), reviewed_version)
    alert = reviews.alert(conn, rid)
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
        "analysable": _analysable(conn, report),
    }
    return fact, findings


def _analysable(conn: psycopg.Connection[Any], report: dict[str, Any]) -> bool:
    """Whether the AI read the study: its first version (the AI's own) is not "not analysable".

    A review replaces the conclusionCode, and a radiologist's reading does not make the images
    readable by the AI: the study stays out of the rates per AI-read study and of agreement."""
    if report.get("meta", {}).get("versionId") in (None, "1"):
        return not is_not_analysable(report)
    try:
        first = resources.vread(conn, "DiagnosticReport", report["id"], 1)
    except (resources.NotFound, resources.Gone):
        return not is_not_analysable(report)
    return not is_not_analysable(first)


def record(conn: psycopg.Connection[Any], ctx: Context, report_id: str, *, event: str, rekey: bool = False) -> None:
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
    fact, findings = build(conn, report, ctx.sites.current(), ctx.pseudonymizer, labels(ctx))
    store.upsert_facts(conn, fact, findings, rekey=rekey)


def backfill(conn: psycopg.Connection[Any], ctx: Context, *, rekey: bool = False, batch: int = 500) -> int:
    """Rebuild the facts of every stored AI report (idempotent); returns how many reports."""
    ids = store.ai_report_ids(conn, AI_DEVICE_EXTENSION)
    for start in range(0, len(ids), batch):
        with conn.transaction():
            for rid in ids[start:start + batch]:
                record(conn, ctx, rid, event="backfill", rekey=rekey)
    store.forget_deleted_reports(conn)
    return len(ids)


def refresh(conn: psycopg.Connection[Any], ctx: Context | None = None, job: queue.Job | None = None,
            _timings: object = None) -> dict[str, float]:
    """Refresh the dashboard's summaries (materialised views, the turnaround summary's changed
    weeks, the kept forecasts); as the `refresh-analytics` job, also queue the next period's
    refresh. Needs an autocommit connection."""
    seconds = store.refresh(conn)
    start = time.perf_counter()
    forecasting.precompute(conn)
    seconds["analytics.forecast_cache"] = round(time.perf_counter() - start, 3)
    if ctx is not None and job is not None:
        with conn.transaction():
            queue.complete(conn, job)
            schedule_refresh(conn, ctx, later=True)
    return seconds


REFRESH = "refresh-analytics"


def schedule_refresh(conn: psycopg.Connection[Any], ctx: Context, *, later: bool = False) -> None:
    """One refresh per period across every runner and replica (the job key is the period's slot)."""
    period = max(1, ctx.settings.analytics_refresh_minutes) * 60
    now = time.time()
    slot = int(now // period) + (1 if later else 0)
    policy = ctx.policies.kind(REFRESH)
    queue.enqueue(conn, REFRESH, {}, dedupe_key=f"{REFRESH}:{slot}", max_attempts=policy.max_attempts,
                  priority=policy.priority, delay_seconds=max(0.0, slot * period - now) if later else 0)
