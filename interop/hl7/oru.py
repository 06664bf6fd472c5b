"""ORU^R01 (HL7 v2.5.1, or v2.3.1 / v2.6 as a site asks) from the hub's FHIR DiagnosticReport,
Observations and Device.

Pure: every input comes in as an argument (the control id and the time too), so the same
inputs always give the same text. Plain string building (0.35 ms a message here; 9.5 ms with hl7apy); the
tests parse the output with hl7apy and python-hl7 and check every field.

Structure (ORU_R01, one order observation):

    MSH  MSH-12 the site's version, ORU^R01^ORU_R01, MSH-18 UNICODE UTF-8, original acknowledgement mode
    PID  Patient identifiers / name / birth date / sex; without a Patient, the subject reference
    ORC  RE, placer and filler order numbers echoed from the order
    OBR  placer/filler numbers, OBR-4 the report's LOINC code, OBR-7 effective, OBR-18
         accession, OBR-22 issued, OBR-24 RAD, OBR-25 P/F/C, OBR-44 ordered procedure
    NTE  "AI-generated preliminary result pending radiologist review" (+ "reference model, not
         clinically validated"), English and Vietnamese
    OBX  ST   113014^DICOM Study^DCM: Study Instance UID (as IHE RAD / dcm4che results carry it)
    OBX  NM   one per finding: probability, SNOMED CT code, unit, A/N/AA, status, time, AI, model
    OBX  FT   19005-8 impression: the conclusion text, line breaks as \\.br\\

Where the accession number goes. OBR-18 (Placer Field 1): IHE RAD puts the imaging study's
accession number there in results (in v2.5.1 orders it travels in IPC-1, but ORU_R01 has no IPC
segment, so results use the v2.3.1 reading of OBR-18; the dcm4che ORU samples do the same).
Second place: ORC-3 / OBR-3 (Filler Order Number). In IHE RAD the Order Filler (the RIS) assigns
the accession number, and IHE notes that the filler order number may carry the accession number
where that is the local definition; the v2-to-FHIR IG maps ORC-3/OBR-3 to the ServiceRequest
identifier of type FILL. So when the order gave no filler order number, ORC-3 and OBR-3 carry the
accession number (EI.1 only); a filler number the order did give is echoed unchanged.

OBX-11 follows Observation.status, except that once the report itself is final, corrected or
amended, a finding still marked preliminary is sent with the report's status: HL7 v2 (ch. 7)
expects OBX-11 consistent with OBR-25 (a final OBR with preliminary OBXs is refused by some
engines), and the radiologist's sign-off covers the findings the report lists.

Versions (the site's `hl7.version` in the sites file): 2.5.1 (the default), 2.6 (the same
segments; every field used exists with the same meaning), and 2.3.1, whose OBX ends at OBX-17:
there is no OBX-18 (equipment instance identifier, added in v2.5), so the model's identity goes
in OBX-17's alternate identifier (CE.4-6) beside the method "AI". MSH-18 stays UNICODE UTF-8
in every version: the bytes are UTF-8 (Vietnamese names), and a 2.3.1 label that means
something else would mislead the receiver.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from ..domain.vocabulary import (
    AI_DEVICE_EXTENSION,
    DISCLAIMER,
    INTERPRETATION,
    LOINC,
    MODEL_SYSTEM,
    NOT_VALIDATED,
    OBSERVATION_SYSTEM,
    REPORT_SYSTEM,
    SNOMED,
    UCUM,
    V2_0203,
)
from ..sites import HL7_VERSIONS
from .errors import escape as _escape

VERSION = "2.5.1"
VERSIONS = HL7_VERSIONS  # one list: the sites file's hl7.version is checked against it
# the last field of each segment the hub writes, where a version ends a segment earlier than the
# fields build_oru fills (HL7 v2.3.1 ch. 7: OBX has 17 fields)
LAST_FIELD = {"2.3.1": {"OBX": 17}}
MESSAGE_TYPE = "ORU^R01^ORU_R01"
CHARSET = "UNICODE UTF-8"
SENDING_APPLICATION = "INTEROP_AI"

# FHIR system URI -> HL7 table 0396 coding system name.
CODING_SYSTEMS = {SNOMED: "SCT", LOINC: "LN", UCUM: "UCUM", "http://dicom.nema.org/resources/ontology/DCM": "DCM",
                  "http://radlex.org": "RADLEX", "http://www.radlex.org": "RADLEX"}

# DiagnosticReport.status -> OBR-25 (table 0123), per the v2-to-FHIR ResultStatus concept map.
REPORT_STATUS = {"registered": "I", "partial": "A", "preliminary": "P", "final": "F",
                 "amended": "C", "corrected": "C", "appended": "C", "cancelled": "X"}
# Observation.status -> OBX-11 (table 0085).
OBSERVATION_STATUS = {"registered": "I", "preliminary": "P", "final": "F", "amended": "C",
                      "corrected": "C", "cancelled": "X", "entered-in-error": "W"}
_SIGNED = {"F", "C"}
# FHIR administrative gender -> PID-8 (table 0001).
SEX = {"male": "M", "female": "F", "other": "O", "unknown": "U"}
# HumanName.use -> XPN-7 (table 0200).
NAME_USE = {"official": "L", "usual": "D", "nickname": "N", "maiden": "M", "anonymous": "S", "temp": "T"}

LOCAL_SYSTEM = "99INTEROP"  # the hub's local coding system (HL7 table 0396: 99zzz)
OBSERVATION_METHOD = ("AI", "Artificial intelligence inference", LOCAL_SYSTEM)
STUDY_CODE = ("113014", "DICOM Study", "DCM")
IMPRESSION_CODE = ("19005-8", "Radiology Imaging study [Impression] (narrative)", "LN")


class OruError(ValueError):
    """The resources cannot give a valid ORU (the message says which field; no patient data)."""


@dataclass(frozen=True)
class OrderContext:
    """What the order (a ServiceRequest, or the HL7 order it came from) lets us echo back.

    Identifiers are given as v2 EI text already (`value^namespace^universal id^type`, components
    escaped), so the numbers the HIS sent come back byte for byte. Build it with
    `order_context(service_request)`."""

    placer_order_number: str | None = None
    filler_order_number: str | None = None
    accession_number: str | None = None
    procedure_code: str | None = None  # CE text for OBR-44, e.g. "RP001^Chest PA^99LOCAL"
    study_instance_uid: str | None = None


# -- text -----------------------------------------------------------------------------------
_NEWLINES = re.compile(r"\r\n|\r|\n")


def escape(text: Any) -> str:
    """HL7 escape of one value (\\E\\ first, then \\F\\ \\S\\ \\T\\ \\R\\); line breaks, which would
    end the segment, become spaces. Use `escape_ft` where breaks must be kept."""
    return _escape(_NEWLINES.sub(" ", str(text)))


def escape_ft(text: Any) -> str:
    """Formatted text (FT): escaped, each line break as \\.br\\."""
    return "\\.br\\".join(escape(line) for line in _NEWLINES.split(str(text)))


def _components(*parts: Any) -> str:
    """Escaped components joined with ^, trailing empties dropped."""
    values = ["" if p is None else escape(p) for p in parts]
    while values and values[-1] == "":
        values.pop()
    return "^".join(values)


def _segment(name: str, fields: dict[int, str]) -> str:
    """A segment from {field number: already-escaped text}; trailing empty fields dropped."""
    last = max((n for n, v in fields.items() if v), default=0)
    return "|".join([name, *(fields.get(n, "") for n in range(1, last + 1))])


# -- times ----------------------------------------------------------------------------------
_FHIR_TIME = re.compile(
    r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$")


def dtm(value: str | datetime | None) -> str:
    """FHIR date/dateTime/instant (or a datetime) to HL7 DTM, keeping precision and offset."""
    if value is None or value == "":
        return ""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.strftime("%Y%m%d%H%M%S") + value.strftime("%z")
    match = _FHIR_TIME.match(value.strip())
    if not match:
        raise OruError(f"not a FHIR date/time: {value!r}")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    out = year + (month or "") + (day or "") + (hour or "") + (minute or "") + (second or "")
    if fraction:
        out += "." + fraction[:4]
    if zone:
        out += "+0000" if zone == "Z" else zone.replace(":", "")
    return out


def _number(value: Any) -> str:
    """NM: plain decimal digits, never an exponent."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        raise OruError("a finding value must be a number")
    text = format(Decimal(str(value)), "f")
    return text


