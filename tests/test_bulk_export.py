"""FHIR Bulk Data export as a Bulk Data client runs it against the hub served over real HTTP: a
SMART backend client with its own key (its scopes, and for an EMR its site) kicks off, polls the
status URL, downloads each NDJSON file with its token and parses it; every line is checked against
HL7's R4 JSON schema. The export is run by the real analysis worker (`interop worker`'s Runner)
claiming the `bulk-export` job from the one queue in PostgreSQL.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import requests
from flask import Flask
from werkzeug.serving import make_server

from interop.app import create_app
from interop.config import Settings
from interop.domain.vocabulary import SITE_TAG, site_tag
from interop.services import bulk
from interop.services.analytics import facts
from interop.services.context import Context
from interop.store import bulk as exports
from interop.store import queue, resources
from interop.workers.analysis import Runner
from scripts.smart import ClientKey, Smart, session
from tests.fixtures.auth import register
from tests.fixtures.hub import TEST_URL_ALLOW
from tests.helpers import free_port
from tests.test_oru import PARAMS, PATIENT, SERVICE_REQUEST, STUDY, built_report

PSEUDONYM_KEY = "bulk-export-test-pseudonym-secret"
ASYNC = {"Prefer": "respond-async", "Accept": "application/fhir+json"}


class Hub:
    """The hub's API over HTTP on a port of its own (its public base URL is that port), and a worker."""

    def __init__(self, db_url: str):
        port = free_port()
        env = {"DATABASE_URL": db_url, "INTEROP_BASE_URL": f"http://127.0.0.1:{port}/fhir",
               "INTEROP_PSEUDONYM_KEY": PSEUDONYM_KEY, "INTEROP_URL_ALLOW": TEST_URL_ALLOW,
               "TRITON_URL": "http://127.0.0.1:9", "INTEROP_RETRY_BASE_SECONDS": "1"}
        self.settings = Settings.from_env(env)
        self.db_url = db_url
        self.app: Flask = create_app(self.settings)
        self.server = make_server("127.0.0.1", port, self.app, threaded=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{port}/fhir"
        self.ctx = Context.from_settings(self.settings)
        self.worker = Runner(self.ctx, worker_id="test-worker")

    def client(self, scopes: str, site: str | None = None) -> requests.Session:
        """A Bulk Data client: registered with these scopes (and site), tokens from /auth/token."""
        key = ClientKey.new()
        client_id = register(self.db_url, key, scopes, site=site)
        return session(Smart(self.settings.token_url(), client_id, key, scopes))

    def close(self) -> None:
        self.worker.close()
        self.server.shutdown()
        self.app.extensions["interop"].close()


@pytest.fixture
def hub(db_url: str) -> Iterator[Hub]:
    running = Hub(db_url)
    yield running
    running.close()


def store_report(conn: psycopg.Connection[Any], ctx: Context, rid: str, site: str, status: str = "final") -> dict[str, Any]:
    """An AI report (with its observations) of `site`, and its analytics facts, as analysis stores them."""
    built = built_report(critical=False, report_id=rid)
    built["report"]["status"] = status
    built["report"]["identifier"][0]["value"] += f"-{rid}"
    built["report"]["meta"] = {"tag": [site_tag(site)]}
    with conn.transaction():
        if resources.find(conn, "Patient/p1") is None:
            for body in (PATIENT, SERVICE_REQUEST, STUDY, built["device"]):
                resources.create(conn, body, PARAMS[body["resourceType"]], rid=body["id"])
        for body in built["observations"]:
            resources.create(conn, body, PARAMS["Observation"], rid=body["id"])
        report = resources.create(conn, built["report"], PARAMS["DiagnosticReport"], rid=rid)
        facts.record(conn, ctx, rid, event="ai_result")
    return report


def kick_off(client: requests.Session, url: str, headers: dict[str, str] | None = None) -> str:
    answer = client.get(url, headers=headers or ASYNC, timeout=30)
    assert answer.status_code == 202, answer.text
    return str(answer.headers["Content-Location"])


def finish(hub: Hub, client: requests.Session, status_url: str) -> dict[str, Any]:
    """Poll (202 with X-Progress while the job waits), let the worker run it, poll again (200)."""
    waiting = client.get(status_url, timeout=30)
    assert waiting.status_code == 202 and waiting.headers["X-Progress"] and waiting.headers["Retry-After"]
    assert hub.worker.run_once() is True
    done = client.get(status_url, timeout=30)
    assert done.status_code == 200, done.text
    assert done.headers["Content-Type"].startswith("application/json") and done.headers["Expires"]
    return dict(done.json())


def download(client: requests.Session, manifest: dict[str, Any],
             fhir_validate: Callable[[dict[str, Any]], list[str]]) -> dict[str, list[dict[str, Any]]]:
    """Every output file, parsed line by line, each line valid R4; by type."""
    out: dict[str, list[dict[str, Any]]] = {}
    for item in manifest["output"]:
        answer = client.get(item["url"], headers={"Accept": "application/fhir+ndjson"}, timeout=30)
        assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("application/fhir+ndjson")
        lines = answer.text.splitlines()
        assert len(lines) == item["count"] and answer.text.endswith("\n")
        for line in lines:
            resource = json.loads(line)
            assert resource["resourceType"] == item["type"]
            assert fhir_validate(resource) == [], (item["type"], fhir_validate(resource))
            out.setdefault(item["type"], []).append(resource)
    return out


def _walk(value: Any, key: str) -> Iterator[Any]:
    if isinstance(value, dict):
        for k, v in value.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item, key)


