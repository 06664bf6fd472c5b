"""HL7 v2 -> FHIR R4 mapping of orders and patient updates (pure): the public samples, the
IG's tables (every cited row checked against the IG's own CSVs), and FHIR validated by two
validators (fhir.resources R4B with the hub's write-time checks, and HL7's R4 JSON schema)."""
from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from interop.fhir.validation import validate
from interop.hl7 import charset
from interop.hl7.errors import ErrorCode
from interop.hl7.mapping import load_tables
from interop.hl7.message import MessageError, parse
from interop.hl7.order import OrderMessage
from interop.hl7.order import map_order as _map_order
from interop.hl7.order import map_patient_update as _map_patient_update
from tests.helpers import DATA
from tests.helpers import ROOT as REPO_ROOT

SAMPLES = DATA / "hl7v2"
IG = DATA / "v2-to-fhir"
DEFAULT_DIR = REPO_ROOT / "mappings" / "hl7v2"
TABLES = load_tables(DEFAULT_DIR)


def map_order(text: str) -> OrderMessage:
    return _map_order(text, TABLES)


def map_patient_update(text: str) -> Any:
    return _map_patient_update(text, TABLES)
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"


def sample_text(name: str) -> str:
    return charset.decode((SAMPLES / name).read_bytes())[0]


def order_samples(prefix: str = "dcm4che_") -> list[Path]:
    """The public samples (dcm4che/IHE) that are orders by their MSH-9 (not by file name); `prefix=""`
    adds the messages written here from the standard (hub_*)."""
    found = []
    for path in sorted(SAMPLES.glob(f"{prefix}*.hl7")):
        msh9 = charset.decode(path.read_bytes())[0].split("\r", 1)[0].split("|")[8]
        if msh9.split("^")[0] in ("ORM", "OMI"):
            found.append(path)
    return found


def filled(resource: dict[str, Any], **refs: Any) -> dict[str, Any]:
    """The resource as the caller stores it: placeholders filled or dropped."""
    out = {k: v for k, v in resource.items() if v is not None}
    out.update(refs)
    return out


def check_fhir(resource: dict[str, Any], fhir_validate: Callable[[dict[str, Any]], list[str]]) -> None:
    validate(resource, REPO_ROOT / "mappings")  # R4B models + required-binding codes (the hub's write path)
    assert fhir_validate(resource) == []  # HL7's R4 JSON schema


def check_message(m: OrderMessage, fhir_validate: Callable[[dict[str, Any]], list[str]]) -> None:
    patient = {"reference": "Patient/p1"}
    check_fhir(m.patient, fhir_validate)
    if m.encounter is not None:
        check_fhir(filled(m.encounter, subject=patient), fhir_validate)
    for order in m.orders:
        check_fhir(filled(order.service_request, subject=patient), fhir_validate)
        check_fhir(filled(order.imaging_study, subject=patient), fhir_validate)


def ident(resource: dict[str, Any], code: str) -> dict[str, Any]:
    return next(i for i in resource["identifier"]
                if any(c.get("code") == code for c in i.get("type", {}).get("coding", [])))


# -- the public samples ---------------------------------------------------------------------
def test_the_order_samples_are_found_by_their_header() -> None:
    names = [p.name for p in order_samples()]
    assert len(names) == 4, names
    assert "dcm4che_ORM_O01-GeneralOrder_HEAD_is_really_OMI_O23.hl7" in names


@pytest.mark.parametrize("path", order_samples(), ids=lambda p: p.name)
def test_every_order_sample_maps_to_valid_fhir(path: Path, fhir_validate: Any) -> None:
    m = map_order(charset.decode(path.read_bytes())[0])
    assert m.orders and m.patient["identifier"]
    check_message(m, fhir_validate)
    for order in m.orders:
        sr = order.service_request
        assert sr["intent"] == "order" and sr["subject"] is None and sr["encounter"] is None
        assert sr["category"][0]["coding"][0] == {"system": "http://snomed.info/sct", "code": "363679005",
                                                  "display": "Imaging"}
        assert order.study_instance_uid and order.accession and order.modality


