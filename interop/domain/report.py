"""From model probabilities to FHIR: Device, one Observation per finding, DiagnosticReport.

Pure: ids and times come in as arguments, so the same inputs always give the same resources.
Every report is preliminary, names the model and its version, and says that it is
AI-generated and (for reference models) not clinically validated.
"""
from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from inference_client.models import ModelDescription

from .quality import NOT_ANALYSABLE, summary
from .vocabulary import (
    AI_DEVICE_EXTENSION,
    DIAGNOSTIC_SERVICE,
    DICOM_UID_SYSTEM,
    DISCLAIMER,
    IMAGING_CATEGORY,
    INTERPRETATION,
    MODEL_SYSTEM,
    NOT_VALIDATED,
    OBSERVATION_SYSTEM,
    REPORT_SYSTEM,
    SOURCE_IMAGE_EXTENSION,
    UCUM,
)

HUB_NS = uuid.UUID("6f1c2f0e-2d7b-4b53-9f5e-2a7c1b7d9e10")


@dataclass(frozen=True)
class Finding:
    key: str
    probability: float
    positive: bool
    critical: bool


def device_id(model: ModelDescription, version: str) -> str:
    return str(uuid.uuid5(HUB_NS, f"device|{model.name}|{version}"))


def findings(model: ModelDescription, probabilities: Sequence[float | None]) -> list[Finding | None]:
    """Apply each label's threshold (from mappings/, not code). None: not assessed (e.g. a breast
    with no view in the exam), reported as nothing rather than as negative."""
    if len(probabilities) != len(model.labels):
        raise ValueError(f"{model.name}: {len(probabilities)} outputs for {len(model.labels)} labels")
    out: list[Finding | None] = []
    for label, p in zip(model.labels, probabilities):
        if p is None:
            out.append(None)
            continue
        positive = float(p) >= label.threshold
        out.append(Finding(label.key, round(float(p), 4), positive, positive and label.critical))
    return out


def device_uid(model: ModelDescription, version: str) -> str:
    """The model's DICOM Device UID (the SR's Contributing Equipment, IHE AIR): a new one whenever
    the model or its version changes."""
    return f"2.25.{uuid.UUID(device_id(model, version)).int}"


def device(model: ModelDescription, version: str) -> dict[str, Any]:
    notes = [{"text": f"AI imaging model {model.name} served by NVIDIA Triton as {model.triton_model}."}]
    if model.reference_model:
        notes.append({"text": NOT_VALIDATED["en"]})
    return {
        "resourceType": "Device",
        "id": device_id(model, version),
        "identifier": [{"system": MODEL_SYSTEM, "value": f"{model.name}@{version}"},
                       {"system": "urn:dicom:uid", "value": f"urn:oid:{device_uid(model, version)}"}],
        "status": "active",
        "deviceName": [
            {"name": model.display.en, "type": "user-friendly-name"},
            {"name": model.name, "type": "model-name"},
        ],
        "modelNumber": model.name,
        "type": {"text": "AI software for medical image analysis"},
        "version": [{"value": version}],
        "note": notes,
    }


def _label_code(label: Any) -> dict[str, Any]:
    coding = [{"system": label.system, "code": label.code, "display": label.display.en}] if label.code else []
    concept: dict[str, Any] = {"text": label.display.en}
    if coding:
        concept["coding"] = coding
    return concept


def _interpretation(finding: Finding) -> list[dict[str, Any]]:
    code = ("POS", "Positive") if finding.positive else ("NEG", "Negative")
    out = [{"coding": [{"system": INTERPRETATION, "code": code[0], "display": code[1]}]}]
    if finding.critical:
        out.append({"coding": [{"system": INTERPRETATION, "code": "AA", "display": "Critical abnormal"}]})
    return out


