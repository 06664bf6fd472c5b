"""What the worklist shows: AI reports waiting for review, critical first, then the longest waiting.

Reads the store (one query for the reports, one for everything they point at) and turns it into
plain rows for the templates; no HTTP here. A report waits while it is `preliminary`; it is
critical when its conclusionCode or one of its Observations' interpretations says `AA`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import psycopg

from inference_client.models import ModelDescription

from ..domain.report import is_not_analysable
from ..domain.vocabulary import REPORT_SYSTEM, SITE_TAG, codes, is_critical, is_critical_finding, site_of
from ..sites import Site
from ..store import resources, worklist

LIMIT = 500  # a province's backlog; past this the page says how many more wait


@dataclass(frozen=True)
class FindingRow:
    observation_id: str
    text_en: str
    text_vi: str | None
    probability: float | None      # None for a finding without a probability (added by a person)
    positive: bool
    critical: bool
    threshold: float | None


PRIORITIES = ("stat", "asap", "urgent", "routine")  # FHIR request-priority, most urgent first


@dataclass(frozen=True)
class Order:
    """What a radiologist reads a study with: the patient (name, age, sex), the order's accession,
    ordering hospital, clinical indication and priority. Shown to logged-in radiologists only."""

    patient_name: str = ""
    age: str = ""           # whole years at the study date ("" when no birth date)
    sex: str = ""           # FHIR administrative gender
    accession: str = ""
    ordering: str = ""      # the requesting organisation or practitioner, as the order names it
    indication: str = ""    # reasonCode texts and notes
    priority: str = ""      # routine | urgent | asap | stat ("" when the order does not say)


@dataclass
class Entry:
    report: dict[str, Any]
    critical: bool
    issued: datetime | None
    patient: str                    # reference, and the first identifier when the Patient is stored
    patient_identifier: str | None
    modality: str
    body_part: str
    study_date: str
    facility: str
    model: str
    findings: list[FindingRow] = field(default_factory=list)
    alert: dict[str, Any] | None = None
    site: str | None = None         # the facility code (a clinician sees their own site's only)
    not_analysable: str | None = None  # the quality gate's reasons when the AI refused the images
    order: Order = field(default_factory=lambda: Order())  # who the patient is and why imaged (radiologists only)

    @property
    def signed_by(self) -> str | None:
        """Who signed (or last reviewed) the report, as the report names them."""
        people = [p.get("display") or p.get("reference") for p in self.report.get("resultsInterpreter") or []]
        return ", ".join(str(p) for p in people if p) or None

    @property
    def id(self) -> str:
        return str(self.report["id"])

    @property
    def version(self) -> str:
        return str(self.report.get("meta", {}).get("versionId", ""))

    @property
    def positives(self) -> list[FindingRow]:
        return [f for f in self.findings if f.positive]

    def waited_seconds(self, now: datetime) -> int:
        return max(0, int((now - self.issued).total_seconds())) if self.issued else 0


def _codes(item: dict[str, Any]) -> set[str]:
    return codes(item.get("interpretation") or [])


def parse_instant(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _ref_id(ref: dict[str, Any] | None) -> str:
    return str((ref or {}).get("reference", ""))


def _model_of(report: dict[str, Any], models: dict[str, ModelDescription]) -> ModelDescription | None:
    for ident in report.get("identifier", []):
        if ident.get("system") == REPORT_SYSTEM:
            return models.get(str(ident.get("value", "")).rsplit("/", 1)[-1])
    return None


def _label(obs: dict[str, Any], model: ModelDescription | None) -> Any:
    if model is None:
        return None
    codes = {c.get("code") for c in obs.get("code", {}).get("coding", [])}
    text = obs.get("code", {}).get("text")
    return next((label for label in model.labels if (label.code and label.code in codes)
                 or label.display.en == text), None)


def finding_row(obs: dict[str, Any], model: ModelDescription | None) -> FindingRow:
    label = _label(obs, model)
    value = obs.get("valueQuantity", {}).get("value")
    return FindingRow(observation_id=str(obs["id"]), text_en=str(obs.get("code", {}).get("text", "")),
                      text_vi=label.display.vi if label else None,
                      probability=float(value) if isinstance(value, (int, float)) else None,
                      positive="POS" in _codes(obs), critical=is_critical_finding(obs),
                      threshold=label.threshold if label else None)


def _study_facts(study: dict[str, Any] | None) -> tuple[str, str, str]:
    if not study:
        return "", "", ""
    modality = ", ".join(dict.fromkeys(str(m.get("code")) for m in study.get("modality", []) if m.get("code")))
    parts = [s.get("bodySite", {}).get("display") or s.get("bodySite", {}).get("code") for s in study.get("series", [])]
    body_part = ", ".join(dict.fromkeys(str(p) for p in parts if p))
    return modality, body_part, str(study.get("started", ""))[:10]


def _patient(report: dict[str, Any], patients: dict[str, dict[str, Any]]) -> tuple[str, str | None]:
    ref = _ref_id(report.get("subject"))
    stored = patients.get(ref)
    for ident in (stored or {}).get("identifier", []):
        if ident.get("value"):
            return ref, str(ident["value"])
    return ref, None


def _site_code(report: dict[str, Any], study: dict[str, Any] | None) -> str | None:
    code = site_of(report) or (site_of(study) if study else None)
    return code.upper() if code else None


def _facility(report: dict[str, Any], study: dict[str, Any] | None, sites: dict[str, Site]) -> str:
    code = _site_code(report, study)
    if not code:
        return ""
    site = sites.get(code.upper())
    return site.name if site else code


def _human_name(patient: dict[str, Any] | None) -> str:
    for name in (patient or {}).get("name") or []:
        if name.get("text"):
            return str(name["text"])
        parts = [name.get("family", ""), *name.get("given", [])]  # family name first, as Vietnamese names are said
        text = " ".join(str(p) for p in parts if p)
        if text:
            return text
    return ""


def age_at(birth: Any, on: str) -> str:
    """Whole years between a FHIR birthDate (YYYY[-MM[-DD]]) and a date (YYYY-MM-DD); "" if unknown."""
    try:
        born = date.fromisoformat((str(birth) + "-01-01")[:10]) if birth else None
        when = date.fromisoformat(on[:10]) if on else datetime.now(UTC).date()
    except ValueError:
        return ""
    if born is None:
        return ""
    years = when.year - born.year - ((when.month, when.day) < (born.month, born.day))
    return str(years) if years >= 0 else ""


def _concept_text(concept: dict[str, Any]) -> str:
    return str(concept.get("text") or next((c.get("display") or c.get("code") for c in concept.get("coding") or []
                                            if c.get("display") or c.get("code")), "") or "")


def _accession(study: dict[str, Any] | None, request: dict[str, Any] | None) -> str:
    for resource in (study, request):
        for ident in (resource or {}).get("identifier") or []:
            if any(c.get("code") == "ACSN" for c in (ident.get("type") or {}).get("coding") or []) and ident.get("value"):
                return str(ident["value"])
    return ""


def order_of(patient: dict[str, Any] | None, study: dict[str, Any] | None, request: dict[str, Any] | None,
             study_date: str, facility: str) -> Order:
    request = request or {}
    reasons = [_concept_text(c) for c in request.get("reasonCode") or []]
    notes = [str(n.get("text")) for n in request.get("note") or [] if n.get("text")]
    requester = request.get("requester") or {}
    priority = str(request.get("priority") or "")
    return Order(patient_name=_human_name(patient), age=age_at((patient or {}).get("birthDate"), study_date),
                 sex=str((patient or {}).get("gender") or ""), accession=_accession(study, request),
                 ordering=str(requester.get("display") or "") or facility,
                 indication="; ".join(dict.fromkeys(t for t in [*reasons, *notes] if t)),
                 priority=priority if priority in PRIORITIES else "")


def _refused(report: dict[str, Any]) -> str | None:
    """The reasons the quality gate gave, when it refused the report's images."""
    if not is_not_analysable(report):
        return None
    text = str((report.get("conclusionCode") or [{}])[0].get("text") or "")
    return text.split(":", 1)[1].strip() if ":" in text else text


