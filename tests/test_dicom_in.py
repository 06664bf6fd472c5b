"""Issue 13, the "in" half: modalities push studies to the hub's DICOM Storage SCP (dcmtk's
echoscu/storescu and pynetdicom as senders). Kept in the archive PACS (the test Orthanc), analysed
once stable, refused with the right status when they cannot be kept."""
from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation  # type: ignore[attr-defined]

from interop.domain.vocabulary import source_images
from scripts.synthetic.dicom import make_chest_xray
from tests.fixtures.auth import person_session
from tests.fixtures.hub import HubProcess, start_hub, stop_hub
from tests.helpers import free_port, wait_for

MAX_BYTES = 5_000_000  # a 1664x1280 mammogram view (4.3 MB) fits; a 2048² radiograph (8.4 MB) does not


@pytest.fixture
def scp_hub(db_url: str, triton_url: str, orthanc: Any, tmp_path: Path) -> Iterator[HubProcess]:
    sites = {"sites": {
        "BVTANPHU": {"name": "Benh vien Tan Phu", "dicom_aets": ["BVTANPHU_CR"], "dicomweb": orthanc.dicomweb_url,
                     "results_to_pacs": True},
        "TTYTHOLD": {"name": "Trung tam Y te (hold)", "dicom_aets": ["HOLD_DX"], "unmatched_studies": "hold"},
    }}
    path = tmp_path / "sites.yaml"
    path.write_text(yaml.safe_dump(sites))
    hub = start_hub({"DATABASE_URL": db_url, "TRITON_URL": triton_url, "DICOMWEB_URL": orthanc.dicomweb_url,
                     "INTEROP_SITES": str(path), "INTEROP_DICOM_PORT": str(free_port()),
                     "INTEROP_DICOM_STABLE_SECONDS": "1", "INTEROP_DICOM_MAX_BYTES": str(MAX_BYTES),
                     "INTEROP_RETRY_BASE_SECONDS": "1"}, tmp_path)
    yield hub
    stop_hub(hub)


def port(hub: HubProcess) -> int:
    return int(hub.env["INTEROP_DICOM_PORT"])


def send(hub: HubProcess, items: list[Dataset | Path], aet: str = "BVTANPHU_CR") -> list[int]:
    """C-STORE each item (datasets of any SOP class, or DX files) in one association (pynetdicom as
    the sender); the statuses answered."""
    ae = AE(ae_title=aet)
    for sop_class in dict.fromkeys(str(i.SOPClassUID) if isinstance(i, Dataset) else DigitalXRayImageStorageForPresentation
                                   for i in items):
        ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", port(hub), ae_title="AIHUB")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(item).Status) for item in items]
    finally:
        assoc.release()


def fhir(hub: HubProcess, path: str, **params: str) -> dict[str, Any]:
    response = hub.session.get(f"{hub.fhir}/{path}", params=params, timeout=10)
    assert response.status_code == 200, response.text
    return dict(response.json())


def studies(hub: HubProcess, uid: str) -> list[dict[str, Any]]:
    found = fhir(hub, "ImagingStudy", identifier=f"urn:dicom:uid|urn:oid:{uid}")
    return [e["resource"] for e in found.get("entry", [])]


def reports(hub: HubProcess, uid: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in fhir(hub, "DiagnosticReport", identifier=f"{uid}/chest-xray").get("entry", [])]


