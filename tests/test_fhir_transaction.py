"""Transaction and batch Bundles POSTed to the FHIR base (issue 15), as HAPI FHIR users send them:
`urn:uuid:` references between entries, conditional entries, R4's processing order, all or
nothing for a transaction and each entry on its own for a batch, the token's scopes per entry.
Every answer is checked by the R4 JSON schema, the npm fhir validator and Medplum's."""
from __future__ import annotations

import copy
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import fhirpy
import pytest
from flask import Flask
from flask.testing import FlaskClient

from interop.store.db import connect
from tests.fixtures.auth import bearer, with_token
from tests.test_fhir_api import FHIR, jobs, outcome, study

Validate = Callable[[dict[str, Any]], list[str]]
NHI = "urn:oid:1.2.840.99999.1"  # the test HIS's patient identifier system


def urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def patient(mrn: str, family: str = "Nguyen") -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [{"system": NHI, "value": mrn}],
            "name": [{"family": family, "given": ["Van", "A"]}], "gender": "male"}


def entry(method: str, url: str, resource: dict[str, Any] | None = None, full_url: str | None = None,
          **request: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"request": {"method": method, "url": url, **request}}
    if resource is not None:
        out["resource"] = resource
    if full_url:
        out["fullUrl"] = full_url
    return out