def test_orm_v231_radiology_sample(fhir_validate: Any) -> None:
    m = map_order(sample_text("dcm4che_ORM_O01_v231_radiology.hl7"))
    assert (m.message_type, m.control_id, m.sending_facility, m.version) == ("ORM^O01", "103106", "XYZ_RADIOLOGY", "2.3.1")
    p = m.patient
    assert p["identifier"] == [{"value": "583295", "system": "urn:interop-hub:pid:ADT1", "assigner": {"display": "ADT1"}}]
    assert p["name"] == [{"family": "DOE", "given": ["J1"]}]
    assert p["gender"] == "male"
    assert m.encounter is not None
    assert m.encounter["identifier"][0]["value"] == "V103-1"
    assert m.encounter["class"]["code"] == "EMER"
    assert m.encounter["period"]["start"] == "2000-07-01T08:00:00+07:00"
    (order,) = m.orders
    assert order.order_control == "NW" and order.order_status == "SC"
    assert order.placer == {"value": "A103Z", "system": "urn:interop-hub:placer:MESA_ORDPLC",
                            "assigner": {"display": "MESA_ORDPLC"},
                            "type": {"coding": [{"system": V2_0203, "code": "PLAC"}]}}
    assert order.filler is not None and order.filler["value"] == "B103Z"
    assert order.study_instance_uid == "1.113654.3.13.1026"  # ZDS-1.1
    assert order.modality == "MR"  # OBR-24
    assert order.accession == "MOF5026"  # OBR-18, IHE RAD v2.3.1
    assert order.requested_procedure_id == "RP1026" and order.scheduled_procedure_step_id == "SPS2032"
    sr = order.service_request
    assert sr["status"] == "active"  # ORC-5 SC through OrderStatus
    assert sr["priority"] == "stat"  # ORC-7.6 S
    assert sr["authoredOn"] == "2000-07-01T09:00:00+07:00"  # ORC-9, NW
    assert ident(sr, "ACSN")["value"] == "MOF5026"
    assert sr["code"]["coding"][0]["code"] == "P1"
    assert order.requester == sr["requester"] and sr["requester"]["display"] == "DR JAIME P ESTRADA"
    (practitioner,) = sr["contained"]
    assert sr["requester"]["reference"] == f"#{practitioner['id']}"
    assert practitioner["identifier"][0]["value"] == "7101"
    study = order.imaging_study
    assert {"system": "urn:dicom:uid", "value": "urn:oid:1.113654.3.13.1026", "use": "official"} in study["identifier"]
    assert study["modality"] == [{"code": "MR", "system": "http://dicom.nema.org/resources/ontology/DCM"}]


def test_omi_v251_imaging_order_sample(fhir_validate: Any) -> None:
    m = map_order(sample_text("dcm4che_OMI_O23-ImagingOrder_v251.hl7"))
    assert m.message_type == "OMI^O23" and m.version == "2.5.1"
    assert m.patient["birthDate"] == "2014-10-14" and m.patient["gender"] == "female"
    assert m.patient["name"] == [{"family": "Smith", "given": ["Lucy", "Mark"]}]
    (order,) = m.orders
    assert order.accession == "AccessionNumber"  # IPC-1
    assert order.study_instance_uid == "1.2.392.200036.9125.0.198811291108.7"  # IPC-3
    assert order.modality == "CT"  # IPC-5
    assert order.requested_procedure_id == "RequestedProcID" and order.scheduled_procedure_step_id == "ScheduledProcStepID"
    assert order.station_name == "ScheduledStationName"
    assert order.station_ae_titles == ("ScheduledStationAET1", "ScheduledStationAET2")
    sr = order.service_request
    assert ident(sr, "ACSN")["value"] == "AccessionNumber"
    assert sr["occurrenceTiming"]["repeat"]["boundsPeriod"]["start"] == "2000-08-16T15:10:00+07:00"  # TQ1-7
    assert "priority" not in sr  # ORC-7.6 "RequestedProcedurePriority" is no table 0485 code
    assert order.procedure_code == {"coding": [{"code": "10637-7", "display": "Microscopic Observation",
                                                "system": "http://loinc.org"}]}
    assert sr["requester"]["display"] == "DR RequestingPhysicianGN RequestingPhysicianMN RequestingPhysicianFN"  # OBR-16
    assert order.reason[0]["coding"][0]["code"] == "D1304"


