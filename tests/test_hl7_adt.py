"""ADT and OMG over MLLP (issue 15): the hub's Patient records follow the HIS's.

End to end on a real PostgreSQL: python-hl7's MLLP client sends to the hub's listener, the
`process-hl7` job runs the hub's own handler (`orders.process_message`, what the worker calls),
and the outcome is read back through the FHIR API (a client with a bearer token). A01/A04 register
a patient and visit; A08/A31 replace the demographics; A40 merges: the prior patient inactive with
a replaced-by link, the surviving one with replaces, and every order, study and report of the prior
patient found from the surviving one. Bad ADT messages get AE/AR with an ERR saying where.
"""
from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient

from interop.config import Settings
from interop.services import orders
from interop.services.context import Context
from interop.store import queue
from interop.store import resources as store
from interop.store.db import connect
from tests.fixtures.mllp import RunningListener, orm, send
from tests.test_mllp import ack_fields, err_code

FACILITY = "BVDKDN"


def adt(event: str, control_id: str, pid: str, *, extra: tuple[str, ...] = (), version: str = "2.5.1",
        structure: str = "ADT_A01") -> bytes:
    return "\r".join([f"MSH|^~\\&|HIS|{FACILITY}|AIHUB|PROVINCE|20261201120000||ADT^{event}^{structure}|{control_id}|P|"
                      f"{version}||||||UNICODE UTF-8", f"EVN|{event}|20261201120000", pid, *extra]).encode("utf-8")


def process_all(db_url: str) -> list[str]:
    """Run every queued process-hl7 job with the hub's handler; the reasons of those that failed."""
    ctx = Context.from_settings(Settings.from_env({"DATABASE_URL": db_url}))
    failures = []
    with connect(db_url, autocommit=True) as conn:
        while (job := queue.claim(conn, "test-worker", 60, kinds=[orders.PROCESS_HL7])) is not None:
            try:
                orders.process_message(conn, ctx, job)
            except orders.MessageFailed as exc:
                with conn.transaction():
                    queue.finish(conn, job, "failed", exc.reason)
                    orders.message_failed(conn, ctx, job, exc.reason, exc)
                failures.append(exc.reason if exc.problem is None else exc.problem.err_segment())
    return failures


def search(client: FlaskClient, path: str) -> list[dict[str, Any]]:
    answer = client.get(f"/fhir/{path}")
    assert answer.status_code == 200, answer.get_json()
    return [e["resource"] for e in answer.get_json().get("entry", []) if e.get("search", {}).get("mode") != "include"]


def patient_by(client: FlaskClient, mrn: str) -> dict[str, Any]:
    (patient,) = search(client, f"Patient?identifier=urn:interop-hub:pid:{FACILITY}|{mrn}")
    return patient


def msa(answer: str) -> str:
    return ack_fields(answer.encode())["MSA"][1]