def entries(conn: psycopg.Connection[Any], reports: list[dict[str, Any]], *, models: dict[str, ModelDescription],
            sites: dict[str, Site], alerts: dict[str, dict[str, Any]]) -> list[Entry]:
    """Rows for these reports, with their observations, studies and patients read in one query."""
    refs: list[str] = []
    for report in reports:
        refs += [_ref_id(r) for r in report.get("result", [])]
        refs += [_ref_id(s) for s in report.get("imagingStudy", [])[:1]]
        refs.append(_ref_id(report.get("subject")))
        refs += [_ref_id(b) for b in report.get("basedOn", [])[:1]]
    linked = {f"{b['resourceType']}/{b['id']}": b for b in resources.read_many(conn, [r for r in refs if r])}
    out = []
    for report in reports:
        observations = [linked[r] for r in (_ref_id(x) for x in report.get("result", [])) if r in linked]
        study = linked.get(_ref_id((report.get("imagingStudy") or [{}])[0]))
        model = _model_of(report, models)
        modality, body_part, study_date = _study_facts(study)
        patient, identifier = _patient(report, linked)
        request = linked.get(_ref_id((report.get("basedOn") or [{}])[0]))
        facility = _facility(report, study, sites)
        out.append(Entry(
            report=report, critical=is_critical(report, observations), issued=parse_instant(report.get("issued")),
            patient=patient, patient_identifier=identifier, modality=modality, body_part=body_part,
            study_date=study_date or str(report.get("effectiveDateTime", ""))[:10],
            facility=facility,
            model=(model.display.en if model else _ref_id(report.get("extension", [{}])[0].get("valueReference"))),
            findings=[finding_row(o, model) for o in observations if "valueQuantity" in o or "valueBoolean" in o],
            alert=alerts.get(str(report["id"])), site=_site_code(report, study),
            not_analysable=_refused(report),
            order=order_of(linked.get(patient), study, request, study_date, facility)))
    return out