# -- FHIR pieces to v2 data types -----------------------------------------------------------
def _coding_system(system: str | None) -> str:
    if not system:
        return ""
    return CODING_SYSTEMS.get(system, system)


def _ce(concept: dict[str, Any] | None, prefer: str | None = None) -> str:
    """CodeableConcept -> CE/CWE: code^text^system (the coding from `prefer` first)."""
    if not concept:
        return ""
    codings = list(concept.get("coding") or [])
    if prefer:
        codings.sort(key=lambda c: c.get("system") != prefer)
    if codings:
        c = codings[0]
        return _components(c.get("code"), concept.get("text") or c.get("display"), _coding_system(c.get("system")))
    return _components(None, concept.get("text"))


def _hd_from_system(system: str | None) -> tuple[str | None, str | None]:
    if not system:
        return None, None
    if system.startswith("urn:oid:"):
        return system[len("urn:oid:"):], "ISO"
    return system, "URI"


def ei(identifier: dict[str, Any] | None) -> str | None:
    """FHIR Identifier -> EI (value^namespace^universal id^type), per the IG's EI map:
    EI.2 from the assigner's name, EI.3/EI.4 from the system (urn:oid: -> ISO, else URI)."""
    if not identifier or not identifier.get("value"):
        return None
    assigner = identifier.get("assigner") or {}
    namespace = assigner.get("display") or (assigner.get("identifier") or {}).get("value")
    universal, kind = _hd_from_system(identifier.get("system"))
    return _components(identifier["value"], namespace, universal, kind)


