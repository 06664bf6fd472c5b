"""AI results as a DICOM Comprehensive 3D SR (TID 1500 Measurement Report), for the site's PACS.

One SR per stored report version, made with highdicom from the FHIR resources the hub already
keeps (the DiagnosticReport as it was at that version, its Observations and the model's Device)
and from the images the model read:

* each finding is a measurement group (TID 1501): the finding as its type, a qualitative
  evaluation (finding, Present/Absent; coded like the FHIR Observation, SNOMED CT where the model
  description has a code, else a local code `99IHUB`) and, for an AI finding, its probability as a
  numeric measurement (DCM 122157 "Probability", UCUM "1"); the source images are referenced;
* the algorithm is the observer device (Device Observer UID = the Device UID) and the groups'
  Algorithm Identification; the IHE AI Results (AIR Rev 1.1, 6.5.3.1) identity is an item of the
  Contributing Equipment Sequence: Purpose of Reference (Newcode1, 99IHE, "Processing Algorithm"),
  Manufacturer, Manufacturer's Model Name, Software Versions and Device UID. highdicom only takes
  CID 7005 purposes, so the item is made as Processing Equipment and its code set afterwards;
* a preliminary report is PARTIAL / UNVERIFIED / PRELIMINARY; a signed one (final, amended,
  corrected, or cancelled when the radiologist rejected it) is COMPLETE / VERIFIED / FINAL with the
  radiologist as verifying observer (and a rejected one carries no finding).

Pure and deterministic: the same inputs give the same bytes. The SR's SOP Instance UID comes from
the report id and version, its series from the report id, so a retried delivery stores the same
object again, never a second one.
"""
from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from typing import Any

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from ..domain.report import is_not_analysable

HUB_MANUFACTURER = "Interop Hub"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
DICOM_UID_SYSTEM = "urn:dicom:uid"
# IHE AIR Rev 1.1, 6.5.3.1: the purpose of reference of the algorithm's Contributing Equipment item
AIR_PROCESSING_ALGORITHM = ("Newcode1", "99IHE", "Processing Algorithm")
LOCAL_SCHEME = "99IHUB"  # codes the hub makes for findings without a verified code
SCHEMES = {"http://snomed.info/sct": "SCT", "http://loinc.org": "LN",
           "http://dicom.nema.org/resources/ontology/DCM": "DCM"}
PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
PRESENT = hd.sr.CodedConcept("52101004", "SCT", "Present")
ABSENT = hd.sr.CodedConcept("272519000", "SCT", "Absent")
AI_RESULT = hd.sr.CodedConcept("AIRESULT", LOCAL_SCHEME, "AI result")
REJECTED = hd.sr.CodedConcept("REJECTED", LOCAL_SCHEME, "Rejected by the radiologist")
NOT_ANALYSABLE = hd.sr.CodedConcept("NOTANALYSABLE", LOCAL_SCHEME, "Images not analysable by the AI model")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
SIGNED = ("final", "amended", "corrected", "cancelled")
SERIES_NUMBER = 9900
MAX_GROUP_IMAGES = 32  # beyond this, a group names no image itself: the evidence lists them all
# What the SR copies from the images (Patient and General Study modules).
HEADER = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
          "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID", "StudyDescription")


class SrError(ValueError):
    """The resources do not make an SR (no source image, no patient, no study UID)."""


@dataclass(frozen=True)
class Source:
    """One image the model read."""

    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class Algorithm:
    """The model as the AIR profile identifies it."""

    manufacturer: str
    model_name: str
    version: str
    device_uid: str


def device_uid(device: dict[str, Any]) -> str:
    """The Device UID of a FHIR Device: its `urn:dicom:uid` identifier, else the UID of its id
    (a UUID, changed whenever the model or its version changes) as `2.25.<integer>`."""
    for ident in device.get("identifier") or []:
        if ident.get("system") == DICOM_UID_SYSTEM and str(ident.get("value", "")).startswith("urn:oid:"):
            return str(ident["value"])[len("urn:oid:"):]
    return uuid_uid(str(device["id"]))


def uuid_uid(value: str) -> str:
    return f"2.25.{uuid.UUID(value).int}"


