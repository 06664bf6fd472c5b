"""AI results the PACS can show: a DICOM Comprehensive 3D SR (TID 1500) per report version.

Content: SRs built from a real report (`interop.domain.report.build` with the shipped chest model,
as tests/test_oru.py) and a synthetic chest radiograph, checked by Debian's `dciodvfy` (no error)
and read back with highdicom and pydicom.

Delivery: through the outbox's `SITE:pacs` lane to a real Orthanc (STOW-RS, the `orthanc`
fixture, and one started late for "PACS down, then back") and to pynetdicom's Storage SCP
(C-STORE, `dicom_store`).
"""
from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Any

import highdicom as hd
import psycopg
import pytest
from pydicom import Dataset, dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage

from interop.dicom import sr as srmod
from interop.dicom.dicomweb import DicomWebClient
from interop.services import delivery, reports, review
from interop.store import queue as jobs
from interop.store import resources
from interop.store.resources import ANY_SYSTEM, Criterion, Query
from interop.workers.delivery import Deliverer
from scripts.peers.orthanc import Orthanc
from scripts.synthetic.dicom import dataset_bytes, make_chest_xray
from tests.helpers import context, delivery_row, free_port, time_passes
from tests.test_oru import MODEL, PARAMS, STUDY_UID, built_report

RADIOLOGIST = "Trần Thị Bình"


def source_images(n: int = 2) -> list[Dataset]:
    first = make_chest_xray(seed=11, size=64, study_uid=STUDY_UID, accession="ACC-1", patient_id="BN-0042",
                            patient_name="Nguyễn^Văn An", patient_sex="M", patient_birth_date="19800517")
    out = [first]
    for i in range(1, n):
        out.append(make_chest_xray(seed=11 + i, size=64, study_uid=STUDY_UID, accession="ACC-1", patient_id="BN-0042",
                                   patient_name="Nguyễn^Văn An", patient_sex="M", patient_birth_date="19800517",
                                   series_uid=first.SeriesInstanceUID))
    return out


def sources_of(images: list[Dataset]) -> list[srmod.Source]:
    return [srmod.Source(d.StudyInstanceUID, d.SeriesInstanceUID, str(d.SOPClassUID), d.SOPInstanceUID) for d in images]


def signed(report: dict[str, Any]) -> dict[str, Any]:
    return {**report, "status": "final", "resultsInterpreter": [{"display": RADIOLOGIST}],
            "issued": "2026-11-20T09:30:00+07:00"}


def build(report: dict[str, Any], observations: list[dict[str, Any]], device: dict[str, Any],
          images: list[Dataset], version: int) -> Dataset:
    return srmod.build_sr(report=report, observations=observations, device=device, header=srmod.header_from(images[0]),
                          sources=sources_of(images), version=version, institution="BVDKDN")


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) of dicom3tools' IOD checker."""
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (done.stdout + done.stderr).splitlines()
    return [x for x in lines if x.startswith("Error")], [x for x in lines if x.startswith("Warning")]


