"""DELETE (soft, with history), PATCH (JSON Patch, JSON Merge Patch) and the conditional update and
delete (issue 15), as HAPI FHIR users call them: with curl-like requests and with fhirpy over HTTP.
Answers are checked against the official R4 JSON schema."""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import fhirpy
import pytest
from flask import Flask
from flask.testing import FlaskClient

from interop.store.db import connect
from tests.fixtures.auth import bearer, with_token
from tests.test_fhir_api import FHIR, jobs, outcome, post, study
from tests.test_fhir_transaction import NHI, patient

Validate = Callable[[dict[str, Any]], list[str]]
JSON_PATCH = "application/json-patch+json"


def created(client: FlaskClient, body: dict[str, Any]) -> dict[str, Any]:
    answer = post(client, body["resourceType"], body)
    assert answer.status_code == 201, answer.get_data(as_text=True)
    return dict(answer.get_json(force=True))


def found(client: FlaskClient, query: str) -> list[str]:
    return [e["resource"]["id"] for e in client.get(f"/fhir/{query}").get_json(force=True).get("entry", [])]


def audit_actions(db_url: str, entity: str) -> list[str]:
    with connect(db_url) as conn:
        rows = conn.execute("SELECT action, patients FROM audit_event WHERE %s = ANY(entities) ORDER BY id",
                            (entity,)).fetchall()
    return [f"{r['action']}:{','.join(r['patients'])}" for r in rows]


def test_delete_is_a_version_read_gives_410_and_the_id_can_come_back(
        client: FlaskClient, db_url: str, check_r4: Validate) -> None:
    person = created(client, patient("M1", "Pham"))
    pid = person["id"]
    person["gender"] = "female"
    assert client.put(f"/fhir/Patient/{pid}", data=json.dumps(person), content_type=FHIR).status_code == 200

    outcome(client.delete(f"/fhir/Patient/{pid}", headers={"If-Match": 'W/"1"'}), 412, "conflict")
    deleted = client.delete(f"/fhir/Patient/{pid}", headers={"If-Match": 'W/"2"'})
    assert deleted.status_code == 200 and deleted.headers["ETag"] == 'W/"3"'
    said = deleted.get_json(force=True)
    assert said["resourceType"] == "OperationOutcome" and said["issue"][0]["severity"] == "information"
    assert check_r4(said) == []
    assert audit_actions(db_url, f"Patient/{pid}/_history/3") == [f"D:Patient/{pid}"]

    gone = outcome(client.get(f"/fhir/Patient/{pid}"), 410, "deleted")
    assert check_r4(gone) == []
    assert client.get(f"/fhir/Patient/{pid}/_history/2").get_json(force=True)["gender"] == "female"
    assert client.get(f"/fhir/Patient/{pid}/_history/1").status_code == 200
    outcome(client.get(f"/fhir/Patient/{pid}/_history/3"), 410, "deleted")  # the deletion has no content
    assert found(client, "Patient?name=pham") == [] and found(client, f"Patient?_id={pid}") == []
    assert found(client, f"Patient?identifier={NHI}|M1") == []

    history = client.get(f"/fhir/Patient/{pid}/_history").get_json(force=True)
    assert check_r4(history) == []
    assert [(e["request"]["method"], e["response"]["status"], "resource" in e) for e in history["entry"]] == [
        ("DELETE", "200 OK", False), ("PUT", "200 OK", True), ("POST", "201 Created", True)]
    assert [e["response"]["etag"] for e in history["entry"]] == ['W/"3"', 'W/"2"', 'W/"1"']
    assert history["entry"][0]["request"]["url"] == f"Patient/{pid}"

    again = client.delete(f"/fhir/Patient/{pid}")  # nothing more happens
    assert again.status_code == 200 and again.headers["ETag"] == 'W/"3"'
    assert "already" in again.get_json(force=True)["issue"][0]["diagnostics"]

    person["gender"] = "male"
    back = client.put(f"/fhir/Patient/{pid}", data=json.dumps(person), content_type=FHIR)
    assert back.status_code == 201 and back.get_json(force=True)["meta"]["versionId"] == "4"
    assert found(client, "Patient?name=pham") == [pid]
    assert client.get(f"/fhir/Patient/{pid}").get_json(force=True)["gender"] == "male"


def test_delete_keeps_the_hub_whole(client: FlaskClient, db_url: str) -> None:
    person = created(client, patient("M1"))
    imaging = created(client, study(subject=f"Patient/{person['id']}"))
    refused = outcome(client.delete(f"/fhir/Patient/{person['id']}"), 409, "conflict")
    assert f"ImagingStudy/{imaging['id']}" in refused["issue"][0]["diagnostics"]
    # the study has its analysis Task (the hub's), so it stays too
    task = found(client, f"Task?focus=ImagingStudy/{imaging['id']}")
    refused = outcome(client.delete(f"/fhir/ImagingStudy/{imaging['id']}"), 409, "conflict")
    assert f"Task/{task[0]}" in refused["issue"][0]["diagnostics"]
    outcome(client.delete(f"/fhir/Task/{task[0]}"), 405, "not-supported")  # the hub writes Tasks and reports
    outcome(client.delete("/fhir/AuditEvent/1"), 405, "not-supported")
    outcome(client.delete("/fhir/Patient/never-stored"), 404, "not-found")
    assert client.get(f"/fhir/Patient/{person['id']}").status_code == 200
    assert len(jobs(db_url)) == 1


