"""What the worklist shows: AI reports waiting for review, critical first, then the longest waiting.

Reads the store (one query for the reports, one for everything they point at) and turns it into
plain rows for the templates; no HTTP here. A report waits while it is `preliminary`; it is
critical when its conclusionCode or one of its Observations' interpretations says `AA`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg

from inference_client.models import ModelDescription

from ..domain.report import is_not_analysable
from ..domain.vocabulary import REPORT_SYSTEM, codes, is_critical, is_critical_finding, site_of
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
    linked = {f"{b['resourceType']}/{b['id']}": b for b in resources.read_many(conn, [r for r in refs if r])}
    out = []
    for report in reports:
        observations = [linked[r] for r in (_ref_id(x) for x in report.get("result", [])) if r in linked]
        study = linked.get(_ref_id((report.get("imagingStudy") or [{}])[0]))
        model = _model_of(report, models)
        modality, body_part, study_date = _study_facts(study)
        patient, identifier = _patient(report, linked)
        out.append(Entry(
            report=report, critical=is_critical(report, observations), issued=parse_instant(report.get("issued")),
            patient=patient, patient_identifier=identifier, modality=modality, body_part=body_part,
            study_date=study_date or str(report.get("effectiveDateTime", ""))[:10],
            facility=_facility(report, study, sites),
            model=(model.display.en if model else _ref_id(report.get("extension", [{}])[0].get("valueReference"))),
            findings=[finding_row(o, model) for o in observations if "valueQuantity" in o or "valueBoolean" in o],
            alert=alerts.get(str(report["id"])), site=_site_code(report, study),
            not_analysable=_refused(report)))
    return out


def waiting(conn: psycopg.Connection[Any], *, models: dict[str, ModelDescription], sites: dict[str, Site],
            alerts: dict[str, dict[str, Any]], limit: int = LIMIT) -> tuple[int, list[Entry]]:
    """(how many wait, the first `limit` of them): critical first, then the oldest `issued` first."""
    total, reports = worklist.waiting_reports(conn, limit)
    found = entries(conn, reports, models=models, sites=sites, alerts=alerts)
    never = datetime.max.replace(tzinfo=UTC)
    # Python re-sorts because an Observation marked AA also makes a report critical.
    found.sort(key=lambda e: (not e.critical, e.issued or never))
    return total, found


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
