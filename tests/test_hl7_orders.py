"""The HL7 path end to end: an order over MLLP (independent python-hl7 client) becomes a
Patient and a ServiceRequest, its exam's images are found in the PACS, the study is analysed,
and the result goes back as ORU^R01 to an independent MLLP server (python-hl7)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.hub import HubProcess, free_port, start_hub, stop_hub
from tests.fixtures.mllp import SEP, Receiver, orm, send
from tests.helpers import chest_study_in_pacs, wait_for


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


@pytest.fixture
def hl7_hub(db_url: str, triton_url: str, orthanc: Any, receiver: Receiver, tmp_path: Path) -> Iterator[HubProcess]:
    sites = {"sites": {"BVDKDN": {"name": "Benh vien Da khoa Dong Nai", "district": "Bien Hoa", "province": "Dong Nai",
                                  "hl7": {"host": "127.0.0.1", "port": receiver.port, "receiving_application": "RIS"},
                                  "pacs_wait_minutes": 1}}}
    path = tmp_path / "sites.yaml"
    path.write_text(yaml.safe_dump(sites))
    hub = start_hub({"DATABASE_URL": db_url, "TRITON_URL": triton_url, "DICOMWEB_URL": orthanc.dicomweb_url,
                     "INTEROP_SITES": str(path), "INTEROP_MLLP_PORT": str(free_port()),
                     "INTEROP_RETRY_BASE_SECONDS": "1"}, tmp_path)
    yield hub
    stop_hub(hub)


def fhir(hub: HubProcess, path: str, **params: str) -> dict[str, Any]:
    response = hub.session.get(f"{hub.fhir}/{path}", params=params, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_order_to_report_to_oru(hl7_hub: HubProcess, orthanc: Any, receiver: Receiver) -> None:
    port = int(hl7_hub.env["INTEROP_MLLP_PORT"])
    ds = chest_study_in_pacs(orthanc, seed=31, accession="ACC3101", patient_id="BN0031")
    new, done = send(port,
                     orm("M1", accession="ACC3101", placer="PL31", filler="FL31", patient_id="BN0031"),
                     orm("M2", order_control="SC", order_status="CM", accession="ACC3101", placer="PL31",
                         filler="FL31", patient_id="BN0031", study_uid=ds.StudyInstanceUID))
    assert "MSA|AA|M1" in new and "MSA|AA|M2" in done

    patients = wait_for(lambda: fhir(hl7_hub, "Patient", identifier="BN0031").get("entry"), 30, what="the Patient")
    patient = patients[0]["resource"]
    assert patient["name"][0]["family"] == "NGUYỄN"
    found = fhir(hl7_hub, "Patient", name="nguy")
    assert [e["resource"]["id"] for e in found["entry"]] == [patient["id"]]
    requests_ = fhir(hl7_hub, "ServiceRequest", identifier="ACC3101")["entry"]
    assert len(requests_) == 1
    order = requests_[0]["resource"]
    assert order["subject"] == {"reference": f"Patient/{patient['id']}"}

    def report() -> Any:
        entries = fhir(hl7_hub, "DiagnosticReport", **{"based-on": f"ServiceRequest/{order['id']}"}).get("entry")
        return entries[0]["resource"] if entries else None

    rep = wait_for(report, 60, what="the report of the HL7 order")
    assert rep["status"] == "preliminary" and rep["subject"] == order["subject"]
    study = fhir(hl7_hub, f"ImagingStudy/{rep['imagingStudy'][0]['reference'].split('/')[1]}")
    assert study["basedOn"] == [{"reference": f"ServiceRequest/{order['id']}"}]

    oru = wait_for(lambda: [m for m in receiver.messages if str(m.segment("MSH")[9]).startswith("ORU")], 30,
                   what="the ORU^R01")
    assert len(oru) == 1
    message = oru[0]
    assert str(message.segment("OBR")[2]).startswith("PL31") and str(message.segment("OBR")[3]).startswith("FL31")
    obx = [s for s in message if str(s[0]) == "OBX"]
    assert all(str(s[11]) == "P" for s in obx)
    assert len([s for s in obx if str(s[2]) == "NM"]) == 14


def test_cancel_withdraws_the_order(hl7_hub: HubProcess) -> None:
    port = int(hl7_hub.env["INTEROP_MLLP_PORT"])
    answers = send(port, orm("C1", placer="PL41", filler="FL41", accession="ACC41", patient_id="BN0041"),
                   orm("C2", order_control="CA", order_status="CA", placer="PL41", filler="FL41",
                       accession="ACC41", patient_id="BN0041"))
    assert all("MSA|AA" in a for a in answers)

    def revoked() -> Any:
        entries = fhir(hl7_hub, "ServiceRequest", identifier="ACC41").get("entry")
        return entries and entries[0]["resource"]["status"] == "revoked"

    wait_for(revoked, 30, what="the cancelled order")


def test_images_never_arrive(hl7_hub: HubProcess, db_url: str) -> None:
    port = int(hl7_hub.env["INTEROP_MLLP_PORT"])
    send(port, orm("N1", order_status="CM", placer="PL51", filler="FL51", accession="ACC-NEVER", patient_id="BN0051"))
    order = wait_for(lambda: fhir(hl7_hub, "ServiceRequest", identifier="ACC-NEVER").get("entry"), 30,
                     what="the order")[0]["resource"]
    task = wait_for(lambda: (fhir(hl7_hub, "Task", focus=f"ServiceRequest/{order['id']}").get("entry") or [None])[0],
                    30, what="the find-study task")["resource"]
    assert task["status"] in ("requested", "in-progress")
    # the site waits 1 minute at most: shorten it by moving the deadline, as time passing would
    from interop.store.db import connect
    with connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE job SET payload = jsonb_set(payload, '{deadline}', to_jsonb(now()::text)),"
                     " run_after = now() WHERE kind = 'find-study'")
        conn.execute("NOTIFY interop_jobs")

    def failed() -> Any:
        t = fhir(hl7_hub, f"Task/{task['id']}")
        return t if t["status"] == "failed" else None

    assert "did not arrive" in wait_for(failed, 30, what="the order to fail")["statusReason"]["text"]


def adt(control_id: str, trigger: str, patient_id: str, name: str, facility: str = "BVDKDN") -> bytes:
    return SEP.join([
        f"MSH|^~\\&|HIS|{facility}|AIHUB|PROVINCE|20261122090000||ADT^{trigger}|{control_id}|P|2.5||||||UNICODE UTF-8",
        f"EVN|{trigger}|20261122090000",
        f"PID|||{patient_id}^^^{facility}^MR||{name}||19900101|F",
        "PV1||O",
    ]).encode("utf-8")


def test_patient_updates_and_unknown_facility(hl7_hub: HubProcess, receiver: Receiver, db_url: str) -> None:
    port = int(hl7_hub.env["INTEROP_MLLP_PORT"])
    answers = send(port, adt("A1", "A31", "BN0061", "LÊ^THỊ HOA"), adt("A2", "A08", "BN0061", "PHẠM^THỊ HOA"),
                   orm("U1", facility="UNKNOWN_CLINIC", placer="PL71", filler="FL71", accession="ACC71",
                       patient_id="UK0071"))
    assert all("MSA|AA" in a for a in answers)

    def renamed() -> Any:
        entries = fhir(hl7_hub, "Patient", identifier="BN0061").get("entry") or []
        return entries if entries and entries[0]["resource"]["name"][0]["family"] == "PHẠM" else None

    patients = wait_for(renamed, 30, what="the A08 update")
    assert len(patients) == 1  # the A31 created it, the A08 updated the same Patient
    assert fhir(hl7_hub, f"Patient/{patients[0]['resource']['id']}/_history")["total"] == 2

    order = wait_for(lambda: fhir(hl7_hub, "ServiceRequest", identifier="ACC71").get("entry"), 30,
                     what="the unknown facility's order")[0]["resource"]
    assert "tag" not in order.get("meta", {})  # recorded, with no site and so no destination
    from interop.store.db import connect
    with connect(db_url) as conn:
        row = conn.execute("SELECT status, sending_facility FROM hl7_message WHERE control_id = 'U1'").fetchone()
        assert row == {"status": "processed", "sending_facility": "UNKNOWN_CLINIC"}
        assert conn.execute("SELECT count(*) AS n FROM job WHERE lane IS NOT NULL").fetchone()["n"] == 0


def test_metrics_and_dead_letter_cli(hl7_hub: HubProcess, db_url: str) -> None:
    import subprocess
    import sys

    port = int(hl7_hub.env["INTEROP_MLLP_PORT"])
    send(port, orm("X1", placer="PL81", filler="FL81", accession="ACC81", patient_id="BN0081"))
    metrics = f"{hl7_hub.base}/metrics"
    wait_for(lambda: 'interop_hl7_messages{status="processed"} 1.0' in hl7_hub.session.get(metrics, timeout=10).text,
             30, what="the message to show as processed")
    from interop.store.db import connect
    with connect(db_url, autocommit=True) as conn:
        conn.execute("INSERT INTO job (kind, dedupe_key, status, lane, series, seq, payload, answer) VALUES"
                     " ('deliver-hl7', 'test-rejected', 'rejected', 'BVDKDN:hl7', 'DiagnosticReport/r1', 1,"
                     " '{\"resource_type\": \"DiagnosticReport\", \"resource_id\": \"r1\", \"version\": 1}',"
                     " 'MSA|AE|X')")
        row_id = conn.execute("SELECT id FROM job WHERE dedupe_key = 'test-rejected'").fetchone()["id"]
    env = {**hl7_hub.env, "DATABASE_URL": db_url}
    listed = subprocess.run([sys.executable, "-m", "interop.cli", "outbox", "dead"], env=env, capture_output=True,
                            text=True, check=True)
    assert '"last_answer": "MSA|AE|X"' in listed.stdout
    replayed = subprocess.run([sys.executable, "-m", "interop.cli", "outbox", "replay", str(row_id)], env=env,
                              capture_output=True, text=True)
    assert replayed.returncode == 0 and f"outbox row {row_id} queued again" in replayed.stdout
    missing = subprocess.run([sys.executable, "-m", "interop.cli", "outbox", "replay", "999999"], env=env,
                             capture_output=True, text=True)
    assert missing.returncode == 1
