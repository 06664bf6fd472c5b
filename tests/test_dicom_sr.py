"""AI results the PACS can show: a DICOM Comprehensive 3D SR (TID 1500) per report version.

Content: SRs built from a real report (`interop.domain.report.build` with the shipped chest model,
as tests/test_oru.py) and a synthetic chest radiograph, checked by Debian's `dciodvfy` (no error)
and read back with highdicom and pydicom.
"""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
from pydicom import Dataset, dcmread

from interop.dicom import sr as srmod
from scripts.synthetic.dicom import make_chest_xray
from tests.test_oru import MODEL, STUDY_UID, built_report

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