def _cx(identifier: dict[str, Any]) -> str | None:
    """FHIR Identifier -> CX: value^^^assigning authority (HD)^type code."""
    if not identifier.get("value"):
        return None
    assigner = identifier.get("assigner") or {}
    namespace = assigner.get("display") or (assigner.get("identifier") or {}).get("value")
    universal, kind = _hd_from_system(identifier.get("system"))
    hd = "&".join(x for x in [escape(namespace or ""), escape(universal or ""), kind or ""]).rstrip("&")
    type_code = next((c.get("code") for c in (identifier.get("type") or {}).get("coding", [])
                      if c.get("code")), None)
    parts = [escape(identifier["value"]), "", "", hd, escape(type_code or "")]
    while parts and parts[-1] == "":
        parts.pop()
    return "^".join(parts)


def _xpn(name: dict[str, Any]) -> str:
    given = list(name.get("given") or [])
    family = name.get("family")
    if not family and not given and name.get("text"):
        return _components(name["text"])
    return _components(family, given[0] if given else None, " ".join(given[1:]) or None,
                       " ".join(name.get("suffix") or []) or None, " ".join(name.get("prefix") or []) or None,
                       None, NAME_USE.get(name.get("use", "")))


def _identifier_of_type(resource: dict[str, Any], code: str) -> dict[str, Any] | None:
    for ident in resource.get("identifier") or []:
        for coding in (ident.get("type") or {}).get("coding", []):
            if coding.get("code") == code and coding.get("system", V2_0203) == V2_0203:
                return dict(ident)
    return None


def order_context(service_request: dict[str, Any] | None, *, study: dict[str, Any] | None = None) -> OrderContext:
    """What a ServiceRequest carries, as the v2-to-FHIR IG maps ORC/OBR into it:
    identifier type PLAC (ORC-2/OBR-2) -> placer, FILL (ORC-3/OBR-3) -> filler, ACSN -> accession;
    code (OBR-4 of the order) -> procedure code. An ImagingStudy (`study`) fills the accession
    number (its ACSN identifier, DICOM 0008,0050) and the Study Instance UID when the order has none.
    """
    sr = service_request or {}
    study = study or {}
    accession = _identifier_of_type(sr, "ACSN") or _identifier_of_type(study, "ACSN")
    uid = next((i["value"][len("urn:oid:"):] for i in study.get("identifier") or []
                if i.get("system") == "urn:dicom:uid" and str(i.get("value", "")).startswith("urn:oid:")), None)
    return OrderContext(
        placer_order_number=ei(_identifier_of_type(sr, "PLAC")),
        filler_order_number=ei(_identifier_of_type(sr, "FILL")),
        accession_number=(accession or {}).get("value"),
        procedure_code=_ce(sr.get("code")) or None,
        study_instance_uid=uid,
    )