def test_deleting_a_subscription_stops_its_notifications(client: FlaskClient, db_url: str) -> None:
    sub = created(client, {"resourceType": "Subscription", "status": "requested", "reason": "EMR",
                           "criteria": "DiagnosticReport?status=final",
                           "channel": {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/hook"}})
    from interop.store import queue

    with connect(db_url, autocommit=True) as conn:
        queue.enqueue(conn, "notify-rest-hook", {"resource_id": "r1", "version": "1"}, lane=f"Subscription/{sub['id']}")
    assert client.delete(f"/fhir/Subscription/{sub['id']}").status_code == 200
    with connect(db_url) as conn:
        row = conn.execute("SELECT status FROM job WHERE lane = %s", (f"Subscription/{sub['id']}",)).fetchone()
    assert row is not None and row["status"] == "dead"


def test_conditional_update_and_delete(client: FlaskClient, check_r4: Validate) -> None:
    url = f"/fhir/Patient?identifier={NHI}|M5"
    first = client.put(url, data=json.dumps(patient("M5", "Vo")), content_type=FHIR)
    assert first.status_code == 201 and first.headers["Location"].endswith("/_history/1")
    pid = first.get_json(force=True)["id"]
    second = client.put(url, data=json.dumps(patient("M5", "Vu")), content_type=FHIR)
    assert second.status_code == 200
    assert second.get_json(force=True)["id"] == pid and second.headers["ETag"] == 'W/"2"'
    outcome(client.put(url, data=json.dumps({**patient("M5"), "id": "other"}), content_type=FHIR), 400, "invalid")
    bystander = created(client, patient("M0"))  # matches nothing below: its id is not taken over
    outcome(client.put(f"/fhir/Patient?identifier={NHI}|M99", data=json.dumps({**patient("M99"), "id": bystander["id"]}),
                       content_type=FHIR), 409, "conflict")
    assert client.get(f"/fhir/Patient/{bystander['id']}").get_json(force=True)["meta"]["versionId"] == "1"
    chosen = client.put(f"/fhir/Patient?identifier={NHI}|M98", data=json.dumps({**patient("M98"), "id": "m98"}),
                        content_type=FHIR)
    assert chosen.status_code == 201 and chosen.get_json(force=True)["id"] == "m98"  # update as create
    outcome(client.put(url + "&colour=red", data=json.dumps(patient("M5")), content_type=FHIR), 400, "invalid")
    outcome(client.put("/fhir/Patient", data=json.dumps(patient("M5")), content_type=FHIR), 400, "invalid")
    created(client, patient("M6", "Vu"))
    outcome(client.put("/fhir/Patient?name=vu", data=json.dumps(patient("M7")), content_type=FHIR), 412, "conflict")
    outcome(client.delete("/fhir/Patient?name=vu"), 412, "conflict")
    assert found(client, "Patient?name=vu") != []
    nothing = client.delete("/fhir/Patient?name=nobody")
    assert nothing.status_code == 200 and check_r4(nothing.get_json(force=True)) == []
    assert client.delete(url).status_code == 200
    assert client.get(f"/fhir/Patient/{pid}").status_code == 410


def test_json_patch(client: FlaskClient, db_url: str) -> None:
    person = created(client, patient("M1", "Dang"))
    pid = person["id"]

    def patch(ops: Any, content_type: str = JSON_PATCH, **headers: str) -> Any:
        data = ops if isinstance(ops, str) else json.dumps(ops)
        return client.patch(f"/fhir/Patient/{pid}", data=data, content_type=content_type, headers=headers)

    done = patch([{"op": "replace", "path": "/gender", "value": "female"},
                  {"op": "add", "path": "/name/0/given/-", "value": "Thi"},
                  {"op": "add", "path": "/birthDate", "value": "1980-02-03"}], **{"If-Match": 'W/"1"'})
    assert done.status_code == 200, done.get_data(as_text=True)
    body = done.get_json(force=True)
    assert body["gender"] == "female" and body["name"][0]["given"] == ["Van", "A", "Thi"]
    assert body["birthDate"] == "1980-02-03" and done.headers["ETag"] == 'W/"2"'
    assert audit_actions(db_url, f"Patient/{pid}/_history/2") == [f"U:Patient/{pid}"]
    tagged = patch([{"op": "add", "path": "/meta/tag", "value": [{"system": "urn:x", "code": "vip"}]},
                    {"op": "replace", "path": "/meta/versionId", "value": "99"}])
    assert tagged.get_json(force=True)["meta"]["tag"] == [{"system": "urn:x", "code": "vip"}]
    assert tagged.headers["ETag"] == 'W/"3"'  # the version is the hub's to set
    outcome(patch([{"op": "remove", "path": "/gender"}], **{"If-Match": 'W/"2"'}), 412, "conflict")
    outcome(patch([{"op": "test", "path": "/gender", "value": "male"}, {"op": "remove", "path": "/gender"}]), 412)
    outcome(patch([{"op": "replace", "path": "/gender", "value": "bogus"}]), 400, "code-invalid")  # validated
    outcome(patch([{"op": "replace", "path": "/id", "value": "x"}]), 400, "invalid")
    outcome(patch([{"op": "remove", "path": "/telecom/0"}]), 400, "invalid")
    outcome(patch([{"op": "dance", "path": "/gender"}]), 400, "invalid")
    outcome(patch("[{not json"), 400, "invalid")
    outcome(patch({"resourceType": "Parameters", "parameter": []}, "application/fhir+json"), 415, "not-supported")
    outcome(patch([], "text/plain"), 415, "not-supported")
    assert client.get(f"/fhir/Patient/{pid}").get_json(force=True)["meta"]["versionId"] == "3"  # none of those stored
    outcome(client.patch("/fhir/DiagnosticReport/r1", data="[]", content_type=JSON_PATCH), 405, "not-supported")
    outcome(client.patch("/fhir/Patient/nope", data="[]", content_type=JSON_PATCH), 404, "not-found")
    client.delete(f"/fhir/Patient/{pid}")
    outcome(patch([{"op": "remove", "path": "/gender"}]), 410, "deleted")


def test_each_interaction_needs_its_scope(app: Flask, client: FlaskClient, db_url: str) -> None:
    pid = created(client, patient("M1"))["id"]
    cru = with_token(app.test_client(), bearer(app.test_client(), db_url, scopes="system/Patient.crus"))
    outcome(cru.delete(f"/fhir/Patient/{pid}"), 403, "forbidden")
    outcome(cru.delete(f"/fhir/Patient?identifier={NHI}|M1"), 403, "forbidden")
    reader = with_token(app.test_client(), bearer(app.test_client(), db_url, scopes="system/Patient.rs"))
    outcome(reader.patch(f"/fhir/Patient/{pid}", data="[]", content_type=JSON_PATCH), 403, "forbidden")
    outcome(reader.put(f"/fhir/Patient?identifier={NHI}|M1", data=json.dumps(patient("M1")), content_type=FHIR), 403)
    assert reader.get("/fhir/Patient/_history").status_code == 200
    assert client.get(f"/fhir/Patient/{pid}").get_json(force=True)["meta"]["versionId"] == "1"


# -- with fhirpy, over HTTP ---------------------------------------------------------------------------
def test_fhirpy_habits(fhirpy_client: fhirpy.SyncFHIRClient) -> None:
    person = fhirpy_client.resource("Patient", **patient("M8", "Bui"))
    person.save()
    person.patch(gender="female", active=True)  # fhirpy sends a JSON Merge Patch
    person.refresh()
    assert person["gender"] == "female" and person["active"] is True and person["meta"]["versionId"] == "2"
    # conditional update through a search set, as fhirpy does it
    updated, was_created = fhirpy_client.resources("Patient").search(identifier=f"{NHI}|M8").update(
        fhirpy_client.resource("Patient", **patient("M8", "Bui Thi")))
    assert was_created is False and updated.id == person.id
    assert fhirpy_client.resources("Patient").search(identifier=f"{NHI}|M9").update(
        fhirpy_client.resource("Patient", **patient("M9")))[1]
    person.delete()
    with pytest.raises(fhirpy.base.exceptions.ResourceNotFound):
        fhirpy_client.reference("Patient", person.id).to_resource()
    assert fhirpy_client.resources("Patient").search(identifier=f"{NHI}|M8").fetch() == []


def test_every_element_of_a_patch_replaced_by_a_wrong_type_is_a_4xx_never_a_500(client: FlaskClient) -> None:
    from tests.test_fhir_transaction import _paths, _replaced

    pid = created(client, patient("M1"))["id"]
    ops = [{"op": "replace", "path": "/gender", "value": "female"}, {"op": "add", "path": "/name/0/given/-", "value": "X"},
           {"op": "move", "from": "/name/0/given/0", "path": "/name/0/given/1"},
           {"op": "test", "path": "/id", "value": pid}]
    merge = {"gender": "female", "name": [{"family": "Ho"}], "active": None}
    tried = 0
    for document, ctype in ((ops, JSON_PATCH), (merge, "application/merge-patch+json")):
        for path in _paths(document):
            for wrong in (None, 7, "x", [], {}, True, "/", "/-", "/name/99"):
                answer = client.patch(f"/fhir/Patient/{pid}", data=json.dumps(_replaced(document, path, wrong)),
                                      content_type=ctype)
                tried += 1
                assert answer.status_code < 500, (path, wrong, answer.get_data(as_text=True)[:300])
                assert answer.get_json(force=True)["resourceType"] in ("Patient", "OperationOutcome")
    assert tried > 150