def test_a_pushed_study_is_analysed_and_more_images_supersede_its_report(scp_hub: HubProcess, tmp_path: Path) -> None:
    echo = subprocess.run(["echoscu", "-aet", "BVTANPHU_CR", "-aec", "AIHUB", "127.0.0.1", str(port(scp_hub))],
                          capture_output=True, timeout=30)
    assert echo.returncode == 0, echo.stderr
    uid = generate_uid()
    first = make_chest_xray(seed=31, size=256, study_uid=uid, accession="PUSH-1", patient_id="PUSH-P1")
    path = tmp_path / "first.dcm"
    first.save_as(path, enforce_file_format=True)
    stored = subprocess.run(["storescu", "-aet", "BVTANPHU_CR", "-aec", "AIHUB", "127.0.0.1", str(port(scp_hub)),
                             str(path)], capture_output=True, timeout=60)
    assert stored.returncode == 0, stored.stderr

    report = wait_for(lambda: next(iter(reports(scp_hub, uid)), None), timeout=90, what="the report")
    assert report["status"] == "preliminary" and report["meta"]["versionId"] == "1"
    assert source_images(report) == {first.SOPInstanceUID}  # what the model read, as the SR will reference it
    study = studies(scp_hub, uid)[0]
    assert {"system": "urn:interop-hub:site", "code": "BVTANPHU"} in study["meta"]["tag"]
    assert study["numberOfInstances"] == 1

    later = make_chest_xray(seed=32, size=256, study_uid=uid, accession="PUSH-1", patient_id="PUSH-P1",
                            series_uid=first.SeriesInstanceUID)
    assert send(scp_hub, [later]) == [0x0000]
    wait_for(lambda: reports(scp_hub, uid)[0]["meta"]["versionId"] == "2", timeout=90, what="the report's version 2")
    assert len(reports(scp_hub, uid)) == 1  # superseded, not a second report
    assert studies(scp_hub, uid)[0]["numberOfInstances"] == 2
    assert source_images(reports(scp_hub, uid)[0]) == {first.SOPInstanceUID, later.SOPInstanceUID}
    # and the result is back in the site's PACS as a DICOM SR, in the same study as the images
    sr = wait_for(lambda: next((i for i in qido(orthanc_url(scp_hub), uid) if i.get("00080060", {}).get("Value") == ["SR"]),
                               None), timeout=90, what="the SR in the PACS")
    assert sr["0020000D"]["Value"] == [uid]


def orthanc_url(hub: HubProcess) -> str:
    return hub.env["DICOMWEB_URL"]


def qido(base: str, study_uid: str) -> list[dict[str, Any]]:
    found = requests.get(f"{base}/studies/{study_uid}/instances", params={"includefield": "00080060"}, timeout=10)
    return list(found.json()) if found.status_code == 200 and found.content else []


def test_a_four_view_mammogram_and_a_ct_head_pushed_get_one_report_each(scp_hub: HubProcess) -> None:
    from scripts.synthetic import dicom as synthetic

    exam = synthetic.make_mammography_exam(61, rows=1664, cols=1280, accession="PUSH-MG")
    head = synthetic.make_ct_head_series(62, slices=40, size=256, accession="PUSH-CT")
    assert send(scp_hub, exam) == [0x0000] * 4
    assert send(scp_hub, head) == [0x0000] * 40
    for datasets, model in ((exam, "mammography"), (head, "brain-ct")):
        uid = datasets[0].StudyInstanceUID
        found = wait_for(lambda: fhir(scp_hub, "DiagnosticReport", identifier=f"{uid}/{model}").get("entry"),  # noqa: B023
                         timeout=120, what=f"the {model} report")
        assert len(found) == 1
        assert studies(scp_hub, uid)[0]["numberOfInstances"] == len(datasets)


def test_what_cannot_be_kept_is_refused_and_the_association_goes_on(scp_hub: HubProcess, tmp_path: Path) -> None:
    unknown = subprocess.run(["echoscu", "-aet", "STRANGER", "-aec", "AIHUB", "127.0.0.1", str(port(scp_hub))],
                             capture_output=True, timeout=30)
    assert unknown.returncode != 0  # association rejected: calling AE title not recognised

    no_uid = make_chest_xray(seed=33, size=256)
    refused_uid = no_uid.StudyInstanceUID
    del no_uid.StudyInstanceUID
    big = make_chest_xray(seed=34, size=2048)  # 8.4 MB of pixels, over INTEROP_DICOM_MAX_BYTES
    truncated = make_chest_xray(seed=35, size=256)
    cut = tmp_path / "cut.dcm"
    truncated.save_as(cut, enforce_file_format=True)
    cut.write_bytes(cut.read_bytes()[:-50_000])
    good = make_chest_xray(seed=36, size=256)

    assert send(scp_hub, [no_uid, big, cut, good]) == [0xA900, 0xA700, 0xC000, 0x0000]
    wait_for(lambda: reports(scp_hub, good.StudyInstanceUID), timeout=90, what="the good study's report")
    for uid in (refused_uid, big.StudyInstanceUID, truncated.StudyInstanceUID):
        assert studies(scp_hub, uid) == []  # nothing half-stored is analysed


