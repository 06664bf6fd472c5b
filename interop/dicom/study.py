"""DICOM attributes to a FHIR R4 ImagingStudy. Pure: datasets or QIDO-RS results in, JSON out.

Used where the hub itself must describe a study it found in a PACS (the HL7 path, the demo),
as a HIS would when it posts one.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydicom import Dataset

from .dicomweb import InstanceRef

DCM = "http://dicom.nema.org/resources/ontology/DCM"
SOP_CLASS = "urn:ietf:rfc:3986"
ACSN = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}

Instance = Dataset | InstanceRef


def _facts(item: Instance) -> dict[str, Any]:
    """The attributes the ImagingStudy needs, from a dataset or from a QIDO-RS result."""
    if isinstance(item, InstanceRef):
        return {"study": item.study_uid, "series": item.series_uid, "instance": item.instance_uid,
                "sop_class": item.sop_class_uid, "modality": item.modality, "body_part": item.body_part,
                "series_description": item.series_description, "series_number": None,
                "instance_number": item.instance_number}
    return {"study": item.StudyInstanceUID, "series": item.SeriesInstanceUID, "instance": item.SOPInstanceUID,
            "sop_class": str(item.SOPClassUID), "modality": item.get("Modality"),
            "body_part": item.get("BodyPartExamined"), "series_description": item.get("SeriesDescription"),
            "series_number": item.get("SeriesNumber"), "instance_number": item.get("InstanceNumber")}


def _dt(date: str | None, time: str | None, utc_offset: str) -> str | None:
    if not date or len(date) != 8:
        return None
    t = (time or "000000").split(".")[0].ljust(6, "0")
    return f"{date[:4]}-{date[4:6]}-{date[6:]}T{t[:2]}:{t[2:4]}:{t[4:6]}{utc_offset}"


def wado_rs_endpoint(address: str, eid: str = "pacs") -> dict[str, Any]:
    return {
        "resourceType": "Endpoint",
        "id": eid,
        "status": "active",
        "connectionType": {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                           "code": "dicom-wado-rs"},
        "payloadType": [{"text": "DICOM"}],
        "payloadMimeType": ["application/dicom"],
        "address": address,
    }


def imaging_study(
    instances: Iterable[Instance],
    *,
    subject: str,
    endpoint_address: str | None = None,
    based_on: str | None = None,
    accession: str | None = None,
    utc_offset: str = "+07:00",
) -> dict[str, Any]:
    """An `available` ImagingStudy of the given instances; a contained WADO-RS Endpoint if named."""
    series: dict[str, dict[str, Any]] = {}
    first: Instance | None = None
    for item in instances:
        first = first if first is not None else item
        f = _facts(item)
        entry = series.setdefault(f["series"], {"uid": f["series"], "modality": {"system": DCM, "code": f["modality"] or "OT"},
                                                "instance": []})
        if f["series_number"] is not None:
            entry["number"] = int(f["series_number"])
        if f["series_description"]:
            entry["description"] = str(f["series_description"])
        if f["body_part"]:
            entry["bodySite"] = {"system": DCM, "code": str(f["body_part"]), "display": str(f["body_part"])}
        instance: dict[str, Any] = {"uid": f["instance"], "sopClass": {"system": SOP_CLASS, "code": f"urn:oid:{f['sop_class']}"}}
        if f["instance_number"] is not None:
            instance["number"] = int(f["instance_number"])
        entry["instance"].append(instance)
    if first is None:
        raise ValueError("an ImagingStudy needs at least one instance")
    modalities = sorted({s["modality"]["code"] for s in series.values()})
    study: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "identifier": [{"use": "official", "system": "urn:dicom:uid", "value": f"urn:oid:{_facts(first)['study']}"}],
        "status": "available",
        "modality": [{"system": DCM, "code": code} for code in modalities],
        "subject": {"reference": subject},
        "numberOfSeries": len(series),
        "numberOfInstances": sum(len(s["instance"]) for s in series.values()),
        "series": list(series.values()),
    }
    if isinstance(first, Dataset):
        accession = accession or (str(first.AccessionNumber) if first.get("AccessionNumber") else None)
        started = _dt(first.get("StudyDate"), first.get("StudyTime"), utc_offset)
        if started:
            study["started"] = started
        if first.get("StudyDescription"):
            study["description"] = str(first.StudyDescription)
    if accession:
        study["identifier"].append({"use": "usual", "type": ACSN, "value": accession})
    if based_on:
        study["basedOn"] = [{"reference": based_on}]
    if endpoint_address:
        study["contained"] = [wado_rs_endpoint(endpoint_address)]
        study["endpoint"] = [{"reference": "#pacs"}]
    return study
