"""What the FHIR API's answers carry beside the resource (issue 15): Last-Modified as an HTTP date,
weak ETags, `_pretty` and `_format` on every interaction, history Bundles with entry.request and
entry.response at instance, type and system level, and CORS for the origins the operator lists."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from interop.app import create_app
from interop.config import Settings
from tests.fixtures.auth import bearer, with_token
from tests.fixtures.hub import TEST_URL_ALLOW
from tests.test_fhir_api import FHIR, outcome, post
from tests.test_fhir_transaction import patient

Validate = Callable[[dict[str, Any]], list[str]]
VIEWER = "https://viewer.example.org"


def test_last_modified_is_an_http_date_of_the_version(client: FlaskClient) -> None:
    made = post(client, "Patient", patient("M1"))
    body = made.get_json(force=True)
    pid = body["id"]
    answers = [made, client.get(f"/fhir/Patient/{pid}"), client.get(f"/fhir/Patient/{pid}/_history/1")]
    for answer in answers:
        header = answer.headers["Last-Modified"]
        assert header.endswith(" GMT") and "," in header  # IMF-fixdate: Sun, 06 Nov 1994 08:49:37 GMT
        stated = parsedate_to_datetime(header)
        stored = datetime.fromisoformat(body["meta"]["lastUpdated"])
        assert stated == stored.replace(microsecond=0)  # the same instant, to the second
        assert answer.headers["ETag"] == 'W/"1"'
        assert answer.headers["Content-Location"].endswith(f"/fhir/Patient/{pid}/_history/1")


def test_pretty_and_format_on_every_interaction(client: FlaskClient, check_r4: Validate) -> None:
    pid = post(client, "Patient", patient("M1")).get_json(force=True)["id"]
    for path in (f"/fhir/Patient/{pid}", f"/fhir/Patient/{pid}/_history", f"/fhir/Patient/{pid}/_history/1",
                 "/fhir/Patient?identifier=M1", "/fhir/Patient/_history", "/fhir/_history", "/fhir/metadata",
                 "/fhir/Patient/nope"):
        plain = client.get(path)
        pretty = client.get(path + ("&" if "?" in path else "?") + "_pretty=true")
        assert pretty.status_code == plain.status_code, (path, pretty.get_data(as_text=True)[:300])
        assert "\n  " in pretty.get_data(as_text=True) and "\n" not in plain.get_data(as_text=True), path
        assert check_r4(pretty.get_json(force=True)) == [], path
        join = "&" if "?" in path else "?"
        for fmt in ("json", "application/fhir%2Bjson", "application/json"):
            assert client.get(f"{path}{join}_format={fmt}").status_code == plain.status_code, (path, fmt)
        for fmt in ("xml", "application/fhir%2Bxml"):
            outcome(client.get(f"{path}{join}_format={fmt}"), 406, "not-supported")
    written = client.post("/fhir/Patient?_format=json&_pretty=true", data=json.dumps(patient("M2")), content_type=FHIR)
    assert written.status_code == 201 and "\n  " in written.get_data(as_text=True)
    outcome(client.post("/fhir/Patient?_format=xml", data=json.dumps(patient("M3")), content_type=FHIR), 406)
    assert client.get("/fhir/Patient?identifier=M3").get_json(force=True)["entry"] == []


def test_prefer_return_chooses_the_answer_of_a_write(client: FlaskClient, check_r4: Validate) -> None:
    """HAPI's habit: Prefer return=minimal (no body), return=OperationOutcome (what was done),
    return=representation or nothing (the resource); the version headers every time."""
    minimal = client.post("/fhir/Patient", data=json.dumps(patient("P1")), content_type=FHIR,
                          headers={"Prefer": "return=minimal"})
    assert minimal.status_code == 201 and minimal.get_data() == b"" and minimal.headers["ETag"] == 'W/"1"'
    pid = minimal.headers["Location"].split("/Patient/")[1].split("/")[0]
    said = client.put(f"/fhir/Patient/{pid}", data=json.dumps({**patient("P1"), "id": pid, "gender": "female"}),
                      content_type=FHIR, headers={"Prefer": 'handling=strict, return="OperationOutcome"'})
    body = said.get_json(force=True)
    assert said.status_code == 200 and body["resourceType"] == "OperationOutcome" and check_r4(body) == []
    assert body["issue"][0]["severity"] == "information" and f"Patient/{pid}/_history/2" in body["issue"][0]["diagnostics"]
    assert said.headers["ETag"] == 'W/"2"'
    for prefer in ({"Prefer": "return=representation"}, {}):
        shown = client.put(f"/fhir/Patient/{pid}", data=json.dumps({**patient("P1"), "id": pid}), content_type=FHIR,
                           headers=prefer)
        assert shown.status_code == 200 and shown.get_json(force=True)["resourceType"] == "Patient"


def test_history_bundles_at_type_and_system_level(client: FlaskClient, check_r4: Validate) -> None:
    ids = [post(client, "Patient", patient(f"M{n}")).get_json(force=True)["id"] for n in range(3)]
    first = client.get(f"/fhir/Patient/{ids[0]}").get_json(force=True)
    first["gender"] = "other"
    assert client.put(f"/fhir/Patient/{ids[0]}", data=json.dumps(first), content_type=FHIR).status_code == 200
    assert client.delete(f"/fhir/Patient/{ids[1]}").status_code == 200
    endpoint = post(client, "Endpoint", {"resourceType": "Endpoint", "status": "active",
                                         "connectionType": {"code": "dicom-wado-rs"}, "payloadType": [{"text": "DICOM"}],
                                         "address": "http://pacs.example.invalid/dicom-web"}).get_json(force=True)

    page = client.get("/fhir/Patient/_history?_count=3").get_json(force=True)
    assert check_r4(page) == [] and page["type"] == "history"
    # newest first: the delete, the update, then the last create
    assert [(e["request"]["method"], e["fullUrl"].rsplit("/", 1)[1]) for e in page["entry"]] == [
        ("DELETE", ids[1]), ("PUT", ids[0]), ("POST", ids[2])]
    assert all(e["response"]["etag"] and e["response"]["lastModified"] for e in page["entry"])
    assert "resource" not in page["entry"][0] and page["entry"][1]["resource"]["gender"] == "other"
    links = {link["relation"]: link["url"] for link in page["link"]}
    rest = client.get("/fhir/" + links["next"].split("/fhir/", 1)[1]).get_json(force=True)
    assert [e["fullUrl"].rsplit("/", 1)[1] for e in rest["entry"]] == [ids[1], ids[0]]  # the first two creates
    assert "next" not in {link["relation"] for link in rest["link"]}

    since = page["entry"][1]["response"]["lastModified"]
    recent = client.get("/fhir/Patient/_history", query_string={"_since": since}).get_json(force=True)
    assert [e["request"]["method"] for e in recent["entry"]] == ["DELETE", "PUT"]

    everything = client.get("/fhir/_history").get_json(force=True)
    assert check_r4(everything) == []
    assert everything["entry"][0]["fullUrl"].endswith(f"/Endpoint/{endpoint['id']}")
    assert len(everything["entry"]) == 6
    for bad in ("_count=x", "_since=yesterday", "_since=2026-01-01T00:00:00", "colour=red"):
        outcome(client.get(f"/fhir/Patient/_history?{bad}"), 400, "invalid")


def test_system_history_shows_only_the_types_the_token_may_read(app: Flask, client: FlaskClient, db_url: str) -> None:
    post(client, "Patient", patient("M1"))
    post(client, "Endpoint", {"resourceType": "Endpoint", "status": "active", "connectionType": {"code": "dicom-wado-rs"},
                              "payloadType": [{"text": "DICOM"}], "address": "http://pacs.example.invalid/dicom-web"})
    endpoints_only = with_token(app.test_client(), bearer(app.test_client(), db_url, scopes="system/Endpoint.rs"))
    seen = endpoints_only.get("/fhir/_history").get_json(force=True)
    assert [e["fullUrl"].split("/")[-2] for e in seen["entry"]] == ["Endpoint"]
    outcome(endpoints_only.get("/fhir/Patient/_history"), 403, "forbidden")


# -- CORS ----------------------------------------------------------------------------------------------
@pytest.fixture
def cors_app(db_url: str) -> Iterator[Flask]:
    application = create_app(Settings.from_env({"DATABASE_URL": db_url, "INTEROP_URL_ALLOW": TEST_URL_ALLOW,
                                                "INTEROP_CORS_ORIGINS": f"{VIEWER}, https://other.example.org"}))
    yield application
    application.extensions["interop"].close()


def test_cors_for_listed_origins_only(cors_app: Flask, db_url: str) -> None:
    browser = cors_app.test_client()
    asked = browser.options("/fhir/Patient/p1", headers={
        "Origin": VIEWER, "Access-Control-Request-Method": "DELETE",
        "Access-Control-Request-Headers": "authorization, content-type, if-match"})
    assert asked.status_code == 204  # answered without a token: browsers send none with a preflight
    assert asked.headers["Access-Control-Allow-Origin"] == VIEWER
    assert {"DELETE", "PATCH", "PUT"} <= {m.strip() for m in asked.headers["Access-Control-Allow-Methods"].split(",")}
    allowed = {h.strip().lower() for h in asked.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "if-match", "prefer"} <= allowed
    assert "Access-Control-Allow-Credentials" not in asked.headers  # tokens, never cookies, cross-origin

    with_token(browser, bearer(browser, db_url))
    made = browser.post("/fhir/Patient", data=json.dumps(patient("M1")), content_type=FHIR, headers={"Origin": VIEWER})
    assert made.status_code == 201 and made.headers["Access-Control-Allow-Origin"] == VIEWER
    exposed = {h.strip() for h in made.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"Location", "ETag", "Last-Modified", "Content-Location"} <= exposed
    assert "Origin" in made.headers["Vary"]
    stranger = cors_app.test_client().get("/fhir/Patient", headers={"Origin": VIEWER})
    assert stranger.status_code == 401 and stranger.headers["Access-Control-Allow-Origin"] == VIEWER  # a page reads its 401

    evil = {"Origin": "https://evil.example"}
    assert "Access-Control-Allow-Origin" not in browser.get("/fhir/Patient", headers=evil).headers
    preflight = cors_app.test_client().options("/fhir/Patient", headers={**evil, "Access-Control-Request-Method": "GET"})
    assert "Access-Control-Allow-Origin" not in preflight.headers
    assert "Access-Control-Allow-Origin" not in browser.get("/worklist/", headers={"Origin": VIEWER}).headers


def test_no_cors_unless_configured(client: FlaskClient) -> None:
    answer = client.get("/fhir/Patient", headers={"Origin": VIEWER})
    assert answer.status_code == 200 and "Access-Control-Allow-Origin" not in answer.headers
    preflight = client.options("/fhir/Patient", headers={"Origin": VIEWER, "Access-Control-Request-Method": "GET"})
    assert "Access-Control-Allow-Origin" not in preflight.headers


def test_an_operation_answers_with_the_version_headers(client: FlaskClient, db_url: str) -> None:
    from tests.test_review import make_report, review

    report = make_report(db_url)
    signed = review(client, report["id"], "sign")
    assert signed.status_code == 200, signed.get_data(as_text=True)
    body = signed.get_json(force=True)
    assert signed.headers["ETag"] == f'W/"{body["meta"]["versionId"]}"'
    assert parsedate_to_datetime(signed.headers["Last-Modified"]) == \
        datetime.fromisoformat(body["meta"]["lastUpdated"]).replace(microsecond=0)


def test_instance_history_pages_and_since(client: FlaskClient, check_r4: Validate) -> None:
    body = post(client, "Patient", patient("M1")).get_json(force=True)
    for gender in ("female", "other", "unknown"):
        body["gender"] = gender
        body = client.put(f"/fhir/Patient/{body['id']}", data=json.dumps(body), content_type=FHIR).get_json(force=True)
    page = client.get(f"/fhir/Patient/{body['id']}/_history?_count=3").get_json(force=True)
    assert check_r4(page) == [] and page["total"] == 4
    assert [e["response"]["etag"] for e in page["entry"]] == ['W/"4"', 'W/"3"', 'W/"2"']
    links = {link["relation"]: link["url"] for link in page["link"]}
    rest = client.get("/fhir/" + links["next"].split("/fhir/", 1)[1]).get_json(force=True)
    assert [e["response"]["etag"] for e in rest["entry"]] == ['W/"1"']
    since = page["entry"][1]["response"]["lastModified"]
    recent = client.get(f"/fhir/Patient/{body['id']}/_history", query_string={"_since": since}).get_json(force=True)
    assert [e["response"]["etag"] for e in recent["entry"]] == ['W/"4"', 'W/"3"']
    outcome(client.get(f"/fhir/Patient/{body['id']}/_history?colour=red"), 400, "invalid")


def test_conditional_read(client: FlaskClient) -> None:
    made = post(client, "Patient", patient("M1"))
    pid, etag, modified = made.get_json(force=True)["id"], made.headers["ETag"], made.headers["Last-Modified"]
    for path in (f"/fhir/Patient/{pid}", f"/fhir/Patient/{pid}/_history/1"):
        same = client.get(path, headers={"If-None-Match": etag})
        assert same.status_code == 304 and same.get_data() == b"" and same.headers["ETag"] == etag
        assert client.get(path, headers={"If-None-Match": 'W/"9", "1"'}).status_code == 304
        assert client.get(path, headers={"If-Modified-Since": modified}).status_code == 304
        assert client.get(path, headers={"If-None-Match": 'W/"2"'}).status_code == 200
        assert client.get(path, headers={"If-Modified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"}).status_code == 200
        assert client.get(path, headers={"If-Modified-Since": "yesterday"}).status_code == 200
    body = made.get_json(force=True)
    body["gender"] = "female"
    client.put(f"/fhir/Patient/{pid}", data=json.dumps(body), content_type=FHIR)
    changed = client.get(f"/fhir/Patient/{pid}", headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.get_json(force=True)["gender"] == "female"