def test_a01_a04_register_and_a08_a31_update_the_demographics(mllp_listener: RunningListener, db_url: str,
                                                             client: FlaskClient) -> None:
    answers = send(mllp_listener.port,
                   adt("A04", "ADT-1", f"PID|1||BN7001^^^{FACILITY}^MR||TRẦN^VĂN NAM||19700101|M|||"
                                        "12 Lê Lợi^^Biên Hòa^^^VN^H||0911111111"),
                   adt("A01", "ADT-2", f"PID|1||BN7002^^^{FACILITY}^MR||PHAN^THỊ LAN||19800202|F",
                       extra=(f"PV1|1|I|K3^P12^B4^{FACILITY}||||||||||||||||V7002^^^{FACILITY}",)))
    assert [msa(a) for a in answers] == ["AA", "AA"]
    assert process_all(db_url) == []
    first = patient_by(client, "BN7001")
    assert first["name"] == [{"family": "TRẦN", "given": ["VĂN NAM"]}] and first["meta"]["versionId"] == "1"
    second = patient_by(client, "BN7002")
    (visit,) = search(client, f"Encounter?subject=Patient/{second['id']}")
    assert visit["class"]["code"] == "IMP" and visit["identifier"][0]["value"] == "V7002"

    # the HIS corrects the name, moves the patient, adds an insurance number, a phone and a status
    pid = (f"PID|1||BN7001^^^{FACILITY}^MR~HS7001^^^BHXH^HC||TRẦN^VĂN NAM^^^^^L||19700101|M|||"
           "&Nguyễn Ái Quốc&200^^Biên Hòa^Đồng Nai^^VN^H||^PRN^CP^^84^912^000111||vi^Vietnamese^ISO639|M^Married^HL70002")
    for event, control, structure in (("A08", "ADT-3", "ADT_A01"), ("A31", "ADT-4", "ADT_A05")):
        assert msa(send(mllp_listener.port, adt(event, control, pid, structure=structure))[0]) == "AA"
    assert process_all(db_url) == []
    updated = patient_by(client, "BN7001")
    assert updated["id"] == first["id"] and updated["meta"]["versionId"] == "3"
    assert updated["name"] == [{"family": "TRẦN", "given": ["VĂN NAM"], "use": "official"}]
    assert updated["address"] == [{"line": ["200 Nguyễn Ái Quốc"], "city": "Biên Hòa", "state": "Đồng Nai",
                                   "country": "VN", "use": "home"}]
    assert updated["telecom"] == [{"value": "+84 912 000111", "system": "phone", "use": "home"}]
    assert updated["maritalStatus"]["coding"][1]["code"] == "M"
    assert {i["value"] for i in updated["identifier"]} == {"BN7001", "HS7001"}

    # "" deletes what the hub holds (PID-13 phone, PID-16 marital status); an empty field changes nothing
    cleared = f'PID|1||BN7001^^^{FACILITY}^MR||TRẦN^VĂN NAM^^^^^L||19700101|M|||||""|||""'
    assert msa(send(mllp_listener.port, adt("A08", "ADT-5", cleared))[0]) == "AA"
    assert process_all(db_url) == []
    after = patient_by(client, "BN7001")
    assert "telecom" not in after and "maritalStatus" not in after
    assert after["address"] == updated["address"] and after["communication"] == updated["communication"]