def test_file_named_orm_is_really_omi_with_zds(fhir_validate: Any) -> None:
    m = map_order(sample_text("dcm4che_ORM_O01-GeneralOrder_HEAD_is_really_OMI_O23.hl7"))
    assert m.message_type == "OMI^O23"
    (order,) = m.orders
    assert order.study_instance_uid == "1.2.392.200036.9125.0.198811291108.7"  # ZDS-1.1, no IPC
    assert order.accession == "AccessionNumber" and order.modality == "CT"  # OBR-18, OBR-24


def test_veterinary_omi_keeps_every_patient_identifier() -> None:
    m = map_order(sample_text("dcm4che_OMI_O23_v251_ipc_veterinary.hl7"))
    assert [(i["value"], i["system"]) for i in m.patient["identifier"]] == [
        ("1234", "urn:interop-hub:pid:CHIP-ISSUER"), ("4711471151", "urn:interop-hub:pid:zxcv"),
        ("1234", "urn:interop-hub:pid:TATTOO-ISSUER")]  # PID-4, the alternate id (the IG's identifier[3])
    animal = next(e for e in m.patient["extension"] if e["url"].endswith("/patient-animal"))
    assert [(e["url"], e["valueCodeableConcept"]["coding"][0]["code"]) for e in animal["extension"]] == [
        ("species", "388490000"), ("breed", "25243005")]  # PID-35, PID-36
    assert m.orders[0].accession == "ACC" and m.orders[0].study_instance_uid.endswith(".199402091242.1")
    assert m.orders[0].procedure_code["coding"][0]["code"] == "ProtocolCode"  # IPC-6: OBR-4 is empty


# -- the parser --------------------------------------------------------------------------------
@pytest.mark.parametrize("path", order_samples(), ids=lambda p: p.name)
def test_parser_agrees_with_hl7apy_and_keeps_z_segments(path: Path) -> None:
    text = charset.decode(path.read_bytes())[0]
    ours = parse(text)
    theirs = parse_message(text, find_groups=False, validation_level=VALIDATION_LEVEL.TOLERANT)
    assert [s.id for s in ours] == [s.name for s in theirs.children]
    compared = 0
    for seg, hseg in zip(ours, theirs.children):
        by_field: dict[int, list[str]] = {}
        for f in hseg.children:
            if f.name:
                by_field.setdefault(int(f.name.split("_")[1]), []).append(f.to_er7())
        for n, reps in by_field.items():
            if seg.id == "MSH" and n <= 2:
                continue
            assert ["^".join("&".join(c.subs) for c in r) for r in seg.get(n)] == reps, (seg.id, n)
            compared += 1
    assert compared > 20
    if "ZDS" in text:
        assert ours.first("ZDS") is not None and ours.value("ZDS", 1).startswith("1.")


def test_accessor_positions_and_escapes() -> None:
    text = ("MSH|^~\\&|HIS|BV|HUB|P|20260101||ORM^O01|1|P|2.3.1\r"
            "PID|||A1^^^BV~B2^^^&1.2.3&ISO||X\\S\\Y\\T\\Z\\F\\W\\R\\V\\E\\U^\\X41C3\\\r"
            "ZZZ|" + "|" * 40 + "late^^^^^^^^^^^^^^^^^^^^^^^^^^c27")
    m = parse(text)
    assert m.get("PID", 3)[1].component(4, 2) == "1.2.3"
    assert m.get("PID", 3)[1].comp(4).subs == ("", "1.2.3", "ISO")
    assert [list(r) for r in m.get("PID", 3)] == [["A1", "", "", "BV"], ["B2", "", "", "&1.2.3&ISO"]]
    assert m.value("PID", 5) == "X^Y&Z|W~V\\U" and m.value("PID", 5, 2) == "AÃ"
    assert len(m.get("PID", 5)[0]) == 2  # escaped delimiters do not split
    assert m.value("ZZZ", 41, 27) == "c27"  # positions past any table survive
    assert m.get("PID", 99) == [] and m.value("OBR", 4) == ""