def test_an_unmatched_study_of_a_holding_site_waits_for_an_admin(scp_hub: HubProcess) -> None:
    ds = make_chest_xray(seed=37, size=256, patient_id="HOLD-1")
    assert send(scp_hub, [ds], aet="HOLD_DX") == [0x0000]
    uid = ds.StudyInstanceUID

    def listed() -> dict[str, Any] | None:
        rows = scp_hub.session.get(f"{scp_hub.base}/admin/dicom/unmatched", timeout=10).json()["studies"]
        return next((r for r in rows if r["study_uid"] == uid), None)

    row = wait_for(listed, timeout=60, what="the study in the unmatched queue")
    assert row["site"] == "TTYTHOLD" and row["modalities"] == "DX" and row["instances"] == 1
    # held: a `registered` ImagingStudy, found by the queue's FHIR search, and not analysed
    held = fhir(scp_hub, "ImagingStudy", _tag="urn:interop-hub:dicom-in|unmatched", status="registered")
    [study] = [e["resource"] for e in held["entry"] if e["resource"]["identifier"][0]["value"] == f"urn:oid:{uid}"]
    assert row["imaging_study"] == f"ImagingStudy/{study['id']}" and reports(scp_hub, uid) == []
    # an admin sees it on the page and releases it there
    browser, csrf = person_session(scp_hub.base, scp_hub.env["DATABASE_URL"], f"pacs-admin-{uid[-6:]}", role="admin",
                                   landing="/admin/dicom/queue")
    page = browser.get(f"{scp_hub.base}/admin/dicom/queue", timeout=10)
    assert page.status_code == 200 and f'data-study="{uid}"' in page.text and "HOLD-1" in page.text
    forged = browser.post(f"{scp_hub.base}/admin/dicom/queue/{uid}", data={"decision": "release"}, timeout=10)
    assert forged.status_code == 403  # no CSRF token: refused, still waiting
    unknown = browser.post(f"{scp_hub.base}/admin/dicom/queue/{uid}", timeout=10,
                           data={"decision": "match", "service_request": "no-such-order", "csrf_token": csrf})
    assert unknown.status_code == 400 and "match needs an existing ServiceRequest" in unknown.text
    answer = browser.post(f"{scp_hub.base}/admin/dicom/queue/{uid}", data={"decision": "release", "csrf_token": csrf},
                          allow_redirects=False, timeout=10)
    assert answer.status_code == 303 and answer.headers["Location"].endswith("/admin/dicom/queue?done=release")
    report = wait_for(lambda: next(iter(reports(scp_hub, uid)), None), timeout=90, what="the released study's report")
    [study] = studies(scp_hub, uid)
    assert study["status"] == "available" and study["id"] == row["imaging_study"].split("/")[1]
    assert {"system": "urn:interop-hub:dicom-in", "code": "unmatched",
            "display": "no order matched this pushed study"} in study["meta"]["tag"]
    assert report["subject"] == study["subject"]
    assert f'data-study="{uid}"' not in browser.get(f"{scp_hub.base}/admin/dicom/queue", timeout=10).text
    assert scp_hub.session.post(f"{scp_hub.base}/admin/dicom/unmatched/{uid}/release", timeout=10).status_code == 404


