"""Each model family end to end through the real hub: realistic DICOM made by a script goes to
the PACS, a FHIR ImagingStudy is posted, the routing picks the model, and the report carries its
coded findings. Critical findings are checked with a site's own thresholds (mappings are data):
a copy of mappings/ where the critical labels' thresholds are 0 must mark them critical."""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEGLSLossless, RLELossless, generate_uid

from inference_client.models import load_models
from scripts.synthetic import dicom as synthetic
from tests.fixtures.hub import HubProcess, start_hub, stop_hub
from tests.helpers import ROOT as REPO_ROOT
from tests.helpers import study_resource, wait_for

MODELS = load_models(REPO_ROOT / "mappings")


@pytest.fixture
def eager_mappings(tmp_path: Path) -> Path:
    """mappings/ with every critical label's threshold at 0: the site says 'flag everything'."""
    target = tmp_path / "mappings"
    shutil.copytree(REPO_ROOT / "mappings", target)
    for path in (target / "models").glob("*.yaml"):
        data = yaml.safe_load(path.read_text())
        for label in data["labels"]:
            if label.get("critical"):
                label["threshold"] = 0.0
        path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    return target


@pytest.fixture
def family_hub(db_url: str, triton_url: str, orthanc: Any, eager_mappings: Path, tmp_path: Path) -> Iterator[HubProcess]:
    hub = start_hub({"DATABASE_URL": db_url, "TRITON_URL": triton_url, "DICOMWEB_URL": orthanc.dicomweb_url,
                     "INTEROP_MAPPINGS_DIR": str(eager_mappings), "INTEROP_JOB_MAX_ATTEMPTS": "2",
                     "INTEROP_RETRY_BASE_SECONDS": "1"}, tmp_path)
    yield hub
    stop_hub(hub)


def analyse(hub: HubProcess, orthanc: Any, datasets: list[Dataset], patient: str) -> dict[str, Any]:
    for ds in datasets:
        orthanc.upload(synthetic.dataset_bytes(ds))
    created = hub.session.post(f"{hub.fhir}/ImagingStudy", json=study_resource(datasets, patient, orthanc.dicomweb_url),
                            timeout=30)
    assert created.status_code == 201, created.text
    sid = created.json()["id"]

    def done() -> Any:
        entries = hub.session.get(f"{hub.fhir}/Task", params={"focus": f"ImagingStudy/{sid}"}, timeout=10).json().get("entry")
        task = entries[0]["resource"] if entries else None
        return task if task and task["status"] in ("completed", "failed", "rejected") else None

    return wait_for(done, 120, what=f"analysis of {patient}")  # type: ignore[no-any-return]


def report_of(hub: HubProcess, task: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    assert task["status"] == "completed", task.get("statusReason")
    rid = task["output"][0]["valueReference"]["reference"].split("/")[1]
    bundle = hub.session.get(f"{hub.fhir}/DiagnosticReport", params={"_id": rid, "_include": "DiagnosticReport:result"},
                          timeout=10).json()
    return bundle["entry"][0]["resource"], [e["resource"] for e in bundle["entry"][1:]]


def check(report: dict[str, Any], observations: list[dict[str, Any]], name: str) -> None:
    model = MODELS[name]
    assert f"Model: {model.name} {model.version}" in report["conclusion"]
    if model.report_code.code:
        assert report["code"]["coding"][0]["code"] == model.report_code.code
    coded = {o["code"]["coding"][0]["code"] for o in observations if o["code"].get("coding")}
    assert {label.code for label in model.labels if label.code} <= coded
    critical = {label.display.en for label in model.labels if label.critical}
    flagged = {o["code"]["text"] for o in observations
               if any(c["code"] == "AA" for i in o.get("interpretation", []) for c in i["coding"])}
    assert flagged == critical
    if critical:
        assert report["conclusionCode"][0]["coding"][0]["code"] == "AA"


def test_spine_xray(family_hub: HubProcess, orthanc: Any) -> None:
    report, observations = report_of(family_hub, analyse(family_hub, orthanc, [synthetic.make_spine_xray(41)], "spine"))
    check(report, observations, "spine-xray")


def test_chest_xray_compressed(family_hub: HubProcess, orthanc: Any) -> None:
    ds = synthetic.compress(synthetic.make_chest_xray(42, size=1024), JPEGLSLossless)
    report, observations = report_of(family_hub, analyse(family_hub, orthanc, [ds], "chest-jls"))
    check(report, observations, "chest-xray")


def test_mammography_four_views(family_hub: HubProcess, orthanc: Any) -> None:
    exam = synthetic.make_mammography_exam(43, rows=1664, cols=1280)
    report, observations = report_of(family_hub, analyse(family_hub, orthanc, exam, "mammo"))
    check(report, observations, "mammography")
    category = [o for o in observations if "valueCodeableConcept" in o]
    assert len(category) == 1 and "Category" in category[0]["valueCodeableConcept"]["text"]
    assert "Assessment:" in report["conclusion"]


def test_mammography_one_breast_only(family_hub: HubProcess, orthanc: Any) -> None:
    exam = synthetic.make_mammography_exam(44, rows=1664, cols=1280, views=(("R", "CC"), ("R", "MLO")))
    report, observations = report_of(family_hub, analyse(family_hub, orthanc, exam, "mammo-right"))
    scored = [o for o in observations if "valueQuantity" in o]
    assert len(scored) == 1  # the left breast was not imaged: not reported as negative


def test_brain_ct_and_mr(family_hub: HubProcess, orthanc: Any) -> None:
    ct = synthetic.make_ct_head_series(45, slices=24, size=256, haemorrhage=True)
    report, observations = report_of(family_hub, analyse(family_hub, orthanc, ct, "brain-ct"))
    check(report, observations, "brain-ct")
    mr = synthetic.make_mr_brain_series(46, slices=20, size=192)
    report, observations = report_of(family_hub, analyse(family_hub, orthanc, mr, "brain-mr"))
    check(report, observations, "brain-mr")


def test_missing_slices_and_corrupt_pixels_fail_clearly(family_hub: HubProcess, orthanc: Any) -> None:
    gappy = synthetic.make_ct_head_series(47, slices=24, size=256, missing=[10, 11])
    task = analyse(family_hub, orthanc, gappy, "gappy")
    assert task["status"] == "failed" and "IncompleteSeries" in task["statusReason"]["text"]

    broken = synthetic.compress(synthetic.make_chest_xray(48, size=512), RLELossless)
    broken.SOPInstanceUID = generate_uid()
    broken.file_meta.MediaStorageSOPInstanceUID = broken.SOPInstanceUID
    frame = next(generate_frames(broken.PixelData, number_of_frames=1))
    broken.PixelData = encapsulate([frame[: len(frame) // 3]])  # a well-framed but truncated RLE stream
    task = analyse(family_hub, orthanc, [broken], "corrupt")
    assert task["status"] == "failed" and "NotAnImage" in task["statusReason"]["text"]
