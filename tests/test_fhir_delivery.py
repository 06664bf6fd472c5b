"""Results out over FHIR: pushed to the site's HIS/EMR as transaction Bundles, and rest-hook
Subscriptions on the hub's API.

The EMR is a real FHIR server, Medplum's FHIR router over its in-memory repository
(`tests/peers/fhir_server.mjs`, started by the `fhir_emr` fixture), which requires a bearer token,
can be made to answer 503 ("down") or to reject Bundles with an OperationOutcome. Subscriptions
are created with the independent `fhirpy` client against the hub served over HTTP, and notified
to small `http.server` receivers on loopback.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fhirpy
import psycopg
import pytest
from flask.testing import FlaskClient

from interop.domain import bundle as fhir_push
from interop.domain import subscriptions
from interop.services import delivery
from interop.services.context import Context
from interop.services.delivery.auth import TokenCache
from interop.sites import SitesError
from interop.sites import load as load_sites
from interop.store import db, resources
from interop.workers.delivery import Deliverer
from tests.fixtures.fhir_server import Emr
from tests.fixtures.receiver import Receiver
from tests.helpers import context, delivery_row, drain, new_report, time_passes
from tests.test_oru import PARAMS, PATIENT, SERVICE_REQUEST, STUDY, built_report

REPORT_SYSTEM = "urn:interop-hub:report"
FAILURES_BEFORE_ERROR = context().policies.kind(delivery.REST_HOOK).max_attempts  # then the Subscription is in error


# -- fixtures ---------------------------------------------------------------------------------
def write_sites(tmp_path: Path, fhir: str) -> Path:
    path = tmp_path / "sites.yaml"
    path.write_text("sites:\n  BVDKDN:\n    name: Benh vien Da khoa Dong Nai\n" + fhir, encoding="utf-8")
    return path


def bearer_sites(tmp_path: Path, emr: Emr, base: str | None = None) -> Path:
    return write_sites(tmp_path, f"    fhir:\n      base: {base or emr.base}\n      timeout_seconds: 5\n"
                                 "      max_bundle_entries: 8\n"
                                 "      auth: {type: bearer, token_env: TEST_EMR_TOKEN}\n")


def make_sender(db_url: str, sites: Path, channel: str | None = "fhir") -> Deliverer:
    ctx = context(INTEROP_SITES=str(sites), DATABASE_URL=db_url, TRITON_URL="unused:1", INTEROP_RETRY_BASE_SECONDS="2")
    kinds = delivery.KINDS if channel is None else (delivery.KIND_OF[channel],)
    return Deliverer(ctx, worker_id="test-sender", kinds=kinds)


def on_report_changed(conn: psycopg.Connection[Any], report: dict[str, Any], ctx: Context, site: str | None) -> list[int]:
    """A stored report version queued for its site's destinations and the Subscriptions it matches."""
    return delivery.queue_report(conn, ctx, report, ctx.sites.get(site))


def queue(conn: psycopg.Connection[Any], sender: Deliverer, rid: str = "r1") -> list[int]:
    with conn.transaction():
        report = resources.read(conn, "DiagnosticReport", rid)
        return on_report_changed(conn, report, sender.ctx, "bvdkdn")


def row(conn: psycopg.Connection[Any], item_id: int) -> dict[str, Any]:
    return delivery_row(conn, item_id)


def emr_reports(emr: Emr) -> list[dict[str, Any]]:
    value = built_report()["report"]["identifier"][0]["value"]
    return emr.search("DiagnosticReport", identifier=f"{REPORT_SYSTEM}|{value}")


