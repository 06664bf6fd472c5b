"""Subscriptions as R4 and the R4 Subscriptions Backport specify them, end to end: created with the
independent `fhirpy` client against the hub served over HTTP, delivered by the real delivery
runner to `http.server` receivers on loopback that record every request exactly as it arrived
(method, path, headers, body), each notification checked against HL7's R4 JSON schema.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fhirpy
import psycopg
import pytest
import requests

from interop.domain import subscriptions
from interop.services import delivery
from interop.store import queue, resources
from interop.store.db import scalar
from interop.workers.delivery import Deliverer
from tests.fixtures.receiver import Receiver
from tests.helpers import context, drain, new_report, time_passes
from tests.test_oru import PARAMS

FAILURES_BEFORE_ERROR = context().policies.kind(delivery.REST_HOOK).max_attempts
FULL = subscriptions.PAYLOAD_CONTENT


@pytest.fixture
def sender(db_url: str, tmp_path: Path) -> Iterator[Deliverer]:
    sites = tmp_path / "sites.yaml"
    sites.write_text("sites:\n  BVDKDN:\n    name: Benh vien Da khoa Dong Nai\n", encoding="utf-8")
    ctx = context(INTEROP_SITES=str(sites), DATABASE_URL=db_url, TRITON_URL="unused:1", INTEROP_RETRY_BASE_SECONDS="2")
    runner = Deliverer(ctx, worker_id="test-sender", kinds=(delivery.REST_HOOK,))
    yield runner
    runner.close()


def run_ready(sender: Deliverer) -> int:
    """Deliver what is due now (a heartbeat due later stays queued)."""
    sent = 0
    while sender.run_once():
        sent += 1
    return sent


def topic_subscription(endpoint: str, content: str, *, filters: tuple[str, ...] = (), heartbeat: int | None = None,
                       **extra: Any) -> dict[str, Any]:
    channel: dict[str, Any] = {"type": "rest-hook", "endpoint": endpoint, "payload": "application/fhir+json",
                               "_payload": {"extension": [{"url": FULL, "valueCode": content}]},
                               "header": ["Authorization: Bearer hook-secret"]}
    if heartbeat is not None:
        channel["extension"] = [{"url": subscriptions.HEARTBEAT_PERIOD, "valueUnsignedInt": heartbeat}]
    return {"resourceType": "Subscription", "status": "requested", "reason": "AI results for the EMR",
            "meta": {"profile": [subscriptions.PROFILE]}, "criteria": subscriptions.TOPIC,
            "_criteria": {"extension": [{"url": subscriptions.FILTER_CRITERIA, "valueString": f}
                                        for f in filters]} if filters else None,
            "channel": channel, **extra}


def create(client: fhirpy.SyncFHIRClient, body: dict[str, Any]) -> Any:
    resource = client.resource("Subscription", **{k: v for k, v in body.items() if v is not None and k != "resourceType"})
    resource.save()
    return resource


def params(bundle: dict[str, Any]) -> dict[str, Any]:
    status = bundle["entry"][0]["resource"]
    assert status["resourceType"] == "Parameters"
    return {p["name"]: p for p in status["parameter"]}


# -- classic R4 rest-hook ----------------------------------------------------------------------------
def test_classic_rest_hook_puts_the_report_at_the_endpoint_or_posts_nothing(
        fhirpy_client: fhirpy.SyncFHIRClient, receivers: Callable[[int], Receiver], sender: Deliverer,
        conn: psycopg.Connection[Any], fhir_validate: Callable[[dict[str, Any]], list[str]]) -> None:
    with_payload, without = receivers(200), receivers(200)
    sub = create(fhirpy_client, {"status": "requested", "reason": "x", "criteria": "DiagnosticReport?status=preliminary",
                       "channel": {"type": "rest-hook", "endpoint": with_payload.url, "payload": "application/fhir+json",
                                   "header": ["Authorization: Bearer hook-secret", "X-Site: BVDKDN"]}})
    assert sub["status"] == "active"  # R4 rest-hook: no handshake
    create(fhirpy_client, {"status": "requested", "reason": "x", "criteria": "DiagnosticReport?status=preliminary",
                 "channel": {"type": "rest-hook", "endpoint": without.url}})
    assert len(new_report(conn, sender, "r7")) == 2
    assert drain(sender, conn) == 2
    [put] = with_payload.received
    assert put["method"] == "PUT" and put["path"] == "/hook/DiagnosticReport/r7"
    assert put["headers"]["Authorization"] == "Bearer hook-secret" and put["headers"]["X-Site"] == "BVDKDN"
    assert put["headers"]["Content-Type"] == "application/fhir+json"
    report = json.loads(put["body"])
    assert report["resourceType"] == "DiagnosticReport" and report["id"] == "r7"
    assert report["meta"]["versionId"] == "1" and fhir_validate(report) == []
    [post] = without.received
    assert post["method"] == "POST" and post["path"] == "/hook" and post["body"] == b""
    assert "Content-Type" not in post["headers"]
    answer = requests.get(f"{fhirpy_client.url}/Subscription/{sub.id}/$status",
                          headers={"Authorization": fhirpy_client.authorization}, timeout=10)
    assert answer.status_code == 200 and fhir_validate(answer.json()) == []
    status = {p["name"]: p for p in answer.json()["entry"][0]["resource"]["parameter"]}
    assert status["status"]["valueCode"] == "active" and "topic" not in status  # a classic one has no topic


# -- the R4 Subscriptions Backport (topic-based) ------------------------------------------------------
def test_topic_subscription_handshake_events_status_and_heartbeat(
        fhirpy_client: fhirpy.SyncFHIRClient, receivers: Callable[[int], Receiver], sender: Deliverer,
        conn: psycopg.Connection[Any], fhir_validate: Callable[[dict[str, Any]], list[str]]) -> None:
    full, ids = receivers(200), receivers(200)
    sub = create(fhirpy_client, topic_subscription(full.url, "full-resource", filters=("DiagnosticReport?status=final",),
                                         heartbeat=60))
    assert sub["status"] == "requested"  # until the handshake is accepted
    other = create(fhirpy_client, topic_subscription(ids.url, "id-only"))
    assert run_ready(sender) == 2  # the two handshakes
    [handshake] = full.bundles()
    assert fhir_validate(handshake) == [] and handshake["type"] == "history"
    status = params(handshake)
    assert status["type"]["valueCode"] == "handshake" and status["status"]["valueCode"] == "requested"
    assert status["topic"]["valueCanonical"] == subscriptions.TOPIC
    assert status["subscription"]["valueReference"]["reference"].endswith(f"/Subscription/{sub.id}")
    assert full.received[0]["method"] == "POST" and full.received[0]["path"] == "/hook"
    assert full.received[0]["headers"]["Authorization"] == "Bearer hook-secret"
    assert full.received[0]["headers"]["Content-Type"] == "application/fhir+json"
    sub.refresh()
    other.refresh()
    assert sub["status"] == "active" and other["status"] == "active"

    assert len(new_report(conn, sender, "r1", status="preliminary")) == 1  # the filter wants final: id-only only
    assert len(new_report(conn, sender, "r2", status="final")) == 2
    assert run_ready(sender) == 3
    [event] = full.bundles()[1:]
    assert fhir_validate(event) == []
    status = params(event)
    assert status["type"]["valueCode"] == "event-notification" and status["status"]["valueCode"] == "active"
    assert status["events-since-subscription-start"]["valueString"] == "1"
    parts = {p["name"]: p for p in status["notification-event"]["part"]}
    assert parts["event-number"]["valueString"] == "1"
    assert parts["focus"]["valueReference"]["reference"].endswith("/DiagnosticReport/r2")
    [_, report_entry] = event["entry"]
    assert report_entry["resource"]["id"] == "r2" and report_entry["request"] == {"method": "POST", "url": "DiagnosticReport"}
    id_only = ids.bundles()[1:]
    assert [len(b["entry"]) for b in id_only] == [1, 1]  # id-only: the focus in the status, no resource
    assert [p["notification-event"]["part"][0]["valueString"] for p in map(params, id_only)] == ["1", "2"]
    assert all(fhir_validate(b) == [] for b in id_only)

    answer = requests.get(f"{fhirpy_client.url}/Subscription/{other.id}/$status",
                          headers={"Authorization": fhirpy_client.authorization}, timeout=10)
    assert answer.status_code == 200
    searchset = answer.json()
    assert searchset["type"] == "searchset" and fhir_validate(searchset) == []
    status = {p["name"]: p for p in searchset["entry"][0]["resource"]["parameter"]}
    assert status["type"]["valueCode"] == "query-status" and status["status"]["valueCode"] == "active"
    assert status["events-since-subscription-start"]["valueString"] == "2"

    # the heartbeat comes a period after the handshake, and each one queues the next
    heartbeats = conn.execute("SELECT id FROM job WHERE lane = %s AND payload->>'type' = 'heartbeat'",
                              (f"Subscription/{sub.id}",)).fetchall()
    assert len(heartbeats) == 1 and sender.run_once() is False  # not due yet
    time_passes(conn)
    assert sender.run_once() is True
    heartbeat = full.bundles()[-1]
    assert params(heartbeat)["type"]["valueCode"] == "heartbeat" and fhir_validate(heartbeat) == []
    assert scalar(conn, "SELECT count(*) FROM job WHERE lane = %s AND payload->>'type' = 'heartbeat'"
                        " AND status = 'queued'", (f"Subscription/{sub.id}",)) == 1


def test_a_refused_handshake_puts_the_topic_subscription_into_error(
        fhirpy_client: fhirpy.SyncFHIRClient, receivers: Callable[[int], Receiver], sender: Deliverer,
        conn: psycopg.Connection[Any]) -> None:
    failing = receivers(503)
    sub = create(fhirpy_client, topic_subscription(failing.url, "empty"))
    for _ in range(FAILURES_BEFORE_ERROR):
        assert sender.run_once() is True
        time_passes(conn)
    assert sender.run_once() is False and len(failing.received) == FAILURES_BEFORE_ERROR
    sub.refresh()
    assert sub["status"] == "error" and "handshake failed" in sub["error"] and "HTTP 503" in sub["error"]
    assert new_report(conn, sender, "r3", status="final") == []  # nothing for a Subscription in error
    failing.status = 200  # the client fixes its endpoint and asks again: a new handshake
    sub["status"] = "requested"
    sub.save()
    assert sub["status"] == "requested" and "error" not in sub
    assert drain(sender, conn) == 1
    sub.refresh()
    assert sub["status"] == "active"
    assert params(failing.bundles()[-1])["type"]["valueCode"] == "handshake"


def test_topic_subscriptions_the_hub_cannot_serve_are_refused(
        fhirpy_client: fhirpy.SyncFHIRClient, receivers: Callable[[int], Receiver], conn: psycopg.Connection[Any]) -> None:
    endpoint = receivers(200).url
    refused = [
        topic_subscription(endpoint, "full-resource", criteria="http://example.org/SubscriptionTopic/admission"),
        topic_subscription(endpoint, "everything"),
        topic_subscription(endpoint, "empty", filters=("DiagnosticReport?colour=blue",)),
        topic_subscription(endpoint, "empty", heartbeat=1),
        {**topic_subscription(endpoint, "empty"), "channel": {"type": "rest-hook", "endpoint": endpoint}},
    ]
    for body in refused:
        with pytest.raises(fhirpy.base.exceptions.OperationOutcome) as outcome:
            create(fhirpy_client, body)
        assert outcome.value.resource["issue"][0]["code"] == "business-rule"
    assert scalar(conn, "SELECT count(*) FROM resource WHERE type = 'Subscription'") == 0
    assert queue.depth(conn) == {}


def test_a_payload_subscription_on_an_emr_fhir_base_updates_the_report_there(
        fhirpy_client: fhirpy.SyncFHIRClient, fhir_emr: Any, sender: Deliverer, conn: psycopg.Connection[Any]) -> None:
    """R4's payload semantics with a real FHIR server as the endpoint (Medplum): the notification
    is an update of the report at the EMR, which then holds each new version."""
    create(fhirpy_client, {"status": "requested", "reason": "x", "criteria": "DiagnosticReport?status=preliminary,final",
                 "channel": {"type": "rest-hook", "endpoint": fhir_emr.base, "payload": "application/fhir+json",
                             "header": [f"Authorization: Bearer {fhir_emr.token}"]}})
    assert len(new_report(conn, sender, "r7")) == 1
    assert run_ready(sender) == 1
    held = fhir_emr.read("DiagnosticReport/r7")
    assert held["status"] == "preliminary"
    report = resources.read(conn, "DiagnosticReport", "r7")
    report["status"] = "final"
    del report["meta"]["lastUpdated"]
    with conn.transaction():
        stored = resources.update(conn, report, PARAMS["DiagnosticReport"])[0]
        delivery.queue_report(conn, sender.ctx, stored, None)
    assert run_ready(sender) == 1
    assert fhir_emr.read("DiagnosticReport/r7")["status"] == "final"
    puts = [r for r in fhir_emr.requests() if r["method"] == "PUT"]
    assert [(r["url"], r["authorization"]) for r in puts] == [("/DiagnosticReport/r7", f"Bearer {fhir_emr.token}")] * 2
    assert all(200 <= r["status"] < 300 for r in puts)
