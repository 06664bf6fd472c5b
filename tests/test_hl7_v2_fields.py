"""Every field the v2-to-FHIR IG maps for PID, PV1, ORC, OBR, NTE, TQ1 (and DG1, the reason for
the study) reaches FHIR (issue 15), on two messages written here from the standard (v2.6 ORM^O01,
v2.8 OMI^O23, tests/data/hl7v2/hub_*) and the dcm4che/IHE samples. Each output is checked by
every validator the tests have (R4 JSON schema, FHIR.js, Medplum, R4's data type invariants such as
cnt-1: a ContactPoint with a value has a system)."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient

from interop.hl7.errors import ErrorCode
from interop.hl7.mapping import MappingTableError, set_path
from interop.hl7.message import MessageError
from interop.hl7.order import OrderMessage
from tests.fixtures.fhir_check import FhirCheck, started
from tests.fixtures.mllp import RunningListener, send
from tests.test_hl7_adt import process_all, search
from tests.test_hl7_mapping import SAMPLES, V2_0203, filled, map_order, order_samples, sample_text

V26 = "hub_ORM_O01_v26_written_from_the_standard.hl7"
V28 = "hub_OMI_O23_v28_written_from_the_standard.hl7"
PATIENT = {"reference": "Patient/p1"}


@pytest.fixture(scope="module")
def checker(fhir_validate: Any) -> Iterator[FhirCheck]:
    with started(fhir_validate) as check:
        yield check


def all_valid(m: OrderMessage, checker: FhirCheck) -> None:
    resources = [m.patient]
    if m.encounter is not None:
        resources.append(filled(m.encounter, subject=PATIENT))
    for order in m.orders:
        resources += [filled(order.service_request, subject=PATIENT), filled(order.imaging_study, subject=PATIENT)]
    for resource in resources:
        assert checker.problems(resource) == [], resource["resourceType"]


def ext(resource: dict[str, Any], url: str) -> dict[str, Any]:
    return next(e for e in resource.get("extension", []) if e["url"] == f"http://hl7.org/fhir/StructureDefinition/{url}")


# -- v2.6 ORM^O01 -------------------------------------------------------------------------------
def test_v26_patient_keeps_every_field_the_ig_maps(checker: FhirCheck) -> None:
    m = map_order(sample_text(V26))
    assert m.version == "2.6"
    p = m.patient
    # PID-3 (two) and PID-4 (the alternate id: the health-insurance number here)
    assert [(i["value"], i["type"]["coding"][0]["code"]) for i in p["identifier"]] == [
        ("BN260001", "MR"), ("079085001234", "NI"), ("HS260001", "HC")]
    assert p["name"] == [{"family": "LÊ", "given": ["THỊ HOA"], "use": "official"}]
    assert ext(p, "patient-mothersMaidenName")["valueString"] == "PHẠM"  # PID-6
    assert p["birthDate"] == "1985-03-12"  # PID-7, and the time of birth in its extension
    assert p["_birthDate"]["extension"] == [{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                                             "valueDateTime": "1985-03-12T07:15:00+07:00"}]
    # PID-11: the street line comes from SAD.2 (street name) and SAD.3 (dwelling number)
    assert p["address"] == [{"line": ["45 Lý Thường Kiệt", "Phường 7"], "city": "Biên Hòa", "state": "Đồng Nai",
                             "postalCode": "810000", "country": "VN", "use": "home",
                             "period": {"start": "2020-01-01", "end": "2030-12-31"}}]
    # PID-13/PID-14: every number has a system (cnt-1), use from XTN.2 or the field (home/work)
    assert p["telecom"] == [
        {"value": "0912345678", "system": "phone", "use": "home"},
        {"value": "+84 913 222333", "system": "phone", "use": "home"},
        {"value": "hoa.le@example.vn", "system": "email", "use": "home"},
        {"value": "251 3822111 ext. 12", "system": "phone", "use": "work"}]
    assert p["communication"] == [{"language": {"coding": [{"code": "vi", "display": "Vietnamese",
                                                            "system": "urn:ietf:bcp:47"}]}}]  # PID-15
    assert p["maritalStatus"]["coding"] == [  # PID-16: as sent, and in R4's own code system
        {"code": "M", "display": "Married", "system": "http://terminology.hl7.org/CodeSystem/v2-0002"},
        {"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "code": "M", "display": "Married"}]
    assert p["multipleBirthBoolean"] is False  # PID-24 N
    all_valid(m, checker)


def test_v26_order_keeps_reason_notes_priority_and_timing(checker: FhirCheck) -> None:
    m = map_order(sample_text(V26))
    (order,) = m.orders
    sr = order.service_request
    assert sr["priority"] == "stat" and order.priority == "stat"  # TQ1-9 S
    assert sr["occurrenceTiming"] == {"repeat": {"boundsPeriod": {"start": "2026-12-01T10:00:00+07:00",
                                                                  "end": "2026-12-01T12:00:00+07:00"}}}  # TQ1-7/8
    assert "occurrenceDateTime" not in sr  # OBR-6 only without a timing: occurrence[x] is one of them
    # the reason for study: OBR-31 as text, and each DG1's diagnosis
    assert sr["reasonCode"] == [
        {"text": "Đau ngực, khó thở 2 ngày"},
        {"coding": [{"code": "J93.9", "display": "Pneumothorax, unspecified", "system": "http://hl7.org/fhir/sid/icd-10"}]},
        {"coding": [{"code": "R07.4", "display": "Chest pain, unspecified", "system": "http://hl7.org/fhir/sid/icd-10"}]}]
    assert order.reason == sr["reasonCode"]
    # each NTE is one note; the repetitions of NTE-3 are its lines
    assert sr["note"] == [
        {"text": "URGENT: nghi tràn khí màng phổi, đọc ngay / suspected pneumothorax, read at once"},
        {"text": "Bệnh nhân mang thai 10 tuần\nPatient 10 weeks pregnant"}]
    assert ext(sr, "servicerequest-order-callback-phone-number")["valueContactPoint"] == {
        "value": "251 3822111", "system": "phone", "use": "work"}  # ORC-14
    enc = m.encounter
    assert enc is not None and enc["serviceType"] == {"coding": [{"code": "RAD"}]}  # PV1-10
    roles = [pt["type"][0]["coding"][0]["code"] for pt in enc["participant"]]
    assert roles == ["ATND", "REF", "CON"]  # PV1-7, PV1-8, PV1-9
    all_valid(m, checker)


# -- v2.8 OMI^O23 ----------------------------------------------------------------------------------
def test_v28_message_maps_the_fields_v27_added(checker: FhirCheck) -> None:
    m = map_order(sample_text(V28))
    assert (m.message_type, m.version) == ("OMI^O23", "2.8")
    p = m.patient
    # XAD.13 effective date and XAD.19 addressee (v2.7+)
    assert p["address"] == [{"line": ["527 Nguyễn Tri Phương", "Anh Hai"], "city": "Quận 10", "state": "Hồ Chí Minh",
                             "postalCode": "700000", "country": "VN", "use": "home", "period": {"start": "2019-05-01"}}]
    # PID-40 (v2.7+ telecom): no XTN.1 any more, the number from its parts, e-mail from X.400
    assert p["telecom"] == [{"value": "+84 908 765432", "system": "phone", "use": "home"},
                            {"value": "+84 28 38652368", "system": "fax", "use": "work"},
                            {"value": "bay.nguyen@example.vn", "system": "email"}]
    assert p["maritalStatus"]["coding"][1]["code"] == "W"
    (order,) = m.orders
    sr = order.service_request
    assert sr["priority"] == "asap"
    assert sr["occurrenceTiming"]["repeat"] == {
        "timeOfDay": ["10:30:00", "14:30:00"], "boundsPeriod": {"start": "2026-12-01T10:30:00+07:00"},
        "duration": 15, "durationUnit": "min", "count": 1}  # TQ1-4, -7, -13, -14 (count: R4's tim-8)
    assert sr["quantityQuantity"] == {"value": 1, "code": "{film}", "unit": "film",
                                      "system": "http://unitsofmeasure.org"}  # TQ1-2
    assert sr["note"] == [{"text": "Chụp trong vòng 30 phút"}, {"text": "URGENT: chấn thương ngực / chest trauma"}]
    assert sr["reasonCode"][0]["coding"][0]["code"] == "S27.0"
    assert sr["orderDetail"][0]["coding"][0]["code"] == "CONTRAST"  # OBR-46
    assert (order.accession, order.study_instance_uid, order.modality) == ("ACC280001", "1.2.840.113619.2.55.3.2801", "CT")
    all_valid(m, checker)


# -- the public samples and hand-written edge cases ------------------------------------------------
@pytest.mark.parametrize("path", order_samples(prefix=""), ids=lambda p: p.name)
def test_every_order_sample_passes_every_validator(path: Any, checker: FhirCheck) -> None:
    all_valid(map_order(sample_text(path.name)), checker)


def _with_pid(fields: dict[int, str]) -> str:
    pid = ["PID"] + [fields.get(n, "") for n in range(1, max(fields) + 1)]
    return "\r".join(["MSH|^~\\&|HIS|BVDKDN|AIHUB|P|20261201||ORM^O01|E1|P|2.5.1", "|".join(pid),
                      "ORC|NW|P1^HIS|F1^RIS||SC", "OBR|1|P1^HIS|F1^RIS|36554-4^XR Chest^LN"])


@pytest.mark.parametrize("xtn,expected", [
    ("0912345678", {"value": "0912345678", "system": "phone", "use": "home"}),            # a number alone
    ("^^^a@b.vn", {"value": "a@b.vn", "system": "email", "use": "home"}),                # only XTN.4
    ("^NET^^a@b.vn", {"value": "a@b.vn", "system": "email", "use": "home"}),             # NET, no equipment
    ("^PRN^MD^^^^^^^^^5551234", {"value": "5551234", "system": "other", "use": "home"}),  # modem: other
    ("^PRS^ZZ^^^^5551234", {"value": "5551234", "system": "other", "use": "mobile"}),    # unknown equipment
    ("^^CP^^84^912^345678", {"value": "+84 912 345678", "system": "phone", "use": "mobile"}),
    ("^BPN^^^^^1234", {"value": "1234", "system": "pager", "use": "home"}),
])
def test_every_contact_point_has_a_system(xtn: str, expected: dict[str, Any], checker: FhirCheck) -> None:
    p = map_order(_with_pid({3: "BN1^^^BVDKDN", 5: "A^B", 13: xtn})).patient
    assert p["telecom"] == [expected]
    assert checker.problems(p) == []


def test_an_empty_xtn_gives_no_contact_point() -> None:
    assert "telecom" not in map_order(_with_pid({3: "BN1^^^BVDKDN", 5: "A^B", 13: "^PRN^PH"})).patient


def test_street_line_as_sad_1_or_from_its_parts() -> None:
    for xad, line in (("12 Le Loi^^Bien Hoa", "12 Le Loi"), ("&Le Loi&12^^Bien Hoa", "12 Le Loi"),
                      ("12 Le Loi&Le Loi&12^^Bien Hoa", "12 Le Loi"), ("&Le Loi^^Bien Hoa", "Le Loi")):
        p = map_order(_with_pid({3: "BN1^^^BVDKDN", 5: "A^B", 11: xad})).patient
        assert p["address"][0]["line"] == [line], xad


def test_a_note_after_an_observation_is_the_observations_not_the_orders() -> None:
    text = "\r".join(["MSH|^~\\&|HIS|BVDKDN|AIHUB|P|20261201||OMI^O23|E2|P|2.5.1", "PID|||BN1^^^BVDKDN||A^B",
                      "NTE|1||patient note", "ORC|NW|P1^HIS|F1^RIS||SC", "OBR|1|P1^HIS|F1^RIS|36554-4^XR^LN",
                      "NTE|1||order note", "OBX|1|NM|29463-7^Weight^LN||70|kg", "NTE|1||observation note",
                      "DG1|1||R05^Cough^I10"])
    sr = map_order(text).orders[0].service_request
    assert sr["note"] == [{"text": "order note"}]
    assert sr["reasonCode"] == [{"coding": [{"code": "R05", "display": "Cough", "system": "http://hl7.org/fhir/sid/icd-10"}]}]


def test_a_bad_number_or_time_names_its_field() -> None:
    bad = _with_pid({3: "BN1^^^BVDKDN", 5: "A^B", 25: "second"})
    with pytest.raises(MessageError) as info:
        map_order(bad)
    assert (info.value.segment, info.value.field, info.value.error_code) == ("PID", 25, ErrorCode.DATA_TYPE)
    text = sample_text(V28).replace("TQ1|1|1^{film}&film&UCUM||1030~1430", "TQ1|1|1^{film}&film&UCUM||2599")
    with pytest.raises(MessageError) as info:
        map_order(text)
    assert (info.value.segment, info.value.field) == ("TQ1", 4)


def test_extension_paths_add_to_the_extension_of_that_url() -> None:
    r: dict[str, Any] = {}
    set_path(r, "extension{http://x.org/a.b}.extension{species}", {"valueString": "dog"})
    set_path(r, "extension{http://x.org/a.b}.extension{breed}", {"valueString": "poodle"})
    set_path(r, "extension[]", {"url": "http://x.org/c"})
    assert r == {"extension": [{"url": "http://x.org/a.b", "extension": [
        {"url": "species", "valueString": "dog"}, {"url": "breed", "valueString": "poodle"}]}, {"url": "http://x.org/c"}]}
    with pytest.raises(MappingTableError):
        set_path(r, "extension{}", {})


def test_identifiers_typed_as_the_ig_says() -> None:
    m = map_order(sample_text(V26))
    types = {c["code"] for i in m.orders[0].service_request["identifier"] for c in i["type"]["coding"]
             if c["system"] == V2_0203}
    assert types == {"PLAC", "FILL", "ACSN"}


# -- end to end ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [p.name for p in order_samples(prefix="")])
def test_order_samples_over_mllp_are_stored_with_every_field(name: str, mllp_listener: RunningListener,
                                                             db_url: str, client: FlaskClient,
                                                             checker: FhirCheck) -> None:
    """python-hl7's client -> the listener -> the hub's process-hl7 handler -> the FHIR API, for the
    dcm4che/IHE samples and the v2.6/v2.8 messages written here."""
    raw = (SAMPLES / name).read_bytes()
    answer = send(mllp_listener.port, raw)[0]
    assert ("MSA|CA|" if name.startswith("hub_") else "MSA|AA|") in answer  # hub_*: MSH-15 AL, commit ACK
    assert process_all(db_url) == []
    expected = map_order(sample_text(name))
    mrn = expected.patient["identifier"][0]
    (patient,) = search(client, f"Patient?identifier={mrn['system']}|{mrn['value']}")
    for key in ("telecom", "address", "maritalStatus", "name", "identifier", "extension"):
        assert patient.get(key) == expected.patient.get(key), key
    assert all(t.get("system") for t in patient.get("telecom", []))  # R4 cnt-1
    placer = expected.orders[0].placer
    assert placer is not None
    (order,) = search(client, f"ServiceRequest?identifier={placer['system']}|{placer['value']}")
    assert order["subject"] == {"reference": f"Patient/{patient['id']}"}
    for key in ("note", "reasonCode", "priority", "occurrenceTiming", "code", "requester", "contained"):
        assert order.get(key) == expected.orders[0].service_request.get(key), key
    if name.startswith("hub_"):
        assert any(n["text"].startswith("URGENT") for n in order["note"]) and order["reasonCode"]
    for resource in (patient, order):
        assert checker.problems(resource) == [], resource["resourceType"]