# -- the Bundle (pure) ------------------------------------------------------------------------
def test_bundle_is_conditional_and_references_resolve_in_the_bundle_or_by_identifier(
        fhir_validate: Callable[[dict[str, Any]], list[str]]) -> None:
    built = built_report()
    bundle = fhir_push.build_bundle(built["report"], built["observations"], built["device"],
                                    context=[PATIENT, SERVICE_REQUEST, STUDY], bundle_id="b1")
    assert fhir_validate(bundle) == []
    assert bundle["type"] == "transaction"
    device, *observations, report = bundle["entry"]
    assert device["request"] == {"method": "POST", "url": "Device",
                                 "ifNoneExist": "identifier=urn%3Ainterop-hub%3Amodel%7Cchest-xray%400.1.0-reference"}
    assert all(e["request"]["method"] == "PUT" and e["request"]["url"].startswith("Observation?identifier=")
               for e in observations) and len(observations) == len(built["observations"])
    assert report["request"]["url"].startswith("DiagnosticReport?identifier=urn%3Ainterop-hub%3Areport%7C")
    full_urls = {e["fullUrl"] for e in bundle["entry"]}
    assert all(u.startswith("urn:uuid:") for u in full_urls) and len(full_urls) == len(bundle["entry"])
    text = json.dumps(bundle)
    for hub_id in ("Patient/p1", "ServiceRequest/sr1", "ImagingStudy/s1", "Observation/r1-o", "Device/"):
        assert hub_id not in text  # no hub id leaks to the EMR
    assert all("id" not in e["resource"] and "meta" not in e["resource"] for e in bundle["entry"])
    dr = report["resource"]
    assert {r["reference"] for r in dr["result"]} == {e["fullUrl"] for e in observations}
    assert dr["extension"][0]["valueReference"]["reference"] == device["fullUrl"]
    assert dr["subject"] == {"type": "Patient", "identifier": {
        "system": "urn:oid:1.2.840.99999.7", "value": "BN-0042", "assigner": {"display": "BVDKDN"},
        "type": PATIENT["identifier"][0]["type"]}}
    assert dr["basedOn"][0]["identifier"]["value"] == "ORD|001"  # the placer order number (PLAC)
    assert dr["imagingStudy"][0]["identifier"] == {"system": "urn:dicom:uid", "value": STUDY["identifier"][0]["value"]}
    assert observations[0]["resource"]["device"]["reference"] == device["fullUrl"]
    # without the context resources, the hub's own identifiers stand in
    bare = fhir_push.build_bundle(built["report"], built["observations"], built["device"])
    assert bare["entry"][-1]["resource"]["subject"]["identifier"] == {"system": "urn:interop-hub:Patient", "value": "p1"}


def test_answers_are_classified() -> None:
    c = fhir_push.classify
    assert [c(s) for s in (200, 201)] == [fhir_push.Outcome.SENT] * 2
    assert [c(s) for s in (400, 404, 409, 412, 422)] == [fhir_push.Outcome.REJECTED] * 5
    assert [c(s) for s in (401, 403)] == [fhir_push.Outcome.UNAUTHORIZED] * 2
    assert [c(s) for s in (408, 429, 500, 502, 503)] == [fhir_push.Outcome.RETRY] * 5


def test_sites_file_fhir_section(tmp_path: Path) -> None:
    path = write_sites(tmp_path, "    fhir:\n      base: https://emr.example/fhir/\n      auth: {type: client_credentials,"
                                 " token_url: https://emr.example/token, client_id: hub, client_secret_env: S, scope: s}\n")
    site = load_sites(path)["BVDKDN"]
    assert site.fhir is not None and site.fhir.base == "https://emr.example/fhir"
    assert (site.fhir.auth.type, site.fhir.auth.client_id, site.fhir.auth.client_secret_env) == ("client_credentials", "hub", "S")
    assert site.hl7 is None and "fhir" not in site.extra
    for bad in ("    fhir: {base: https://x, auth: {type: bearer, token: s3cret}}\n",  # a secret in the file
                "    fhir: {base: https://x, auth: {type: bearer}}\n",
                "    fhir: {base: ftp://x}\n", "    fhir: {base: https://x, auth: {type: basic}}\n"):
        with pytest.raises(SitesError):
            load_sites(write_sites(tmp_path, bad))


# -- push to a real FHIR server ---------------------------------------------------------------
@pytest.fixture
def emr_token(monkeypatch: pytest.MonkeyPatch, fhir_emr: Emr) -> str:
    monkeypatch.setenv("TEST_EMR_TOKEN", fhir_emr.token)
    return fhir_emr.token