def test_instances_naming_different_patients_are_flagged_not_merged(scp_hub: HubProcess) -> None:
    a = make_chest_xray(seed=38, size=256, patient_id="PAT-A")
    b = make_chest_xray(seed=39, size=256, patient_id="PAT-B", study_uid=a.StudyInstanceUID)
    assert send(scp_hub, [a, b]) == [0x0000, 0x0000]

    def listed() -> dict[str, Any] | None:
        rows = scp_hub.session.get(f"{scp_hub.base}/admin/dicom/unmatched", timeout=10).json()["studies"]
        return next((r for r in rows if r["study_uid"] == a.StudyInstanceUID), None)

    row = wait_for(listed, timeout=60, what="the conflicting study held")
    assert "different patient IDs" in row["identity_conflict"]
    [study] = studies(scp_hub, a.StudyInstanceUID)  # held, flagged, not analysed
    assert study["status"] == "registered" and "identity-conflict" in {t["code"] for t in study["meta"]["tag"]}
    assert reports(scp_hub, a.StudyInstanceUID) == []
    found = fhir(scp_hub, "ImagingStudy", _tag="urn:interop-hub:dicom-in|identity-conflict")
    assert study["id"] in {e["resource"]["id"] for e in found["entry"]}


# -- STOW-RS: the same keeping, over HTTP ----------------------------------------------------------
def _multipart(parts: list[bytes], boundary: str = "interop-stow-test") -> tuple[bytes, str]:
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                    for p in parts) + b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def test_stow_rs_keeps_each_instance_and_says_which_were_refused(db_url: str, orthanc: Any, tmp_path: Path) -> None:
    from interop.app import create_app
    from interop.config import Settings
    from interop.store.db import connect
    from scripts.synthetic.dicom import dataset_bytes
    from tests.fixtures.auth import bearer, with_token

    app = create_app(Settings.from_env({"DATABASE_URL": db_url, "DICOMWEB_URL": orthanc.dicomweb_url,
                                        "INTEROP_DATA_DIR": str(tmp_path), "INTEROP_URL_ALLOW": "http://127.0.0.1:*"}))
    try:
        # a district hospital's gateway, registered as acting for its site (`interop clients add --site`)
        gateway = with_token(app.test_client(), bearer(app.test_client(), db_url, "system/ImagingStudy.c", site="BVDKDN"))
        first = make_chest_xray(seed=71, size=128, accession="STOW71")
        second = make_chest_xray(seed=72, size=128, study_uid=first.StudyInstanceUID, accession="STOW71")
        no_study = make_chest_xray(seed=73, size=128)
        del no_study.StudyInstanceUID
        body, ctype = _multipart([dataset_bytes(first), dataset_bytes(second), dataset_bytes(no_study), b"not DICOM"])
        answer = gateway.post("/dicom-web/studies", data=body, content_type=ctype)
        assert answer.status_code == 202 and answer.mimetype == "application/dicom+json", answer.text
        stored = answer.get_json()
        assert sorted(i["00081155"]["Value"][0] for i in stored["00081199"]["Value"]) == \
            sorted([first.SOPInstanceUID, second.SOPInstanceUID])
        reasons = [(i["00081197"]["Value"][0], i["00000902"]["Value"][0]) for i in stored["00081198"]["Value"]]
        assert [status for status, _ in reasons] == [0xA900, 0xC000] and all(why for _, why in reasons)
        # kept in the archive PACS and recorded, one study of two instances
        in_pacs = requests.get(f"{orthanc.dicomweb_url}/studies/{first.StudyInstanceUID}/instances", timeout=10).json()
        assert {first.SOPInstanceUID, second.SOPInstanceUID} <= {i["00080018"]["Value"][0] for i in in_pacs}
        with connect(db_url) as conn:
            row = conn.execute("SELECT instances, accession, site FROM dicom_study WHERE study_uid = %s",
                               (first.StudyInstanceUID,)).fetchone()
        assert row is not None and row["instances"] == 2 and row["accession"] == "STOW71"
        assert row["site"] == "BVDKDN"  # the gateway's site: the results go back there
        # the same instances again: kept once
        again = gateway.post("/dicom-web/studies", data=_multipart([dataset_bytes(first)])[0], content_type=ctype)
        assert again.status_code == 200
        with connect(db_url) as conn:
            assert conn.execute("SELECT count(*) AS n FROM dicom_instance WHERE study_uid = %s",
                                (first.StudyInstanceUID,)).fetchone()["n"] == 2
        # wrong media type, no token, a token without the scope
        assert gateway.post("/dicom-web/studies", data=b"{}", content_type="application/json").status_code == 415
        assert app.test_client().post("/dicom-web/studies", data=body, content_type=ctype).status_code == 401
        reader = with_token(app.test_client(), bearer(app.test_client(), db_url, "system/ImagingStudy.rs"))
        assert reader.post("/dicom-web/studies", data=body, content_type=ctype).status_code == 403
    finally:
        app.extensions["interop"].close()