def algorithm(device: dict[str, Any], manufacturer: str = HUB_MANUFACTURER) -> Algorithm:
    names = {n.get("type"): n.get("name") for n in device.get("deviceName") or []}
    name = str(names.get("model-name") or device.get("modelNumber") or "AI model")
    version = next((str(v["value"]) for v in device.get("version") or [] if v.get("value")), "unknown")
    return Algorithm(str(device.get("manufacturer") or manufacturer), name, version, device_uid(device))


def sr_uids(report_id: str, version: int) -> tuple[str, str]:
    """(series UID, SOP Instance UID) of the SR of one report version: the same every time."""
    return (generate_uid(entropy_srcs=["interop-hub sr series", report_id]),
            generate_uid(entropy_srcs=["interop-hub sr", report_id, str(version)]))


def header_from(ds: Dataset) -> Dataset:
    """The patient and study attributes of a source image, as the SR must copy them."""
    out = Dataset()
    for keyword in HEADER:
        if keyword in ds:
            setattr(out, keyword, ds.data_element(keyword).value)  # type: ignore[union-attr]
    if "SpecificCharacterSet" in ds:
        out.SpecificCharacterSet = ds.SpecificCharacterSet
    return out


def header_from_fhir(patient: dict[str, Any] | None, study: dict[str, Any], study_uid: str,
                     accession: str | None = None) -> Dataset:
    """The same attributes from the FHIR Patient and ImagingStudy (when no image can be read)."""
    patient = patient or {}
    ident: dict[str, Any] = next(iter(patient.get("identifier") or []), {})
    name: dict[str, Any] = next(iter(patient.get("name") or []), {})
    started = str(study.get("started") or "")
    return dataset(
        SpecificCharacterSet="ISO_IR 192", PatientID=str(ident.get("value", ""))[:64],
        PatientName="^".join([str(name.get("family", "")), " ".join(name.get("given") or [])]).rstrip("^"),
        PatientBirthDate=str(patient.get("birthDate", "")).replace("-", "")[:8],
        PatientSex={"male": "M", "female": "F", "other": "O"}.get(str(patient.get("gender")), ""),
        StudyInstanceUID=study_uid, StudyDate=started[:10].replace("-", "") if len(started) >= 10 else "",
        StudyTime=started[11:19].replace(":", "") if len(started) >= 19 else "",
        AccessionNumber=(accession or "")[:16], ReferringPhysicianName="", StudyID="")


def dataset(**attributes: Any) -> Dataset:
    """A dataset of DICOM keywords and values."""
    return put(Dataset(), **attributes)


def put(ds: Dataset, **attributes: Any) -> Dataset:
    """Set DICOM attributes by keyword (one place, so that no write looks unused to vulture)."""
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


# -- FHIR to SR content -------------------------------------------------------------------------
def concept(codeable: dict[str, Any] | None, fallback: str = "Finding") -> hd.sr.CodedConcept:
    """A CodeableConcept as a coded concept: its first coding of a known scheme, else a local code."""
    codeable = codeable or {}
    for coding in codeable.get("coding") or []:
        scheme = SCHEMES.get(str(coding.get("system")))
        if scheme and coding.get("code"):
            meaning = str(coding.get("display") or codeable.get("text") or coding["code"])
            return hd.sr.CodedConcept(str(coding["code"]), scheme, meaning[:64])
    text = str(codeable.get("text") or fallback)
    local = "".join(c for c in text.upper() if c.isalnum())[:16] or "FINDING"
    return hd.sr.CodedConcept(local, LOCAL_SCHEME, text[:64])


def present(obs: dict[str, Any]) -> bool:
    if "valueBoolean" in obs:
        return bool(obs["valueBoolean"])
    codes_ = {c.get("code") for i in obs.get("interpretation") or [] for c in i.get("coding") or []
              if c.get("system") == INTERPRETATION}
    return bool(codes_ & {"POS", "A", "AA", "H", "HH"})