# -- (a) de-identified analytics for the provincial CDC ----------------------------------------------------
def test_a_system_export_for_analytics_holds_pseudonymised_data_only(
        hub: Hub, conn: psycopg.Connection[Any], fhir_validate: Callable[[dict[str, Any]], list[str]]) -> None:
    store_report(conn, hub.ctx, "r1", "BVDKDN")
    store_report(conn, hub.ctx, "r2", "OTHER", status="preliminary")
    cdc = hub.client("hub:analytics")
    status_url = kick_off(cdc, f"{hub.base}/$export?_outputFormat=application/fhir%2Bndjson")
    assert status_url.startswith(f"{hub.base}/$export-poll-status/")
    manifest = finish(hub, cdc, status_url)
    assert manifest["request"] == f"{hub.base}/$export?_outputFormat=application/fhir%2Bndjson"
    assert manifest["requiresAccessToken"] is True and manifest["error"] == []
    assert manifest["transactionTime"].endswith("Z")
    exported = download(cdc, manifest, fhir_validate)
    assert set(exported) == {"Patient", "DiagnosticReport", "Observation"}
    [patient] = exported["Patient"]  # one patient, however many studies
    assert len(exported["DiagnosticReport"]) == 2
    text = json.dumps(exported, ensure_ascii=False)
    for secret in ("BN-0042", "Nguyễn", "Văn", "An\"", "1980-05-17", "urn:oid:1.2.840.99999.7", "ORD|001",
                   "Patient/p1", "ServiceRequest/sr1", "ImagingStudy/s1", '"r1"', '"r2"', STUDY["identifier"][0]["value"],
                   built_report()["report"]["identifier"][0]["value"]):
        assert secret not in text, secret
    assert not {"name", "identifier", "birthDate", "telecom", "contact"} & set(patient)
    for key in ("name", "birthDate", "telecom", "div", "conclusion", "note"):  # no narrative, no free text
        assert list(_walk(exported, key)) == [], key
    assert all(i["system"] == SITE_TAG for i in _walk(exported, "identifier"))  # the facility, never a person
    expected_key = hub.ctx.pseudonymizer.patient_key(PATIENT["identifier"][0]["system"], "BN-0042")
    assert patient["id"] == expected_key and patient["gender"] == "male"
    assert {r["subject"]["reference"] for r in exported["DiagnosticReport"]} == {f"Patient/{expected_key}"}
    assert all(r["meta"]["security"][0]["code"] == "PSEUDED" for rs in exported.values() for r in rs)
    assert all(len(r["effectiveDateTime"]) == 10 for r in exported["DiagnosticReport"])  # a day, no time

    # the files are the asking client's only, with its token
    assert requests.get(manifest["output"][0]["url"], timeout=10).status_code == 401
    other = hub.client("hub:analytics")
    assert other.get(manifest["output"][0]["url"], timeout=10).status_code == 404
    assert other.get(status_url, timeout=10).status_code == 404