def written(tmp_path: Path, sr: Dataset, name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(srmod.to_bytes(sr))
    return path


def content_items(ds: Dataset) -> list[Dataset]:
    out = []
    for item in ds.get("ContentSequence") or []:
        out.append(item)
        out.extend(content_items(item))
    return out


def air_item(ds: Dataset) -> Dataset:
    items = [i for i in ds.ContributingEquipmentSequence
             if i.PurposeOfReferenceCodeSequence[0].CodeValue == srmod.AIR_PROCESSING_ALGORITHM[0]]
    assert len(items) == 1
    return items[0]


@pytest.mark.parametrize("state", ["preliminary", "signed"])
def test_sr_passes_dciodvfy_and_reads_back(tmp_path: Path, state: str) -> None:
    built = built_report()
    report = built["report"] if state == "preliminary" else signed(built["report"])
    images = source_images()
    path = written(tmp_path, build(report, built["observations"], built["device"], images, 1), f"{state}.dcm")

    errors, warnings = dciodvfy(path)
    assert errors == [], errors
    assert all("99IHUB" in w or "Device UID" in w or "Standard Extended" in w for w in warnings), warnings

    raw = dcmread(path)
    assert raw.SOPClassUID == srmod.COMPREHENSIVE_3D_SR and raw.Modality == "SR"
    again = hd.sr.srread(path)
    assert isinstance(again, hd.sr.Comprehensive3DSR)
    assert isinstance(hd.sr.Comprehensive3DSR.from_dataset(raw), hd.sr.Comprehensive3DSR)
    # the same study and patient as the images
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber", "StudyDate", "PatientBirthDate"):
        assert raw.get(keyword) == images[0].get(keyword), keyword
    assert str(raw.PatientName) == "Nguyễn^Văn An"
    # the template: a TID 1500 Measurement Report
    assert raw.ConceptNameCodeSequence[0].CodeValue == "126000"
    assert raw.ContentTemplateSequence[0].TemplateIdentifier == "1500"

    # the AIR identity of the algorithm
    item = air_item(raw)
    code = item.PurposeOfReferenceCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == ("Newcode1", "99IHE", "Processing Algorithm")
    assert item.ManufacturerModelName == MODEL.name and item.SoftwareVersions == MODEL.version
    assert item.Manufacturer == srmod.HUB_MANUFACTURER
    fhir_uid = next(i["value"] for i in built["device"]["identifier"] if i["system"] == "urn:dicom:uid")
    assert fhir_uid == f"urn:oid:{item.DeviceUID}"
    # ... and as the observer device
    observer_uids = [i.UID for i in content_items(raw) if i.ConceptNameCodeSequence[0].CodeValue == "121012"]
    assert observer_uids == [item.DeviceUID]


def test_findings_and_probabilities_with_their_codes(tmp_path: Path) -> None:
    built = built_report()
    images = source_images()
    path = written(tmp_path, build(built["report"], built["observations"], built["device"], images, 1), "sr.dcm")
    sr = hd.sr.srread(path)
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == len(built["observations"])
    by_code = {g.finding_type.value: g for g in groups}
    for obs in built["observations"]:
        coding = (obs["code"].get("coding") or [None])[0]
        if coding is None:  # a label with no verified code: a local code, the label as meaning
            group = next(g for g in groups if g.finding_type.meaning == obs["code"]["text"])
            assert group.finding_type.scheme_designator == "99IHUB"
        else:
            group = by_code[coding["code"]]
            assert group.finding_type.scheme_designator == "SCT"
        if "valueQuantity" in obs:
            (measurement,) = group.get_measurements()
            assert measurement.name.value == "122157"  # DCM Probability
            assert measurement.value == pytest.approx(obs["valueQuantity"]["value"])
            assert measurement.unit.value == "1"
            (evaluation,) = group.get_qualitative_evaluations()
            positive = any(c["code"] == "POS" for i in obs["interpretation"] for c in i["coding"])
            assert evaluation.value.value == ("52101004" if positive else "272519000")
        # the images it read
        assert {i.referenced_sop_instance_uid for i in group.source_images} == {d.SOPInstanceUID for d in images}
    # the probabilities of the example: one critical positive, one positive
    values = sorted(g.get_measurements()[0].value for g in groups if g.get_measurements())
    assert values[-2:] == [pytest.approx(0.81), pytest.approx(0.97)]
    raw = dcmread(path)
    evidence = {i.ReferencedSOPInstanceUID for s in raw.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert evidence == {d.SOPInstanceUID for d in images}
    series = {se.SeriesInstanceUID for s in raw.CurrentRequestedProcedureEvidenceSequence for se in s.ReferencedSeriesSequence}
    assert series == {images[0].SeriesInstanceUID}


def test_status_flags_follow_the_review(tmp_path: Path) -> None:
    built = built_report()
    images = source_images(1)
    prelim = dcmread(written(tmp_path, build(built["report"], built["observations"], built["device"], images, 1), "1.dcm"))
    assert (prelim.CompletionFlag, prelim.VerificationFlag, prelim.PreliminaryFlag) == ("PARTIAL", "UNVERIFIED", "PRELIMINARY")
    assert "VerifyingObserverSequence" not in prelim
    final = dcmread(written(tmp_path, build(signed(built["report"]), built["observations"], built["device"], images, 2),
                            "2.dcm"))
    assert (final.CompletionFlag, final.VerificationFlag, final.PreliminaryFlag) == ("COMPLETE", "VERIFIED", "FINAL")
    assert str(final.VerifyingObserverSequence[0].VerifyingObserverName) == "Bình^Trần Thị"
    assert final.ContentDate == "20261120" and final.ContentTime == "093000"
    # one series per report, one instance per version; the same version is the same object
    assert final.SeriesInstanceUID == prelim.SeriesInstanceUID and final.SOPInstanceUID != prelim.SOPInstanceUID
    assert final.InstanceNumber == 2
    again = build(signed(built["report"]), built["observations"], built["device"], images, 2)
    assert srmod.to_bytes(again) == (tmp_path / "2.dcm").read_bytes()


def test_a_rejected_result_has_no_finding(tmp_path: Path) -> None:
    built = built_report()
    report = {**signed(built["report"]), "status": "cancelled"}
    path = written(tmp_path, build(report, built["observations"], built["device"], source_images(1), 3), "3.dcm")
    assert dciodvfy(path)[0] == []
    sr = hd.sr.srread(path)
    (group,) = sr.content.get_image_measurement_groups()
    assert group.get_measurements() == [] and sr.VerificationFlag == "VERIFIED"
    (evaluation,) = group.get_qualitative_evaluations()
    assert (evaluation.value.value, evaluation.value.scheme_designator) == ("REJECTED", "99IHUB")


def test_no_source_image_is_no_sr() -> None:
    built = built_report()
    with pytest.raises(srmod.SrError):
        srmod.build_sr(report=built["report"], observations=built["observations"], device=built["device"],
                       header=srmod.header_from(source_images(1)[0]), sources=[], version=1)


def test_device_uid_without_the_identifier_is_the_same() -> None:
    device = built_report()["device"]
    bare = {**device, "identifier": device["identifier"][:1]}
    assert srmod.device_uid(bare) == srmod.device_uid(device)


# -- delivery ---------------------------------------------------------------------------------
def pacs_sites(tmp_path: Path, pacs: str) -> Path:
    path = tmp_path / "sites.yaml"
    path.write_text("sites:\n  BVDKDN:\n    name: Benh vien Da khoa Dong Nai\n    results_to_pacs: true\n" + pacs,
                    encoding="utf-8")
    return path


def sender(db_url: str, sites: Path) -> Deliverer:
    ctx = context(INTEROP_SITES=str(sites), DATABASE_URL=db_url, TRITON_URL="unused:1", INTEROP_RETRY_BASE_SECONDS="2",
                  INTEROP_DICOMWEB_TIMEOUT="5")
    return Deliverer(ctx, worker_id="test-sr-sender", kinds=(delivery.SR,))


def queue_r1(conn: psycopg.Connection[Any], out: Deliverer) -> list[int]:
    with conn.transaction():
        report = resources.read(conn, "DiagnosticReport", "r1")
        return delivery.queue_report(conn, out.ctx, report, out.ctx.sites.get("bvdkdn"))


def image_in(pacs: Orthanc, seed: int = 21) -> Dataset:
    ds = make_chest_xray(seed=seed, size=64, study_uid=STUDY_UID, accession="ACC-1", patient_id="BN-0042",
                         patient_name="Nguyen^Van An")
    pacs.upload(dataset_bytes(ds))
    return ds


def srs_in(pacs: Orthanc) -> list[Dataset]:
    with DicomWebClient(pacs.dicomweb_url, 10) as client:
        refs = [r for r in client.search_instances(STUDY_UID) if r.sop_class_uid == srmod.COMPREHENSIVE_3D_SR]
        return [client.retrieve_instance(r) for r in refs]


def referenced(ds: Dataset) -> set[str]:
    return {i.ReferencedSOPInstanceUID for s in ds.CurrentRequestedProcedureEvidenceSequence
            for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}


def test_sr_reaches_the_pacs_in_the_study_of_the_images_once(stored: psycopg.Connection[Any], orthanc: Orthanc,
                                                             db_url: str, tmp_path: Path) -> None:
    image = image_in(orthanc)
    out = sender(db_url, pacs_sites(tmp_path, f"    dicomweb: {orthanc.dicomweb_url}\n"))
    ids = queue_r1(stored, out)
    assert len(ids) == 1 and jobs.job_row(stored, ids[0])["lane"] == "BVDKDN:pacs"
    # the first try stores the SR, then the runner dies before it records that (lease lost)
    job = jobs.claim(stored, "dies", 60, kinds=(delivery.SR,))
    assert job is not None
    channel = out.channels[delivery.SR]
    message = channel.prepare(stored, job)
    assert isinstance(message, delivery.Message)
    with stored.transaction():
        jobs.set_message(stored, job, message.id, message.text)
    assert channel.send(job, message).state == "sent"
    stored.execute("UPDATE job SET leased_until = now() - interval '1 second' WHERE id = %s", (job.id,))
    # the retry sends the same SR: the PACS still has one
    assert out.run_once()
    assert delivery_row(stored, ids[0])["status"] == "sent"
    (sr,) = srs_in(orthanc)
    assert sr.StudyInstanceUID == image.StudyInstanceUID and sr.PatientID == image.PatientID
    assert sr.AccessionNumber == image.AccessionNumber and sr.SOPInstanceUID == message.id
    assert image.SOPInstanceUID in referenced(sr)
    assert sr.PreliminaryFlag == "PRELIMINARY"
    assert not referenced(sr) & {s.SOPInstanceUID for s in srs_in(orthanc)}  # never an SR as a source
    # queued again (the same version): nothing new
    assert queue_r1(stored, out) == []


def test_pacs_down_is_retried_then_delivered(stored: psycopg.Connection[Any], db_url: str, tmp_path: Path) -> None:
    port = free_port()
    pacs = Orthanc(tmp_path / "late-pacs", http_port=port)
    out = sender(db_url, pacs_sites(tmp_path, f"    dicomweb: {pacs.dicomweb_url}\n"))
    (item,) = queue_r1(stored, out)
    assert out.run_once()
    row = delivery_row(stored, item)
    assert row["status"] == "pending" and row["attempts"] == 1 and "PACS" in (row["last_error"] or "")
    pacs.start()
    try:
        image = image_in(pacs, seed=22)
        time_passes(stored)
        assert out.run_once()
        assert delivery_row(stored, item)["status"] == "sent"
        (sr,) = srs_in(pacs)
        assert sr.StudyInstanceUID == STUDY_UID and referenced(sr) == {image.SOPInstanceUID}
    finally:
        pacs.stop()


@pytest.fixture
def storage_scp() -> Any:
    received: list[Dataset] = []
    lock = threading.Lock()

    def on_store(event: Any) -> int:
        with lock:
            received.append(event.dataset)
        return 0x0000

    ae = AE(ae_title="SITEPACS")
    ae.add_supported_context(Comprehensive3DSRStorage)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield port, received
    finally:
        server.shutdown()


def test_c_store_to_the_sites_dicom_store(stored: psycopg.Connection[Any], orthanc: Orthanc, db_url: str,
                                          tmp_path: Path, storage_scp: Any) -> None:
    port, received = storage_scp
    image = image_in(orthanc, seed=23)
    out = sender(db_url, pacs_sites(tmp_path, f"    dicomweb: {orthanc.dicomweb_url}\n"
                                              f"    dicom_store: {{aet: SITEPACS, host: 127.0.0.1, port: {port}}}\n"))
    (item,) = queue_r1(stored, out)
    assert out.run_once()
    assert delivery_row(stored, item)["status"] == "sent"
    (sr,) = received
    assert sr.SOPClassUID == srmod.COMPREHENSIVE_3D_SR and sr.StudyInstanceUID == STUDY_UID
    assert image.SOPInstanceUID in referenced(sr)
    code = air_item(sr).PurposeOfReferenceCodeSequence[0]
    assert code.CodeMeaning == "Processing Algorithm"


def test_a_site_without_results_to_pacs_gets_no_sr(stored: psycopg.Connection[Any], db_url: str,
                                                    tmp_path: Path) -> None:
    path = tmp_path / "sites.yaml"
    path.write_text("sites:\n  BVDKDN:\n    name: BV\n    dicomweb: http://127.0.0.1:9/dicom-web\n", encoding="utf-8")
    assert queue_r1(stored, sender(db_url, path)) == []


# -- provenance -------------------------------------------------------------------------------
def provenances(conn: psycopg.Connection[Any], target: str) -> list[dict[str, Any]]:
    params = context().params["Provenance"]
    query = Query(criteria=[Criterion(params["target"], [(ANY_SYSTEM, target)])])
    return resources.search(conn, "Provenance", query)[1]


def test_provenance_of_the_ai_result_and_of_the_sign_off(stored: psycopg.Connection[Any], db_url: str,
                                                          tmp_path: Path) -> None:
    ctx = context(DATABASE_URL=db_url, TRITON_URL="unused:1")
    images = source_images()
    study = resources.read(stored, "ImagingStudy", "s1")
    study["series"] = [{"uid": images[0].SeriesInstanceUID, "modality": {"code": "DX"},
                        "instance": [{"uid": d.SOPInstanceUID, "sopClass": {"code": f"urn:oid:{d.SOPClassUID}"}}
                                     for d in images]}]
    study.pop("meta", None)
    resources.update(stored, study, ctx.params["ImagingStudy"])
    with stored.transaction():
        reports.stored(stored, ctx, resources.read(stored, "DiagnosticReport", "r1"), event="ai_result")
    (ai,) = provenances(stored, "DiagnosticReport/r1")
    assert ai["agent"][0]["who"]["reference"] == f"Device/{built_report()['device']['id']}"
    assert ai["target"][0]["reference"] == "DiagnosticReport/r1/_history/1"
    assert ai["entity"][0]["what"]["reference"] == "ImagingStudy/s1"
    assert {e["what"]["identifier"]["value"] for e in ai["entity"][1:]} == {f"urn:oid:{d.SOPInstanceUID}" for d in images}

    review.apply_review(stored, ctx, "r1", action="sign", reviewer="Practitioner/rad-1")
    signed_off = [p for p in provenances(stored, "DiagnosticReport/r1") if p["id"] != ai["id"]]
    (sign,) = signed_off
    assert sign["agent"][0]["who"] == {"reference": "Practitioner/rad-1"}
    assert sign["agent"][0]["type"]["coding"][0]["code"] == "verifier"
    assert sign["target"][0]["reference"] == "DiagnosticReport/r1/_history/2"


def test_the_sr_references_the_images_the_model_read(stored: psycopg.Connection[Any], orthanc: Orthanc, db_url: str,
                                                     tmp_path: Path) -> None:
    read, other = image_in(orthanc, seed=31), image_in(orthanc, seed=32)  # two images; the model was given one
    from interop.domain.vocabulary import SOURCE_IMAGE_EXTENSION, source_images

    with stored.transaction():
        report = resources.read(stored, "DiagnosticReport", "r1")
        report["extension"] = [*report.get("extension", []), {"url": SOURCE_IMAGE_EXTENSION, "valueIdentifier": {
            "system": "urn:dicom:uid", "value": f"urn:oid:{read.SOPInstanceUID}"}}]
        resources.update(stored, {k: v for k, v in report.items() if k != "meta"}, PARAMS["DiagnosticReport"])
    assert source_images(resources.read(stored, "DiagnosticReport", "r1")) == {read.SOPInstanceUID}
    out = sender(db_url, pacs_sites(tmp_path, f"    dicomweb: {orthanc.dicomweb_url}\n"))
    assert len(queue_r1(stored, out)) == 1
    assert out.run_once()
    (sr,) = [s for s in srs_in(orthanc) if read.SOPInstanceUID in referenced(s)]
    assert referenced(sr) == {read.SOPInstanceUID} and other.SOPInstanceUID not in referenced(sr)


def test_a_later_version_names_the_srs_it_replaces(tmp_path: Path) -> None:
    built = built_report()
    images = source_images()
    first = build(built["report"], built["observations"], built["device"], images, 1)
    assert "PredecessorDocumentsSequence" not in first
    third = build(signed(built["report"]), built["observations"], built["device"], images, 3)
    path = written(tmp_path, third, "v3.dcm")
    errors, _warnings = dciodvfy(path)
    assert errors == [], errors
    raw = dcmread(path)
    (study,) = raw.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == images[0].StudyInstanceUID
    named = {i.ReferencedSOPInstanceUID for s in study.ReferencedSeriesSequence for i in s.ReferencedSOPSequence}
    assert named == {first.SOPInstanceUID, srmod.sr_uids(str(built["report"]["id"]), 2)[1]}
    assert raw.SOPInstanceUID not in named and raw.SeriesInstanceUID == first.SeriesInstanceUID