Filters = worklist.Filters


def waiting(conn: psycopg.Connection[Any], *, models: dict[str, ModelDescription], sites: dict[str, Site],
            alerts: dict[str, dict[str, Any]], limit: int = LIMIT,
            filters: Filters | None = None) -> tuple[int, list[Entry]]:
    """(how many match, the first `limit` of them): waiting reports critical first, then the most
    urgent order, then the oldest `issued` first; reports already dealt with, newest first."""
    total, reports = worklist.waiting_reports(conn, limit, filters or Filters(), tag_system=SITE_TAG,
                                              priorities=PRIORITIES)
    return total, entries(conn, reports, models=models, sites=sites, alerts=alerts)


def following(conn: psycopg.Connection[Any], report_id: str, filters: Filters) -> str | None:
    """The report after this one in the filtered list (the "next" shortcut)."""
    return worklist.following(conn, report_id, filters, tag_system=SITE_TAG, priorities=PRIORITIES)


def one(conn: psycopg.Connection[Any], report_id: str, *, models: dict[str, ModelDescription],
        sites: dict[str, Site], alerts: dict[str, dict[str, Any]]) -> Entry:
    """The entry of one report, whatever its status; raises resources.NotFound / Gone."""
    return entries(conn, [resources.read(conn, "DiagnosticReport", report_id)], models=models, sites=sites,
                   alerts=alerts)[0]


def waited_text(seconds: int, labels: dict[str, str]) -> str:
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} {labels['minutes']}"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} {labels['hours']} {minutes:02d} {labels['minutes']}"
    return f"{hours // 24} {labels['days']} {hours % 24} {labels['hours']}"