def conclusion(model: ModelDescription, version: str, found: list[Finding | None], category: Any = None) -> str:
    labels = {label.key: label for label in model.labels}
    positives = [f for f in found if f is not None and f.positive]
    lines = [f"{DISCLAIMER['en']} {DISCLAIMER['vi']}",
             f"Model: {model.name} {version}." + (f" {NOT_VALIDATED['en']}" if model.reference_model else "")]
    if positives:
        parts = [f"{labels[f.key].display.en} / {labels[f.key].display.vi} (p={f.probability:.2f}"
                 + (", CRITICAL" if f.critical else "") + ")" for f in positives]
        lines.append("Findings above threshold: " + "; ".join(parts) + ".")
    else:
        lines.append("No finding above threshold. / Không có phát hiện vượt ngưỡng.")
    if category is not None:
        lines.append(f"Assessment: {category.display.en} / {category.display.vi}.")
    return "\n".join(lines)


def _report_code(model: ModelDescription) -> dict[str, Any]:
    code: dict[str, Any] = {"text": model.report_code.display}
    if model.report_code.code:
        code["coding"] = [{"system": model.report_code.system, "code": model.report_code.code,
                           "display": model.report_code.display}]
    return code


def _category_observation(oid: str, model: ModelDescription, version: str, category: Any, study: dict[str, Any],
                          study_ref: dict[str, str], dev_ref: dict[str, str], study_uid: str, effective: str,
                          issued: str) -> dict[str, Any]:
    """The assessment category (e.g. BI-RADS-like) the model's score falls in, from mappings/."""
    value: dict[str, Any] = {"text": f"{category.display.en} / {category.display.vi}"}
    if category.code and model.categories and model.categories.system:
        value["coding"] = [{"system": model.categories.system, "code": category.code, "display": category.display.en}]
    obs: dict[str, Any] = {
        "resourceType": "Observation", "id": oid,
        "identifier": [{"system": OBSERVATION_SYSTEM, "value": f"{study_uid}/{model.name}/category"}],
        "status": "preliminary",
        "category": [IMAGING_CATEGORY],
        "code": {"text": "AI assessment category (reference model, not a BI-RADS assessment)"},
        "effectiveDateTime": effective, "issued": issued, "valueCodeableConcept": value,
        "method": {"text": f"AI inference, {model.name} {version}, highest score banded by mappings/"},
        "device": dev_ref, "derivedFrom": [study_ref],
    }
    if "subject" in study:
        obs["subject"] = study["subject"]
    return obs


def build(
    *,
    study: dict[str, Any],
    study_uid: str,
    model: ModelDescription,
    version: str,
    probabilities: Sequence[float],
    report_id: str,
    observation_ids: Sequence[str],
    issued: str,
    sources: Sequence[str] = (),
) -> dict[str, Any]:
    """{'device': …, 'observations': […], 'report': …} for one study and one model; `sources` are
    the SOP Instance UIDs of the images the model was given."""
    found = findings(model, probabilities)
    assessed = [p for p in probabilities if p is not None]
    category = model.categories.category(assessed) if model.categories and assessed else None
    dev = device(model, version)
    dev_ref = {"reference": f"Device/{dev['id']}", "display": f"{model.name} {version}"}
    study_ref = {"reference": f"ImagingStudy/{study['id']}"}
    effective = study.get("started", issued)
    observations = []
    for oid, label, finding in zip(observation_ids, model.labels, found):
        if finding is None:
            continue
        obs: dict[str, Any] = {
            "resourceType": "Observation",
            "id": oid,
            "identifier": [{"system": OBSERVATION_SYSTEM, "value": f"{study_uid}/{model.name}/{label.key}"}],
            "status": "preliminary",
            "category": [IMAGING_CATEGORY],
            "code": _label_code(label),
            "effectiveDateTime": effective,
            "issued": issued,
            "valueQuantity": {"value": finding.probability, "unit": "probability",
                              "system": UCUM, "code": "1"},
            "interpretation": _interpretation(finding),
            "method": {"text": f"AI inference, {model.name} {version}, positive at p >= {label.threshold}"},
            "device": dev_ref,
            "derivedFrom": [study_ref],
        }
        if "subject" in study:
            obs["subject"] = study["subject"]
        observations.append(obs)
    if category is not None:
        observations.append(_category_observation(observation_ids[-1] if len(observation_ids) > len(model.labels)
                                                  else f"{report_id}-category", model, version, category,
                                                  study, study_ref, dev_ref, study_uid, effective, issued))
    report = _preliminary_report(report_id, model, study, study_uid, dev_ref, sources, effective, issued,
                                 conclusion(model, version, found, category))
    report["result"] = [{"reference": f"Observation/{o['id']}", "display": o["code"]["text"]} for o in observations]
    if any(f is not None and f.critical for f in found):
        report["conclusionCode"] = [{"coding": [{"system": INTERPRETATION, "code": "AA",
                                                 "display": "Critical abnormal"}],
                                     "text": "Critical finding suspected by AI"}]
    return {"device": dev, "observations": observations, "report": report}