def _datetime(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _reviewer(report: dict[str, Any]) -> str | None:
    for ref in report.get("resultsInterpreter") or []:
        name = ref.get("display") or str(ref.get("reference") or "").split("/")[-1]
        if name:
            return str(name)
    return None


def _person_name(name: str) -> str:
    """A reviewer as a DICOM PN (family^given when written 'Given Family'; else as it is)."""
    name = name.strip()
    if "^" in name or " " not in name:
        return name[:64]
    given, _, family = name.rpartition(" ")
    return f"{family}^{given}"[:64]


def _group(obs: dict[str, Any], index: int, report_id: str, algo: hd.sr.AlgorithmIdentification,
           images: list[hd.sr.SourceImageForMeasurementGroup]) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    name = concept(obs.get("code"))
    measurements = []
    evaluations = []
    value = obs.get("valueQuantity")
    if "valueCodeableConcept" in obs:  # the assessment category
        evaluations.append(hd.sr.QualitativeEvaluation(name, concept(obs["valueCodeableConcept"], "Category")))
    else:
        evaluations.append(hd.sr.QualitativeEvaluation(name, PRESENT if present(obs) else ABSENT))
    if isinstance(value, dict) and isinstance(value.get("value"), (int, float)):
        measurements.append(hd.sr.Measurement(name=PROBABILITY, value=float(value["value"]), unit=NO_UNITS))
    tracking = hd.sr.TrackingIdentifier(uid=generate_uid(entropy_srcs=["interop-hub finding", report_id, str(obs["id"])]),
                                        identifier=f"Finding {index}: {name.meaning}"[:64])
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, finding_type=name, algorithm_id=algo if "valueQuantity" in obs else None,
        measurements=measurements or None, qualitative_evaluations=evaluations, source_images=images or None)


def _verdict(report_id: str, images: list[hd.sr.SourceImageForMeasurementGroup], value: hd.sr.CodedConcept,
             entropy: str, identifier: str) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A group with no finding, only a verdict on the AI result itself; its tracking UID derives
    from `entropy` and the report, so each rebuild of the SR gives the same one."""
    tracking = hd.sr.TrackingIdentifier(uid=generate_uid(entropy_srcs=[entropy, report_id]), identifier=identifier)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, finding_type=AI_RESULT,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(AI_RESULT, value)], source_images=images or None)


def _rejected(report_id: str, images: list[hd.sr.SourceImageForMeasurementGroup]
              ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A rejected AI result: no finding, only the radiologist's verdict."""
    return _verdict(report_id, images, REJECTED, "interop-hub rejected", "AI result rejected")