def _study_uid(report: dict[str, Any], order: OrderContext | None) -> str | None:
    if order and order.study_instance_uid:
        return order.study_instance_uid
    for ident in report.get("identifier") or []:  # report.build: "<study uid>/<model>"
        if ident.get("system") == REPORT_SYSTEM and "/" in str(ident.get("value", "")):
            return str(ident["value"]).rsplit("/", 1)[0]
    return None


def _finding_code(observation: dict[str, Any]) -> str:
    """OBX-3: the SNOMED CT coding (SCT) with its text; a finding the model description gives no
    verified code for gets a local code (table 0396 "99zzz") from the observation's identifier."""
    concept = observation.get("code") or {}
    if concept.get("coding"):
        return _ce(concept, prefer=SNOMED)
    local = next((str(i["value"]).rsplit("/", 1)[-1] for i in observation.get("identifier") or []
                  if i.get("system") == OBSERVATION_SYSTEM and i.get("value")), None)
    return _components(local, concept.get("text"), LOCAL_SYSTEM if local else None)


def _abnormal_flag(observation: dict[str, Any]) -> str:
    codes = {c.get("code") for i in observation.get("interpretation") or [] for c in i.get("coding") or []
             if c.get("system", INTERPRETATION) == INTERPRETATION}
    if "AA" in codes or "HH" in codes or "LL" in codes:
        return "AA"
    if "POS" in codes or "A" in codes or "DET" in codes:
        return "A"
    if "NEG" in codes or "N" in codes or "ND" in codes:
        return "N"
    return ""


def _model(device: dict[str, Any]) -> tuple[str, str, str]:
    """(EI for OBX-18, model name, version) from the Device, as the IG maps OBX-18 -> Device.identifier."""
    names = {n.get("type"): n.get("name") for n in device.get("deviceName") or []}
    name = names.get("model-name") or device.get("modelNumber") or ""
    version = next((v.get("value") for v in device.get("version") or [] if v.get("value")), "")
    ident = next((i for i in device.get("identifier") or [] if i.get("system") == MODEL_SYSTEM), None)
    if ident is None:
        ident = {"system": MODEL_SYSTEM, "value": f"{name}@{version}"}
    return ei(ident) or "", name, version


def _is_reference_model(device: dict[str, Any]) -> bool:
    return any(note.get("text") == NOT_VALIDATED["en"] for note in device.get("note") or [])


def _status(mapping: dict[str, str], status: str | None, what: str) -> str:
    try:
        return mapping[status or ""]
    except KeyError:
        raise OruError(f"{what} status {status!r} has no HL7 v2 result status") from None


# -- the message ----------------------------------------------------------------------------
def _pid(patient: dict[str, Any] | None, subject: dict[str, Any] | None, facility: str) -> str:
    fields: dict[int, str] = {1: "1"}
    if patient:
        fields[3] = "~".join(x for x in (_cx(i) for i in patient.get("identifier") or []) if x)
        if not fields[3] and patient.get("id"):
            fields[3] = _components(patient["id"], None, None, facility, "PI")
        fields[5] = "~".join(_xpn(n) for n in patient.get("name") or [])
        fields[7] = dtm(patient.get("birthDate"))
        fields[8] = SEX.get(patient.get("gender", ""), "")
    elif subject:
        if subject.get("identifier"):
            fields[3] = _cx(subject["identifier"]) or ""
        elif subject.get("reference"):
            # Only the hub's reference is known: its id, assigned by the hub (type PI).
            fields[3] = _components(subject["reference"].rsplit("/", 1)[-1], None, None, facility, "PI")
        if subject.get("display"):
            fields[5] = _components(subject["display"])
    return _segment("PID", fields)