def test_report_arrives_once_with_its_observations(
        stored: psycopg.Connection[Any], fhir_emr: Emr, emr_token: str, db_url: str, tmp_path: Path,
        fhir_validate: Callable[[dict[str, Any]], list[str]]) -> None:
    sender = make_sender(db_url, bearer_sites(tmp_path, fhir_emr))
    try:
        [item_id] = queue(stored, sender)
        assert queue(stored, sender) == []  # a version is queued once
        assert row(stored, item_id)["priority"] == 0 and row(stored, item_id)["channel"] == "fhir"
        assert sender.run_once() is True
        assert sender.run_once() is False
    finally:
        sender.close()
    got = row(stored, item_id)
    assert got["status"] == "sent" and got["attempts"] == 1, got["last_answer"]
    assert fhir_validate(json.loads(got["payload"])) == []
    [report] = emr_reports(fhir_emr)
    assert report["status"] == "preliminary" and len(report["result"]) == len(built_report()["observations"])
    observations = [fhir_emr.read(r["reference"]) for r in report["result"]]  # literal references in the EMR now
    assert {o["identifier"][0]["value"] for o in observations} == {
        o["identifier"][0]["value"] for o in built_report()["observations"]}
    devices = fhir_emr.search("Device", identifier="urn:interop-hub:model|chest-xray@0.1.0-reference")
    assert len(devices) == 1 and observations[0]["device"]["reference"] == f"Device/{devices[0]['id']}"
    assert report["subject"]["identifier"]["value"] == "BN-0042"
    posts = [r for r in fhir_emr.requests() if r["method"] == "POST"]
    assert len(posts) == 2  # 16 entries in transactions of at most 8 (Medplum's cap on conditional ones)
    assert {(p["authorization"], p["status"]) for p in posts} == {(f"Bearer {emr_token}", 200)}
    # the answer was lost (say) and the row is sent again: the EMR still holds one of each
    stored.execute("UPDATE job SET status = 'queued', run_after = now() WHERE id = %s", (item_id,))
    sender = make_sender(db_url, bearer_sites(tmp_path, fhir_emr))
    try:
        assert sender.run_once() is True
    finally:
        sender.close()
    assert row(stored, item_id)["status"] == "sent" and len(fhir_emr.requests()) > len(posts)
    [again] = emr_reports(fhir_emr)
    assert again["id"] == report["id"] and again["result"] == report["result"]
    assert len(fhir_emr.search("Device", identifier="urn:interop-hub:model|chest-xray@0.1.0-reference")) == 1
    first = observations[0]["identifier"][0]["value"]
    assert len(fhir_emr.search("Observation", identifier=f"urn:interop-hub:observation|{first}")) == 1


def test_emr_down_for_a_while_then_delivered_late_but_once(
        stored: psycopg.Connection[Any], fhir_emr: Emr, emr_token: str, db_url: str, tmp_path: Path) -> None:
    sender = make_sender(db_url, bearer_sites(tmp_path, fhir_emr))
    fhir_emr.down(True)
    try:
        [item_id] = queue(stored, sender)
        assert sender.run_once() is True
        first = row(stored, item_id)
        assert first["status"] == "pending" and first["last_error"] == "HTTP 503"
        assert "EMR is down" in first["last_answer"]
        assert first["run_after"] > stored.execute("SELECT now() AS t").fetchone()["t"]  # backed off
        assert sender.run_once() is False  # not due yet
        time_passes(stored)
        assert sender.run_once() is True  # still down
        fhir_emr.down(False)
        time_passes(stored)
        assert sender.run_once() is True
        assert sender.run_once() is False
    finally:
        sender.close()
    got = row(stored, item_id)
    assert got["status"] == "sent" and got["attempts"] == 3 and got["control_id"] == first["control_id"]
    assert len(emr_reports(fhir_emr)) == 1


def test_emr_not_listening_is_retried(stored: psycopg.Connection[Any], fhir_emr: Emr, emr_token: str, db_url: str,
                                      tmp_path: Path) -> None:
    from tests.fixtures.fhir_server import free_port

    sender = make_sender(db_url, bearer_sites(tmp_path, fhir_emr, base=f"http://127.0.0.1:{free_port()}"))
    try:
        [item_id] = queue(stored, sender)
        assert sender.run_once() is True
    finally:
        sender.close()
    got = row(stored, item_id)
    assert got["status"] == "pending" and got["last_error"].startswith("ConnectionError")


