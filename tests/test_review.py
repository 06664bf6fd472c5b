"""Radiologist review and critical findings through the FHIR API, on a real PostgreSQL."""
from __future__ import annotations

from typing import Any

from flask.testing import FlaskClient

from inference_client.models import load_models
from interop.domain import report
from interop.services import critical
from interop.store import queue as jobs
from interop.store import resources
from interop.store.db import connect
from interop.store.search_params import load
from tests.helpers import ROOT as REPO_ROOT
from tests.helpers import context

MODEL = load_models(REPO_ROOT / "mappings")["chest-xray"]
PARAMS = load(REPO_ROOT / "mappings")
CRITICAL = next(i for i, label in enumerate(MODEL.labels) if label.critical)


def make_report(db_url: str, *, critical_finding: bool = False, site: str | None = None) -> dict[str, Any]:
    probs = [0.02] * len(MODEL.labels)
    probs[0] = 0.9  # atelectasis: positive, not critical
    if critical_finding:
        probs[CRITICAL] = 0.97
    built = report.build(study={"resourceType": "ImagingStudy", "id": "s1", "subject": {"reference": "Patient/p1"}},
                         study_uid="1.2.3", model=MODEL, version="0.1.0-reference", probabilities=probs,
                         report_id=resources.new_id(), observation_ids=[resources.new_id() for _ in MODEL.labels],
                         issued="2026-11-22T08:00:00+07:00")
    with connect(db_url, autocommit=True) as conn, conn.transaction():
        for obs in built["observations"]:
            resources.create(conn, obs, PARAMS["Observation"], rid=obs["id"])
        stored = resources.create(conn, built["report"], PARAMS["DiagnosticReport"], rid=built["report"]["id"])
        critical.raise_alert(conn, context(), stored, None)
    return stored


def review(client: FlaskClient, rid: str, action: str, reviewer: str = "BS. Trần Văn Bình", **extra: Any) -> Any:
    params = [{"name": "action", "valueCode": action}, {"name": "reviewer", "valueString": reviewer}]
    if "conclusion" in extra:
        params.append({"name": "conclusion", "valueString": extra["conclusion"]})
    for oid, present in extra.get("findings", {}).items():
        params.append({"name": "finding", "part": [{"name": "observation", "valueReference": {"reference": f"Observation/{oid}"}},
                                                   {"name": "present", "valueBoolean": present}]})
    for add in extra.get("added", []):
        params.append({"name": "added", "part": [{"name": "code", "valueCoding": add}]})
    return client.post(f"/fhir/DiagnosticReport/{rid}/$review", json={"resourceType": "Parameters", "parameter": params},
                       headers=extra.get("headers", {}))


def verdicts(db_url: str, rid: str) -> list[tuple[str, Any, Any, str]]:
    with connect(db_url) as conn:
        rows = conn.execute("SELECT finding, ai_positive, radiologist_positive, verdict FROM review_verdict"
                            " WHERE report_id = %s ORDER BY id", (rid,)).fetchall()
    return [(r["finding"], r["ai_positive"], r["radiologist_positive"], r["verdict"]) for r in rows]


def test_sign_as_is(client: FlaskClient, db_url: str, fhir_validate: Any) -> None:
    rep = make_report(db_url)
    signed = review(client, rep["id"], "sign")
    assert signed.status_code == 200, signed.get_data(as_text=True)
    body = signed.get_json()
    assert body["status"] == "final" and body["resultsInterpreter"] == [{"display": "BS. Trần Văn Bình"}]
    assert "reviewed by a radiologist" in body["conclusion"] and "pending review" not in body["conclusion"]
    assert fhir_validate(body) == []
    obs = client.get(body["result"][0]["reference"].replace("Observation", "/fhir/Observation")).get_json()
    assert obs["status"] == "final"
    assert {v[3] for v in verdicts(db_url, rep["id"])} == {"agree"}
    history = client.get(f"/fhir/DiagnosticReport/{rep['id']}/_history").get_json()
    assert [e["resource"]["status"] for e in history["entry"]] == ["final", "preliminary"]
    again = review(client, rep["id"], "sign")
    assert again.status_code == 409  # already final: amend or correct instead


def test_edit_and_sign_records_disagreement(client: FlaskClient, db_url: str) -> None:
    rep = make_report(db_url)
    first, second = (r["reference"].split("/")[1] for r in rep["result"][:2])
    edited = review(client, rep["id"], "edit", conclusion="Xẹp phổi thùy dưới phải, không thấy tràn khí.",
                    findings={first: False, second: True},
                    added=[{"system": "http://snomed.info/sct", "code": "233604007", "display": "Pneumonia"}])
    assert edited.status_code == 200, edited.get_data(as_text=True)
    body = edited.get_json()
    assert body["status"] == "final" and "Xẹp phổi thùy dưới phải" in body["conclusion"]
    assert len(body["result"]) == len(MODEL.labels) + 1
    got = {v[0]: v[1:] for v in verdicts(db_url, rep["id"])}
    assert got[MODEL.labels[0].display.en] == (True, False, "disagree")
    assert got[MODEL.labels[1].display.en] == (False, True, "disagree")
    assert got[MODEL.labels[2].display.en] == (False, False, "agree")
    assert got["Pneumonia"] == (None, True, "added")
    obs = client.get(f"/fhir/Observation/{first}").get_json()
    assert {c["code"] for i in obs["interpretation"] for c in i["coding"]} == {"NEG"}
    assert obs["valueQuantity"]["value"] == 0.9  # the AI's probability stays, the call is the radiologist's


