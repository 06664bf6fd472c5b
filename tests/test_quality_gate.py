"""The image-quality gate (issue 15): the AI refuses images it cannot read.

First the gate's statistics on images made with numpy, then the real pipeline (`interop serve`,
Orthanc, Triton): an all-white, an all-black, a noise and a wrong-body-part chest radiograph are
reported "not analysable" with the reason (FHIR, the ORU built from the report), with no finding
Observation; the test chest image still reads normally.
"""
from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
import yaml
from fhirpy import SyncFHIRClient

from inference_client.models import load_models
from interop.dicom.pixels import to_display_array
from interop.dicom.study import imaging_study
from interop.domain import quality
from interop.domain import report as builder
from interop.hl7 import oru
from scripts.synthetic.dicom import dataset_bytes, make_chest_xray, make_mammography_exam
from tests.helpers import ROOT, study_resource, wait_for

LIMITS = quality.parse_limits(yaml.safe_load((ROOT / "mappings" / "quality.yaml").read_text()))
CHEST = quality.limits_for(LIMITS, "chest-xray")


def with_pixels(ds: Any, kind: str, seed: int = 0) -> Any:
    """The same chest radiograph (header, window) with other pixels: white, black, noise, burnt."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    low = int(ds.WindowCenter) - int(ds.WindowWidth) // 2
    high = int(ds.WindowCenter) + int(ds.WindowWidth) // 2
    rng = np.random.default_rng(seed)
    if kind == "white":
        pixels = np.full((rows, cols), 4095, dtype=np.uint16)
    elif kind == "black":
        pixels = np.zeros((rows, cols), dtype=np.uint16)
    elif kind == "noise":
        pixels = rng.integers(low, high, (rows, cols)).astype(np.uint16)
    elif kind == "burnt":  # overexposed: most of the film white, a little anatomy at one edge
        pixels = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(rows, cols).copy()
        pixels[:, cols // 8:] = 4095
    else:
        raise ValueError(kind)
    ds.PixelData = pixels.tobytes()
    return ds


@pytest.mark.parametrize(("kind", "reason"), [("white", "empty image: all white"), ("black", "empty image: all black"),
                                              ("noise", "noise image"), ("burnt", "saturated image")])
def test_gate_refuses_unreadable_pixels(kind: str, reason: str) -> None:
    image = to_display_array(with_pixels(make_chest_xray(seed=3, size=512), kind))
    said = quality.check_pixels(CHEST, image)
    assert said is not None and said.startswith(reason), said


@pytest.mark.parametrize("seed", [1, 2, 3, 11])
def test_gate_reads_the_test_images(seed: int) -> None:
    assert quality.check_pixels(CHEST, to_display_array(make_chest_xray(seed=seed, size=1024))) is None
    mammo = quality.limits_for(LIMITS, "mammography")
    for ds in make_mammography_exam(seed=seed):
        assert quality.check(mammo, ds.Modality, ds.BodyPartExamined, to_display_array(ds)) is None


def test_gate_reads_headers() -> None:
    assert quality.check_header(CHEST, "DX", "CHEST") is None
    assert quality.check_header(CHEST, "DX", "") is None  # no body part in the header: not refused for it
    assert quality.check_header(CHEST, "dx", " chest ") is None
    wrong = quality.check_header(CHEST, "DX", "ABDOMEN")
    assert wrong is not None and wrong.startswith("wrong body part") and "ABDOMEN" in wrong
    modality = quality.check_header(CHEST, "MR", "CHEST")
    assert modality is not None and modality.startswith("wrong modality")


def test_limits_are_checked() -> None:
    with pytest.raises(quality.QualityLimitsError, match="models.x.min_range"):
        quality.parse_limits({"models": {"x": {"min_range": "high"}}})
    with pytest.raises(quality.QualityLimitsError, match="unknown keys"):
        quality.parse_limits({"defaults": {"min_rnage": 0.1}})
    assert LIMITS["mammography"].max_clipped_fraction == 0.9
    assert LIMITS["chest-xray"].min_neighbour_correlation == LIMITS[""].min_neighbour_correlation
    assert set(load_models(ROOT / "mappings")) <= set(LIMITS)  # every model has its header rules


def test_not_analysable_report_and_oru() -> None:
    model = load_models(ROOT / "mappings")["chest-xray"]
    study = {"resourceType": "ImagingStudy", "id": "s1", "subject": {"reference": "Patient/p1"}}
    built = builder.not_analysable(study=study, study_uid="1.2.3", model=model, version="1",
                                   reasons=["empty image: all white (spread 0.000 < 0.02)"], report_id="r1",
                                   issued="2026-12-01T00:00:00+00:00", sources=["1.2.3.4"])
    report = built["report"]
    assert built["observations"] == [] and "result" not in report
    assert report["status"] == "preliminary"
    assert "NOT ANALYSABLE" in report["conclusion"] and "all white" in report["conclusion"]
    assert "No finding" not in report["conclusion"]
    assert builder.is_not_analysable(report)
    assert not builder.is_not_analysable({"conclusionCode": [{"coding": [{"code": "AA"}]}]})
    message = oru.build_oru(report, [], built["device"], None, sending_facility="HUB", receiving_application="HIS",
                            receiving_facility="SITE", control_id="C1", now=datetime(2026, 12, 1, tzinfo=UTC))
    segments = message.split("\r")
    assert not any(s.startswith("OBX") and "NM" == s.split("|")[2] for s in segments)  # no probability read
    impression = next(s for s in segments if s.startswith("OBX") and "19005-8" in s)
    assert "NOT ANALYSABLE" in impression and "all white" in impression


def _analyse(hub: Any, orthanc: Any, client: SyncFHIRClient, ds: Any, patient: str,
             procedure: bool = False, also: list[Any] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    orthanc.upload(dataset_bytes(ds))
    resource = study_resource([ds, *(also or [])], patient, orthanc.dicomweb_url)
    if procedure:  # routed by the order's procedure (chest), whatever the header says
        resource["procedureCode"] = [{"coding": [{"system": "http://loinc.org", "code": "36554-4"}]}]
    study = client.resource("ImagingStudy", **resource)
    study.save()

    def done() -> Any:
        tasks = client.resources("Task").search(focus=f"ImagingStudy/{study.id}").fetch()
        return tasks[0] if tasks and tasks[0]["status"] in ("completed", "failed", "rejected", "cancelled") else None

    task = wait_for(done, 120, what=f"analysis of ImagingStudy/{study.id}")
    assert task["status"] == "completed", task.get("statusReason")
    refs = [o["valueReference"]["reference"] for o in task.get("output", [])]
    assert len(refs) == 1, task
    report = hub.session.get(f"{hub.fhir}/{refs[0]}", timeout=10).json()
    observations = [hub.session.get(f"{hub.fhir}/{r['reference']}", timeout=10).json()
                    for r in report.get("result", [])]
    return report, observations


def test_unreadable_studies_are_not_analysable(hub: Any, orthanc: Any, fhir_validate: Any) -> None:
    client = SyncFHIRClient(hub.fhir, authorization=f"Bearer {hub.token}")
    patient = client.resource("Patient", identifier=[{"system": "urn:test:mrn", "value": "QG-1"}], gender="male")
    patient.save()
    model = load_models(ROOT / "mappings")["chest-xray"]

    readable, observations = _analyse(hub, orthanc, client, make_chest_xray(seed=21, size=512), patient.id)
    assert not builder.is_not_analysable(readable)
    assert len(observations) == len(model.labels) and "NOT ANALYSABLE" not in readable["conclusion"]

    cases = {"white": "empty image: all white", "black": "empty image: all black", "noise": "noise image"}
    for seed, (kind, reason) in enumerate(cases.items(), start=30):
        report, observations = _analyse(hub, orthanc, client, with_pixels(make_chest_xray(seed=seed, size=512), kind),
                                        patient.id)
        assert report["status"] == "preliminary"
        assert builder.is_not_analysable(report), (kind, report.get("conclusionCode"))
        assert reason in report["conclusion"] and reason in report["conclusionCode"][0]["text"], kind
        assert "No finding above threshold" not in report["conclusion"]
        assert observations == [] and not report.get("result"), kind
        assert fhir_validate(report) == []

    # one readable image and one noise image in the same study: read from the first, the report names the other
    good = make_chest_xray(seed=45, size=512)
    bad = with_pixels(make_chest_xray(seed=46, size=512, study_uid=str(good.StudyInstanceUID),
                                      series_uid=str(good.SeriesInstanceUID)), "noise")
    orthanc.upload(dataset_bytes(bad))
    mixed, observations = _analyse(hub, orthanc, client, good, patient.id, also=[bad])
    assert not builder.is_not_analysable(mixed) and len(observations) == len(model.labels)
    assert "1 image(s) not read by the AI: noise image" in mixed["conclusion"]
    read = [e["valueIdentifier"]["value"] for e in mixed["extension"] if "valueIdentifier" in e]
    assert read == [f"urn:oid:{good.SOPInstanceUID}"]  # the images the model read, not the refused one

    abdomen = make_chest_xray(seed=40, size=512)
    abdomen.BodyPartExamined = "ABDOMEN"
    report, observations = _analyse(hub, orthanc, client, abdomen, patient.id, procedure=True)
    assert builder.is_not_analysable(report) and "wrong body part" in report["conclusion"]
    assert "ABDOMEN" in report["conclusion"] and observations == []


def test_worklist_shows_not_analysable(login: Any, db_url: str) -> None:
    from interop.domain.vocabulary import site_tag
    from interop.store import resources
    from interop.store.db import connect
    from interop.store.search_params import load

    params = load(ROOT / "mappings")
    model = load_models(ROOT / "mappings")["chest-xray"]
    ds = make_chest_xray(seed=5, patient_id="QG-W", size=64)
    with connect(db_url, autocommit=True) as conn, conn.transaction():
        patient = resources.create(conn, {"resourceType": "Patient", "identifier": [
            {"system": "urn:test:mrn", "value": "QG-W"}]}, params["Patient"])
        body = imaging_study([ds], subject=f"Patient/{patient['id']}", endpoint_address=None)
        body["meta"] = {"tag": [site_tag("BVDKDN")]}
        study = resources.create(conn, body, params["ImagingStudy"])
        built = builder.not_analysable(study=study, study_uid=str(ds.StudyInstanceUID), model=model,
                                       version=model.version, reasons=["noise image: neighbouring pixels correlate"
                                                                       " at 0.00 (anatomy: above 0.5)"],
                                       report_id=resources.new_id(), issued=datetime.now(UTC).isoformat())
        resources.create(conn, built["device"], params["Device"], rid=built["device"]["id"])
        stored = resources.create(conn, built["report"], params["DiagnosticReport"], rid=built["report"]["id"])
    radiologist = login("radiologist")
    html = radiologist.get("/worklist/?lang=en").get_data(as_text=True)
    row = html[html.index(f'data-report="{stored["id"]}"'):]
    row = row[:row.index("</tr>")]
    assert "NOT ANALYSABLE" in row and "noise image" in row and "No finding above threshold" not in row
    page = radiologist.get(f"/worklist/{stored['id']}?lang=en").get_data(as_text=True)
    assert "NOT ANALYSABLE" in page and "noise image" in page


def test_not_analysable_sr_says_so(tmp_path: Any) -> None:
    """The AI result in the PACS (DICOM SR) says "not analysable": an SR with no finding would read
    as a negative result in a PACS viewer."""
    import highdicom as hd

    from interop.dicom import sr as srmod

    model = load_models(ROOT / "mappings")["chest-xray"]
    image = make_chest_xray(seed=9, size=64, patient_id="QG-SR")
    study = {"resourceType": "ImagingStudy", "id": "s1", "subject": {"reference": "Patient/p1"}}
    built = builder.not_analysable(study=study, study_uid=str(image.StudyInstanceUID), model=model, version="1",
                                   reasons=["noise image"], report_id="r-sr", issued="2026-12-01T00:00:00+00:00",
                                   sources=[str(image.SOPInstanceUID)])
    source = srmod.Source(study_uid=str(image.StudyInstanceUID), series_uid=str(image.SeriesInstanceUID),
                          sop_class_uid=str(image.SOPClassUID), sop_instance_uid=str(image.SOPInstanceUID))
    made = srmod.build_sr(report=built["report"], observations=[], device=built["device"],
                          header=srmod.header_from(image), sources=[source], version=1)
    path = tmp_path / "sr.dcm"
    path.write_bytes(srmod.to_bytes(made))
    from tests.test_dicom_sr import dciodvfy

    assert dciodvfy(path)[0] == []  # dicom3tools' IOD checker finds no error
    (group,) = hd.sr.srread(path).content.get_image_measurement_groups()
    (evaluation,) = group.get_qualitative_evaluations()
    assert (evaluation.value.value, evaluation.value.scheme_designator) == ("NOTANALYSABLE", "99IHUB")