def build_oru(
    report: dict[str, Any],
    observations: list[dict[str, Any]],
    device: dict[str, Any],
    order: OrderContext | None,
    *,
    sending_facility: str,
    receiving_application: str,
    receiving_facility: str,
    control_id: str,
    now: datetime,
    patient: dict[str, Any] | None = None,
    sending_application: str = SENDING_APPLICATION,
    version: str = VERSION,
) -> str:
    """One ORU^R01 as ER7 text in HL7 `version` (VERSIONS), segments separated by CR (no trailing
    CR; MLLP frames it)."""
    if not control_id or len(control_id) > 20:
        raise OruError("MSH-10 control id must be 1 to 20 characters")
    if version not in VERSIONS:
        raise OruError(f"HL7 version {version!r} is not one the hub writes ({', '.join(VERSIONS)})")
    last = LAST_FIELD.get(version, {})
    order = order or OrderContext()
    obr25 = _status(REPORT_STATUS, report.get("status"), "DiagnosticReport")
    accession = escape(order.accession_number) if order.accession_number else ""
    placer = order.placer_order_number or ""
    filler = order.filler_order_number or accession
    model_ei, model_name, model_version = _model(device)
    method = _components(*OBSERVATION_METHOD)
    if last.get("OBX", 18) < 18:  # no OBX-18: the model as OBX-17's alternate identifier
        method = "^".join([method, model_ei.split("^")[0], escape(f"{model_name} {model_version}".strip()),
                           LOCAL_SYSTEM])
        model_ei = ""

    segments = [
        "|".join(["MSH", "^~\\&", escape(sending_application), escape(sending_facility),
                  escape(receiving_application), escape(receiving_facility), dtm(now), "",
                  MESSAGE_TYPE, escape(control_id), "P", version, "", "", "", "", "", CHARSET]),
        _pid(patient, report.get("subject"), sending_facility),
        _segment("ORC", {1: "RE", 2: placer, 3: filler, 9: dtm(report.get("issued"))}),
        _segment("OBR", {
            1: "1", 2: placer, 3: filler, 4: _ce(report.get("code"), prefer=LOINC),
            7: dtm(report.get("effectiveDateTime") or (report.get("effectivePeriod") or {}).get("start")),
            18: accession, 22: dtm(report.get("issued")), 24: "RAD", 25: obr25,
            44: order.procedure_code or "",
        }),
    ]
    notes = [f"{DISCLAIMER['en']} {DISCLAIMER['vi']}"]
    if _is_reference_model(device):
        notes.append(f"{NOT_VALIDATED['en']} {NOT_VALIDATED['vi']}")
    notes.append(f"Model: {model_name} {model_version}.")
    segments += [_segment("NTE", {1: str(n), 2: "L", 3: escape(text), 4: "RE"}) for n, text in enumerate(notes, 1)]

    set_id = 0
    obx: list[str] = []
    uid = _study_uid(report, order)
    if uid:
        set_id += 1
        obx.append(_segment("OBX", {1: str(set_id), 2: "ST", 3: _components(*STUDY_CODE), 5: escape(uid),
                                    11: obr25}))
    for observation in observations:
        quantity = observation.get("valueQuantity")
        if not quantity or "value" not in quantity:
            raise OruError("each finding needs a valueQuantity with the probability")
        status = _status(OBSERVATION_STATUS, observation.get("status"), "Observation")
        if obr25 in _SIGNED and status == "P":
            status = obr25
        unit = _components(quantity.get("code"), quantity.get("unit"), _coding_system(quantity.get("system")))
        set_id += 1
        obx.append(_segment("OBX", {
            1: str(set_id), 2: "NM", 3: _finding_code(observation),
            5: _number(quantity["value"]), 6: unit, 8: _abnormal_flag(observation), 11: status,
            14: dtm(observation.get("effectiveDateTime") or report.get("effectiveDateTime")),
            17: method, 18: model_ei,
        }))
    if report.get("conclusion"):
        set_id += 1
        obx.append(_segment("OBX", {
            1: str(set_id), 2: "FT", 3: _components(*IMPRESSION_CODE), 5: escape_ft(report["conclusion"]),
            11: obr25, 14: dtm(report.get("effectiveDateTime")), 17: method, 18: model_ei,
        }))
    segments += obx
    for segment in segments:  # a field the version does not have would be misread by its parsers
        if segment[:3] in last and segment.count("|") > last[segment[:3]]:
            raise OruError(f"{segment[:3]} has more fields than HL7 v{version} defines")
    return "\r".join(segments)


def device_reference(report: dict[str, Any], observations: Iterable[dict[str, Any]] = ()) -> str | None:
    """'Device/<id>' of the AI model that made the report (its extension, else a result's device)."""
    for ext in report.get("extension") or []:
        if ext.get("url") == AI_DEVICE_EXTENSION and (ext.get("valueReference") or {}).get("reference"):
            return str(ext["valueReference"]["reference"])
    for obs in observations:
        if (obs.get("device") or {}).get("reference"):
            return str(obs["device"]["reference"])
    return None