def test_rejected_bundle_is_a_dead_letter_with_its_outcome_and_replays(
        stored: psycopg.Connection[Any], fhir_emr: Emr, emr_token: str, db_url: str, tmp_path: Path,
        client: FlaskClient) -> None:
    sender = make_sender(db_url, bearer_sites(tmp_path, fhir_emr))
    fhir_emr.reject("Patient BN-0042 is not known to this EMR")
    try:
        [item_id] = queue(stored, sender)
        assert sender.run_once() is True
        assert sender.run_once() is False  # not retried blindly
        got = row(stored, item_id)
        assert got["status"] == "rejected" and got["last_error"].startswith("HTTP 422: Patient BN-0042")
        listed = client.get("/outbox?status=dead,rejected")
        assert listed.status_code == 200
        [letter] = listed.get_json()
        assert (letter["id"], letter["channel"], letter["status"], letter["resource_id"]) == (item_id, "fhir", "rejected", "r1")
        assert "payload" not in letter
        assert json.loads(letter["last_answer"])["issue"][0]["code"] == "business-rule"
        assert client.get("/outbox?status=sent").get_json() == []
        assert client.get("/outbox?status=lost").status_code == 400
        fhir_emr.reject(None)
        assert client.post(f"/outbox/{item_id}/replay").get_json() == {"id": item_id, "status": "pending"}
        assert client.post(f"/outbox/{item_id}/replay").status_code == 409
        assert client.post("/outbox/999999/replay").status_code == 404
        assert sender.run_once() is True
    finally:
        sender.close()
    assert row(stored, item_id)["status"] == "sent" and client.get("/outbox").get_json() == []
    assert len(emr_reports(fhir_emr)) == 1


def test_a_status_change_updates_the_same_emr_report(
        stored: psycopg.Connection[Any], fhir_emr: Emr, emr_token: str, db_url: str, tmp_path: Path) -> None:
    sender = make_sender(db_url, bearer_sites(tmp_path, fhir_emr))
    try:
        [v1] = queue(stored, sender)
        assert sender.run_once() is True
        [before] = emr_reports(fhir_emr)
        with stored.transaction():  # what the radiologist's signature does: final report and findings
            report = dict(resources.read(stored, "DiagnosticReport", "r1"))
            for ref in report["result"]:
                obs = dict(resources.read(stored, "Observation", ref["reference"].split("/")[1]))
                obs["status"] = "final"
                resources.update(stored, obs, PARAMS["Observation"])
            report["status"] = "final"
            signed, _ = resources.update(stored, report, PARAMS["DiagnosticReport"])
            [v2] = on_report_changed(stored, signed, sender.ctx, "BVDKDN")
        assert sender.run_once() is True
        assert sender.run_once() is False
    finally:
        sender.close()
    assert row(stored, v2)["version"] == 2 and row(stored, v2)["status"] == "sent"
    [after] = emr_reports(fhir_emr)
    assert after["id"] == before["id"] and after["status"] == "final"
    assert [r["reference"] for r in after["result"]] == [r["reference"] for r in before["result"]]
    assert {fhir_emr.read(r["reference"])["status"] for r in after["result"]} == {"final"}