def test_a40_merge_moves_orders_studies_and_reports_to_the_surviving_patient(
        mllp_listener: RunningListener, db_url: str, client: FlaskClient) -> None:
    # two records of one person: a temporary MRN from the emergency desk, and the real one
    answers = send(mllp_listener.port,
                   orm("M-1", placer="PL-M1", filler="FL-M1", accession="ACC-M1", patient_id="TMP900"),
                   orm("M-2", placer="PL-M2", filler="FL-M2", accession="ACC-M2", patient_id="BN9000"))
    assert [msa(a) for a in answers] == ["AA", "AA"]
    assert process_all(db_url) == []
    prior, survivor = patient_by(client, "TMP900"), patient_by(client, "BN9000")
    (prior_order,) = search(client, f"ServiceRequest?subject=Patient/{prior['id']}")
    ctx = Context.from_settings(Settings.from_env({"DATABASE_URL": db_url}))
    with connect(db_url, autocommit=True) as conn:  # the study and report the hub made for the prior record
        study = store.create(conn, {"resourceType": "ImagingStudy", "status": "available",
                                    "subject": {"reference": f"Patient/{prior['id']}"}}, ctx.params["ImagingStudy"])
        report = store.create(conn, {"resourceType": "DiagnosticReport", "status": "preliminary",
                                     "code": {"text": "chest X-ray"}, "subject": {"reference": f"Patient/{prior['id']}"},
                                     "basedOn": [{"reference": f"ServiceRequest/{prior_order['id']}"}]},
                              ctx.params["DiagnosticReport"])

    merge = adt("A40", "MRG-1", f"PID|1||BN9000^^^{FACILITY}^MR||NGUYỄN^VĂN AN||19580214|M",
                extra=(f"MRG|TMP900^^^{FACILITY}^MR",), structure="ADT_A39")
    assert msa(send(mllp_listener.port, merge)[0]) == "AA"
    assert process_all(db_url) == []

    retired = client.get(f"/fhir/Patient/{prior['id']}").get_json()
    assert retired["active"] is False
    assert retired["link"] == [{"other": {"reference": f"Patient/{survivor['id']}"}, "type": "replaced-by"}]
    stays = client.get(f"/fhir/Patient/{survivor['id']}").get_json()
    assert stays["active"] is True
    assert stays["link"] == [{"other": {"reference": f"Patient/{prior['id']}"}, "type": "replaces"}]
    assert [(i["value"], i.get("use")) for i in stays["identifier"]] == [("BN9000", None), ("TMP900", "old")]
    # everything of the prior record is found from the surviving one
    found = {o["identifier"][0]["value"] for o in search(client, f"ServiceRequest?subject=Patient/{survivor['id']}")}
    assert found == {"PL-M1", "PL-M2"}
    assert [s["id"] for s in search(client, f"ImagingStudy?patient=Patient/{survivor['id']}")] == [study["id"]]
    assert [r["id"] for r in search(client, f"DiagnosticReport?patient=Patient/{survivor['id']}")] == [report["id"]]
    assert search(client, f"ServiceRequest?subject=Patient/{prior['id']}") == []
    # a merge of a patient the hub never saw keeps the old number on the survivor
    assert msa(send(mllp_listener.port, adt("A40", "MRG-9", f"PID|1||BN9000^^^{FACILITY}^MR||NGUYỄN^VĂN AN",
                                            extra=(f"MRG|UNSEEN1^^^{FACILITY}^MR",), structure="ADT_A39"))[0]) == "AA"
    assert process_all(db_url) == []
    assert patient_by(client, "UNSEEN1")["id"] == survivor["id"]
    retired = client.get(f"/fhir/Patient/{prior['id']}").get_json()
    # the same A40 again changes nothing more; an order still naming the old number reaches the survivor
    assert msa(send(mllp_listener.port, merge.replace(b"MRG-1", b"MRG-2"))[0]) == "AA"
    assert msa(send(mllp_listener.port, orm("M-3", placer="PL-M3", filler="FL-M3", accession="ACC-M3",
                                            patient_id="TMP900"))[0]) == "AA"
    assert process_all(db_url) == []
    again = client.get(f"/fhir/Patient/{prior['id']}").get_json()
    assert again["link"] == retired["link"] and again["meta"]["versionId"] == retired["meta"]["versionId"]
    found = {o["identifier"][0]["value"] for o in search(client, f"ServiceRequest?subject=Patient/{survivor['id']}")}
    assert found == {"PL-M1", "PL-M2", "PL-M3"}
    stays = client.get(f"/fhir/Patient/{survivor['id']}").get_json()
    assert [(i["value"], i.get("use")) for i in stays["identifier"]] == [
        ("BN9000", None), ("TMP900", "old"), ("UNSEEN1", "old")]  # the late order did not make TMP900 current


def test_an_omg_o19_order_is_accepted_and_mapped(mllp_listener: RunningListener, db_url: str,
                                                 client: FlaskClient) -> None:
    message = "\r".join([
        f"MSH|^~\\&|HIS|{FACILITY}|AIHUB|PROVINCE|20261201120000||OMG^O19^OMG_O19|OMG-1|P|2.5.1||||||UNICODE UTF-8",
        f"PID|1||BN8001^^^{FACILITY}^MR||LÝ^THỊ MAI||19900909|F",
        "ORC|NW|PL-G1^HIS|FL-G1^RIS||SC", "TQ1|1||||||20261201130000||S",
        "OBR|1|PL-G1^HIS|FL-G1^RIS|36554-4^XR Chest Single view^LN||||||||||||||ACC-G1||||||DX",
        "NTE|1||URGENT: SpO2 88%", "DG1|1||J18.9^Pneumonia, unspecified^I10"]).encode("utf-8")
    assert msa(send(mllp_listener.port, message)[0]) == "AA"
    assert process_all(db_url) == []
    (order,) = search(client, "ServiceRequest?identifier=urn:interop-hub:placer:HIS|PL-G1")
    assert order["priority"] == "stat" and order["note"] == [{"text": "URGENT: SpO2 88%"}]
    assert order["reasonCode"][0]["coding"][0]["code"] == "J18.9"