def test_dicom_tls_when_the_hub_has_a_certificate(db_url: str, pki: Any, tmp_path: Path) -> None:
    import os
    import sys

    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from tests.helpers import stop_process

    scp_port = free_port()
    env = {**os.environ, "DATABASE_URL": db_url, "INTEROP_DICOM_PORT": str(scp_port), "INTEROP_DATA_DIR": str(tmp_path),
           "INTEROP_DICOM_ALLOW_UNKNOWN_AE": "true", "INTEROP_TLS_CERT": str(pki.server.cert),
           "INTEROP_TLS_KEY": str(pki.server.key)}
    log = tmp_path / "scp.log"
    proc = subprocess.Popen([sys.executable, "-m", "interop.cli", "dicom-scp"], env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "listening" in log.read_text(), timeout=60, what="the Storage SCP")
        ae = AE(ae_title="TLS_SENDER")
        ae.add_requested_context(Verification)
        secure = ae.associate("127.0.0.1", scp_port, ae_title="AIHUB", tls_args=(pki.client_context(), "127.0.0.1"))
        assert secure.is_established
        assert int(secure.send_c_echo().Status) == 0x0000
        secure.release()
        plain = ae.associate("127.0.0.1", scp_port, ae_title="AIHUB")  # plain DICOM to the TLS port: no association
        assert not plain.is_established
        assert proc.poll() is None and "(TLS)" in log.read_text()
    finally:
        stop_process(proc)


def test_a_hub_without_an_archive_analyses_from_its_own_storage(db_url: str, triton_url: str, tmp_path: Path) -> None:
    hub = start_hub({"DATABASE_URL": db_url, "TRITON_URL": triton_url, "INTEROP_DICOM_PORT": str(free_port()),
                     "INTEROP_DICOM_STABLE_SECONDS": "1", "INTEROP_DICOM_ALLOW_UNKNOWN_AE": "true",
                     "INTEROP_RETRY_BASE_SECONDS": "1"}, tmp_path)  # no DICOMWEB_URL: kept under INTEROP_DATA_DIR
    try:
        uid = generate_uid()
        first = make_chest_xray(seed=81, size=256, study_uid=uid, accession="LOCAL-1", patient_id="LOCAL-P1")
        assert send(hub, [first], aet="ANY_MODALITY") == [0x0000]
        assert (tmp_path / "dicom" / uid / f"{first.SOPInstanceUID}.dcm").is_file()
        report = wait_for(lambda: next(iter(reports(hub, uid)), None), timeout=90, what="the report")
        assert report["status"] == "preliminary"
        later = make_chest_xray(seed=82, size=256, study_uid=uid, accession="LOCAL-1", patient_id="LOCAL-P1",
                                series_uid=first.SeriesInstanceUID)
        assert send(hub, [later], aet="ANY_MODALITY") == [0x0000]
        wait_for(lambda: reports(hub, uid)[0]["meta"]["versionId"] == "2", timeout=90, what="the report's version 2")
        assert len(reports(hub, uid)) == 1
    finally:
        stop_hub(hub)