def bundle(kind: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def post_bundle(client: FlaskClient, body: Any, **headers: str) -> Any:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return client.post("/fhir", data=data, content_type=FHIR, headers=headers)


def answered(response: Any, kind: str, validate: Validate, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json(force=True)
    assert body["resourceType"] == "Bundle" and body["type"] == f"{kind}-response"
    assert validate(body) == []
    return body


def count(db_url: str, rtype: str) -> int:
    with connect(db_url) as conn:
        row = conn.execute("SELECT count(*) AS n FROM resource WHERE type = %s AND NOT deleted", (rtype,)).fetchone()
        assert row is not None
        return int(row["n"])


def audited(db_url: str, action: str) -> int:
    with connect(db_url) as conn:
        row = conn.execute("SELECT count(*) AS n FROM audit_event WHERE action = %s", (action,)).fetchone()
        assert row is not None
        return int(row["n"])


def test_a_transaction_resolves_urn_uuid_references_and_queues_the_study(
        client: FlaskClient, db_url: str, check_r4: Validate) -> None:
    p_url, e_url = urn(), urn()
    endpoint = {"resourceType": "Endpoint", "status": "active", "connectionType": {"code": "dicom-wado-rs"},
                "payloadType": [{"text": "DICOM"}], "address": "http://127.0.0.1:9/dicom-web"}
    imaging = study(subject=p_url, endpoint=None)
    imaging["endpoint"] = [{"reference": e_url}]
    # the study comes first in the Bundle and names entries that follow it
    sent = bundle("transaction", entry("POST", "ImagingStudy", imaging, urn()), entry("POST", "Patient", patient("M1"), p_url),
                  entry("POST", "Endpoint", endpoint, e_url))
    body = answered(post_bundle(client, sent), "transaction", check_r4)
    statuses = [e["response"]["status"] for e in body["entry"]]
    assert statuses == ["201 Created"] * 3
    locations = [e["response"]["location"] for e in body["entry"]]
    assert [loc.split("/")[0] for loc in locations] == ["ImagingStudy", "Patient", "Endpoint"]
    assert all(loc.endswith("/_history/1") for loc in locations)
    assert all(e["response"]["etag"] == 'W/"1"' and e["response"]["lastModified"] for e in body["entry"])
    assert "resource" not in body["entry"][0]  # HAPI's default: the response alone
    study_id, patient_id, endpoint_id = (loc.split("/")[1] for loc in locations)
    stored = client.get(f"/fhir/ImagingStudy/{study_id}").get_json(force=True)
    assert stored["subject"] == {"reference": f"Patient/{patient_id}"}
    assert stored["endpoint"] == [{"reference": f"Endpoint/{endpoint_id}"}]
    queued = jobs(db_url)  # the study is analysed as if it had been POSTed on its own
    assert [j["kind"] for j in queued] == ["analyse-study"] and queued[0]["payload"]["study"] == study_id
    assert queued[0]["payload"]["dicomweb"] == "http://127.0.0.1:9/dicom-web"
    assert audited(db_url, "C") >= 3  # each create audited (and the analysis Task is the hub's own write)


def test_a_transaction_is_all_or_nothing(client: FlaskClient, db_url: str, check_r4: Validate) -> None:
    bad = study(subject="Patient/x", endpoint=None)
    bad["status"] = "bogus"
    refused = post_bundle(client, bundle("transaction", entry("POST", "Patient", patient("M1"), urn()),
                                         entry("POST", "ImagingStudy", bad)))
    body = outcome(refused, 400)
    assert check_r4(body) == []
    assert body["issue"][0]["expression"][0] == "Bundle.entry[1]"
    created = client.post("/fhir/Patient", data=json.dumps(patient("M2")), content_type=FHIR).get_json(force=True)
    before = audited(db_url, "C")
    # a refusal found only while writing (a stale If-Match on the last entry) undoes the earlier entries
    stale = post_bundle(client, bundle("transaction", entry("POST", "Patient", patient("M3"), urn()),
                                       entry("PUT", f"Patient/{created['id']}", {**created, "gender": "other"},
                                             ifMatch='W/"7"')))
    assert outcome(stale, 412)["issue"][0]["expression"][0] == "Bundle.entry[1]"
    assert count(db_url, "Patient") == 1 and jobs(db_url) == []
    assert audited(db_url, "C") == before  # nothing written, nothing recorded as written
    assert client.get(f"/fhir/Patient/{created['id']}").get_json(force=True)["meta"]["versionId"] == "1"
    for _ in range(2):
        client.post("/fhir/Patient", data=json.dumps(patient("M4")), content_type=FHIR)
    ambiguous = post_bundle(client, bundle("transaction", entry("DELETE", f"Patient/{created['id']}"),
                                           entry("PUT", f"Patient?identifier={NHI}|M4", patient("M4"))))
    assert outcome(ambiguous, 412)["issue"][0]["expression"] == ["Bundle.entry[1]"]  # the entry at fault, once
    assert client.get(f"/fhir/Patient/{created['id']}").status_code == 200  # its delete undone


def test_conditional_entries_and_processing_order(client: FlaskClient, db_url: str, check_r4: Validate) -> None:
    known = client.post("/fhir/Patient", data=json.dumps(patient("M1")), content_type=FHIR).get_json(force=True)
    doomed = client.post("/fhir/Patient", data=json.dumps(patient("M9", "Tran")), content_type=FHIR).get_json(force=True)
    p_url, q_url = urn(), urn()
    sent = bundle(
        "transaction",
        entry("GET", "Patient?identifier=" + f"{NHI}|M2"),                         # processed last: sees the PUT
        entry("POST", "Patient", patient("M1"), p_url, ifNoneExist=f"identifier={NHI}|M1"),  # finds `known`
        entry("PUT", f"Patient?identifier={NHI}|M2", patient("M2", "Le"), q_url),  # no match: created
        entry("POST", "ImagingStudy", study(subject=p_url, endpoint=None)),
        entry("POST", "ImagingStudy", study(uid="1.2.3.4.5", subject=q_url, endpoint=None)),
        entry("DELETE", f"Patient/{doomed['id']}"),                               # processed first
    )
    body = answered(post_bundle(client, sent), "transaction", check_r4)
    got = [e["response"]["status"] for e in body["entry"]]
    assert got == ["200 OK", "200 OK", "201 Created", "201 Created", "201 Created", "200 OK"]
    search = body["entry"][0]["resource"]
    assert search["type"] == "searchset" and [e["resource"]["name"][0]["family"] for e in search["entry"]] == ["Le"]
    # a GET entry's search is the API's own: _include and _revinclude too
    pages = answered(post_bundle(client, bundle("batch", entry("GET", "ImagingStudy?_include=ImagingStudy:patient"),
                                                entry("GET", "Patient?_revinclude=ImagingStudy:patient&identifier=M2"))),
                     "batch", check_r4)
    studies = [(e["resource"]["resourceType"], e["search"]["mode"]) for e in pages["entry"][0]["resource"]["entry"]]
    assert studies.count(("ImagingStudy", "match")) == 2 and studies.count(("Patient", "include")) == 2
    patients = [(e["resource"]["resourceType"], e["search"]["mode"]) for e in pages["entry"][1]["resource"]["entry"]]
    assert patients == [("Patient", "match"), ("ImagingStudy", "include")]
    assert body["entry"][1]["response"]["location"] == f"Patient/{known['id']}/_history/1"
    created_id = body["entry"][2]["response"]["location"].split("/")[1]
    first = client.get(f"/fhir/{body['entry'][3]['response']['location'].rsplit('/_history', 1)[0]}").get_json(force=True)
    second = client.get(f"/fhir/{body['entry'][4]['response']['location'].rsplit('/_history', 1)[0]}").get_json(force=True)
    assert first["subject"]["reference"] == f"Patient/{known['id']}"
    assert second["subject"]["reference"] == f"Patient/{created_id}"
    assert client.get(f"/fhir/Patient/{doomed['id']}").status_code == 410
    assert body["entry"][5]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    # the same conditional PUT again: one match, updated
    again = answered(post_bundle(client, bundle("transaction", entry("PUT", f"Patient?identifier={NHI}|M2",
                                                                     patient("M2", "Ly")))), "transaction", check_r4)
    assert again["entry"][0]["response"]["status"] == "200 OK"
    assert again["entry"][0]["response"]["location"] == f"Patient/{created_id}/_history/2"


def test_a_transaction_deletes_a_patient_with_its_studies_together(client: FlaskClient, db_url: str,
                                                                   check_r4: Validate) -> None:
    person = client.post("/fhir/Patient", data=json.dumps(patient("M1")), content_type=FHIR).get_json(force=True)
    imaging = client.post("/fhir/ImagingStudy", data=json.dumps(study(subject=f"Patient/{person['id']}", endpoint=None,
                                                                      status="registered")),
                          content_type=FHIR).get_json(force=True)
    alone = post_bundle(client, bundle("transaction", entry("DELETE", f"Patient/{person['id']}")))
    assert f"ImagingStudy/{imaging['id']}" in outcome(alone, 409, "conflict")["issue"][0]["diagnostics"]
    together = post_bundle(client, bundle("transaction", entry("DELETE", f"Patient/{person['id']}"),
                                          entry("DELETE", f"ImagingStudy/{imaging['id']}")))
    answered(together, "transaction", check_r4)
    assert count(db_url, "Patient") == 0 and count(db_url, "ImagingStudy") == 0


@pytest.mark.parametrize("sent, status, says", [
    ({"resourceType": "Patient"}, 400, "Bundle"),
    (bundle("collection"), 400, "collection"),
    (bundle("transaction", {"resource": patient("M1")}), 400, "request"),
    (bundle("transaction", entry("POST", "Patient/abc", patient("M1"))), 400, "ifNoneExist"),
    (bundle("transaction", entry("POST", "Medication", {"resourceType": "Medication"})), 404, "not supported"),
    (bundle("transaction", entry("POST", "DiagnosticReport", {"resourceType": "DiagnosticReport"})), 405, "hub"),
    (bundle("transaction", entry("POST", "Patient", {**patient("M1"), "reference": 1},)), 400, "entry[0]"),
    (bundle("transaction", entry("POST", "Patient", {"resourceType": "Patient", "generalPractitioner":
                                                     [{"reference": "urn:uuid:0b1c"}]})), 400, "names no entry"),
    (bundle("transaction", entry("PUT", "Patient/a", {"resourceType": "Patient", "id": "a"}),
            entry("DELETE", "Patient/a")), 400, "once"),
    (bundle("transaction", entry("DELETE", "Patient")), 400, "criteria"),
    (bundle("transaction", entry("PUT", "Patient/a", {"resourceType": "Patient", "id": "a"}, ifMatch=3)), 400, "If-Match"),
    (bundle("transaction", entry("POST", "Patient", patient("M1"), ifNoneExist=["identifier=x"])), 400, "ifNoneExist"),
    (bundle("transaction", entry("POST", "Patient", patient("M1"), "urn:uuid:1"),
            entry("POST", "Patient", patient("M2"), "urn:uuid:1")), 400, "fullUrl"),
    ("{not json", 400, "JSON"),
])
def test_bad_bundles_get_an_operation_outcome(client: FlaskClient, db_url: str, check_r4: Validate,
                                              sent: Any, status: int, says: str) -> None:
    body = outcome(post_bundle(client, sent), status)
    assert check_r4(body) == []
    assert says in json.dumps(body)
    assert count(db_url, "Patient") == 0


def test_the_base_answers_fhir_not_html(client: FlaskClient) -> None:
    for response in (client.get("/fhir"), client.put("/fhir", data="{}", content_type=FHIR),
                     client.post("/fhir", data="<Bundle/>", content_type="application/fhir+xml")):
        assert response.status_code in (405, 415), response.status_code
        assert response.headers["Content-Type"].startswith(FHIR)
        assert response.get_json(force=True)["resourceType"] == "OperationOutcome"


def test_a_batch_answers_each_entry_on_its_own(client: FlaskClient, db_url: str, check_r4: Validate) -> None:
    created = client.post("/fhir/Patient", data=json.dumps(patient("M1")), content_type=FHIR).get_json(force=True)
    sent = bundle("batch",
                  entry("POST", "Patient", patient("M2")),
                  entry("POST", "Patient", {**patient("M3"), "gender": "bogus"}),
                  entry("GET", f"Patient/{created['id']}"),
                  entry("GET", "Patient/nope"),
                  entry("POST", "ImagingStudy", study(subject="urn:uuid:6f1d", endpoint=None)),
                  entry("DELETE", f"Patient/{created['id']}"))
    body = answered(post_bundle(client, sent, Prefer="return=representation"), "batch", check_r4)
    got = [e["response"]["status"] for e in body["entry"]]
    assert got == ["201 Created", "400 Bad Request", "200 OK", "404 Not Found", "400 Bad Request", "200 OK"]
    assert body["entry"][0]["resource"]["identifier"][0]["value"] == "M2"  # Prefer: return=representation
    assert body["entry"][2]["resource"]["id"] == created["id"]
    assert body["entry"][1]["response"]["outcome"]["issue"][0]["code"] == "code-invalid"
    assert "transaction" in body["entry"][4]["response"]["outcome"]["issue"][0]["diagnostics"]
    assert count(db_url, "Patient") == 1  # M2 kept; M1 deleted after it was read


def test_each_entry_needs_its_scope(app: Flask, db_url: str, check_r4: Validate) -> None:
    limited = with_token(app.test_client(), bearer(app.test_client(), db_url, scopes="system/Patient.cr"))
    sent = bundle("transaction", entry("POST", "Patient", patient("M1")),
                  entry("POST", "ImagingStudy", study(endpoint=None)))
    refused = outcome(post_bundle(limited, sent), 403, "forbidden")
    assert "ImagingStudy" in refused["issue"][0]["diagnostics"]
    assert count(db_url, "Patient") == 0
    body = answered(post_bundle(limited, {**sent, "type": "batch"}), "batch", check_r4)
    assert [e["response"]["status"] for e in body["entry"]] == ["201 Created", "403 Forbidden"]
    deleting = post_bundle(limited, bundle("transaction", entry("DELETE", "Patient?identifier=M1")))
    outcome(deleting, 403, "forbidden")  # delete needs .d
    assert count(db_url, "Patient") == 1


# -- as a vendor's integration does it, with fhirpy over HTTP --------------------------------------
def test_fhirpy_posts_a_transaction(fhirpy_client: fhirpy.SyncFHIRClient, check_r4: Validate) -> None:
    p_url = urn()
    sent = bundle("transaction", entry("POST", "Patient", patient("M7"), p_url),
                  entry("POST", "ImagingStudy", study(subject=p_url, endpoint=None, status="registered")))
    body = fhirpy_client.execute("/", method="post", data=sent)
    assert check_r4(body) == [] and body["type"] == "transaction-response"
    pid = body["entry"][0]["response"]["location"].split("/")[1]
    studies = fhirpy_client.resources("ImagingStudy").search(subject=f"Patient/{pid}").fetch()
    assert len(studies) == 1 and studies[0]["subject"]["reference"] == f"Patient/{pid}"
    with pytest.raises(fhirpy.base.exceptions.OperationOutcome):
        fhirpy_client.execute("/", method="post", data=bundle("document"))


def _paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, child in children:
        yield from _paths(child, (*path, key))


def _replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    out = copy.deepcopy(value)
    holder = out
    for key in path[:-1]:
        holder = holder[key]
    holder[path[-1]] = new
    return out


@pytest.mark.parametrize("kind", ["transaction", "batch"])
def test_every_element_of_a_bundle_replaced_by_a_wrong_type_is_a_4xx_never_a_500(
        client: FlaskClient, kind: str) -> None:
    p_url = urn()
    sent = bundle(kind, entry("POST", "Patient", patient("M1"), p_url, ifNoneExist=f"identifier={NHI}|M1"),
                  entry("PUT", f"Patient?identifier={NHI}|M2", patient("M2"), ifMatch='W/"1"'),
                  entry("PATCH", "Patient/p9", {"resourceType": "Binary", "contentType": "application/json-patch+json",
                                                "data": "W10="}),
                  entry("DELETE", "Patient/p8"), entry("GET", "Patient?name=x"))
    tried = 0
    for path in _paths(sent):
        for wrong in (None, 7, "x", [], {}, True, "urn:uuid:" + "9" * 36):
            answer = post_bundle(client, _replaced(sent, path, wrong))
            tried += 1
            assert answer.status_code < 500, (path, wrong, answer.get_data(as_text=True)[:300])
            assert answer.get_json(force=True)["resourceType"] in ("Bundle", "OperationOutcome"), (path, wrong)
    assert tried > 300


def test_the_same_conditional_transaction_sent_at_once_makes_one_patient(app: Flask, db_url: str) -> None:
    token = bearer(app.test_client(), db_url)
    creates = bundle("transaction", entry("POST", "Patient", patient("M1"), urn(), ifNoneExist=f"identifier={NHI}|M1"))
    updates = bundle("transaction", entry("PUT", f"Patient?identifier={NHI}|M2", patient("M2")))
    statuses: list[int] = []
    barrier = threading.Barrier(8)

    def send(sent: dict[str, Any]) -> None:
        sender = with_token(app.test_client(), token)
        barrier.wait(30)
        statuses.append(post_bundle(sender, sent).status_code)

    threads = [threading.Thread(target=send, args=(creates if n % 2 else updates,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert statuses == [200] * 8
    assert count(db_url, "Patient") == 2  # one M1 (the others found it), one M2 (the others updated it)
