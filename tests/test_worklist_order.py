"""The worklist as radiologists read it (issue 15): who the patient is and why the study was
ordered (name, age, sex, accession, ordering hospital, indication, priority), for logged-in
radiologists only; filters by site, modality, priority, status and date kept in the page's links;
"next" and "sign and next" (the keyboard shortcuts' targets). Flask's client on a real PostgreSQL."""
from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from inference_client.models import load_models
from interop.dicom.study import imaging_study
from interop.domain import report
from interop.domain.vocabulary import site_tag
from interop.store import resources
from interop.store.db import connect
from interop.store.search_params import load
from interop.web.waiting import age_at
from scripts.synthetic.dicom import make_chest_xray
from tests.helpers import ROOT

MODEL = load_models(ROOT / "mappings")["chest-xray"]
PARAMS = load(ROOT / "mappings")


def ordered_report(db_url: str, *, mrn: str, name: str, birth: str, sex: str, priority: str | None,
                   reason: str, note: str, site: str = "BVDKDN", study_date: str = "20261120", seed: int = 1,
                   accession: str = "ACC-1", requester: str = "BV Da khoa Dong Nai - Khoa Noi") -> dict[str, Any]:
    ds = make_chest_xray(seed=seed, patient_id=mrn, size=64, accession=accession)
    ds.StudyDate = study_date
    with connect(db_url, autocommit=True) as conn, conn.transaction():
        patient = resources.create(conn, {"resourceType": "Patient", "identifier": [{"system": "urn:test:mrn", "value": mrn}],
                                          "name": [{"family": name.split()[0], "given": name.split()[1:]}],
                                          "birthDate": birth, "gender": sex}, PARAMS["Patient"])
        request: dict[str, Any] = {
            "resourceType": "ServiceRequest", "status": "active", "intent": "order",
            "subject": {"reference": f"Patient/{patient['id']}"}, "code": {"text": "XR Chest"},
            "identifier": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                                 "code": "ACSN"}]}, "value": accession}],
            "reasonCode": [{"text": reason}], "note": [{"text": note}], "requester": {"display": requester},
            "meta": {"tag": [site_tag(site)]}}
        if priority:
            request["priority"] = priority
        order = resources.create(conn, request, PARAMS["ServiceRequest"])
        body = imaging_study([ds], subject=f"Patient/{patient['id']}", endpoint_address=None,
                             based_on=f"ServiceRequest/{order['id']}")
        body["meta"] = {"tag": [site_tag(site)]}
        study = resources.create(conn, body, PARAMS["ImagingStudy"])
        built = report.build(study=study, study_uid=str(ds.StudyInstanceUID), model=MODEL, version=MODEL.version,
                             probabilities=[0.03] * len(MODEL.labels), report_id=resources.new_id(),
                             observation_ids=[resources.new_id() for _ in MODEL.labels],
                             issued=(datetime.now(UTC) - timedelta(minutes=seed)).isoformat())
        if not conn.execute("SELECT 1 FROM resource WHERE id = %s", (built["device"]["id"],)).fetchone():
            resources.create(conn, built["device"], PARAMS["Device"], rid=built["device"]["id"])
        for obs in built["observations"]:
            resources.create(conn, obs, PARAMS["Observation"], rid=obs["id"])
        built["report"]["meta"] = {"tag": [site_tag(site)]}
        return resources.create(conn, built["report"], PARAMS["DiagnosticReport"], rid=built["report"]["id"])


def rows(html: str) -> list[str]:
    return re.findall(r'<tr class="entry[^"]*" data-report="([^"]+)"', html)


def row_of(html: str, rid: str) -> str:
    part = html[html.index(f'data-report="{rid}"'):]
    return part[:part.index("</tr>")]


def test_age_at() -> None:
    assert age_at("1970-06-15", "2026-06-14") == "55" and age_at("1970-06-15", "2026-06-15") == "56"
    assert age_at("1970", "2026-01-01") == "56" and age_at(None, "2026-01-01") == "" and age_at("bad", "2026") == ""