# -- (b) a site's reports for its EMR back-fill ------------------------------------------------------------
def test_a_site_client_exports_its_own_reports_and_their_observations(
        hub: Hub, conn: psycopg.Connection[Any], fhir_validate: Callable[[dict[str, Any]], list[str]]) -> None:
    mine = store_report(conn, hub.ctx, "r1", "BVDKDN")
    store_report(conn, hub.ctx, "r2", "OTHER")
    emr = hub.client("system/DiagnosticReport.rs system/Observation.rs", site="BVDKDN")
    manifest = finish(hub, emr, kick_off(emr, f"{hub.base}/DiagnosticReport/$export?_type=DiagnosticReport,Observation"))
    exported = download(emr, manifest, fhir_validate)
    assert [r["id"] for r in exported["DiagnosticReport"]] == ["r1"]
    assert exported["DiagnosticReport"][0] == mine  # as stored
    assert sorted(o["id"] for o in exported["Observation"]) == sorted(r["reference"].split("/")[1] for r in mine["result"])

    # _since: only what changed after the first export's transaction time
    changed = dict(mine, status="amended")
    del changed["meta"]["lastUpdated"]
    with conn.transaction():
        resources.update(conn, changed, PARAMS["DiagnosticReport"])
    since = manifest["transactionTime"]
    again = finish(hub, emr, kick_off(emr, f"{hub.base}/DiagnosticReport/$export?_since={since}"))
    exported = download(emr, again, fhir_validate)
    assert [(r["id"], r["status"]) for r in exported["DiagnosticReport"]] == [("r1", "amended")]
    assert "Observation" not in exported


def test_scopes_and_parameters_are_enforced_at_kick_off(hub: Hub, conn: psycopg.Connection[Any]) -> None:
    observations_only = hub.client("system/Observation.rs", site="BVDKDN")
    cdc = hub.client("hub:analytics")
    emr = hub.client("system/DiagnosticReport.rs", site="BVDKDN")
    wide = hub.client("system/*.rs", site="BVDKDN")
    refused = [
        (observations_only, "DiagnosticReport/$export", ASYNC, 403),
        (cdc, "DiagnosticReport/$export", ASYNC, 403),  # identified data need system/ scopes
        (emr, "Patient/$export", ASYNC, 403),
        (wide, "Patient/$export", ASYNC, 400),           # a site's client exports its site's results only
        (wide, "AuditEvent/$export", ASYNC, 400),
        (cdc, "$export?_type=ServiceRequest", ASYNC, 400),
        (emr, "DiagnosticReport/$export", {"Accept": "application/fhir+json"}, 400),  # no respond-async
        (emr, "DiagnosticReport/$export?_outputFormat=text/csv", ASYNC, 400),
        (emr, "DiagnosticReport/$export?_typeFilter=DiagnosticReport%3Fstatus%3Dfinal", ASYNC, 400),
        (emr, "DiagnosticReport/$export?_since=yesterday", ASYNC, 400),
        (emr, "DiagnosticReport/$export?_since=2026-12-01T00:00:00", ASYNC, 400),  # no time zone
    ]
    for client, path, headers, status in refused:
        answer = client.get(f"{hub.base}/{path}", headers=headers, timeout=30)
        assert answer.status_code == status, (path, answer.status_code, answer.text)
        assert answer.json()["resourceType"] == "OperationOutcome"
    assert requests.get(f"{hub.base}/$export", headers=ASYNC, timeout=10).status_code == 401
    assert queue.depth(conn, [bulk.EXPORT]) == {}
    lenient = {**ASYNC, "Prefer": "respond-async, handling=lenient"}
    assert emr.get(f"{hub.base}/DiagnosticReport/$export?_elements=id", headers=lenient, timeout=30).status_code == 202


def test_delete_cancels_the_export_and_its_job(hub: Hub, conn: psycopg.Connection[Any]) -> None:
    store_report(conn, hub.ctx, "r1", "BVDKDN")
    emr = hub.client("system/DiagnosticReport.rs", site="BVDKDN")
    status_url = kick_off(emr, f"{hub.base}/DiagnosticReport/$export")
    assert hub.client("system/DiagnosticReport.rs").delete(status_url, timeout=10).status_code == 404  # not theirs
    assert emr.delete(status_url, timeout=10).status_code == 202
    assert emr.get(status_url, timeout=10).status_code == 404
    assert hub.worker.run_once() is False  # the job was withdrawn
    assert queue.depth(conn, [bulk.EXPORT]) == {"cancelled": 1}