def test_wrong_bearer_token_is_rejected(stored: psycopg.Connection[Any], fhir_emr: Emr, db_url: str, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_EMR_TOKEN", "not-the-token")
    sender = make_sender(db_url, bearer_sites(tmp_path, fhir_emr))
    try:
        [item_id] = queue(stored, sender)
        assert sender.run_once() is True
    finally:
        sender.close()
    got = row(stored, item_id)
    assert got["status"] == "rejected" and got["last_error"].startswith("HTTP 401")
    assert "not-the-token" not in (got["last_error"] + got["last_answer"])


def test_client_credentials_token_is_fetched_cached_and_refreshed_once(
        stored: psycopg.Connection[Any], fhir_emr: Emr, db_url: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_EMR_SECRET", "s3cret")
    sites = write_sites(tmp_path, f"    fhir:\n      base: {fhir_emr.base}\n      max_bundle_entries: 8\n"
                                  "      auth: {type: client_credentials,"
                                  f" token_url: {fhir_emr.token_url}, client_id: hub, client_secret_env: TEST_EMR_SECRET,"
                                  " scope: system/*.write}\n")
    sender = make_sender(db_url, sites)
    fhir = sender.channels[delivery.FHIR]
    assert isinstance(fhir.tokens, TokenCache)  # the runner's own cache: fetched once, then reused
    try:
        queue(stored, sender)
        assert sender.run_once() is True
        fhir_emr.set_token("rotated-token")  # the EMR revokes the cached token
        built = built_report(critical=False, report_id="r2")
        built["report"]["identifier"][0]["value"] += "-2"
        for body in (*built["observations"], built["report"]):
            resources.create(stored, body, PARAMS[body["resourceType"]], rid=body["id"])
        [second] = queue(stored, sender, "r2")
        assert sender.run_once() is True
    finally:
        sender.close()
    assert row(stored, second)["status"] == "sent"
    posts = [(r["authorization"], r["status"]) for r in fhir_emr.requests() if r["method"] == "POST"]
    # fetched once and reused (two transactions each); after the EMR's 401, fetched again once
    old, new = "Bearer emr-test-token", "Bearer rotated-token"
    assert posts == [(old, 200), (old, 200), (old, 401), (new, 200), (new, 200)]


# -- Subscriptions ----------------------------------------------------------------------------
def test_critical_notice_reaches_the_ordering_site_and_the_higher_level_hospital(
        stored: psycopg.Connection[Any], fhir_emr: Emr, emr_token: str, db_url: str, tmp_path: Path) -> None:
    """A critical report: each Communication goes to its hospital's EMR, the report also goes to
    the higher-level hospital (FHIR push and ORU with the AA flag), and so does its sign-off."""
    from interop.services import critical
    from tests.test_oru import Peer, free_port

    peer = Peer(free_port())
    peer.start()
    path = tmp_path / "sites.yaml"
    fhir = (f"    fhir: {{base: {fhir_emr.base}, timeout_seconds: 5, max_bundle_entries: 8,"
            " auth: {type: bearer, token_env: TEST_EMR_TOKEN}}\n")
    path.write_text("sites:\n  BVDKDN:\n    name: Benh vien Da khoa Dong Nai\n" + fhir +
                    "    referral: BVND115\n    critical_contacts: [Dr A, Dr B]\n"
                    "  BVND115:\n    name: Benh vien Nhan dan 115\n" + fhir +
                    f"    hl7: {{host: 127.0.0.1, port: {peer.port}, receiving_application: RIS}}\n", encoding="utf-8")
    sender = make_sender(db_url, path, channel=None)
    try:
        report = resources.read(stored, "DiagnosticReport", "r1")
        with stored.transaction():
            critical.raise_alert(stored, sender.ctx, report, sender.ctx.sites.get("BVDKDN"))
            on_report_changed(stored, report, sender.ctx, "BVDKDN")
        queued = {(r["lane"], r["payload"]["resource_type"], r["priority"]) for r in stored.execute(
            "SELECT lane, payload, priority FROM job WHERE lane IS NOT NULL")}
        assert queued == {("BVDKDN:fhir", "Communication", 0), ("BVND115:fhir", "Communication", 0),
                          ("BVDKDN:fhir", "DiagnosticReport", 0), ("BVND115:fhir", "DiagnosticReport", 0),
                          ("BVND115:hl7", "DiagnosticReport", 0)}
        assert drain(sender, stored) == 5
        notices = fhir_emr.search("Communication", priority="stat")
        assert sorted(n["recipient"][0]["display"] for n in notices) == ["Benh vien Nhan dan 115", "Dr A"]
        report_identifier = built_report()["report"]["identifier"][0]
        for notice in notices:
            assert notice["basedOn"][0]["identifier"]["value"] == report_identifier["value"]
            assert notice["subject"]["identifier"]["value"] == "BN-0042"
            assert "Benh vien Nhan dan 115" in notice["payload"][0]["contentString"]
        assert len(emr_reports(fhir_emr)) == 1  # both sites' pushes are one report in this one EMR
        [oru] = peer.received
        assert "|RIS|" in oru.split("\r")[0] and any(
            seg.startswith("OBX|") and seg.split("|")[8] == "AA" for seg in oru.split("\r"))
        # the radiologist signs: the higher-level hospital hears of it too; the notices are not resent
        signed = {k: v for k, v in report.items() if k != "meta"}
        signed["status"] = "final"
        with stored.transaction():
            on_report_changed(stored, resources.update(stored, signed, PARAMS["DiagnosticReport"])[0], sender.ctx,
                              "BVDKDN")
        assert drain(sender, stored) == 3
        assert len(peer.received) == 2 and "|F|" in peer.received[1].split("OBR|")[1]
        assert emr_reports(fhir_emr)[0]["status"] == "final"
        assert len(fhir_emr.search("Communication", priority="stat")) == 2
    finally:
        sender.close()
        peer.shutdown()


def subscribe(hub: fhirpy.SyncFHIRClient, receiver: Receiver, criteria: str, **channel: Any) -> Any:
    sub = hub.resource("Subscription", status="requested", reason="AI results for the EMR", criteria=criteria,
                       channel={"type": "rest-hook", "endpoint": receiver.url, **channel})
    sub.save()
    return sub


def test_subscription_is_notified_of_matching_reports_only(
        stored: psycopg.Connection[Any], fhirpy_client: fhirpy.SyncFHIRClient, receivers: Callable[[int], Receiver],
        db_url: str, tmp_path: Path) -> None:
    wanted, other = receivers(200), receivers(200)
    sub = subscribe(fhirpy_client, wanted, "DiagnosticReport?status=preliminary,final", payload="application/fhir+json",
                    header=["Authorization: Bearer hook-secret"])
    assert sub["status"] == "active" and sub.id
    subscribe(fhirpy_client, other, "DiagnosticReport?status=final&code=http://loinc.org|36554-4")
    assert len(fhirpy_client.resources("Subscription").search(status="active").fetch()) == 2
    with pytest.raises(fhirpy.base.exceptions.OperationOutcome) as refused:
        fhirpy_client.resource("Subscription", status="requested", reason="x", criteria="DiagnosticReport?status=final",
                               channel={"type": "websocket"}).save()
    assert "rest-hook" in str(refused.value)
    with pytest.raises(fhirpy.base.exceptions.OperationOutcome):
        fhirpy_client.resource("Subscription", status="requested", reason="x", criteria="DiagnosticReport?colour=blue",
                               channel={"type": "rest-hook", "endpoint": wanted.url}).save()

    sender = make_sender(db_url, write_sites(tmp_path, ""), channel="rest-hook")
    try:
        assert len(new_report(stored, sender, "r7")) == 1  # preliminary: only the first matches
        assert drain(sender, stored) == 1
        [note] = wanted.received
        assert note["path"] == "/hook/DiagnosticReport/r7"  # PUT there (the handler records both methods)
        assert note["headers"]["Authorization"] == "Bearer hook-secret"
        assert note["headers"]["Content-Type"] == "application/fhir+json"
        assert json.loads(note["body"])["id"] == "r7" and other.received == []
        assert len(new_report(stored, sender, "r8", status="final")) == 2  # final: both match
        assert drain(sender, stored) == 2
    finally:
        sender.close()
    assert len(wanted.received) == 2 and len(other.received) == 1
    assert other.received[0]["body"] == b""  # no payload asked: an empty POST (R4 rest-hook)


def test_a_failing_endpoint_puts_the_subscription_into_error(
        stored: psycopg.Connection[Any], fhirpy_client: fhirpy.SyncFHIRClient, receivers: Callable[[int], Receiver],
        db_url: str, tmp_path: Path) -> None:
    failing = receivers(500)
    sub = subscribe(fhirpy_client, failing, "DiagnosticReport?status=preliminary")
    sender = make_sender(db_url, write_sites(tmp_path, ""), channel="rest-hook")
    try:
        [item_id] = new_report(stored, sender, "r9")
        for _ in range(FAILURES_BEFORE_ERROR):
            assert sender.run_once() is True
            time_passes(stored)
        assert sender.run_once() is False
        assert len(failing.received) == FAILURES_BEFORE_ERROR
        assert row(stored, item_id)["status"] == "dead"
        sub.refresh()
        assert sub["status"] == "error" and "HTTP 500" in sub["error"]
        assert new_report(stored, sender, "r10") == []  # nothing more is queued for it
        failing.status = 200  # the client fixes the endpoint and turns it back on
        sub["status"] = "requested"
        sub.save()
        sub.refresh()
        assert sub["status"] == "active" and "error" not in sub
        assert len(new_report(stored, sender, "r11")) == 1
        assert drain(sender, stored) == 1
    finally:
        sender.close()
    assert len(failing.received) == FAILURES_BEFORE_ERROR + 1


def test_criteria_match_like_a_search(db_url: str) -> None:
    built = built_report(critical=False)
    params = PARAMS
    with db.connect(db_url, autocommit=True) as conn:
        report = resources.create(conn, built["report"], params["DiagnosticReport"], rid=built["report"]["id"])

        def matches(criteria: str) -> bool:  # the store's own search decides, as for GET DiagnosticReport?...
            return resources.matches(conn, "DiagnosticReport", report["id"], subscriptions.parse_criteria(criteria, params))

        assert matches("DiagnosticReport?status=preliminary&category=RAD")
        for criteria in ("DiagnosticReport?status=final", "DiagnosticReport?status:not=preliminary",
                         "DiagnosticReport?patient=Patient/other", "DiagnosticReport?code=http://snomed.info/sct|36554-4"):
            assert not matches(criteria), criteria
        assert matches("DiagnosticReport?patient=p1")
    for bad in ("Observation?status=final", "DiagnosticReport?_count=5", None, "DiagnosticReport?nope=1"):
        with pytest.raises(subscriptions.SubscriptionError):
            subscriptions.parse_criteria(bad, params)
