"""The radiologists' worklist (/worklist): pages and forms through Flask's client on a real
PostgreSQL, the image rendered from a real Orthanc, and the whole page in headless Chromium
against the real `interop serve`."""
from __future__ import annotations

import io
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask.testing import FlaskClient
from PIL import Image

from inference_client.models import load_models
from interop.dicom.study import imaging_study
from interop.domain import report
from interop.domain.vocabulary import site_tag
from interop.services import critical
from interop.store import resources
from interop.store.db import connect
from interop.store.reviews import open_alerts
from interop.store.search_params import load
from scripts.synthetic.dicom import make_chest_xray
from tests.fixtures.auth import PASSWORD, PersonClient, add_person
from tests.helpers import ROOT as REPO_ROOT
from tests.helpers import chest_study_in_pacs, context

MODEL = load_models(REPO_ROOT / "mappings")["chest-xray"]
PARAMS = load(REPO_ROOT / "mappings")
CTX = context()
CRITICAL = next(i for i, label in enumerate(MODEL.labels) if label.critical)
REVIEWER = "BS. Trần Văn Bình"


def make_report(db_url: str, *, mrn: str, critical_finding: bool = False, waited: timedelta = timedelta(minutes=30),
                orthanc: Any = None, seed: int = 1, site: str = "BVDKDN") -> dict[str, Any]:
    """A patient, an ImagingStudy (in the PACS when `orthanc` is given) and its AI report, stored
    as the worker stores them; a critical report raises its alert as the worker does."""
    probs = [0.03] * len(MODEL.labels)
    probs[0] = 0.81  # atelectasis: above threshold, not critical
    if critical_finding:
        probs[CRITICAL] = 0.97
    if orthanc is not None:
        ds = chest_study_in_pacs(orthanc, seed=seed, patient_id=mrn, size=512)
    else:
        ds = make_chest_xray(seed=seed, patient_id=mrn, size=64)
    issued = (datetime.now(UTC) - waited).isoformat()
    with connect(db_url, autocommit=True) as conn, conn.transaction():
        patient = resources.create(conn, {"resourceType": "Patient", "identifier": [
            {"system": "urn:test:mrn", "value": mrn}]}, PARAMS["Patient"])
        body = imaging_study([ds], subject=f"Patient/{patient['id']}",
                             endpoint_address=orthanc.dicomweb_url if orthanc is not None else None)
        body["meta"] = {"tag": [site_tag(site)]}
        study = resources.create(conn, body, PARAMS["ImagingStudy"])
        built = report.build(study=study, study_uid=str(ds.StudyInstanceUID), model=MODEL, version=MODEL.version,
                             probabilities=probs, report_id=resources.new_id(),
                             observation_ids=[resources.new_id() for _ in MODEL.labels], issued=issued)
        if not conn.execute("SELECT 1 FROM resource WHERE id = %s", (built["device"]["id"],)).fetchone():
            resources.create(conn, built["device"], PARAMS["Device"], rid=built["device"]["id"])
        for obs in built["observations"]:
            resources.create(conn, obs, PARAMS["Observation"], rid=obs["id"])
        built["report"]["meta"] = {"tag": [site_tag(site)]}
        stored = resources.create(conn, built["report"], PARAMS["DiagnosticReport"], rid=built["report"]["id"])
        critical.raise_alert(conn, CTX, stored, CTX.sites.get(site))
    return stored


@pytest.fixture
def client(login: Any) -> PersonClient:
    """A radiologist logged in to the worklist (FHIR reads beside it with a backend client's token)."""
    return login("radiologist", name=REVIEWER, api=True)


def listed(html: str) -> list[tuple[str, str]]:
    """(report id, data-critical) of the worklist rows, in page order."""
    return re.findall(r'<tr class="entry[^"]*" data-report="([^"]+)" data-critical="([01])"', html)


def post(client: FlaskClient, rid: str, action: str, **form: Any) -> Any:
    return client.post(f"/worklist/{rid}/review", data={"action": action, "reviewer": REVIEWER, **form})


def observation_ids(rep: dict[str, Any]) -> list[str]:
    return [r["reference"].split("/", 1)[1] for r in rep["result"]]


