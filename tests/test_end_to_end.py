"""The walking skeleton, end to end, with every component real: `interop serve` on PostgreSQL,
the bundled Triton, Orthanc over DICOMweb, and an independent FHIR client (fhirpy)."""
from __future__ import annotations

from typing import Any

import pytest
from fhirpy import SyncFHIRClient

from inference_client.models import load_models
from tests.helpers import ROOT as REPO_ROOT
from tests.helpers import chest_study_in_pacs, study_resource, wait_for

TERMINAL = ("completed", "failed", "rejected", "cancelled")


def finished_task(client: SyncFHIRClient, study_id: str, timeout: float = 90) -> dict[str, Any]:
    def done() -> Any:
        tasks = client.resources("Task").search(focus=f"ImagingStudy/{study_id}").fetch()
        return tasks[0] if tasks and tasks[0]["status"] in TERMINAL else None

    return dict(wait_for(done, timeout, what=f"analysis of ImagingStudy/{study_id}").serialize())


def test_study_to_preliminary_report(hub: Any, orthanc: Any, fhir_validate: Any) -> None:
    client = SyncFHIRClient(hub.fhir, authorization=f"Bearer {hub.token}")
    patient = client.resource("Patient", identifier=[{"system": "urn:test:mrn", "value": "E2E-1"}], gender="female")
    patient.save()
    ds = chest_study_in_pacs(orthanc, seed=11, patient_id="E2E-1")
    study = client.resource("ImagingStudy", **study_resource([ds], patient.id, orthanc.dicomweb_url))
    study.save()

    task = finished_task(client, study.id)
    assert task["status"] == "completed", task.get("statusReason")
    report_ref = task["output"][0]["valueReference"]["reference"]

    bundle = hub.session.get(f"{hub.fhir}/DiagnosticReport", params={
        "patient": patient.id, "_include": "DiagnosticReport:result"}, timeout=10).json()
    reports = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "match"]
    observations = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "include"]
    assert [f"DiagnosticReport/{r['id']}" for r in reports] == [report_ref]
    report = reports[0]

    model = load_models(REPO_ROOT / "mappings")["chest-xray"]
    assert report["status"] == "preliminary"
    assert report["subject"] == {"reference": f"Patient/{patient.id}"}
    assert report["imagingStudy"] == [{"reference": f"ImagingStudy/{study.id}"}]
    assert report["code"]["coding"][0] == {"system": "http://loinc.org", "code": model.report_code.code,
                                           "display": model.report_code.display}
    assert report["category"][0]["coding"][0]["code"] == "RAD"
    assert "AI-generated preliminary result" in report["conclusion"]
    assert "not clinically validated" in report["conclusion"]
    assert f"{model.name} {model.version}" in report["conclusion"]
    assert len(observations) == len(model.labels) == len(report["result"])
    assert {f"Observation/{o['id']}" for o in observations} == {r["reference"] for r in report["result"]}

    by_text = {o["code"]["text"]: o for o in observations}
    for label in model.labels:
        obs = by_text[label.display.en]
        p = obs["valueQuantity"]["value"]
        assert 0.0 < p < 1.0
        assert obs["status"] == "preliminary"
        assert obs["derivedFrom"] == [{"reference": f"ImagingStudy/{study.id}"}]
        assert obs["subject"] == {"reference": f"Patient/{patient.id}"}
        codes = {c["code"] for i in obs["interpretation"] for c in i["coding"]}
        assert ("POS" in codes) == (p >= label.threshold)
        assert ("AA" in codes) == (p >= label.threshold and label.critical)
        if label.code:
            assert obs["code"]["coding"][0]["code"] == label.code

    device_ref = observations[0]["device"]["reference"]
    device = client.reference(reference=device_ref).to_resource()
    assert device["version"][0]["value"] == model.version
    assert any(n["name"] == model.name for n in device["deviceName"])
    assert any("not clinically validated" in n["text"] for n in device["note"])

    for resource in [report, *observations, dict(device.serialize())]:
        assert fhir_validate(resource) == [], resource["resourceType"]

    # The report is searchable the ways a HIS looks for it.
    by_study_subject = client.resources("DiagnosticReport").search(subject=f"Patient/{patient.id}",
                                                                   status="preliminary").fetch()
    assert [r.id for r in by_study_subject] == [report["id"]]
    later = hub.session.get(f"{hub.fhir}/DiagnosticReport", params={
        "_lastUpdated": f"gt{report['meta']['lastUpdated']}"}, timeout=10).json()
    assert later["total"] == 0


def test_resend_does_not_analyse_twice(hub: Any, orthanc: Any) -> None:
    client = SyncFHIRClient(hub.fhir, authorization=f"Bearer {hub.token}")
    ds = chest_study_in_pacs(orthanc, seed=12)
    body = study_resource([ds], "resend-patient", orthanc.dicomweb_url)
    criteria = f"identifier=urn:dicom:uid|urn:oid:{ds.StudyInstanceUID}"
    headers = {"Content-Type": "application/fhir+json", "If-None-Exist": criteria}
    first = hub.session.post(f"{hub.fhir}/ImagingStudy", json=body, headers=headers, timeout=10)
    second = hub.session.post(f"{hub.fhir}/ImagingStudy", json=body, headers=headers, timeout=10)
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["id"] == second.json()["id"]
    finished_task(client, first.json()["id"])
    reports = client.resources("DiagnosticReport").search(subject="Patient/resend-patient").fetch_all()
    assert len(reports) == 1