def test_lf_separators_and_bom_give_the_same_mapping() -> None:
    raw = (SAMPLES / "dcm4che_ORM_O01_v231_radiology.hl7").read_bytes()
    text = charset.decode(raw)[0]
    assert map_order(text) == map_order("\ufeff" + text.replace("\r", "\n"))
    assert map_order(charset.decode(raw.replace(b"\r", b"\n"))[0]) == map_order(text)


# -- messages built here -----------------------------------------------------------------------
def segment(seg_id: str, fields: dict[int, str]) -> str:
    return "|".join([seg_id] + [fields.get(n, "") for n in range(1, max(fields) + 1)])


def orm(*, control: str = "NW", status: str = "SC", pid: str = "PID|||BN0001^^^BVDK^MR||NGUYỄN^VĂN AN||19580214|M",
        obr31: str = "^ho kéo dài 3 tuần", charset_label: str = "UNICODE UTF-8", extra: str = "") -> str:
    segments = [
        f"MSH|^~\\&|HIS|BVDKDN|AIHUB|PROVINCE|20261122083000||ORM^O01|C1|P|2.3.1||||||{charset_label}",
        pid,
        "PV1||O|XQ^^^BVDKDN||||1234^TRAN^BINH^^^BS|||||||||||V1^^^BVDKDN",
        f"ORC|{control}|PL1^HIS|FL1^RIS||{status}||^^^20261122083000^^R||20261122083000|||1234^TRAN^BINH^^^BS",
        segment("OBR", {1: "1", 2: "PL1^HIS", 3: "FL1^RIS", 4: "36554-4^XR Chest Single view^LN", 18: "ACC1",
                        19: "RP1", 20: "SPS1", 24: "DX", 27: "^^^20261122083000^^R", 31: obr31}),
        "ZDS|1.2.840.113619.2.55.3^HUB^Application^DICOM",
    ]
    return "\r".join([s for s in segments if s] + ([extra] if extra else []))


def test_vietnamese_name_in_utf8_maps_intact(fhir_validate: Any) -> None:
    for label in ("UNICODE UTF-8", "8859/1"):  # UTF-8 bytes under a Latin-1 label too (charset.py)
        text, _codec = charset.decode(orm(charset_label=label).encode("utf-8"))
        m = map_order(text)
        assert m.patient["name"] == [{"family": "NGUYỄN", "given": ["VĂN AN"]}]
        assert m.patient["identifier"][0]["system"] == "urn:interop-hub:pid:BVDK"
        assert m.patient["identifier"][0]["type"]["coding"][0]["code"] == "MR"
        assert m.orders[0].reason == [{"text": "ho kéo dài 3 tuần"}]  # CWE without a code: text
        assert m.orders[0].service_request["occurrenceTiming"]["repeat"]["boundsPeriod"]["start"] == \
            "2026-11-22T08:30:00+07:00"  # ORC-7.4, site timezone
        assert m.orders[0].priority == "routine"
        assert (m.orders[0].accession, m.orders[0].modality, m.orders[0].requested_procedure_id) == ("ACC1", "DX", "RP1")
        assert m.encounter is not None and m.encounter["class"]["code"] == "AMB"
        assert m.encounter["location"] == [{"location": {"display": "XQ, BVDKDN"}, "status": "active"}]
        check_message(m, fhir_validate)


def test_escape_sequences_are_undone_in_fhir() -> None:
    m = map_order(orm(pid="PID|||BN2^^^BVDK||O\\T\\BRIEN^ANNA\\S\\MARIE||19580214|F",
                      obr31="^fever\\F\\cough\\R\\dyspnoea\\E\\"))
    assert m.patient["name"] == [{"family": "O&BRIEN", "given": ["ANNA^MARIE"]}]
    assert m.orders[0].reason == [{"text": "fever|cough~dyspnoea\\"}]