@pytest.mark.parametrize("name,message,code,err", [
    ("an event the hub does not take", adt("A02", "BAD-1", f"PID|1||BN1^^^{FACILITY}^MR||A^B"), "AR", "201"),
    ("a merge without MRG", adt("A40", "BAD-2", f"PID|1||BN1^^^{FACILITY}^MR||A^B", structure="ADT_A39"), "AE", "100"),
    ("an ADT without PID", adt("A08", "BAD-3", f"PV1|1|O||||||||||||||||||V1^^^{FACILITY}"), "AE", "100"),
    ("a v2.3 merge (MRG-1 is a CX list from v2.3.1)",
     adt("A40", "BAD-4", f"PID|1||BN1^^^{FACILITY}^MR||A^B", extra=("MRG|X1",), version="2.3"), "AR", "203"),
])
def test_bad_adt_messages_are_answered_with_where_and_why(mllp_listener: RunningListener, db_url: str, name: str,
                                                          message: bytes, code: str, err: str) -> None:
    answer = send(mllp_listener.port, message)[0].encode()
    assert (ack_fields(answer)["MSA"][1], err_code(answer)) == (code, err), name
    assert process_all(db_url) == []  # nothing refused is processed


def test_a_merge_naming_no_prior_identifier_fails_with_the_place(mllp_listener: RunningListener, db_url: str,
                                                                  client: FlaskClient) -> None:
    message = adt("A40", "BAD-5", f"PID|1||BN1^^^{FACILITY}^MR||A^B", extra=("MRG|",), structure="ADT_A39")
    assert msa(send(mllp_listener.port, message)[0]) == "AA"  # taken on the wire: MRG is there
    (failure,) = process_all(db_url)
    assert failure.startswith("ERR||MRG^1^1|101^Required field missing^HL70357|E"), failure  # ERR-2, ERR-3
    with connect(db_url) as conn:
        row = conn.execute("SELECT status, error FROM hl7_message WHERE control_id = 'BAD-5'").fetchone()
    assert row is not None and row["status"] == "failed" and "MRG-1" in row["error"]
    assert search(client, f"Patient?identifier=urn:interop-hub:pid:{FACILITY}|BN1") == []  # nothing half done


# -- the A40 mapping (pure) -------------------------------------------------------------------------
def test_a40_pairs_each_pid_with_the_mrg_after_it() -> None:
    from interop.hl7.message import MessageError
    from interop.hl7.order import map_patient_merge
    from tests.test_hl7_mapping import TABLES

    two = adt("A40", "P-1", f"PID|1||BN1^^^{FACILITY}^MR||A^B", version="2.8", structure="ADT_A39",
              extra=(f"MRG|OLD1^^^{FACILITY}^MR~OLD1B^^^BHXH^HC", f"PID|2||BN2^^^{FACILITY}^MR||C^D", "PD1|||x",
                     f"MRG|||^^^^^^^^|OLD2^^^{FACILITY}^MR")).decode("utf-8")
    merged = map_patient_merge(two, TABLES)
    assert merged.version == "2.8"
    assert [(p["identifier"][0]["value"], [i["value"] for i in prior]) for p, prior in merged.merges] == [
        ("BN1", ["OLD1", "OLD1B"]), ("BN2", ["OLD2"])]  # MRG-1 repeats; MRG-4 (v2.3) when MRG-1 is empty
    assert merged.merges[0][1][1]["system"] == "urn:interop-hub:pid:BHXH"
    for bad, where in ((adt("A40", "P-2", f"MRG|OLD1^^^{FACILITY}", structure="ADT_A39"), "PID"),
                       (adt("A40", "P-3", f"PID|1||BN1^^^{FACILITY}^MR", structure="ADT_A39"), "MRG")):
        with pytest.raises(MessageError) as info:
            map_patient_merge(bad.decode("utf-8"), TABLES)
        assert info.value.segment == where
