"""The report builder (pure) with the shipped model description: thresholds, critical marks,
and valid FHIR R4 by two validators (fhir.resources R4B and HL7's JSON schema)."""
from __future__ import annotations

from typing import Any

from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation

from inference_client.models import load_models
from interop.domain import report
from tests.helpers import ROOT as REPO_ROOT

MODEL = load_models(REPO_ROOT / "mappings")["chest-xray"]
STUDY = {"resourceType": "ImagingStudy", "id": "s1", "status": "available",
         "subject": {"reference": "Patient/p1"}, "basedOn": [{"reference": "ServiceRequest/o1"}],
         "started": "2026-11-20T08:00:00+07:00"}


def build(probabilities: list[float]) -> dict[str, Any]:
    return report.build(study=STUDY, study_uid="1.2.3", model=MODEL, version="9.9", probabilities=probabilities,
                        report_id="r1", observation_ids=[f"o{i}" for i in range(len(MODEL.labels))],
                        issued="2026-11-20T08:05:00+07:00")


def test_thresholds_and_critical_come_from_mappings(fhir_validate: Any) -> None:
    critical = [i for i, label in enumerate(MODEL.labels) if label.critical]
    assert critical, "the chest model marks at least one critical finding (pneumothorax)"
    probs = [0.01] * len(MODEL.labels)
    probs[critical[0]] = 0.97
    built = build(probs)
    rep = built["report"]
    assert rep["status"] == "preliminary"
    assert rep["basedOn"] == STUDY["basedOn"] and rep["subject"] == STUDY["subject"]
    assert rep["conclusionCode"][0]["coding"][0]["code"] == "AA"
    assert "CRITICAL" in rep["conclusion"] and MODEL.labels[critical[0]].display.vi in rep["conclusion"]
    flagged = [o for o in built["observations"] if any(c["code"] == "AA" for i in o["interpretation"] for c in i["coding"])]
    assert [o["code"]["text"] for o in flagged] == [MODEL.labels[critical[0]].display.en]
    for obs in built["observations"]:
        Observation.model_validate(obs)
        assert fhir_validate(obs) == []
    DiagnosticReport.model_validate(rep)
    assert fhir_validate(rep) == [] and fhir_validate(built["device"]) == []


def test_no_positive_finding() -> None:
    rep = build([0.0] * len(MODEL.labels))["report"]
    assert "No finding above threshold" in rep["conclusion"]
    assert "conclusionCode" not in rep


def test_threshold_is_inclusive_and_label_count_is_checked() -> None:
    probs = [label.threshold for label in MODEL.labels]
    assert all(f.positive for f in report.findings(MODEL, probs))
    try:
        report.findings(MODEL, probs[:-1])
    except ValueError as exc:
        assert "labels" in str(exc)
    else:
        raise AssertionError("a short output vector must be refused")


def test_device_names_model_and_version() -> None:
    dev = build([0.1] * len(MODEL.labels))["device"]
    assert dev["version"] == [{"value": "9.9"}]
    assert dev["id"] == report.device_id(MODEL, "9.9") != report.device_id(MODEL, "9.8")
