"""Every version of every result reaches every hospital, whatever else fails (issue 10).

The real hub (`interop serve`) against real peers: python-hl7's MLLP server as the site's RIS,
Medplum's FHIR router as its EMR, Orthanc as its PACS. Orders come in both ways a hospital sends
them (an HL7 ORM^O01 over MLLP, a FHIR ImagingStudy), and each version a radiologist makes
(sign, edit, reject, amend: through `$review` and through the worklist form) must reach the RIS as
an ORU^R01 with the right result status and the EMR as the same DiagnosticReport, updated.

Then the fault a provincial network meets every week: one hospital's RIS and EMR accept
connections and never answer. Its results wait in their own lanes; another hospital's results
and new analyses are not slowed.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.auth import person_session
from tests.fixtures.fhir_server import Emr
from tests.fixtures.hub import HubProcess, start_hub, stop_hub
from tests.fixtures.mllp import BlackHole, Receiver, orm, send
from tests.helpers import chest_study_in_pacs, study_resource, wait_for

REVIEWER = "BS. Trần Văn Bình"


def site(name: str, ris_port: int, emr_base: str, pacs: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": name, "district": "Bien Hoa", "province": "Dong Nai", "pacs_wait_minutes": 1,
        "hl7": {"host": "127.0.0.1", "port": ris_port, "receiving_application": "RIS", **extra.pop("hl7", {})},
        "fhir": {"base": emr_base, "max_bundle_entries": 8, "auth": {"type": "bearer", "token_env": "TEST_EMR_TOKEN"},
                 **extra.pop("fhir", {})},
        **extra,
    }
    if pacs:
        body["dicomweb"] = pacs
    return body


def start(sites: dict[str, Any], tmp_path: Path, db_url: str, triton_url: str, orthanc: Any, emr: Emr,
          **env: str) -> HubProcess:
    path = tmp_path / "sites.yaml"
    path.write_text(yaml.safe_dump({"sites": sites}), encoding="utf-8")
    return start_hub({"DATABASE_URL": db_url, "TRITON_URL": triton_url, "DICOMWEB_URL": orthanc.dicomweb_url,
                      "INTEROP_SITES": str(path), "INTEROP_RETRY_BASE_SECONDS": "1", "TEST_EMR_TOKEN": emr.token,
                      **env}, tmp_path)


def fhir(hub: HubProcess, path: str, **params: str) -> dict[str, Any]:
    response = hub.session.get(f"{hub.fhir}/{path}", params=params, timeout=10)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def report_of(hub: HubProcess, **params: str) -> dict[str, Any]:
    found = wait_for(lambda: fhir(hub, "DiagnosticReport", **params).get("entry"), 60, what="the report")
    result: dict[str, Any] = found[0]["resource"]
    return result


def review(hub: HubProcess, rid: str, action: str, **extra: Any) -> dict[str, Any]:
    params = [{"name": "action", "valueCode": action}, {"name": "reviewer", "valueString": REVIEWER}]
    if "conclusion" in extra:
        params.append({"name": "conclusion", "valueString": extra["conclusion"]})
    response = hub.session.post(f"{hub.fhir}/DiagnosticReport/{rid}/$review", timeout=30,
                             json={"resourceType": "Parameters", "parameter": params})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def oru_statuses(ris: Receiver, accession: str) -> list[str]:
    """OBR-25 of each ORU^R01 the RIS received for this accession number, in arrival order."""
    out = []
    for message in list(ris.messages):
        if str(message.segment("MSH")[9]).startswith("ORU") and str(message.segment("OBR")[18]) == accession:
            out.append(str(message.segment("OBR")[25]))
    return out


def emr_status(emr: Emr, study_uid: str) -> str | None:
    found = emr.search("DiagnosticReport", identifier=f"urn:interop-hub:report|{study_uid}/chest-xray")
    assert len(found) <= 1, "the EMR holds one report per study, updated in place"
    return str(found[0]["status"]) if found else None


def arrives(what: str, probe: Any, expected: Any, timeout: float = 45) -> None:
    wait_for(lambda: probe() == expected, timeout, interval=0.3, what=f"{what} to be {expected!r}")


@pytest.fixture
def ris() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


def test_an_hl7_order_signed_then_amended_reaches_the_ris_and_the_emr(
        db_url: str, triton_url: str, orthanc: Any, fhir_emr: Emr, ris: Receiver, tmp_path: Path) -> None:
    hub = start({"BVDKDN": site("Benh vien Da khoa Dong Nai", ris.port, fhir_emr.base)}, tmp_path, db_url, triton_url,
                orthanc, fhir_emr)
    try:
        ds = chest_study_in_pacs(orthanc, seed=41, size=256, accession="ACC4101", patient_id="BN4101")
        uid = ds.StudyInstanceUID
        answers = send(int(hub.env["INTEROP_MLLP_PORT"]),
                       orm("R1", accession="ACC4101", placer="PL41", filler="FL41", patient_id="BN4101"),
                       orm("R2", order_control="SC", order_status="CM", accession="ACC4101", placer="PL41",
                           filler="FL41", patient_id="BN4101", study_uid=uid))
        assert all("MSA|AA" in a for a in answers)
        report = report_of(hub, identifier=f"urn:interop-hub:report|{uid}/chest-xray")
        arrives("the ORUs at the RIS", lambda: oru_statuses(ris, "ACC4101"), ["P"])
        arrives("the report in the EMR", lambda: emr_status(fhir_emr, uid), "preliminary")

        assert review(hub, report["id"], "sign")["status"] == "final"
        arrives("the ORUs at the RIS", lambda: oru_statuses(ris, "ACC4101"), ["P", "F"])
        arrives("the report in the EMR", lambda: emr_status(fhir_emr, uid), "final")
        signed = [m for m in ris.messages if str(m.segment("OBR")[25]) == "F"][0]
        assert {str(s[11]) for s in signed.segments("OBX")} == {"F"}  # every finding signed with it

        assert review(hub, report["id"], "amend", conclusion="Addendum: compare with the prior film.")["status"] == "amended"
        arrives("the ORUs at the RIS", lambda: oru_statuses(ris, "ACC4101"), ["P", "F", "C"])
        arrives("the report in the EMR", lambda: emr_status(fhir_emr, uid), "amended")
    finally:
        stop_hub(hub)


def test_a_fhir_study_edited_in_the_worklist_and_another_rejected_reach_the_ris_and_the_emr(
        db_url: str, triton_url: str, orthanc: Any, fhir_emr: Emr, ris: Receiver, tmp_path: Path) -> None:
    # The HIS posts the study naming the site's PACS: the hub knows the site from its sites file.
    hub = start({"BVDKDN": site("Benh vien Da khoa Dong Nai", ris.port, fhir_emr.base, pacs=orthanc.dicomweb_url)},
                tmp_path, db_url, triton_url, orthanc, fhir_emr)
    try:
        made = []
        for n, accession in enumerate(("ACC4201", "ACC4202")):
            ds = chest_study_in_pacs(orthanc, seed=42 + n, size=256, accession=accession, patient_id=f"BN42{n}")
            posted = hub.session.post(f"{hub.fhir}/ImagingStudy", json=study_resource([ds], f"p42{n}", orthanc.dicomweb_url),
                                   headers={"Content-Type": "application/fhir+json"}, timeout=30)
            assert posted.status_code == 201, posted.text
            assert {"system": "urn:interop-hub:site", "code": "BVDKDN"} in posted.json()["meta"]["tag"]
            made.append((ds.StudyInstanceUID, accession))
        (edit_uid, edit_acc), (reject_uid, reject_acc) = made
        edited = report_of(hub, identifier=f"urn:interop-hub:report|{edit_uid}/chest-xray")
        rejected = report_of(hub, identifier=f"urn:interop-hub:report|{reject_uid}/chest-xray")
        arrives("the ORUs of the first study", lambda: oru_statuses(ris, edit_acc), ["P"])
        arrives("the first report in the EMR", lambda: emr_status(fhir_emr, edit_uid), "preliminary")

        first = edited["result"][0]["reference"].split("/")[1]
        browser, csrf = person_session(hub.base, db_url, REVIEWER)
        form = browser.post(f"{hub.base}/worklist/{edited['id']}/review", allow_redirects=False, timeout=30,
                            data={"action": "edit", "csrf_token": csrf, "version": "1",
                                   "conclusion": "Không thấy bất thường.", f"finding-{first}": "present"})
        assert form.status_code == 303, form.text
        arrives("the ORUs of the first study", lambda: oru_statuses(ris, edit_acc), ["P", "F"])
        arrives("the first report in the EMR", lambda: emr_status(fhir_emr, edit_uid), "final")
        final = [m for m in ris.messages if str(m.segment("OBR")[25]) == "F"][0]
        assert "Không thấy bất thường." in str(final).replace("\\.br\\", "\n")

        assert review(hub, rejected["id"], "reject")["status"] == "cancelled"
        arrives("the ORUs of the second study", lambda: oru_statuses(ris, reject_acc), ["P", "X"])
        arrives("the second report in the EMR", lambda: emr_status(fhir_emr, reject_uid), "cancelled")
    finally:
        stop_hub(hub)


def test_a_hung_hospital_holds_only_its_own_results(
        db_url: str, triton_url: str, orthanc: Any, fhir_emr: Emr, ris: Receiver, tmp_path: Path) -> None:
    hung_ris, hung_emr = BlackHole(), BlackHole()
    sites = {"GOOD": site("Benh vien tot", ris.port, fhir_emr.base),
             "HUNG": site("Benh vien treo", hung_ris.port, f"http://127.0.0.1:{hung_emr.port}/fhir")}
    hub = start(sites, tmp_path, db_url, triton_url, orthanc, fhir_emr)
    port = int(hub.env["INTEROP_MLLP_PORT"])
    try:
        # Six results for the hung hospital: analysed, then stuck at its RIS and EMR.
        for n in range(6):
            ds = chest_study_in_pacs(orthanc, seed=500 + n, size=256, accession=f"HUNG{n}", patient_id=f"H{n}")
            send(port, orm(f"H{n}", order_status="CM", accession=f"HUNG{n}", placer=f"HP{n}", filler=f"HF{n}",
                           patient_id=f"H{n}", facility="HUNG", study_uid=ds.StudyInstanceUID))
        wait_for(lambda: fhir(hub, "DiagnosticReport", _count="0")["total"] == 6, 90, what="the six hung reports")
        wait_for(lambda: hung_ris.connections >= 1 and hung_emr.connections >= 1, 30, what="the hung peers to be tried")
        pending = hub.session.get(f"{hub.base}/outbox?status=pending,sending", timeout=10).json()
        assert len([d for d in pending if d["destination"].startswith("HUNG:")]) >= 6

        # The healthy hospital's results reach its RIS within 15 s of exam-done, each one.
        good_uids = []
        for n in range(3):
            ds = chest_study_in_pacs(orthanc, seed=600 + n, size=256, accession=f"GOOD{n}", patient_id=f"G{n}")
            done = time.monotonic()
            send(port, orm(f"G{n}", order_status="CM", accession=f"GOOD{n}", placer=f"GP{n}", filler=f"GF{n}",
                           patient_id=f"G{n}", facility="GOOD", study_uid=ds.StudyInstanceUID))
            report_of(hub, identifier=f"urn:interop-hub:report|{ds.StudyInstanceUID}/chest-xray")
            analysed = time.monotonic() - done
            good_uids.append(ds.StudyInstanceUID)
            wait_for(lambda n=n: oru_statuses(ris, f"GOOD{n}") == ["P"], 15 - (time.monotonic() - done), interval=0.2,
                     what=f"GOOD{n}'s result at its RIS within 15 s of exam-done")
            assert analysed < 15, f"GOOD{n} was analysed {analysed:.1f} s after exam-done"
        arrives("GOOD's reports in its EMR", lambda: [emr_status(fhir_emr, uid) for uid in good_uids],
                ["preliminary"] * 3)
        def stuck() -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = hub.session.get(f"{hub.base}/outbox?status=pending,sending", timeout=10).json()
            return found

        wait_for(lambda: {d["destination"] for d in stuck()} <= {"HUNG:hl7", "HUNG:fhir"}, 15,
                 what="only the hung hospital's deliveries to be waiting")
        assert len(stuck()) >= 12  # each hung result waits for both of its destinations
    finally:
        stop_hub(hub)
        hung_ris.close()
        hung_emr.close()