def test_an_export_interrupted_by_a_crash_is_done_again_from_the_start(
        hub: Hub, conn: psycopg.Connection[Any], fhir_validate: Callable[[dict[str, Any]], list[str]]) -> None:
    store_report(conn, hub.ctx, "r1", "BVDKDN")
    emr = hub.client("system/DiagnosticReport.rs", site="BVDKDN")
    status_url = kick_off(emr, f"{hub.base}/DiagnosticReport/$export")
    export_id = status_url.rsplit("/", 1)[1]
    # a worker claims it, writes a first file and dies (its lease runs out)
    job = queue.claim(conn, "dead-worker", 60, kinds=[bulk.EXPORT])
    assert job is not None
    with conn.transaction():
        exports.begin(conn, export_id)
        exports.add_file(conn, export_id, 1, "DiagnosticReport", 1, '{"resourceType": "DiagnosticReport"}\n')
    conn.execute("UPDATE job SET leased_until = now() - interval '1 second' WHERE id = %s", (job.id,))
    assert emr.get(status_url, timeout=10).status_code == 202  # still in progress, not completed
    assert hub.worker.run_once() is True  # another worker takes it over and starts again
    done = emr.get(status_url, timeout=10)
    assert done.status_code == 200
    manifest = done.json()
    exported = download(emr, manifest, fhir_validate)
    assert [r["id"] for r in exported["DiagnosticReport"]] == ["r1"] and len(manifest["output"]) == 1


def test_large_exports_are_split_into_files_read_a_page_at_a_time(
        hub: Hub, conn: psycopg.Connection[Any], fhir_validate: Callable[[dict[str, Any]], list[str]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bulk, "FILE_LINES", 4)
    monkeypatch.setattr(bulk, "PAGE", 2)
    reports = [store_report(conn, hub.ctx, f"r{i}", "BVDKDN") for i in range(3)]
    emr = hub.client("system/DiagnosticReport.rs system/Observation.rs", site="BVDKDN")
    manifest = finish(hub, emr, kick_off(emr, f"{hub.base}/DiagnosticReport/$export?_type=Observation,DiagnosticReport"))
    observations = sorted(r["reference"].split("/")[1] for report in reports for r in report["result"])
    assert [f["type"] for f in manifest["output"]] == ["Observation"] * -(-len(observations) // 4) + ["DiagnosticReport"]
    assert all(f["count"] <= 4 for f in manifest["output"]) and len(observations) % 4  # a last, partial file
    exported = download(emr, manifest, fhir_validate)
    assert sorted(o["id"] for o in exported["Observation"]) == observations  # each once
    assert sorted(r["id"] for r in exported["DiagnosticReport"]) == ["r0", "r1", "r2"]


def test_an_analytics_export_since_an_instant_holds_what_changed_after_it(
        hub: Hub, conn: psycopg.Connection[Any], fhir_validate: Callable[[dict[str, Any]], list[str]]) -> None:
    store_report(conn, hub.ctx, "r1", "BVDKDN")
    store_report(conn, hub.ctx, "r2", "BVDKDN")
    cdc = hub.client("hub:analytics")
    first = finish(hub, cdc, kick_off(cdc, f"{hub.base}/$export?_type=DiagnosticReport"))
    assert [f["type"] for f in first["output"]] == ["DiagnosticReport"] and first["output"][0]["count"] == 2
    with conn.transaction():
        facts.record(conn, hub.ctx, "r2", event="reviewed")  # the fact is recomputed: it changed
    again = finish(hub, cdc, kick_off(cdc, f"{hub.base}/$export?_since={first['transactionTime']}"))
    exported = download(cdc, again, fhir_validate)
    expected = hub.ctx.pseudonymizer.patient_key(bulk.REPORT_KEY_SYSTEM, "r2")
    assert [r["id"] for r in exported["DiagnosticReport"]] == [expected]
    assert len(exported["Patient"]) == 1 and len(exported["Observation"]) == len(exported["DiagnosticReport"][0]["result"])


def test_a_not_analysable_study_is_exported_as_such_not_as_one_with_no_finding() -> None:
    """The CDC's export says which studies the AI could not read (they are out of the rates), by the
    same code as the hub's reports; a study the AI read with nothing found has no conclusion code."""
    from interop.domain.quality import NOT_ANALYSABLE
    from interop.services.analytics.pseudonym import Pseudonymizer

    keys = Pseudonymizer(b"x" * 32)
    fact = {"report_id": "r1", "patient_key": None, "report_status": "preliminary", "modality": "DX",
            "body_part": "CHEST", "model_name": "chest-xray", "model_version": "1", "facility": "BVDKDN",
            "study_day": None, "findings": []}

    def report(**extra: Any) -> dict[str, Any]:
        return next(r for r in bulk.deidentified({**fact, **extra}, keys, set())
                    if r["resourceType"] == "DiagnosticReport")

    refused = report(analysable=False)
    assert refused["conclusionCode"][0]["coding"] == [NOT_ANALYSABLE]
    assert "conclusionCode" not in report(analysable=True)