@pytest.mark.parametrize("control,status,expected", [
    ("NW", "", "active"),         # OrderControlCode row 18
    ("NW", "SC", "active"),       # ORC-5 wins: OrderStatus SC
    ("XO", "", "unknown"),        # XO: no status in the IG's table -> the message map's default
    ("XO", "SC", "active"),
    ("CA", "", "active"),         # the IG: a cancel *request* (row 4); CR/OC are the revocations
    ("OC", "", "revoked"),        # row 19
    ("DC", "", "revoked"),        # row 9
    ("SC", "CM", "completed"),    # status changed, exam complete
    ("SC", "IP", "active"),
    ("SC", "CA", "revoked"),
])
def test_order_control_and_status_follow_the_ig_table(control: str, status: str, expected: str, fhir_validate: Any) -> None:
    m = map_order(orm(control=control, status=status))
    (order,) = m.orders
    assert order.order_control == control and order.order_status == (status or None)
    assert order.service_request["status"] == expected
    assert ("authoredOn" in order.service_request) == (control == "NW")  # ORC-9 only IF ORC-1 = NW
    check_message(m, fhir_validate)


def test_two_orders_in_one_message() -> None:
    text = orm(extra="ORC|NW|PL2^HIS|FL2^RIS||SC\r" + segment("OBR", {1: "2", 2: "PL2^HIS", 3: "FL2^RIS",
                                                                     4: "24627-2^CT Chest^LN", 18: "ACC2", 24: "CT"}))
    m = map_order(text)
    assert [(o.placer["value"], o.accession, o.modality, o.study_instance_uid) for o in m.orders] == [
        ("PL1", "ACC1", "DX", "1.2.840.113619.2.55.3"), ("PL2", "ACC2", "CT", None)]


def test_timezone_given_is_kept_and_partial_times_are_completed() -> None:
    m = map_order(orm().replace("||20261122083000|||1234", "||202611220830-0500|||1234"))
    assert m.orders[0].service_request["authoredOn"] == "2026-11-22T08:30:00-05:00"


def test_adt_a08_builds_the_patient_update(fhir_validate: Any) -> None:
    for event in ("A08", "A31"):
        text = "\r".join([
            f"MSH|^~\\&|HIS|BVDKDN|AIHUB|PROVINCE|20261122090000||ADT^{event}^ADT_A01|U1|P|2.5||||||UNICODE UTF-8",
            f"EVN|{event}|20261122090000",
            "PID|1||BN0001^^^BVDK^MR~079123456789^^^VNM^NI||TRẦN^THỊ BÍCH^^^^^L||19900305|F|||"
            "12 Lê Lợi^^Biên Hòa^Đồng Nai^^VN^H||^PRN^PH^^^^^^^^^0901234567|||||||||||||||||N",
            "PV1||I|K3^P12^B4^BVDKDN||||||||||||||||V77^^^BVDKDN|||||||||||||||||||||||||202611200700",
        ])
        u = map_patient_update(charset.decode(text.encode("utf-8"))[0])
        assert u.message_type == f"ADT^{event}" and u.control_id == "U1" and u.sending_facility == "BVDKDN"
        p = u.patient
        assert [(i["value"], i["system"]) for i in p["identifier"]] == [
            ("BN0001", "urn:interop-hub:pid:BVDK"), ("079123456789", "urn:interop-hub:pid:VNM")]
        assert p["name"] == [{"family": "TRẦN", "given": ["THỊ BÍCH"], "use": "official"}]
        assert p["gender"] == "female" and p["birthDate"] == "1990-03-05"
        assert p["address"] == [{"line": ["12 Lê Lợi"], "city": "Biên Hòa", "state": "Đồng Nai", "country": "VN",
                                 "use": "home"}]
        assert p["telecom"] == [{"value": "0901234567", "system": "phone", "use": "home"}]
        check_fhir(p, fhir_validate)
        assert u.encounter is not None and u.encounter["class"]["code"] == "IMP"
        assert u.encounter["period"]["start"] == "2026-11-20T07:00:00+07:00"
        check_fhir(filled(u.encounter, subject={"reference": "Patient/p1"}), fhir_validate)


# -- errors ------------------------------------------------------------------------------------
def test_missing_pid_or_orc_names_the_segment() -> None:
    no_pid = orm(pid="")
    with pytest.raises(MessageError) as info:
        map_order(no_pid)
    assert info.value.segment == "PID" and info.value.error_code == ErrorCode.SEGMENT_SEQUENCE
    assert "PID" in str(info.value) and "PID" in info.value.err_segment("2.5")
    no_orc = "\r".join(line for line in orm().split("\r") if not line.startswith("ORC"))
    with pytest.raises(MessageError) as info:
        map_order(no_orc)
    assert info.value.segment == "ORC" and info.value.reason
    with pytest.raises(MessageError) as info:
        map_patient_update("MSH|^~\\&|HIS|BV|HUB|P|20260101||ADT^A08|1|P|2.5\rEVN|A08")
    assert info.value.segment == "PID"