def test_reject_then_amend_is_refused_and_amend_after_final(client: FlaskClient, db_url: str) -> None:
    rejected = make_report(db_url)
    body = review(client, rejected["id"], "reject").get_json()
    assert body["status"] == "cancelled" and "rejected" in body["conclusion"]
    assert {v[3] for v in verdicts(db_url, rejected["id"])} == {"rejected"}
    assert review(client, rejected["id"], "amend").status_code == 409

    rep = make_report(db_url)
    assert review(client, rep["id"], "sign").status_code == 200
    stale = review(client, rep["id"], "amend", conclusion="x", headers={"If-Match": 'W/"1"'})
    assert stale.status_code == 412
    amended = review(client, rep["id"], "amend", conclusion="Addendum: compare with prior.")
    assert amended.status_code == 200 and amended.get_json()["status"] == "amended"
    corrected = review(client, rep["id"], "correct", conclusion="Corrected laterality.")
    assert corrected.get_json()["status"] == "corrected"
    history = client.get(f"/fhir/DiagnosticReport/{rep['id']}/_history").get_json()
    assert [e["resource"]["status"] for e in history["entry"]] == ["corrected", "amended", "final", "preliminary"]


def test_bad_review_requests(client: FlaskClient, db_url: str) -> None:
    rep = make_report(db_url)
    assert review(client, "nope", "sign").status_code == 404
    assert review(client, rep["id"], "approve").status_code == 400
    assert review(client, rep["id"], "sign", reviewer="").status_code == 422
    assert review(client, rep["id"], "edit", findings={"not-a-result": True}).status_code == 422
    assert client.post(f"/fhir/DiagnosticReport/{rep['id']}/$review", data="{x").status_code == 400
    assert client.get(f"/fhir/DiagnosticReport/{rep['id']}").get_json()["status"] == "preliminary"


def test_critical_alert_acknowledge_and_transfer(client: FlaskClient, db_url: str) -> None:
    rep = make_report(db_url, critical_finding=True)
    comms = client.get(f"/fhir/Communication?based-on=DiagnosticReport/{rep['id']}").get_json()
    assert comms["total"] == 1 and comms["entry"][0]["resource"]["priority"] == "stat"
    assert MODEL.labels[CRITICAL].display.en in comms["entry"][0]["resource"]["payload"][0]["contentString"]
    task = client.get(f"/fhir/Task?focus=DiagnosticReport/{rep['id']}").get_json()["entry"][0]["resource"]
    assert task["status"] == "requested" and task["priority"] == "stat"
    ack = client.post(f"/fhir/DiagnosticReport/{rep['id']}/$acknowledge-critical",
                      json={"resourceType": "Parameters", "parameter": [{"name": "by", "valueString": "BS. Lê An"}]})
    assert ack.status_code == 200 and ack.get_json()["status"] == "completed"
    decision = client.post(f"/fhir/DiagnosticReport/{rep['id']}/$transfer-decision", json={
        "resourceType": "Parameters", "parameter": [{"name": "decision", "valueCode": "transfer"},
                                                    {"name": "by", "valueString": "BS. Lê An"}]})
    assert decision.status_code == 200
    referral = decision.get_json()
    assert referral["status"] == "active" and referral["intent"] == "order"
    with connect(db_url) as conn:
        row = conn.execute("SELECT acknowledged_by, transfer_decision FROM critical_alert").fetchone()
        assert row == {"acknowledged_by": "BS. Lê An", "transfer_decision": "transfer"}
        assert conn.execute("SELECT status FROM job WHERE kind = 'escalate-critical'").fetchone()["status"] == "cancelled"
    plain = make_report(db_url)
    assert client.post(f"/fhir/DiagnosticReport/{plain['id']}/$acknowledge-critical", json={
        "resourceType": "Parameters", "parameter": [{"name": "by", "valueString": "x"}]}).status_code == 404


def test_escalation_goes_down_the_contact_list(db_url: str, tmp_path: Any) -> None:
    sites = tmp_path / "sites.yaml"
    sites.write_text("sites:\n  BVDKDN: {name: BV DK Dong Nai, critical_contacts: [Dr A, Dr B], referral: BVND115}\n"
                     "  BVND115: {name: Benh vien Nhan dan 115}\n", encoding="utf-8")
    ctx = context(INTEROP_SITES=str(sites), INTEROP_CRITICAL_ESCALATE_MINUTES="0")
    rep = make_report(db_url, critical_finding=False)
    with connect(db_url, autocommit=True) as conn:
        with conn.transaction():
            crit = dict(rep)
            crit["conclusionCode"] = [{"coding": [{"code": "AA"}]}]
            task = critical.raise_alert(conn, ctx, crit, ctx.sites.get("BVDKDN"))
        assert task is not None and task["owner"] == {"display": "Dr A"}
        recipients = [r["body"]["recipient"][0]["display"] for r in conn.execute(
            "SELECT body FROM resource WHERE type = 'Communication' ORDER BY last_updated")]
        assert recipients == ["Dr A", "Benh vien Nhan dan 115"]
        job = jobs.claim(conn, "t", 60)
        assert job is not None and job.kind == critical.ESCALATE
        critical.escalate(conn, ctx, job)
        owner = resources.read(conn, "Task", task["id"])["owner"]
        assert owner == {"display": "Dr B"}
        job = jobs.claim(conn, "t", 60)
        assert job is not None
        critical.escalate(conn, ctx, job)
        final = resources.read(conn, "Task", task["id"])
        assert "all 2 contacts notified" in final["businessStatus"]["text"]
        assert jobs.claim(conn, "t", 60) is None
