"""Radiology orders (ORM^O01, OMI^O23, OMG^O19), patient updates (ADT^A01/A04/A08/A31) and
patient merges (ADT^A40) to FHIR R4, pure.

The message maps in `mappings/hl7v2/messages/` say which segment builds which resource; the
engine (`mapping.py`) applies the segment, datatype and code-system maps. What this module adds
is the message's shape: one Patient (PID), at most one Encounter (PV1), and one order per ORC
with the segments that follow it up to the next ORC (TQ1, OBR, IPC, ZDS, and every NTE and DG1;
OBX, and the NTEs that follow an OBX, are not mapped). An A40 gives, for each PID/MRG pair, the
surviving Patient and the prior patient's identifiers (MRG-1). References between the resources
(`subject`, `encounter`, `basedOn`) are left as `None`: the caller knows the stored ids.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import ErrorCode
from .mapping import V2_0203, Context, Tables, build_resource
from .message import Message, MessageError, MissingSegmentError, Segment, parse

ORDER_TYPES = ("ORM^O01", "OMI^O23", "OMG^O19")
PATIENT_TYPES = ("ADT^A08", "ADT^A31", "ADT^A01", "ADT^A04")
MERGE_TYPES = ("ADT^A40",)


@dataclass(frozen=True)
class Order:
    """One ORC group: the facts the hub acts on, and the FHIR it stores."""

    order_control: str                       # ORC-1 (HL7 table 0119)
    order_status: str | None                 # ORC-5 (table 0038)
    result_status: str | None                # OBR-25 (table 0123)
    placer: dict[str, Any] | None            # Identifier, type PLAC (ORC-2, else OBR-2)
    filler: dict[str, Any] | None            # Identifier, type FILL (ORC-3, else OBR-3)
    accession: str | None                    # IPC-1 (OMI), else OBR-18 (ORM, IHE RAD)
    requested_procedure_id: str | None       # IPC-2, else OBR-19
    scheduled_procedure_step_id: str | None  # IPC-4, else OBR-20
    study_instance_uid: str | None           # IPC-3, else ZDS-1.1
    modality: str | None                     # IPC-5, else OBR-24
    station_name: str | None                 # IPC-7
    station_ae_titles: tuple[str, ...]       # IPC-9 (repeats)
    procedure_code: dict[str, Any] | None    # ServiceRequest.code (OBR-4, else IPC-6)
    priority: str | None                     # ServiceRequest.priority (ORC-7/TQ1-9/OBR-27/OBR-5)
    reason: list[dict[str, Any]]             # ServiceRequest.reasonCode (OBR-31)
    requester: dict[str, Any] | None         # ServiceRequest.requester (ORC-12, else OBR-16)
    service_request: dict[str, Any]          # FHIR ServiceRequest; subject/encounter/basedOn: None
    imaging_study: dict[str, Any]            # the expected ImagingStudy (identifiers, modality); subject: None
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OrderMessage:
    message_type: str                        # MSH-9.1^MSH-9.2, e.g. OMI^O23
    control_id: str                          # MSH-10
    sending_facility: str                    # MSH-4 namespace (the site code)
    version: str                             # MSH-12
    patient: dict[str, Any]                  # FHIR Patient
    encounter: dict[str, Any] | None         # FHIR Encounter from PV1 (subject: None)
    orders: list[Order]


@dataclass(frozen=True)
class PatientUpdate:
    message_type: str
    control_id: str
    sending_facility: str
    version: str
    patient: dict[str, Any]
    encounter: dict[str, Any] | None
    # Patient elements a field sent as "" empties (HL7: delete what the receiver holds), e.g. telecom
    cleared: tuple[str, ...] = ()


@dataclass(frozen=True)
class PatientMerge:
    message_type: str
    control_id: str
    sending_facility: str
    version: str
    # (the surviving Patient from PID, the prior patient's identifiers from MRG-1), one per pair
    merges: list[tuple[dict[str, Any], list[dict[str, Any]]]]


def _spec(msg: Message, tables: Tables, accepted: tuple[str, ...]) -> dict[str, Any]:
    spec = tables.message_for(msg.message_type) if msg.message_type in accepted else None
    if spec is None:
        raise MessageError("message type not mapped here", "MSH", 9, error_code=ErrorCode.UNSUPPORTED_MESSAGE_TYPE)
    return spec


def _patient_and_encounter(msg: Message, spec: dict[str, Any], tables: Tables, default_ns: str,
                           cleared: list[str] | None = None) -> tuple[dict[str, Any], dict[str, Any] | None, Segment]:
    pat = spec["patient"]
    pid = msg.first(pat["segment"])
    if pid is None:
        raise MissingSegmentError(pat["segment"], msg.message_type)
    scope = {"MSH": msg.msh, "PID": pid}
    ctx = Context(tables, scope, default_ns)
    patient = build_resource("Patient", pat["maps"], ctx, spec)
    if cleared is not None:
        cleared.extend(k for k in ctx.facts.get("cleared", []) if k not in patient)
    encounter = None
    enc = spec.get("encounter")
    pv1 = msg.first(enc["segment"]) if enc else None
    if enc and pv1 is not None:
        encounter = build_resource("Encounter", enc["maps"], Context(tables, {**scope, "PV1": pv1}, default_ns), spec)
    return patient, encounter, pid


@dataclass
class _Group:
    segments: dict[str, Segment] = field(default_factory=dict)
    repeats: dict[str, list[Segment]] = field(default_factory=dict)
    in_observation: bool = False  # an OBX was seen: NTEs after it are the observation's


def _groups(msg: Message, order_spec: dict[str, Any]) -> list[_Group]:
    """Order groups: each `starts_with` segment and the listed segments after it (the first of
    each, or every one for a `repeat` segment: NTE, DG1)."""
    start, members = order_spec["starts_with"], order_spec["segments"]
    groups: list[_Group] = []
    for seg in msg:
        if seg.id == start:
            groups.append(_Group({start: seg}))
        elif seg.id == "OBX" and groups:
            groups[-1].in_observation = True
        elif seg.id in members and seg.id != start:
            repeat = bool(members[seg.id].get("repeat"))
            if not groups:
                if repeat:  # a note or diagnosis of the message or the patient, not of an order
                    continue
                raise MissingSegmentError(start, msg.message_type)  # an OBR/IPC before any ORC
            group = groups[-1]
            if seg.id == "OBR":
                group.in_observation = False
            if repeat:
                if not (seg.id == "NTE" and group.in_observation):
                    group.repeats.setdefault(seg.id, []).append(seg)
                    group.segments.setdefault(seg.id, seg)
                continue
            group.segments.setdefault(seg.id, seg)
    return groups


def _typed(identifiers: list[dict[str, Any]], code: str) -> dict[str, Any] | None:
    for ident in identifiers:
        for coding in (ident.get("type") or {}).get("coding", []):
            if coding.get("system") == V2_0203 and coding.get("code") == code:
                return ident
    return None


def map_order(text: str, tables: Tables) -> OrderMessage:
    """An ORM^O01 or OMI^O23 (text from `charset.decode`) as FHIR and order facts.

    Raises MessageError (not an order, PID or ORC missing, a field that is not its datatype)."""
    msg = parse(text)
    spec = _spec(msg, tables, ORDER_TYPES)
    default_ns = msg.sending_facility
    patient, encounter, pid = _patient_and_encounter(msg, spec, tables, default_ns)
    order_spec = spec["order"]
    groups = _groups(msg, order_spec)
    if not groups:
        raise MissingSegmentError(order_spec["starts_with"], msg.message_type)
    orders = []
    for group in groups:
        ctx = Context(tables, {"MSH": msg.msh, "PID": pid, **group.segments}, default_ns, repeats=group.repeats)
        maps = [m for seg_id in order_spec["segments"] if seg_id in group.segments
                for m in order_spec["segments"][seg_id]["maps"]]
        request = build_resource("ServiceRequest", maps, ctx, spec)
        study = build_resource("ImagingStudy", maps, ctx, spec)
        f = ctx.facts
        idents = request.get("identifier", [])
        orders.append(Order(
            order_control=f.get("order_control", ""), order_status=f.get("order_status"),
            result_status=f.get("result_status"), placer=_typed(idents, "PLAC"), filler=_typed(idents, "FILL"),
            accession=f.get("accession"), requested_procedure_id=f.get("requested_procedure_id"),
            scheduled_procedure_step_id=f.get("scheduled_procedure_step_id"),
            study_instance_uid=f.get("study_instance_uid"), modality=f.get("modality"),
            station_name=f.get("station_name"), station_ae_titles=tuple(f.get("station_ae_titles", ())),
            procedure_code=request.get("code"), priority=request.get("priority"),
            reason=list(request.get("reasonCode", [])), requester=request.get("requester"),
            service_request=request, imaging_study=study, facts=dict(f)))
    return OrderMessage(msg.message_type, msg.control_id, msg.sending_facility, msg.version, patient, encounter, orders)


def map_patient_update(text: str, tables: Tables) -> PatientUpdate:
    """An ADT^A08/A31 (also A01/A04) as the Patient (and Encounter) it updates."""
    msg = parse(text)
    spec = _spec(msg, tables, PATIENT_TYPES)
    cleared: list[str] = []
    patient, encounter, _pid = _patient_and_encounter(msg, spec, tables, msg.sending_facility, cleared)
    return PatientUpdate(msg.message_type, msg.control_id, msg.sending_facility, msg.version, patient, encounter,
                         tuple(cleared))


def map_patient_merge(text: str, tables: Tables) -> PatientMerge:
    """An ADT^A40 (merge patient, patient identifier list): each PID (the patient that stays) with
    the MRG after it (the identifiers of the one merged into it). Raises MessageError (no MRG, an
    MRG before its PID, an MRG-1 with no identifier)."""
    msg = parse(text)
    spec = _spec(msg, tables, MERGE_TYPES)
    ns = msg.sending_facility
    merges = []
    pid: Segment | None = None
    for seg in msg:
        if seg.id == spec["patient"]["segment"]:
            pid = seg
        elif seg.id == spec["merge"]["segment"]:
            if pid is None:
                raise MissingSegmentError(spec["patient"]["segment"], msg.message_type)
            scope = {"MSH": msg.msh, "PID": pid, seg.id: seg}
            survivor = build_resource("Patient", spec["patient"]["maps"], Context(tables, scope, ns), spec)
            prior = build_resource("Patient", spec["merge"]["maps"], Context(tables, scope, ns), spec)
            if not prior.get("identifier"):
                raise MessageError("MRG-1 names no prior patient identifier", seg.id, 1, seg.sequence,
                                   ErrorCode.REQUIRED_FIELD_MISSING)
            merges.append((survivor, list(prior["identifier"])))
            pid = None
    if not merges:
        raise MissingSegmentError(spec["merge"]["segment"], msg.message_type)
    return PatientMerge(msg.message_type, msg.control_id, msg.sending_facility, msg.version, merges)
