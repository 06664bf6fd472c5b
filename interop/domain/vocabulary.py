"""The hub's vocabulary: code systems, identifier systems, the statements every AI result carries,
and the small questions every layer asks of a resource (is this report critical? which site is
it for? which version is it?). Pure: no I/O, imports nothing of the hub.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# -- code systems -------------------------------------------------------------------------------
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
DIAGNOSTIC_SERVICE = "http://terminology.hl7.org/CodeSystem/v2-0074"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"  # identifier types (MR, PLAC, FILL, ACSN)
COMMUNICATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/communication-category"

# -- the hub's own identifier systems -----------------------------------------------------------
DICOM_UID_SYSTEM = "urn:dicom:uid"
HUB_SYSTEM = "urn:interop-hub:"  # + resource type: identifier system for hub-only resources
REPORT_SYSTEM = "urn:interop-hub:report"                # "<study uid>/<model>"
OBSERVATION_SYSTEM = "urn:interop-hub:observation"      # "<study uid>/<model>/<label>"
MODEL_SYSTEM = "urn:interop-hub:model"                  # "<model>@<version>"
COMMUNICATION_SYSTEM = "urn:interop-hub:communication"  # the identifier an EMR finds a notice by
PATIENT_REF_SYSTEM = "urn:interop-hub:patient-reference"
SITE_TAG = "urn:interop-hub:site"                        # meta.tag: the facility an order/study/report is for
TASK_TYPE = "urn:interop-hub:task-type"
AI_DEVICE_EXTENSION = "urn:interop-hub:fhir:StructureDefinition:ai-device"
# each DICOM instance the model was given (valueIdentifier urn:dicom:uid): what the SR and the
# Provenance reference as the images the result was read from
SOURCE_IMAGE_EXTENSION = "urn:interop-hub:fhir:StructureDefinition:source-image"


def source_images(report: dict[str, Any]) -> set[str]:
    """SOP Instance UIDs of the images the AI result was read from (empty: not recorded)."""
    return {str(e["valueIdentifier"]["value"]).removeprefix("urn:oid:") for e in report.get("extension") or []
            if e.get("url") == SOURCE_IMAGE_EXTENSION and isinstance(e.get("valueIdentifier"), dict)
            and e["valueIdentifier"].get("value")}

ANALYSIS_TASK = {"system": TASK_TYPE, "code": "ai-analysis", "display": "AI analysis of an imaging study"}
FIND_STUDY_TASK = {"system": TASK_TYPE, "code": "find-study", "display": "Find the order's images in the PACS"}
ACK_TASK = {"system": TASK_TYPE, "code": "acknowledge-critical-result", "display": "Acknowledge a critical result"}
ALERT_CATEGORY = {"system": COMMUNICATION_CATEGORY, "code": "alert", "display": "Alert"}
REFERRAL = {"system": SNOMED, "code": "3457005", "display": "Patient referral"}
IMAGING_CATEGORY = {"coding": [{"system": OBSERVATION_CATEGORY, "code": "imaging", "display": "Imaging"}]}

# -- what every AI result says, in English and Vietnamese ---------------------------------------
DISCLAIMER = {
    "en": "AI-generated preliminary result, pending review by a radiologist.",
    "vi": "Kết quả sơ bộ do AI tạo ra, đang chờ bác sĩ chẩn đoán hình ảnh xem xét.",
}
NOT_VALIDATED = {
    "en": "Reference model: its weights are not clinically validated.",
    "vi": "Mô hình tham chiếu: trọng số chưa được thẩm định lâm sàng.",
}
REVIEWED = {
    "en": "AI-assisted result, reviewed by a radiologist.",
    "vi": "Kết quả có hỗ trợ AI, đã được bác sĩ chẩn đoán hình ảnh xem xét.",
}
REJECTED = {
    "en": "The AI result was rejected by the reviewing radiologist.",
    "vi": "Kết quả AI đã bị bác sĩ chẩn đoán hình ảnh bác bỏ.",
}

# -- queue priorities (lower is sooner) ---------------------------------------------------------
CRITICAL_PRIORITY = 0
DEFAULT_PRIORITY = 5


def codes(concepts: Any) -> set[str]:
    """Every code of a CodeableConcept or a list of them."""
    items = concepts if isinstance(concepts, list) else [concepts]
    return {str(c.get("code")) for cc in items if isinstance(cc, dict) for c in cc.get("coding") or []
            if isinstance(c, dict)}


def is_critical_finding(observation: dict[str, Any]) -> bool:
    """A finding is critical when its interpretation says AA (critical abnormal)."""
    return "AA" in codes(observation.get("interpretation") or [])


def is_critical(report: dict[str, Any], observations: Sequence[dict[str, Any]] = ()) -> bool:
    """A report is critical when its conclusionCode, or one of its results' interpretations, says AA."""
    return "AA" in codes(report.get("conclusionCode") or []) or any(is_critical_finding(o) for o in observations)


def priority(report: dict[str, Any]) -> int:
    """Queue priority of a report's deliveries: a critical result goes first."""
    return CRITICAL_PRIORITY if is_critical(report) else DEFAULT_PRIORITY


def version_of(resource: dict[str, Any]) -> int:
    """meta.versionId of a stored resource; raises ValueError for one not stored yet."""
    version = int((resource.get("meta") or {}).get("versionId") or 0)
    if version < 1:
        raise ValueError("the resource must be the stored one: it needs meta.versionId")
    return version


def site_tag(code: str) -> dict[str, str]:
    """The meta.tag that records which facility an order (and its study and report) belongs to."""
    return {"system": SITE_TAG, "code": code}


def site_of(resource: dict[str, Any] | None) -> str | None:
    """The facility code a resource is tagged with, if any."""
    for tag in ((resource or {}).get("meta") or {}).get("tag") or []:
        if tag.get("system") == SITE_TAG and tag.get("code"):
            return str(tag["code"])
    return None


def reference_id(ref: dict[str, Any] | str | None, rtype: str) -> str | None:
    """The id in a reference to `rtype` ('Observation/abc' or {'reference': ...}); None otherwise."""
    value = (ref.get("reference") if isinstance(ref, dict) else ref) or ""
    prefix = rtype + "/"
    return value[len(prefix):].split("/_history/")[0] if value.startswith(prefix) else None


def study_uid(study: dict[str, Any]) -> str | None:
    """The DICOM Study Instance UID from identifier (system urn:dicom:uid, value urn:oid:…)."""
    for ident in study.get("identifier") or []:
        if ident.get("system") == DICOM_UID_SYSTEM and ident.get("value"):
            value = str(ident["value"])
            return value[len("urn:oid:"):] if value.startswith("urn:oid:") else value
    return None


def without_meta(resource: dict[str, Any], *, keep_tags: bool = True) -> dict[str, Any]:
    """A copy ready for the next version: no versionId/lastUpdated, its tags kept (the site)."""
    out = {k: v for k, v in resource.items() if k != "meta"}
    tags = ((resource.get("meta") or {}).get("tag") or []) if keep_tags else []
    if tags:
        out["meta"] = {"tag": list(tags)}
    return out