# -- pages and forms (Flask's client, real PostgreSQL) ----------------------------------------
def test_list_critical_first_then_longest_waiting(client: FlaskClient, db_url: str) -> None:
    oldest = make_report(db_url, mrn="MRN-OLD", waited=timedelta(hours=3))
    newer = make_report(db_url, mrn="MRN-NEW", waited=timedelta(minutes=50), seed=2)
    urgent = make_report(db_url, mrn="MRN-CRIT", critical_finding=True, waited=timedelta(minutes=5), seed=3)
    signed = make_report(db_url, mrn="MRN-DONE", waited=timedelta(hours=9), seed=4)
    assert post(client, signed["id"], "sign").status_code == 303

    page = client.get("/worklist/?lang=en")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert page.headers["Cache-Control"] == "no-store" and "default-src 'self'" in page.headers["Content-Security-Policy"]
    html = page.get_data(as_text=True)
    assert listed(html) == [(urgent["id"], "1"), (oldest["id"], "0"), (newer["id"], "0")]
    assert '<strong id="total">3</strong>' in html
    row = html[html.index(f'data-report="{urgent["id"]}"'):html.index(f'data-report="{oldest["id"]}"')]
    assert "CRITICAL" in row and "Pneumothorax" in row and "0.97" in row and "Atelectasis" in row and "0.81" in row
    assert "MRN-CRIT" in row and "Benh vien Da khoa Dong Nai" in row and "DX" in row and "5 min" in row
    assert 'name="action" value="acknowledge"' in row  # the alert is open: acknowledge from the list
    assert "3 h 00 min" in html  # the oldest has waited three hours
    assert "Pulmonary nodule" not in html  # below threshold: not on the list
    vi = client.get("/worklist/").get_data(as_text=True)
    assert "Danh sách ca chờ đọc" in vi and "NGUY KỊCH" in vi and "Tràn khí màng phổi" in vi
    assert client.get("/worklist").status_code == 308  # the list lives at /worklist/


def test_study_page_and_sign(client: FlaskClient, db_url: str) -> None:
    rep = make_report(db_url, mrn="MRN-1")
    page = client.get(f"/worklist/{rep['id']}?lang=en")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    for oid in observation_ids(rep):
        assert f'name="finding-{oid}" value="present"' in html and f'name="finding-{oid}" value="absent"' in html
    assert f'src="/worklist/{rep["id"]}/image.png"' in html
    assert 'value="sign"' in html and 'value="edit"' in html and 'value="reject"' in html
    assert 'id="acknowledge"' not in html  # not critical
    assert "AI-generated preliminary result" in html  # the conclusion, editable

    done = post(client, rep["id"], "sign", version="1", conclusion=rep["conclusion"])
    assert done.status_code == 303 and done.headers["Location"].endswith("/worklist/?lang=vi&done=sign")
    final = client.get(f"/fhir/DiagnosticReport/{rep['id']}").get_json()
    assert final["status"] == "final" and final["resultsInterpreter"] == [{"display": REVIEWER}]
    assert listed(client.get("/worklist/").get_data(as_text=True)) == []
    assert "Đã ký duyệt" in client.get("/worklist/?done=sign").get_data(as_text=True)
    after = client.get(f"/worklist/{rep['id']}").get_data(as_text=True)
    assert 'id="not-waiting"' in after and re.search(r'value="sign" id="sign" disabled', after)


def test_edit_and_sign_from_the_form(client: FlaskClient, db_url: str) -> None:
    rep = make_report(db_url, mrn="MRN-2")
    first, second = observation_ids(rep)[:2]
    done = post(client, rep["id"], "edit", version="1", conclusion="Xẹp phổi thùy dưới phải.\r\nKhông tràn khí.",
                **{f"finding-{first}": "absent", f"finding-{second}": "present"})
    assert done.status_code == 303, done.get_data(as_text=True)
    final = client.get(f"/fhir/DiagnosticReport/{rep['id']}").get_json()
    assert final["status"] == "final" and "Xẹp phổi thùy dưới phải.\nKhông tràn khí." in final["conclusion"]
    calls = {oid: {c["code"] for i in client.get(f"/fhir/Observation/{oid}").get_json()["interpretation"]
                   for c in i["coding"]} for oid in (first, second)}
    assert calls == {first: {"NEG"}, second: {"POS"}}
    with connect(db_url) as conn:
        verdicts = {r["observation_id"]: r["verdict"] for r in conn.execute(
            "SELECT observation_id, verdict FROM review_verdict WHERE report_id = %s", (rep["id"],))}
    assert verdicts[first] == verdicts[second] == "disagree"