def test_errors_carry_location_but_no_patient_data() -> None:
    bad = orm(pid="PID|||BN0001^^^BVDK||NGUYỄN^VĂN AN||1958-02-14|M")
    with pytest.raises(MessageError) as info:
        map_order(bad)
    err = info.value
    assert (err.segment, err.field, err.error_code) == ("PID", 7, ErrorCode.DATA_TYPE)
    for rendered in (str(err), err.reason, err.err_segment("2.5"), err.err_segment("2.3.1")):
        assert "1958" not in rendered and "NGUY" not in rendered and "BN0001" not in rendered
    with pytest.raises(MessageError) as info:
        map_order(orm().replace("ORM^O01", "ADT^A08"))
    assert info.value.error_code == ErrorCode.UNSUPPORTED_MESSAGE_TYPE and info.value.field == 9
    for garbage in ("", "hello", "PID|||1", "MSH|^~\\&|A\rP!D|x"):
        with pytest.raises(MessageError):
            map_order(garbage)


# -- the tables ----------------------------------------------------------------------------------
def _csv(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.reader(f))


def _rows(value: Any) -> list[int]:
    return [] if value is None else (value if isinstance(value, list) else [value])


def test_every_cited_ig_row_exists_and_names_the_same_field() -> None:
    """A reviewer's check, automated: each row's ig_row points at the IG line for that field."""
    checked = 0
    for f in sorted((DEFAULT_DIR / "segments").glob("*.yaml")):
        spec = yaml.safe_load(f.read_text(encoding="utf-8"))
        if not spec["ig_sheet"]:
            assert all(r["ig_row"] is None for r in spec["rows"]), f"{f.name}: the hub's own file cites no IG row"
            continue
        sheet = _csv(IG / "segments" / spec["ig_sheet"])
        for row in spec["rows"]:
            for n in _rows(row["ig_row"]):
                assert sheet[n - 1][1] == row["field"].split(".")[0], (f.name, row["field"], n)
                checked += 1
    for f in sorted((DEFAULT_DIR / "datatypes").glob("*.yaml")):
        spec = yaml.safe_load(f.read_text(encoding="utf-8"))
        if not spec.get("ig_sheet") or not spec.get("components"):
            continue
        sheet = _csv(IG / "datatypes" / spec["ig_sheet"])
        for row in spec["components"]:
            comps = row.get("components") or [row.get("c")]
            for n in _rows(row.get("ig_row")):
                assert sheet[n - 1][1] in [f"{spec['datatype']}.{c}" for c in comps] + \
                    [f"{spec['ig_sheet'].split('_ ')[1].split('[')[0]}.{c}" for c in comps], (f.name, row, n)
                checked += 1
    for f in sorted((DEFAULT_DIR / "codesystems").glob("*.yaml")):
        spec = yaml.safe_load(f.read_text(encoding="utf-8"))
        if not spec["ig_sheet"]:
            continue
        sheet = _csv(IG / "codesystems" / spec["ig_sheet"])
        for code, entry in spec["map"].items():
            line = sheet[entry["ig_row"] - 1]
            assert (line[0], line[6]) == (code, entry["code"]), (f.name, code)
            checked += 1
    assert checked > 100


def test_tables_load_and_every_message_map_names_known_maps() -> None:
    tables = load_tables(DEFAULT_DIR)
    assert {"ORM_O01", "OMI_O23", "ADT_A08"} <= set(tables.messages)
    assert tables.message_for("OMI^O23")["structure"] == "OMI_O23"
    for name in ("PID-Patient", "PV1-Encounter", "ORC-ServiceRequest", "OBR-ServiceRequest", "TQ1-ServiceRequest",
                 "IPC-ServiceRequest", "IPC-ImagingStudy"):
        assert name in tables.segments