def test_instances_that_are_not_images(hub: Any, orthanc: Any) -> None:
    from pydicom.uid import generate_uid

    from scripts.synthetic.dicom import dataset_bytes, make_chest_xray, make_non_image

    client = SyncFHIRClient(hub.fhir, authorization=f"Bearer {hub.token}")
    # A structured report alone: no model reads it, recorded as not analysed.
    sr = make_non_image(generate_uid())
    orthanc.upload(dataset_bytes(sr))
    study = client.resource("ImagingStudy", **study_resource([sr], "sr-patient", orthanc.dicomweb_url))
    study.save()
    task = finished_task(client, study.id)
    assert task["status"] == "rejected"
    assert task["statusReason"]["text"].startswith("not analysed: no model for SR")

    # A chest DX whose pixel data is missing: routed to the chest model, then a clear failure.
    broken = make_chest_xray(seed=15, size=256)
    del broken.PixelData
    orthanc.upload(dataset_bytes(broken))
    study = client.resource("ImagingStudy", **study_resource([broken], "nopixels", orthanc.dicomweb_url))
    study.save()
    task = finished_task(client, study.id)
    assert task["status"] == "failed"
    assert "NotAnImage" in task["statusReason"]["text"]
    assert client.resources("DiagnosticReport").search(subject="Patient/sr-patient").fetch() == []
    assert client.resources("DiagnosticReport").search(subject="Patient/nopixels").fetch() == []

    # and the next good study still goes through
    good = chest_study_in_pacs(orthanc, seed=13)
    study2 = client.resource("ImagingStudy", **study_resource([good], "after-sr", orthanc.dicomweb_url))
    study2.save()
    assert finished_task(client, study2.id)["status"] == "completed"


def test_unreachable_pacs_is_retried_then_failed_with_reason(hub: Any) -> None:
    client = SyncFHIRClient(hub.fhir, authorization=f"Bearer {hub.token}")
    from scripts.synthetic.dicom import make_chest_xray

    ds = make_chest_xray(seed=14, size=256)
    dead = "http://127.0.0.1:9/dicom-web"  # discard port: nothing listens
    study = client.resource("ImagingStudy", **study_resource([ds], "dead-pacs", dead))
    study.save()
    task = finished_task(client, study.id, timeout=60)
    assert task["status"] == "failed"
    assert "PacsUnavailable" in task["statusReason"]["text"]
    job = hub.session.get(f"{hub.base}/metrics", timeout=10).text
    assert 'interop_jobs{status="failed"} 1.0' in job


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/fhir/metadata"])
def test_operational_endpoints(hub: Any, path: str) -> None:
    response = hub.session.get(hub.base + path, timeout=10)
    assert response.status_code == 200


def test_bad_input_over_http_keeps_the_hub_serving(hub: Any) -> None:
    big = b'{"resourceType":"ImagingStudy","description":"' + b"x" * (20 * 1024 * 1024) + b'"}'
    response = hub.session.post(f"{hub.fhir}/ImagingStudy", data=big,
                             headers={"Content-Type": "application/fhir+json"}, timeout=60)
    assert response.status_code == 413
    assert response.json()["resourceType"] == "OperationOutcome"
    for body, ctype, status in [(b"\x00\xff garbage", "application/fhir+json", 400),
                                (b"<ImagingStudy/>", "application/xml", 415)]:
        response = hub.session.post(f"{hub.fhir}/ImagingStudy", data=body, headers={"Content-Type": ctype}, timeout=10)
        assert response.status_code == status
        assert response.json()["resourceType"] == "OperationOutcome"
    assert hub.session.get(f"{hub.fhir}/metadata", timeout=10).status_code == 200


def test_a_study_posted_before_its_images_waits_for_them(hub: Any, orthanc: Any) -> None:
    """The HIS posts the study as the modality starts sending: the hub looks for the images until
    they come (the site's pacs_wait_minutes, else INTEROP_PACS_WAIT_MINUTES), as for an HL7 order."""
    from scripts.synthetic.dicom import dataset_bytes, make_chest_xray

    client = SyncFHIRClient(hub.fhir, authorization=f"Bearer {hub.token}")
    ds = make_chest_xray(seed=16, size=256)
    study = client.resource("ImagingStudy", **study_resource([ds], "early", orthanc.dicomweb_url))
    study.save()

    def waiting() -> Any:
        tasks = client.resources("Task").search(focus=f"ImagingStudy/{study.id}").fetch()
        return tasks and (tasks[0].get("businessStatus") or {}).get("text") == "waiting for the images in the PACS"

    wait_for(waiting, 30, what="the analysis to wait for the images")
    orthanc.upload(dataset_bytes(ds))  # the modality's images arrive
    task = finished_task(client, study.id, timeout=60)
    assert task["status"] == "completed", task.get("statusReason")
    assert len(client.resources("DiagnosticReport").search(subject="Patient/early").fetch()) == 1