def test_refusals_are_shown_with_their_status(client: PersonClient, db_url: str) -> None:
    rep = make_report(db_url, mrn="MRN-3")
    oid = observation_ids(rep)[0]
    changed = post(client, rep["id"], "sign", **{f"finding-{oid}": "absent"})
    assert changed.status_code == 422
    assert re.search(r'id="error"[^>]*><strong>Lỗi 422:</strong> Đã thay đổi phát hiện', changed.get_data(as_text=True))
    assert client.get(f"/fhir/DiagnosticReport/{rep['id']}").get_json()["status"] == "preliminary"
    # the radiologist's choice survives the refusal
    assert re.search(rf'name="finding-{oid}" value="absent"[^>]*checked', changed.get_data(as_text=True))

    unsigned = client.test_client.post(f"/worklist/{rep['id']}/review", data={"action": "sign"})
    assert unsigned.status_code == 403  # no CSRF token: not from the hub's own page
    forged = client.test_client.post(f"/worklist/{rep['id']}/review", data={"action": "sign", "csrf_token": "x" * 43})
    assert forged.status_code == 403
    stale = post(client, rep["id"], "sign", version="7")
    assert stale.status_code == 412 and "Lỗi 412" in stale.get_data(as_text=True)
    assert post(client, rep["id"], "sign").status_code == 303
    again = post(client, rep["id"], "sign", lang="en")
    assert again.status_code == 409 and "Error 409" in again.get_data(as_text=True)
    assert post(client, "no-such-report", "sign").status_code == 404
    assert client.get("/worklist/no-such-report").status_code == 404
    assert post(client, rep["id"], "delete").status_code == 400
    cross = client.post(f"/worklist/{rep['id']}/review", data={"action": "sign", "reviewer": REVIEWER},
                        headers={"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"})
    assert cross.status_code == 403


def test_reject_with_reason(client: FlaskClient, db_url: str) -> None:
    rep = make_report(db_url, mrn="MRN-4")
    assert post(client, rep["id"], "reject", reason="Ảnh chụp sai tư thế <b>AP</b>").status_code == 303
    cancelled = client.get(f"/fhir/DiagnosticReport/{rep['id']}").get_json()
    assert cancelled["status"] == "cancelled" and "Ảnh chụp sai tư thế <b>AP</b>" in cancelled["conclusion"]
    page = client.get(f"/worklist/{rep['id']}").get_data(as_text=True)
    assert "<b>AP</b>" not in page and "&lt;b&gt;AP&lt;/b&gt;" in page  # autoescaped


def test_acknowledge_critical_from_list_and_study(client: FlaskClient, db_url: str) -> None:
    urgent = make_report(db_url, mrn="MRN-5", critical_finding=True)
    page = client.get(f"/worklist/{urgent['id']}").get_data(as_text=True)
    assert 'id="acknowledge"' in page and "NGUY KỊCH" in page
    done = post(client, urgent["id"], "acknowledge", back="list")
    assert done.status_code == 303 and "done=acknowledge" in done.headers["Location"]
    with connect(db_url) as conn:
        assert urgent["id"] not in open_alerts(conn)
        alert = conn.execute("SELECT acknowledged_by, task_id FROM critical_alert WHERE report_id = %s",
                             (urgent["id"],)).fetchone()
    assert alert is not None and alert["acknowledged_by"] == REVIEWER
    assert client.get(f"/fhir/Task/{alert['task_id']}").get_json()["status"] == "completed"
    html = client.get("/worklist/").get_data(as_text=True)
    assert listed(html) == [(urgent["id"], "1")]  # still critical and still waiting for its review
    assert 'value="acknowledge"' not in html
    # acknowledging twice is harmless; from the study page it comes back to the study
    again = post(client, urgent["id"], "acknowledge")
    assert again.status_code == 303 and again.headers["Location"].startswith(f"/worklist/{urgent['id']}")
    plain = make_report(db_url, mrn="MRN-6", seed=6)
    assert post(client, plain["id"], "acknowledge").status_code == 404  # no critical alert to acknowledge


def test_image_rendered_by_the_hub_from_the_pacs(client: FlaskClient, db_url: str, orthanc: Any) -> None:
    rep = make_report(db_url, mrn="MRN-7", orthanc=orthanc, seed=7)
    full = client.get(f"/worklist/{rep['id']}/image.png")
    assert full.status_code == 200 and full.mimetype == "image/png", full.get_data(as_text=True)
    assert full.headers["Cache-Control"].startswith("private")
    image = Image.open(io.BytesIO(full.data))
    assert image.size == (512, 512) and image.mode == "L"
    assert 40 < float(np.asarray(image).mean()) < 220  # a radiograph, not a blank
    thumb = Image.open(io.BytesIO(client.get(f"/worklist/{rep['id']}/image.png?size=thumb").data))
    assert max(thumb.size) == 256

    gone = make_report(db_url, mrn="MRN-8", seed=8)  # a study the PACS never received
    with connect(db_url, autocommit=True) as conn:
        study_id = gone["imagingStudy"][0]["reference"].split("/")[1]
        body = {k: v for k, v in resources.read(conn, "ImagingStudy", study_id).items() if k != "meta"}
        body["contained"], body["endpoint"] = [{"resourceType": "Endpoint", "id": "pacs", "status": "active",
                                                "connectionType": {"code": "dicom-wado-rs"}, "payloadType": [{"text": "DICOM"}],
                                                "address": orthanc.dicomweb_url}], [{"reference": "#pacs"}]
        resources.update(conn, body, PARAMS["ImagingStudy"])
    missing = client.get(f"/worklist/{gone['id']}/image.png")
    assert missing.status_code == 404 and missing.headers["Cache-Control"] == "no-store"
    assert client.get("/worklist/nope/image.png").status_code == 404