def _refused(report_id: str, images: list[hd.sr.SourceImageForMeasurementGroup]
             ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The quality gate refused the images: the AI read nothing (an empty SR would read as "no finding")."""
    return _verdict(report_id, images, NOT_ANALYSABLE, "interop-hub not analysable", "AI result: images not analysable")


def predecessors(report_id: str, version: int, study_uid: str) -> list[Dataset]:
    """The SRs of the report's earlier versions (their UIDs are derived, so they need not be fetched):
    the Predecessor Documents Sequence, so that a viewer shows the latest and knows what it replaces."""
    out = []
    for earlier in range(1, version):
        series_uid, sop_uid = sr_uids(report_id, earlier)
        out.append(dataset(StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid, SOPClassUID=COMPREHENSIVE_3D_SR,
                           SOPInstanceUID=sop_uid))
    return out


def build_sr(*, report: dict[str, Any], observations: Sequence[dict[str, Any]], device: dict[str, Any],
             header: Dataset, sources: Sequence[Source], version: int, manufacturer: str = HUB_MANUFACTURER,
             institution: str | None = None) -> hd.sr.Comprehensive3DSR:
    """The SR of one report version (see the module's docstring)."""
    if not sources:
        raise SrError("no source image to reference")
    study_uid = str(header.get("StudyInstanceUID") or sources[0].study_uid)
    if any(s.study_uid != study_uid for s in sources):
        raise SrError("the source images are not all of the report's study")
    if not header.get("PatientID"):
        raise SrError("no patient ID to file the SR under")
    model = algorithm(device, manufacturer)
    evidence = []
    for src in sources:
        ds = Dataset()
        for elem in header:
            ds.add(elem)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID, ds.SOPClassUID, ds.SOPInstanceUID = src.series_uid, src.sop_class_uid, src.sop_instance_uid
        evidence.append(ds)
    status = str(report.get("status") or "preliminary")
    signed = status in SIGNED
    reviewer = _reviewer(report) if signed else None
    device_observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=model.device_uid, name=model.model_name[:64], manufacturer_name=model.manufacturer[:64],
            model_name=model.model_name[:64]))
    person_observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Person,
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name=_person_name(reviewer))) \
        if reviewer else None
    context = hd.sr.ObservationContext(observer_person_context=person_observer, observer_device_context=device_observer)
    algo = hd.sr.AlgorithmIdentification(name=model.model_name[:64], version=model.version[:64])
    images = [hd.sr.SourceImageForMeasurementGroup(s.sop_class_uid, s.sop_instance_uid)
              for s in sources[:MAX_GROUP_IMAGES]] if len(sources) <= MAX_GROUP_IMAGES else []
    report_id = str(report["id"])
    groups = [_rejected(report_id, images)] if status == "cancelled" else \
        [_group(obs, i, report_id, algo, images) for i, obs in enumerate(observations, start=1)]
    if status != "cancelled" and is_not_analysable(report):
        groups.insert(0, _refused(report_id, images))
    procedure = concept(report.get("code"), "Imaging procedure") if (report.get("code") or {}).get("coding") \
        else codes.SCT.ImagingProcedure
    content = hd.sr.MeasurementReport(observation_context=context, procedure_reported=procedure,
                                      imaging_measurements=groups or None)
    series_uid, sop_uid = sr_uids(report_id, version)
    contributing = hd.ContributingEquipment(
        model.manufacturer[:64], codes.DCM.ProcessingEquipment, manufacturer_model_name=model.model_name[:64],
        software_versions=model.version[:64])
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=content, series_instance_uid=series_uid, series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid, instance_number=version, manufacturer=manufacturer[:64],
        previous_versions=predecessors(report_id, version, study_uid) or None,
        is_complete=signed, is_final=signed, is_verified=bool(signed and reviewer),
        institution_name=institution[:64] if institution else None,
        verifying_observer_name=_person_name(reviewer) if signed and reviewer else None,
        verifying_organization=(institution or manufacturer)[:64] if signed and reviewer else None,
        contributing_equipment=[contributing])
    _air_identity(sr, model)
    _dates(sr, report)
    scheme = dataset(CodingSchemeDesignator=LOCAL_SCHEME, CodingSchemeName="Interop Hub local finding codes",
                     CodingSchemeResponsibleOrganization=manufacturer[:64])
    put(sr, SpecificCharacterSet="ISO_IR 192", CodingSchemeIdentificationSequence=[scheme],
        SeriesDescription="AI result, reviewed" if signed else "AI result, preliminary (not reviewed)")
    return sr


def _air_identity(sr: Dataset, model: Algorithm) -> None:
    """The AIR purpose of reference and Device UID on the algorithm's Contributing Equipment item
    (the item highdicom adds for itself stays, as Processing Equipment)."""
    for item in sr.ContributingEquipmentSequence:
        if getattr(item, "ManufacturerModelName", None) == model.model_name[:64] and \
                getattr(item, "Manufacturer", None) == model.manufacturer[:64]:
            value, scheme, meaning = AIR_PROCESSING_ALGORITHM
            code = dataset(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)
            put(item, PurposeOfReferenceCodeSequence=[code], DeviceUID=model.device_uid)
            return
    raise SrError("the algorithm's Contributing Equipment item is missing")  # pragma: no cover


def _dates(sr: Dataset, report: dict[str, Any]) -> None:
    """Content and creation date/time from the report's `issued` (highdicom would write now)."""
    issued = _datetime(report.get("issued"))
    if issued is None:
        return
    date, time_, stamp = issued.strftime("%Y%m%d"), issued.strftime("%H%M%S"), issued.strftime("%Y%m%d%H%M%S%z")
    put(sr, ContentDate=date, ContentTime=time_, SeriesDate=date, SeriesTime=time_, InstanceCreationDate=date,
        InstanceCreationTime=time_)
    if issued.utcoffset() is not None:
        put(sr, TimezoneOffsetFromUTC=issued.strftime("%z"))
    for item in sr.get("VerifyingObserverSequence") or []:
        put(item, VerificationDateTime=stamp)
    for item in sr.get("ContributingEquipmentSequence") or []:
        if "ContributionDateTime" in item:
            put(item, ContributionDateTime=stamp)


def to_bytes(sr: Dataset) -> bytes:
    """The SR as a DICOM Part 10 file."""
    buffer = BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