def test_order_facts_for_radiologists_only(login: Any, db_url: str) -> None:
    rep = ordered_report(db_url, mrn="WO-1", name="Nguyen Van An", birth="1950-03-02", sex="male", priority="urgent",
                         reason="Suspected pneumothorax", note="Fell from a ladder this morning", accession="ACC-WO-1")
    radiologist: Any = login("radiologist")
    html = radiologist.get("/worklist/?lang=en").get_data(as_text=True)
    row = row_of(html, rep["id"])
    for text in ("Nguyen Van An", "76 y", "Male", "ACC-WO-1", "BV Da khoa Dong Nai - Khoa Noi",
                 "Suspected pneumothorax", "Fell from a ladder this morning", "Urgent"):
        assert text in row, text
    page = radiologist.get(f"/worklist/{rep['id']}?lang=en").get_data(as_text=True)
    assert re.search(r'id="patient-name">Nguyen Van An<', page) and 'id="accession">ACC-WO-1<' in page
    assert re.search(r'id="age-sex">76 y\s*· Male', page) and 'id="priority">Urgent<' in page
    assert "Suspected pneumothorax; Fell from a ladder this morning" in page
    assert "S: sign" in page and "N: next study" in page  # the shortcuts, documented on the page

    clinician = login("clinician", site="BVDKDN")
    seen = clinician.get("/worklist/?lang=en").get_data(as_text=True)
    assert rep["id"] in seen and "Nguyen Van An" not in seen and "Suspected pneumothorax" not in seen
    study = clinician.get(f"/worklist/{rep['id']}?lang=en").get_data(as_text=True)
    assert "Nguyen Van An" not in study and 'id="accession"' not in study


def test_filters_and_next(login: Any, db_url: str) -> None:
    a = ordered_report(db_url, mrn="WF-A", name="Tran Thi Binh", birth="1980-01-01", sex="female", priority="stat",
                       reason="Dyspnoea", note="", site="BVDKDN", study_date="20261120", seed=5, accession="ACC-A")
    b = ordered_report(db_url, mrn="WF-B", name="Le Van Cuong", birth="1990-01-01", sex="male", priority=None,
                       reason="Cough", note="", site="TTYT_NHONTRACH", study_date="20261125", seed=4, accession="ACC-B")
    c = ordered_report(db_url, mrn="WF-C", name="Pham Thi Dung", birth="2000-01-01", sex="female", priority=None,
                       reason="Fever", note="", site="BVDKDN", study_date="20261128", seed=3, accession="ACC-C")
    r: Any = login("radiologist")

    def listed(query: str) -> list[str]:
        page = r.get(f"/worklist/?lang=en&{query}")
        assert page.status_code == 200, page.get_data(as_text=True)
        return [i for i in rows(page.get_data(as_text=True)) if i in (a["id"], b["id"], c["id"])]

    assert listed("") == [a["id"], b["id"], c["id"]]  # stat first, then the longest waiting
    assert listed("site=TTYT_NHONTRACH") == [b["id"]]
    assert listed("site=BVDKDN") == [a["id"], c["id"]]
    assert listed("priority=stat") == [a["id"]] and listed("priority=routine") == [b["id"], c["id"]]
    assert listed("modality=DX") == [a["id"], b["id"], c["id"]] and listed("modality=MG") == []
    assert listed("date_from=2026-11-21&date_to=2026-11-27") == [b["id"]]
    assert listed("status=final") == []

    html = r.get("/worklist/?lang=en&site=BVDKDN").get_data(as_text=True)
    assert f'/worklist/{a["id"]}?lang=en&amp;site=BVDKDN' in html  # the filter travels with the links
    assert 'option value="BVDKDN" selected' in html
    page = r.get(f"/worklist/{a['id']}?lang=en&site=BVDKDN").get_data(as_text=True)
    assert 'id="next">' in page and f'/worklist/{c["id"]}?lang=en&amp;site=BVDKDN' in page  # b is another site
    assert 'href="/worklist/?lang=en&amp;site=BVDKDN" id="back"' in page

    done = r.post(f"/worklist/{a['id']}/review?then=next", data={
        "action": "sign", "version": "1", "conclusion": a["conclusion"], "lang": "en", "site": "BVDKDN",
        "next_report": c["id"]})
    assert done.status_code == 303, done.get_data(as_text=True)
    assert done.headers["Location"].endswith(f"/worklist/{c['id']}?lang=en&done=sign&site=BVDKDN")
    assert listed("status=final") == [a["id"]] and listed("") == [b["id"], c["id"]]

    for bad in ("status=nonsense", "priority=soon", "date_from=yesterday", "site=<script>"):
        answer = r.get(f"/worklist/?{bad}")
        assert answer.status_code == 400 and "worklist filter refused" in answer.get_data(as_text=True), bad


