"""DICOM attributes to a FHIR R4 ImagingStudy. Pure: datasets (or QIDO results) in, JSON out.

Used where the hub itself must describe a study it found in a PACS (the HL7 path, the demo),
as a HIS would when it posts one.
"""
from __future__ import annotations

from typing import Any, Iterable

from pydicom import Dataset

DCM = "http://dicom.nema.org/resources/ontology/DCM"
SOP_CLASS = "urn:ietf:rfc:3986"


def _dt(date: str | None, time: str | None) -> str | None:
    if not date or len(date) != 8:
        return None
    t = (time or "000000").split(".")[0].ljust(6, "0")
    return f"{date[:4]}-{date[4:6]}-{date[6:]}T{t[:2]}:{t[2:4]}:{t[4:6]}+07:00"


def imaging_study(
    datasets: Iterable[Dataset],
    *,
    subject: str,
    endpoint_address: str | None = None,
    based_on: str | None = None,
    utc_offset: str = "+07:00",
) -> dict[str, Any]:
    """An `available` ImagingStudy of the given instances; a contained WADO-RS Endpoint if named."""
    series: dict[str, dict[str, Any]] = {}
    first: Dataset | None = None
    for ds in datasets:
        first = first or ds
        entry = series.setdefault(ds.SeriesInstanceUID, {
            "uid": ds.SeriesInstanceUID,
            "modality": {"system": DCM, "code": ds.get("Modality", "OT")},
            "instance": [],
        })
        if ds.get("SeriesNumber") is not None:
            entry["number"] = int(ds.SeriesNumber)
        if ds.get("SeriesDescription"):
            entry["description"] = str(ds.SeriesDescription)
        if ds.get("BodyPartExamined"):
            entry["bodySite"] = {"system": DCM, "code": str(ds.BodyPartExamined), "display": str(ds.BodyPartExamined)}
        instance: dict[str, Any] = {"uid": ds.SOPInstanceUID, "sopClass": {"system": SOP_CLASS, "code": f"urn:oid:{ds.SOPClassUID}"}}
        if ds.get("InstanceNumber") is not None:
            instance["number"] = int(ds.InstanceNumber)
        entry["instance"].append(instance)
    if first is None:
        raise ValueError("an ImagingStudy needs at least one instance")
    study: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "identifier": [{"use": "official", "system": "urn:dicom:uid", "value": f"urn:oid:{first.StudyInstanceUID}"}],
        "status": "available",
        "modality": [
            {"system": DCM, "code": code} for code in sorted({s["modality"]["code"] for s in series.values()})],
        "subject": {"reference": subject},
        "numberOfSeries": len(series),
        "numberOfInstances": sum(len(s["instance"]) for s in series.values()),
        "series": list(series.values()),
    }
    if first.get("AccessionNumber"):
        study["identifier"].append({
            "use": "usual",
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
            "value": str(first.AccessionNumber),
        })
    started = _dt(first.get("StudyDate"), first.get("StudyTime"))
    if started:
        study["started"] = started.replace("+07:00", utc_offset)
    if first.get("StudyDescription"):
        study["description"] = str(first.StudyDescription)
    if based_on:
        study["basedOn"] = [{"reference": based_on}]
    if endpoint_address:
        study["contained"] = [{
            "resourceType": "Endpoint",
            "id": "pacs",
            "status": "active",
            "connectionType": {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                               "code": "dicom-wado-rs"},
            "payloadType": [{"text": "DICOM"}],
            "payloadMimeType": ["application/dicom"],
            "address": endpoint_address,
        }]
        study["endpoint"] = [{"reference": "#pacs"}]
    return study
