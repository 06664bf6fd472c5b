"""The FHIR REST API against a real PostgreSQL (Flask's test client; the HTTP server is
exercised in test_end_to_end). Every bad input gets an OperationOutcome with the right status."""
from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from flask.testing import FlaskClient

from tests.fixtures.auth import bearer, with_token

FHIR = "application/fhir+json"
UID = "1.2.826.0.1.3680043.8.498.1"


def study(uid: str = UID, subject: str = "Patient/p1", endpoint: str | None = "http://127.0.0.1:9/dicom-web",
          status: str = "available") -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "status": status,
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"},
                       {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                             "code": "ACSN"}]}, "value": "ACC-1"}],
        "subject": {"reference": subject},
        "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "DX"}],
    }
    if endpoint:
        body["contained"] = [{"resourceType": "Endpoint", "id": "pacs", "status": "active",
                              "connectionType": {"code": "dicom-wado-rs"},
                              "payloadType": [{"text": "DICOM"}], "address": endpoint}]
        body["endpoint"] = [{"reference": "#pacs"}]
    return body


def post(client: FlaskClient, rtype: str, body: Any, **headers: str) -> Any:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return client.post(f"/fhir/{rtype}", data=data, content_type=headers.pop("content_type", FHIR), headers=headers)


def outcome(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json(force=True)
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["severity"] == "error"
    if code:
        assert body["issue"][0]["code"] == code
    return body


def jobs(db_url: str) -> list[dict[str, Any]]:
    from interop.store.db import connect

    with connect(db_url) as conn:
        return conn.execute("SELECT kind, status, payload FROM job ORDER BY id").fetchall()


def test_create_read_version_and_queue(client: FlaskClient, db_url: str) -> None:
    created = post(client, "ImagingStudy", study())
    assert created.status_code == 201
    body = created.get_json(force=True)
    assert created.headers["Content-Type"].startswith(FHIR)
    assert created.headers["ETag"] == 'W/"1"'
    assert created.headers["Location"].endswith(f"/fhir/ImagingStudy/{body['id']}/_history/1")
    assert body["meta"]["versionId"] == "1" and body["meta"]["lastUpdated"]

    read = client.get(f"/fhir/ImagingStudy/{body['id']}")
    assert read.status_code == 200 and read.get_json(force=True) == body

    queued = jobs(db_url)
    assert [(j["kind"], j["status"]) for j in queued] == [("analyse-study", "queued")]
    assert queued[0]["payload"]["study"] == body["id"]
    assert queued[0]["payload"]["study_uid"] == UID
    assert queued[0]["payload"]["dicomweb"] == "http://127.0.0.1:9/dicom-web"
    task = client.get(f"/fhir/Task?focus=ImagingStudy/{body['id']}").get_json(force=True)["entry"][0]["resource"]
    assert task["status"] == "requested" and task["for"] == {"reference": "Patient/p1"}

    body["description"] = "XR chest PA"
    updated = client.put(f"/fhir/ImagingStudy/{body['id']}", data=json.dumps(body), content_type=FHIR,
                         headers={"If-Match": 'W/"1"'})
    assert updated.status_code == 200 and updated.headers["ETag"] == 'W/"2"'
    assert len(jobs(db_url)) == 1  # an update does not analyse the same study twice
    stale = client.put(f"/fhir/ImagingStudy/{body['id']}", data=json.dumps(body), content_type=FHIR,
                       headers={"If-Match": 'W/"1"'})
    outcome(stale, 412, "conflict")
    history = client.get(f"/fhir/ImagingStudy/{body['id']}/_history").get_json(force=True)
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2", "1"]
    v1 = client.get(f"/fhir/ImagingStudy/{body['id']}/_history/1").get_json(force=True)
    assert "description" not in v1


def test_conditional_create_is_idempotent(client: FlaskClient, db_url: str) -> None:
    header = {"If-None-Exist": f"identifier=urn:dicom:uid|urn:oid:{UID}"}
    first = post(client, "ImagingStudy", study(), **header)
    again = post(client, "ImagingStudy", study(), **header)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.get_json(force=True)["id"] == again.get_json(force=True)["id"]
    assert len(jobs(db_url)) == 1


def test_study_without_endpoint_is_stored_and_visibly_not_analysed(client: FlaskClient, db_url: str) -> None:
    created = post(client, "ImagingStudy", study(endpoint=None))
    assert created.status_code == 201
    sid = created.get_json(force=True)["id"]
    task = client.get(f"/fhir/Task?focus={sid}").get_json(force=True)["entry"][0]["resource"]
    assert task["status"] == "rejected"
    assert "no DICOMweb endpoint" in task["statusReason"]["text"]
    assert jobs(db_url) == []


def test_registered_study_is_not_queued(client: FlaskClient, db_url: str) -> None:
    assert post(client, "ImagingStudy", study(status="registered")).status_code == 201
    assert jobs(db_url) == []


def test_stored_endpoint_reference(client: FlaskClient, db_url: str) -> None:
    endpoint = post(client, "Endpoint", {
        "resourceType": "Endpoint", "status": "active", "connectionType": {"code": "dicom-wado-rs"},
        "payloadType": [{"text": "DICOM"}], "address": "http://pacs.example.invalid/dicom-web"})
    assert endpoint.status_code == 201
    body = study(endpoint=None)
    body["endpoint"] = [{"reference": f"Endpoint/{endpoint.get_json(force=True)['id']}"}]
    assert post(client, "ImagingStudy", body).status_code == 201
    assert jobs(db_url)[0]["payload"]["dicomweb"] == "http://pacs.example.invalid/dicom-web"


@pytest.mark.parametrize(
    "body, content_type, status, code",
    [
        ("{not json", FHIR, 400, "invalid"),
        ("[1, 2]", FHIR, 400, "invalid"),
        (json.dumps({"resourceType": "Patient"}), FHIR, 400, "invalid"),
        (json.dumps({"resourceType": "ImagingStudy", "status": "available"}), FHIR, 400, "structure"),
        (json.dumps({**study(), "status": "bogus"}), FHIR, 400, "code-invalid"),
        (json.dumps({**study(), "unknownElement": 1}), FHIR, 400, "structure"),
        ('<ImagingStudy xmlns="http://hl7.org/fhir"/>', "application/fhir+xml", 415, "not-supported"),
        (json.dumps(study()), "text/plain", 415, "not-supported"),
    ],
)
def test_bad_input(client: FlaskClient, db_url: str, body: str, content_type: str, status: int, code: str) -> None:
    outcome(post(client, "ImagingStudy", body, content_type=content_type), status, code)
    assert client.get("/fhir/ImagingStudy").get_json(force=True)["total"] == 0
    assert jobs(db_url) == []


def test_validation_messages_do_not_echo_input(client: FlaskClient) -> None:
    body = study()
    body["subject"] = {"reference": 42, "display": "NGUYEN VAN A"}
    text = post(client, "ImagingStudy", body).get_data(as_text=True)
    assert "NGUYEN" not in text and "subject" in text


def test_business_rules_422_and_nothing_half_stored(client: FlaskClient, db_url: str) -> None:
    unknown = study(endpoint=None)
    unknown["endpoint"] = [{"reference": "Endpoint/does-not-exist"}]
    body = outcome(post(client, "ImagingStudy", unknown), 422, "business-rule")
    assert "unknown endpoint" in body["issue"][0]["diagnostics"]
    no_uid = study()
    no_uid["identifier"] = no_uid["identifier"][1:]
    outcome(post(client, "ImagingStudy", no_uid), 422, "business-rule")
    for rtype in ("ImagingStudy", "Task"):
        assert client.get(f"/fhir/{rtype}").get_json(force=True)["total"] == 0
    assert jobs(db_url) == []


def test_too_large(client: FlaskClient) -> None:
    body = study()
    body["description"] = "x" * (2 * 1024 * 1024)  # the fixture caps bodies at 1 MiB
    outcome(post(client, "ImagingStudy", body), 413, "too-costly")


def test_not_found_method_and_accept(client: FlaskClient) -> None:
    outcome(client.get("/fhir/ImagingStudy/nope"), 404, "not-found")
    outcome(client.get("/fhir/Medication"), 404, "not-found")
    outcome(client.delete("/fhir/ImagingStudy/x"), 404, "not-found")  # DELETE is supported (issue 15)
    outcome(client.delete("/fhir/DiagnosticReport/x"), 405, "not-supported")  # reports are the hub's
    outcome(post(client, "DiagnosticReport", {"resourceType": "DiagnosticReport"}), 405, "not-supported")
    outcome(client.get("/fhir/ImagingStudy", headers={"Accept": "application/fhir+xml"}), 406)
    outcome(client.get("/fhir/ImagingStudy?colour=red"), 400, "invalid")
    outcome(client.get("/fhir/ImagingStudy?_lastUpdated=gtyesterday"), 400, "invalid")
    outcome(client.get("/fhir/ImagingStudy?_count=abc"), 400, "invalid")


def test_search_paging_and_lenient(client: FlaskClient) -> None:
    ids = []
    for i in range(5):
        created = post(client, "ImagingStudy", study(uid=f"{UID}.{i}", subject=f"Patient/p{i % 2}"))
        ids.append(created.get_json(force=True)["id"])
    page = client.get("/fhir/ImagingStudy?_count=2").get_json(force=True)
    assert "total" not in page and len(page["entry"]) == 2  # not counted unless asked (issue 14)
    assert client.get("/fhir/ImagingStudy?_count=2&_total=accurate").get_json(force=True)["total"] == 5
    links = {link["relation"]: link["url"] for link in page["link"]}
    assert "next" in links and "previous" not in links
    seen = [e["resource"]["id"] for e in page["entry"]]
    while "next" in links:
        nxt = links["next"].split("/fhir/", 1)[1]
        page = client.get("/fhir/" + nxt).get_json(force=True)
        seen += [e["resource"]["id"] for e in page["entry"]]
        links = {link["relation"]: link["url"] for link in page["link"]}
    assert seen == ids  # oldest first, every one once

    def found(query: str) -> list[str]:
        return [e["resource"]["id"] for e in client.get(f"/fhir/ImagingStudy?{query}").get_json(force=True)["entry"]]

    assert found("patient=p1") == [ids[1], ids[3]]
    assert found("subject=Patient/p0") == [ids[0], ids[2], ids[4]]
    assert found(f"identifier=urn:dicom:uid|urn:oid:{UID}.3") == [ids[3]]
    assert found("identifier=ACC-1") == ids
    assert found(f"_id={ids[2]},{ids[4]}") == [ids[2], ids[4]]
    assert found("status=available&modality=DX&patient=p0") == [ids[0], ids[2], ids[4]]
    assert found("status=registered") == []
    all_studies = client.get("/fhir/ImagingStudy").get_json(force=True)["entry"]
    third = all_studies[2]["resource"]["meta"]["lastUpdated"]
    assert found(f"_lastUpdated=gt{third.replace('+00:00', 'Z')}") == ids[3:]
    assert found(f"_lastUpdated=lt{third}") == ids[:2]
    assert found("_sort=-_lastUpdated&_count=1") == [ids[4]]
    lenient = client.get("/fhir/ImagingStudy?colour=red", headers={"Prefer": "handling=lenient"}).get_json(force=True)
    assert lenient["total"] == 5
    assert lenient["entry"][-1]["search"]["mode"] == "outcome"


def test_metadata_tells_the_truth(client: FlaskClient) -> None:
    cap = client.get("/fhir/metadata").get_json(force=True)
    assert cap["resourceType"] == "CapabilityStatement" and cap["fhirVersion"] == "4.0.1"
    resources = {r["type"]: r for r in cap["rest"][0]["resource"]}
    assert {"create", "update", "read", "search-type"} <= {i["code"] for i in resources["ImagingStudy"]["interaction"]}
    assert "create" not in {i["code"] for i in resources["DiagnosticReport"]["interaction"]}
    assert "DiagnosticReport:result" in resources["DiagnosticReport"]["searchInclude"]
    # every advertised search parameter is accepted
    for rtype, res in resources.items():
        for param in res["searchParam"]:
            value = {"date": "2020-01-01", "number": "1", "quantity": "1"}.get(param["type"], "x")
            assert client.get(f"/fhir/{rtype}?{param['name']}={value}").status_code == 200, (rtype, param)


def test_patient_round_trip_and_name_search(client: FlaskClient) -> None:
    patient = {"resourceType": "Patient", "name": [{"family": "Trần", "given": ["Thị", "Lan"]}], "gender": "female"}
    created = post(client, "Patient", copy.deepcopy(patient))
    assert created.status_code == 201
    found = client.get("/fhir/Patient?name=trầ").get_json(force=True)
    assert [e["resource"]["id"] for e in found["entry"]] == [created.get_json(force=True)["id"]]


# -- a client's retry, and what a fuzzer sends (issue 10) --------------------------------------
def test_a_retried_post_of_the_same_study_is_one_study_and_one_analysis(client: FlaskClient, db_url: str) -> None:
    first = post(client, "ImagingStudy", study(status="registered"))
    retry = post(client, "ImagingStudy", study(status="registered"))  # no If-None-Exist: a plain retry
    assert (first.status_code, retry.status_code) == (201, 200)
    sid = first.get_json(force=True)["id"]
    assert retry.get_json(force=True)["id"] == sid and retry.get_json(force=True)["meta"]["versionId"] == "1"
    available = post(client, "ImagingStudy", study())  # news of the same study: now available
    again = post(client, "ImagingStudy", study())
    assert (available.status_code, again.status_code) == (200, 200)
    assert available.get_json(force=True)["id"] == sid and available.get_json(force=True)["status"] == "available"
    assert again.get_json(force=True)["meta"]["versionId"] == "2"  # the same content: nothing new stored
    assert client.get("/fhir/ImagingStudy").get_json(force=True)["total"] == 1
    assert len(jobs(db_url)) == 1
    tasks = client.get(f"/fhir/Task?focus=ImagingStudy/{sid}").get_json(force=True)
    assert tasks["total"] == 1


def _deep(levels: int) -> str:
    """A Patient whose extensions nest `levels` deep, as JSON text (too deep for json.dumps)."""
    inner = '{"url": "urn:x", "valueString": "leaf"}'
    return ('{"resourceType": "Patient", "extension": [' + '{"url": "urn:x", "extension": [' * levels + inner
            + "]}" * levels + "]}")


@pytest.mark.parametrize("name,rtype,body,status", [
    ("an object where a code goes", "Patient", {"resourceType": "Patient", "gender": {}}, 400),
    ("a list where a code goes", "Patient", {"resourceType": "Patient", "gender": ["male"]}, 400),
    ("1,000-deep extensions", "Patient", _deep(1000), 400),
    ("an identifier too long to search by", "Patient",
     {"resourceType": "Patient", "identifier": [{"system": "urn:x", "value": "9" * 600}]}, 422),
    ("a NUL in a string", "Patient", {"resourceType": "Patient", "name": [{"family": "A\u0000B"}]}, 400),
])
def test_type_confused_and_oversized_values_are_4xx(client: FlaskClient, name: str, rtype: str, body: Any,
                                                     status: int) -> None:
    data = body if isinstance(body, str) else json.dumps(body)
    response = client.post(f"/fhir/{rtype}", data=data, content_type=FHIR)
    assert response.status_code == status, (name, response.get_data(as_text=True)[:300])
    assert response.get_json(force=True)["resourceType"] == "OperationOutcome"
    assert client.get(f"/fhir/{rtype}").get_json(force=True)["total"] == 0  # nothing half-stored


def test_odd_operation_parameters_ids_and_search_values_are_4xx(client: FlaskClient) -> None:
    for params in ([[]], [{"name": 5}], "action", [{"name": "action", "part": [[]]}]):
        response = client.post("/fhir/DiagnosticReport/x/$review", content_type=FHIR,
                               data=json.dumps({"resourceType": "Parameters", "parameter": params}))
        assert response.status_code == 400, params
    typed = client.post("/fhir/DiagnosticReport/x/$review", content_type=FHIR, data=json.dumps(
        {"resourceType": "Parameters", "parameter": [{"name": "action", "valueInteger": 3}]}))
    assert typed.status_code == 400
    for path in ("/fhir/Patient/%00", "/fhir/Patient/" + "x" * 65, "/fhir/Patient/a%2Fb/_history",
                 "/fhir/Patient/p1/_history/%C2%B2"):
        assert client.get(path).status_code == 404, path
    for query in ("name=a%00b", "identifier=%00", "_id=" + "x" * 2000, "name:foo%00=x"):
        response = client.get(f"/fhir/Patient?{query}")
        assert response.status_code == 400, query
        assert response.get_json(force=True)["resourceType"] == "OperationOutcome"


def test_a_95_mib_name_under_the_default_body_limit_is_refused(db_url: str) -> None:
    from interop.app import create_app
    from interop.config import Settings

    app = create_app(Settings.from_env({"DATABASE_URL": db_url}))  # the default 10 MiB body limit
    try:
        client = app.test_client()
        with_token(client, bearer(client, db_url))
        body = json.dumps({"resourceType": "Patient", "name": [{"family": "N" * (9 * 1024 * 1024 + 512 * 1024)}]})
        response = client.post("/fhir/Patient", data=body, content_type=FHIR)
        assert response.status_code == 400 and "1048576 characters" in response.get_data(as_text=True)
        assert client.get("/fhir/Patient").get_json(force=True)["total"] == 0
    finally:
        app.extensions["interop"].close()