def not_analysable_conclusion(model: ModelDescription, version: str, reasons: Sequence[str]) -> str:
    """What a report says when the quality gate refused the images: never "no finding"."""
    return "\n".join([
        f"{DISCLAIMER['en']} {DISCLAIMER['vi']}",
        f"Model: {model.name} {version}." + (f" {NOT_VALIDATED['en']}" if model.reference_model else ""),
        "NOT ANALYSABLE: the AI did not read these images. / KHÔNG PHÂN TÍCH ĐƯỢC: AI không đọc các ảnh này.",
        "Reason: " + summary(reasons) + ".",
        "The images need a radiologist's reading (or a repeat acquisition). / Cần bác sĩ đọc ảnh hoặc chụp lại.",
    ])


def not_analysable(*, study: dict[str, Any], study_uid: str, model: ModelDescription, version: str,
                   reasons: Sequence[str], report_id: str, issued: str,
                   sources: Sequence[str] = ()) -> dict[str, Any]:
    """{'device': …, 'observations': [], 'report': …}: the report of a study whose images the
    quality gate refused. Preliminary like every AI report, with no finding Observation (the model
    read nothing), the reasons in the conclusion and a conclusionCode saying "not analysable"."""
    dev = device(model, version)
    dev_ref = {"reference": f"Device/{dev['id']}", "display": f"{model.name} {version}"}
    report = _preliminary_report(report_id, model, study, study_uid, dev_ref, sources, study.get("started", issued),
                                 issued, not_analysable_conclusion(model, version, reasons))
    report["conclusionCode"] = [{"coding": [dict(NOT_ANALYSABLE)],
                                 "text": "Not analysable: " + summary(reasons)}]
    return {"device": dev, "observations": [], "report": report}


def _preliminary_report(report_id: str, model: ModelDescription, study: dict[str, Any], study_uid: str,
                        dev_ref: dict[str, str], sources: Sequence[str], effective: str, issued: str,
                        text: str) -> dict[str, Any]:
    """What every AI report holds, read or not: its model (Device), the images it was given, its
    identity (one per study and model), preliminary status, the study, patient and order."""
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": report_id,
        "extension": [{"url": AI_DEVICE_EXTENSION, "valueReference": dev_ref},
                      *({"url": SOURCE_IMAGE_EXTENSION,
                         "valueIdentifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}}
                        for uid in dict.fromkeys(sources))],
        "identifier": [{"system": REPORT_SYSTEM, "value": f"{study_uid}/{model.name}"}],
        "status": "preliminary",
        "category": [{"coding": [{"system": DIAGNOSTIC_SERVICE, "code": "RAD", "display": "Radiology"}]}],
        "code": _report_code(model),
        "effectiveDateTime": effective,
        "issued": issued,
        "imagingStudy": [{"reference": f"ImagingStudy/{study['id']}"}],
        "conclusion": text,
    }
    if "subject" in study:
        report["subject"] = study["subject"]
    if study.get("basedOn"):
        report["basedOn"] = study["basedOn"]
    return report


def is_not_analysable(report: dict[str, Any]) -> bool:
    """Whether the quality gate refused the report's images."""
    return any(c.get("system") == NOT_ANALYSABLE["system"] and c.get("code") == NOT_ANALYSABLE["code"]
               for cc in report.get("conclusionCode") or [] for c in cc.get("coding") or [])