def test_a_held_study_is_matched_when_its_order_arrives(scp_hub: HubProcess) -> None:
    from tests.fixtures import mllp

    ds = make_chest_xray(seed=91, size=256, patient_id="HOLD-2", accession="HOLD-ACC-2")
    assert send(scp_hub, [ds], aet="HOLD_DX") == [0x0000]
    uid = ds.StudyInstanceUID

    def listed() -> bool:
        rows = scp_hub.session.get(f"{scp_hub.base}/admin/dicom/unmatched", timeout=10).json()["studies"]
        return any(r["study_uid"] == uid for r in rows)

    wait_for(listed, timeout=60, what="the study in the unmatched queue")
    stand_in = wait_for(lambda: next(iter(studies(scp_hub, uid)), None), timeout=30, what="the held study")["subject"]
    made = scp_hub.session.get(f"{scp_hub.fhir}/{stand_in['reference']}", timeout=10).json()
    assert made["identifier"][0]["system"].startswith("urn:interop-hub:dicom-patient-id:")
    # the order arrives from the hospital's integration engine, naming the same accession number
    answers = mllp.send(int(scp_hub.env["INTEROP_MLLP_PORT"]),
                        mllp.orm("HOLD2", placer="PLH2", filler="FLH2", accession="HOLD-ACC-2", patient_id="HOLD-2",
                                 facility="TTYTHOLD"))
    assert "MSA|AA" in answers[0]
    report = wait_for(lambda: next(iter(reports(scp_hub, uid)), None), timeout=50,  # well before the 60 s recheck
                      what="the report of the study matched to its order")
    study = studies(scp_hub, uid)[0]
    order = fhir(scp_hub, "ServiceRequest", identifier="PLH2")["entry"][0]["resource"]
    assert study["basedOn"] == [{"reference": f"ServiceRequest/{order['id']}"}]
    assert not listed() and report["status"] == "preliminary"
    # the study and its report follow the order's Patient; the one made from the header is gone
    assert study["subject"] == order["subject"] == report["subject"] != stand_in
    assert scp_hub.session.get(f"{scp_hub.fhir}/{stand_in['reference']}", timeout=10).status_code == 410


def test_an_accession_number_matches_only_an_order_of_the_same_hospital(scp_hub: HubProcess) -> None:
    """Hospitals number their own accessions: another hospital's order with the same number is
    another patient's, and a study is never matched to it."""
    from tests.fixtures import mllp

    ds = make_chest_xray(seed=93, size=256, patient_id="HOLD-3", accession="SAME-ACC-3")
    assert send(scp_hub, [ds], aet="HOLD_DX") == [0x0000]
    uid = ds.StudyInstanceUID
    wait_for(lambda: any(r["study_uid"] == uid for r in scp_hub.session.get(
        f"{scp_hub.base}/admin/dicom/unmatched", timeout=10).json()["studies"]), timeout=60, what="the held study")
    mllp_port = int(scp_hub.env["INTEROP_MLLP_PORT"])
    for control, placer, patient, facility in (("OTHER3", "PLO3", "OTHER-9", "BVTANPHU"),
                                               ("HOLD3", "PLH3", "HOLD-3", "TTYTHOLD")):
        answers = mllp.send(mllp_port, mllp.orm(control, placer=placer, filler=f"F{placer}", accession="SAME-ACC-3",
                                                patient_id=patient, facility=facility))
        assert "MSA|AA" in answers[0]
    report = wait_for(lambda: next(iter(reports(scp_hub, uid)), None), timeout=50, what="the report of the study")
    own = fhir(scp_hub, "ServiceRequest", identifier="PLH3")["entry"][0]["resource"]
    study = studies(scp_hub, uid)[0]
    assert study["basedOn"] == [{"reference": f"ServiceRequest/{own['id']}"}]
    assert report["subject"] == own["subject"]


def test_a_study_pushed_by_stow_rs_is_analysed_like_one_pushed_by_c_store(scp_hub: HubProcess) -> None:
    from scripts.synthetic.dicom import dataset_bytes

    ds = make_chest_xray(seed=95, size=256, accession="STOW-95", patient_id="STOW-P95")
    body, ctype = _multipart([dataset_bytes(ds)])
    answer = scp_hub.session.post(f"{scp_hub.base}/dicom-web/studies", data=body, headers={"Content-Type": ctype},
                                  timeout=30)
    assert answer.status_code == 200, answer.text
    report = wait_for(lambda: next(iter(reports(scp_hub, ds.StudyInstanceUID)), None), timeout=90, what="the report")
    assert report["status"] == "preliminary" and source_images(report) == {ds.SOPInstanceUID}
    assert studies(scp_hub, ds.StudyInstanceUID)[0]["numberOfInstances"] == 1