# -- the page in a real browser, against the real hub -------------------------------------------
def test_worklist_in_headless_chromium(hub: Any, db_url: str, orthanc: Any, page: Any, tmp_path: Path) -> None:
    routine = make_report(db_url, mrn="MRN-B1", waited=timedelta(hours=2), orthanc=orthanc, seed=21)
    urgent = make_report(db_url, mrn="MRN-B2", critical_finding=True, waited=timedelta(minutes=3),
                         orthanc=orthanc, seed=22)

    add_person(db_url, REVIEWER, "radiologist")
    page.goto(f"{hub.base}/worklist/?lang=en")  # not logged in: the login form, at this address
    assert page.evaluate("document.getElementById('login-form') !== null")
    page.fill("#username", REVIEWER)
    page.fill("#password", PASSWORD)
    page.click("#login-button", navigates=True)
    assert page.url().startswith(f"{hub.base}/worklist/")
    assert page.evaluate("document.getElementById('person').textContent") == REVIEWER
    logged_in = len(page.errors())  # the console noted the 401 of the login form: that was the point
    rows = page.evaluate("[...document.querySelectorAll('#worklist tbody tr')].map("
                         "r => [r.dataset.report, r.dataset.critical, r.querySelector('.badge')?.textContent || ''])")
    assert rows == [[urgent["id"], "1", "CRITICAL"], [routine["id"], "0", ""]]
    page.wait_for("[...document.querySelectorAll('td.thumb img')].every(i => i.complete && i.naturalWidth > 0)")
    page.screenshot(tmp_path / "worklist.png")

    page.click(f'tr[data-report="{urgent["id"]}"] a.button', navigates=True)
    assert page.url().startswith(f"{hub.base}/worklist/{urgent['id']}")
    # a radiologist reads in the DICOM viewer (tests/test_worklist_viewer.py); its first image is drawn
    state = page.wait_for("['ready', 'failed'].includes(document.getElementById('dicom-viewer').dataset.state)"
                          " && document.getElementById('dicom-viewer').dataset.state", timeout=90)
    assert state == "ready", page.errors()
    assert page.evaluate("document.querySelectorAll('#viewer-vp0 canvas').length") >= 1

    page.click("#acknowledge", navigates=True)
    assert page.evaluate("document.getElementById('ack-form')") is None  # acknowledged
    # the signature will be the logged-in person's: no name to type
    assert page.evaluate("document.getElementById('signing-as').textContent").endswith(REVIEWER)
    # changing a finding keeps Sign for the AI result as it is
    oid = observation_ids(urgent)[0]
    page.click(f'input[name="finding-{oid}"][value="absent"]')
    assert page.evaluate("document.getElementById('sign').disabled") is True
    page.click(f'input[name="finding-{oid}"][value="present"]')
    assert page.evaluate("document.getElementById('sign').disabled") is False
    page.screenshot(tmp_path / "study.png")

    page.click("#sign", navigates=True)
    assert "done=sign" in page.url()
    assert page.evaluate("document.getElementById('done').textContent") == "Signed"
    remaining = page.evaluate("[...document.querySelectorAll('#worklist tbody tr')].map(r => r.dataset.report)")
    assert remaining == [routine["id"]]
    assert page.errors()[logged_in:] == []

    signed = hub.session.get(f"{hub.fhir}/DiagnosticReport/{urgent['id']}", timeout=10).json()
    assert signed["status"] == "final" and signed["resultsInterpreter"] == [{"display": REVIEWER}]
    assert "reviewed by a radiologist" in signed["conclusion"]
    waiting = hub.session.get(f"{hub.fhir}/DiagnosticReport", params={"status": "preliminary"}, timeout=10).json()
    assert [e["resource"]["id"] for e in waiting.get("entry", [])] == [routine["id"]]