def test_filters_order_and_count_in_the_database_past_one_page(login: Any, db_url: str) -> None:
    """A page holds `limit` reports; filters, the count, the order (an Observation marked AA makes a
    report critical) and "next" must cover every report of the status, not the first page's."""
    from interop.web import waiting

    older = [ordered_report(db_url, mrn=f"WP-{i}", name="Do Van Em", birth="1970-01-01", sex="male", priority=None,
                            reason="Cough", note="", site="BVDKDN", seed=90 + i, accession=f"ACC-P{i}")
             for i in range(3)]
    later = [ordered_report(db_url, mrn=f"WQ-{i}", name="Vo Thi Hoa", birth="1985-01-01", sex="female",
                            priority=None, reason="Fever", note="", site="TTYT_NHONTRACH", seed=5 - i,
                            accession=f"ACC-Q{i}") for i in range(3)]
    lookups: dict[str, Any] = {"models": {MODEL.name: MODEL}, "sites": {}, "alerts": {}}
    with connect(db_url, autocommit=True) as conn:
        total, page = waiting.waiting(conn, limit=2, **lookups)
        assert total == 6 and [e.id for e in page] == [older[2]["id"], older[1]["id"]]  # the longest waiting
        total, page = waiting.waiting(conn, limit=2, filters=waiting.Filters(site="ttyt_nhontrach"), **lookups)
        assert total == 3 and [e.id for e in page] == [later[0]["id"], later[1]["id"]]

        # the newest report's Observation (not its conclusion) says AA: it comes first, on page one
        newest = later[2]
        obs = resources.read(conn, "Observation", newest["result"][0]["reference"].split("/")[1])
        obs["interpretation"] = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                                              "code": "AA"}]}]
        resources.update(conn, obs, PARAMS["Observation"])
        total, page = waiting.waiting(conn, limit=1, **lookups)
        assert total == 6 and page[0].id == newest["id"] and page[0].critical

        filters = waiting.Filters(site="TTYT_NHONTRACH")
        assert waiting.following(conn, newest["id"], filters) == later[0]["id"]
        assert waiting.following(conn, later[0]["id"], filters) == later[1]["id"]
        assert waiting.following(conn, later[1]["id"], filters) is None
        assert waiting.following(conn, older[0]["id"], filters) == newest["id"]  # not listed: the list's first

        # reports already dealt with: the newest first
        for done in (older[0], later[1]):
            body = resources.read(conn, "DiagnosticReport", done["id"])
            body["status"] = "final"
            resources.update(conn, body, PARAMS["DiagnosticReport"])
        total, page = waiting.waiting(conn, limit=1, filters=waiting.Filters(status="final"), **lookups)
        assert total == 2 and [e.id for e in page] == [later[1]["id"]]

        # a report without a site tag of its own is at its study's site, as the page shows it
        untagged = resources.read(conn, "DiagnosticReport", older[1]["id"])
        untagged["meta"].pop("tag")
        resources.update(conn, untagged, PARAMS["DiagnosticReport"])
        assert "tag" not in resources.read(conn, "DiagnosticReport", older[1]["id"])["meta"]
        total, page = waiting.waiting(conn, filters=waiting.Filters(site="BVDKDN"), **lookups)
        assert [e.id for e in page] == [older[2]["id"], older[1]["id"]] and page[1].site == "BVDKDN"

    clinician = login("clinician", site="BVDKDN")  # sees only their own site, whatever the filter says
    assert set(rows(clinician.get("/worklist/?lang=en").get_data(as_text=True))) == {older[1]["id"], older[2]["id"]}
    assert rows(clinician.get("/worklist/?lang=en&site=TTYT_NHONTRACH").get_data(as_text=True)) == []
    signed = login("radiologist").get("/worklist/?lang=en&status=final").get_data(as_text=True)
    assert rows(signed) == [later[1]["id"], older[0]["id"]]
    assert re.search(r'<strong id="total">2</strong> studies\s', signed) and "studies waiting" not in signed
