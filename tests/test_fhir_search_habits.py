"""FHIR search as HAPI FHIR users write it (issue 15): dates with prefixes and partial dates (each a
range, R4 search.html#date), quantities with prefixes and units, one level of chaining, _has,
_revinclude, _summary (count, true, text, data) and _elements on search and read. Against the app
on a real PostgreSQL (the embedded one), every answer checked with the official R4 JSON schema, and
with fhirpy over HTTP as its users call it."""
from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import fhirpy
import pytest
from flask import Flask
from flask.testing import FlaskClient

from interop.store import resources
from interop.store.db import connect
from tests.fixtures.auth import bearer, with_token

Validate = Callable[[dict[str, Any]], list[str]]
FHIR = "application/fhir+json"
MRN = "urn:oid:1.2.840.99999.1"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"

# Three patients, born at dates that test a range: a year, a day, a day at the end of a month.
PEOPLE = [("A1", "Nguyễn", "1980-05-12"), ("A2", "Trần", "1975-12-31"), ("A3", "Lê", "1980-12-01")]
# Reports: (patient index, issued, effectiveDateTime, status)
REPORTS = [
    (0, "2026-11-30T23:30:00+07:00", "2026-11-30", "final"),       # 16:30Z on the 30th
    (0, "2026-12-01T08:00:00Z", "2026-12-01T07:00:00Z", "preliminary"),
    (1, "2026-12-02T09:15:00.250Z", "2026-12", "final"),
    (2, "2026-12-15T12:00:00Z", "2026-12-15T11:00:00Z", "final"),
]


def _store(db_url: str, app: Flask, body: dict[str, Any]) -> dict[str, Any]:
    params = app.extensions["interop"].params
    with connect(db_url) as conn:
        stored = resources.create(conn, body, params[body["resourceType"]])
        conn.commit()
    return stored


@pytest.fixture
def world(app: Flask, client: FlaskClient, db_url: str) -> dict[str, list[str]]:
    """Patients through the API; reports, observations and provenance as the hub's writers store them."""
    ids: dict[str, list[str]] = {"Patient": [], "DiagnosticReport": [], "Observation": [], "Provenance": []}
    for mrn, family, born in PEOPLE:
        body = {"resourceType": "Patient", "identifier": [{"system": MRN, "value": mrn}],
                "name": [{"family": family, "given": ["Thị"]}], "gender": "female", "birthDate": born,
                "text": {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{mrn}</div>'}}
        answer = client.post("/fhir/Patient", data=json.dumps(body), content_type=FHIR)
        assert answer.status_code == 201, answer.text
        ids["Patient"].append(answer.get_json(force=True)["id"])
    for n, (who, issued, effective, status) in enumerate(REPORTS):
        report = _store(db_url, app, {
            "resourceType": "DiagnosticReport", "status": status, "code": {"coding": [{"system": LOINC, "code": "36643-5"}]},
            "subject": {"reference": f"Patient/{ids['Patient'][who]}"}, "issued": issued,
            "effectiveDateTime": effective, "conclusion": f"report {n}"})
        ids["DiagnosticReport"].append(report["id"])
        obs = _store(db_url, app, {
            "resourceType": "Observation", "status": "final", "code": {"coding": [{"system": LOINC, "code": "72133-2"}]},
            "subject": {"reference": f"Patient/{ids['Patient'][who]}"}, "effectiveDateTime": issued,
            "valueQuantity": {"value": [0.12, 0.5, 0.87, 100][n], "unit": "%" if n < 3 else "mg",
                              "system": UCUM, "code": "%" if n < 3 else "mg"}})
        ids["Observation"].append(obs["id"])
        prov = _store(db_url, app, {
            "resourceType": "Provenance", "target": [{"reference": f"DiagnosticReport/{report['id']}"}],
            "recorded": issued, "agent": [{"who": {"display": "model"}}]})
        ids["Provenance"].append(prov["id"])
    return ids


def bundle(client: FlaskClient, query: str, validate: Validate | None = None) -> dict[str, Any]:
    answer = client.get(f"/fhir/{query}")
    assert answer.status_code == 200, f"{query}: {answer.text}"
    found: dict[str, Any] = answer.get_json(force=True)
    assert found["resourceType"] == "Bundle" and found["type"] == "searchset"
    if validate is not None:
        assert validate(found) == [], query
    return found


def matched(client: FlaskClient, query: str, validate: Validate | None = None) -> list[str]:
    return sorted(e["resource"]["id"] for e in bundle(client, query, validate)["entry"]
                  if e["search"]["mode"] == "match")


def pick(ids: list[str], *n: int) -> list[str]:
    return sorted(ids[k] for k in n)


def test_date_search_with_prefixes_and_partial_dates(client: FlaskClient, world: dict[str, list[str]],
                                                     fhir_validate: Validate) -> None:
    reports, people = world["DiagnosticReport"], world["Patient"]
    assert matched(client, "DiagnosticReport?issued=ge2026-12-01", fhir_validate) == pick(reports, 1, 2, 3)
    assert matched(client, "DiagnosticReport?issued=lt2026-12-01") == pick(reports, 0)  # +07:00 is 16:30Z
    assert matched(client, "DiagnosticReport?issued=2026-12") == pick(reports, 1, 2, 3)
    assert matched(client, "DiagnosticReport?issued=2026-11-30") == pick(reports, 0)
    assert matched(client, "DiagnosticReport?issued=eq2026-12-02T09:15:00.250Z") == pick(reports, 2)
    assert matched(client, "DiagnosticReport?issued=ne2026-12") == pick(reports, 0)
    assert matched(client, "DiagnosticReport?issued=gt2026-12-02") == pick(reports, 3)
    assert matched(client, "DiagnosticReport?issued=le2026-12-02") == pick(reports, 0, 1, 2)
    assert matched(client, "DiagnosticReport?issued=ge2026-12-01&issued=lt2026-12-03") == pick(reports, 1, 2)
    assert matched(client, "DiagnosticReport?issued=sa2026-12-01") == pick(reports, 2, 3)
    assert matched(client, "DiagnosticReport?issued=eb2026-12-01") == pick(reports, 0)
    assert matched(client, "DiagnosticReport?issued=2026-11-30,2026-12-15") == pick(reports, 0, 3)  # ORed
    # an unencoded + in a query string arrives as a space: read as the + it was
    assert matched(client, "DiagnosticReport?issued=lt2026-12-01T00:00:00 07:00") == pick(reports, 0)
    assert matched(client, "DiagnosticReport?issued=lt2026-11-30T23:30:00 07:00") == []
    # effective[x] as a month is a range: within December, not at a day of it
    assert matched(client, "DiagnosticReport?date=2026-12") == pick(reports, 1, 2, 3)
    assert matched(client, "DiagnosticReport?date=2026-12-02") == []
    assert matched(client, "DiagnosticReport?date=ge2026-12-02") == pick(reports, 2, 3)  # the month reaches past it
    assert matched(client, "Patient?birthdate=1980", fhir_validate) == pick(people, 0, 2)
    assert matched(client, "Patient?birthdate=lt1980") == pick(people, 1)
    assert matched(client, "Patient?birthdate=ge1980-06") == pick(people, 2)
    assert matched(client, "Patient?birthdate=1975-12-31&family=tran") == pick(people, 1)
    # ap: within 10 % of the time from now (46 years and more: 4.6 years and more)
    assert matched(client, "Patient?birthdate=ap1978-06-01") == pick(people, 0, 1, 2)
    assert matched(client, "Patient?birthdate=ap1990-01-01") == []
    assert matched(client, "DiagnosticReport?issued=ge2026-12-01&status=final") == pick(reports, 2, 3)  # index walk
    assert matched(client, "Provenance?recorded=2026-12-15") == pick(world["Provenance"], 3)
    assert matched(client, "Observation?date=ge2026-12-15") == pick(world["Observation"], 3)
    # _lastUpdated takes partial dates too (all were stored today)
    today = datetime.now(UTC)
    assert len(matched(client, f"Patient?_lastUpdated={today:%Y}")) == 3
    assert matched(client, f"Patient?_lastUpdated=gt{today:%Y}") == []
    assert len(matched(client, f"Patient?_lastUpdated=ge{today:%Y-%m}")) == 3
    assert client.get("/fhir/Patient?_lastUpdated=2026-02-30").status_code == 400


def ordered(client: FlaskClient, query: str) -> list[str]:
    return [e["resource"]["id"] for e in bundle(client, query)["entry"]]


def test_sort_by_a_date_parameter(client: FlaskClient, world: dict[str, list[str]]) -> None:
    reports, people = world["DiagnosticReport"], world["Patient"]
    assert ordered(client, "DiagnosticReport?_sort=-issued") == [reports[n] for n in (3, 2, 1, 0)]
    assert ordered(client, "DiagnosticReport?_sort=issued&status=final") == [reports[n] for n in (0, 2, 3)]
    assert ordered(client, "Patient?_sort=birthdate") == [people[n] for n in (1, 0, 2)]
    paged = bundle(client, "DiagnosticReport?_sort=-date&_count=2")  # report 2 (a month) starts before report 1
    assert [e["resource"]["id"] for e in paged["entry"]] == [reports[3], reports[1]]
    following = next(link["url"] for link in paged["link"] if link["relation"] == "next")
    assert ordered(client, following.split("/fhir/", 1)[1]) == [reports[2], reports[0]]
    assert client.get("/fhir/DiagnosticReport?_sort=status").status_code == 400


@pytest.mark.parametrize("query", ["issued=2026-13", "issued=gt", "issued=yesterday", "issued:exact=2026",
                                   "issued=2026-12-01T10:00:00Z|x", "date=ge2026-12-01T25:00:00Z"])
def test_bad_dates_are_400(client: FlaskClient, query: str) -> None:
    answer = client.get(f"/fhir/DiagnosticReport?{query}")
    assert answer.status_code == 400, query
    assert answer.get_json(force=True)["resourceType"] == "OperationOutcome"


def test_quantity_search(client: FlaskClient, world: dict[str, list[str]]) -> None:
    obs = world["Observation"]
    assert matched(client, "Observation?value-quantity=gt0.5") == pick(obs, 2, 3)
    assert matched(client, "Observation?value-quantity=ge0.5") == pick(obs, 1, 2, 3)
    assert matched(client, "Observation?value-quantity=0.5") == pick(obs, 1)  # [0.45, 0.55)
    assert matched(client, "Observation?value-quantity=0.9") == pick(obs, 2)  # 0.87 is within 0.9's precision
    assert matched(client, "Observation?value-quantity=0.90") == []
    assert matched(client, f"Observation?value-quantity=gt0.1|{UCUM}|%") == pick(obs, 0, 1, 2)
    assert matched(client, "Observation?value-quantity=gt0.1||mg") == pick(obs, 3)
    assert matched(client, "Observation?value-quantity=lt1,ge100") == pick(obs, 0, 1, 2, 3)
    assert matched(client, "Observation?value-quantity=ap100") == pick(obs, 3)
    assert client.get("/fhir/Observation?value-quantity=lots").status_code == 400
    assert client.get("/fhir/Observation?value-quantity=1|x").status_code == 400


def test_missing(client: FlaskClient, world: dict[str, list[str]]) -> None:
    reports = world["DiagnosticReport"]
    assert matched(client, "Observation?value-quantity:missing=false") == sorted(world["Observation"])
    assert matched(client, "Observation?value-quantity:missing=true") == []
    assert matched(client, "DiagnosticReport?performer:missing=true&status=final") == pick(reports, 0, 2, 3)
    assert matched(client, "DiagnosticReport?issued:missing=true") == []
    assert matched(client, "Patient?birthdate:missing=false&family=le") == pick(world["Patient"], 2)
    assert client.get("/fhir/Patient?birthdate:missing=maybe").status_code == 400


def test_chained_search_and_has(client: FlaskClient, world: dict[str, list[str]], fhir_validate: Validate) -> None:
    reports, people = world["DiagnosticReport"], world["Patient"]
    assert matched(client, f"DiagnosticReport?subject:Patient.identifier={MRN}|A1", fhir_validate) == pick(reports, 0, 1)
    assert matched(client, "DiagnosticReport?patient.identifier=A2") == pick(reports, 2)
    assert matched(client, "DiagnosticReport?patient.family=nguyen") == pick(reports, 0, 1)
    assert matched(client, "DiagnosticReport?patient.family=le&status=final") == pick(reports, 3)
    assert matched(client, "DiagnosticReport?patient.birthdate=1980&issued=ge2026-12-01") == pick(reports, 1, 3)
    assert matched(client, "DiagnosticReport?patient.identifier=nobody") == []
    # the reference's type as a modifier: subject:Patient=id
    assert matched(client, f"DiagnosticReport?subject:Patient={people[1]}") == pick(reports, 2)
    assert client.get(f"/fhir/DiagnosticReport?subject:Endpoint={people[1]}").status_code == 400
    assert matched(client, "Observation?subject:Patient.gender=female&value-quantity=lt0.2") == pick(world["Observation"], 0)
    assert matched(client, "Patient?_has:DiagnosticReport:subject:status=preliminary", fhir_validate) == pick(people, 0)
    assert matched(client, "Patient?_has:DiagnosticReport:subject:status=final") == pick(people, 0, 1, 2)
    assert matched(client, "Patient?_has:DiagnosticReport:patient:issued=gt2026-12-10") == pick(people, 2)
    assert matched(client, "Patient?_has:Observation:subject:value-quantity=gt0.4&family=tran") == pick(people, 1)
    # chains that cannot be answered are refused with the reason, not ignored
    for query in ("DiagnosticReport?subject.identifier=A1", "DiagnosticReport?status.code=x",
                  "DiagnosticReport?patient.unknown=1", "DiagnosticReport?patient.subject:Patient.identifier=A1",
                  "Patient?_has:DiagnosticReport:status:status=final", "Patient?_has:Nothing:subject:status=final",
                  "Patient?_has:DiagnosticReport:subject"):
        answer = client.get(f"/fhir/{query}")
        assert answer.status_code == 400, query


def test_chain_and_has_over_many_resources_are_tested_row_by_row(
        client: FlaskClient, world: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources, "CHAIN_MOST", 1)  # two patients match: the chain is not resolved first
    reports = world["DiagnosticReport"]
    assert matched(client, "DiagnosticReport?patient.birthdate=1980") == pick(reports, 0, 1, 3)
    monkeypatch.setattr(resources, "CHAIN_MOST", 0)  # even one match is tested row by row
    assert matched(client, "DiagnosticReport?patient.family:exact=Lê") == pick(reports, 3)  # the text as written
    assert matched(client, "DiagnosticReport?patient.family:exact=le") == []
    assert bundle(client, "DiagnosticReport?patient.birthdate=1980&_total=accurate")["total"] == 3
    people = world["Patient"]  # and _has with more than one referring resource
    assert matched(client, "Patient?_has:DiagnosticReport:subject:status=final") == pick(people, 0, 1, 2)
    assert matched(client, "Patient?_has:DiagnosticReport:subject:status=final&birthdate=1980") == pick(people, 0, 2)
    assert matched(client, "Patient?_has:DiagnosticReport:subject:status=preliminary") == pick(people, 0)


def test_revinclude(app: Flask, client: FlaskClient, world: dict[str, list[str]], db_url: str,
                    fhir_validate: Validate, monkeypatch: pytest.MonkeyPatch) -> None:
    found = bundle(client, f"Patient?identifier={MRN}|A1&_revinclude=DiagnosticReport:subject", fhir_validate)
    modes = sorted((e["search"]["mode"], e["resource"]["resourceType"], e["resource"]["id"]) for e in found["entry"])
    assert modes == sorted([("match", "Patient", world["Patient"][0]),
                            *(("include", "DiagnosticReport", r) for r in pick(world["DiagnosticReport"], 0, 1))])
    found = bundle(client, "DiagnosticReport?status=preliminary&_revinclude=Provenance:target"
                           "&_include=DiagnosticReport:subject", fhir_validate)
    assert sorted(e["resource"]["resourceType"] for e in found["entry"]) == ["DiagnosticReport", "Patient", "Provenance"]
    assert [e["resource"]["id"] for e in found["entry"] if e["resource"]["resourceType"] == "Provenance"] == \
        [world["Provenance"][1]]
    for bad in ("Patient?_revinclude=DiagnosticReport:status", "Patient?_revinclude=Nothing:subject",
                "Patient?_revinclude=Provenance:agent:x", "Observation?_revinclude=DiagnosticReport:patient"):
        assert client.get(f"/fhir/{bad}").status_code == 400, bad
    # past REVINCLUDE_MOST the answer says it is cut, with an outcome entry
    monkeypatch.setattr(resources, "REVINCLUDE_MOST", 1)
    cut = bundle(client, f"Patient?identifier={MRN}|A1&_revinclude=DiagnosticReport:subject", fhir_validate)
    assert [e["resource"]["resourceType"] for e in cut["entry"]] == ["Patient", "DiagnosticReport", "OperationOutcome"]
    assert "first 1 resources only" in cut["entry"][-1]["resource"]["issue"][0]["diagnostics"]
    # results within the token's scopes: a client that may read patients only gets no reports
    narrow = with_token(app.test_client(), bearer(app.test_client(), db_url, scopes="system/Patient.rs"))
    found = bundle(narrow, "Patient?_revinclude=DiagnosticReport:subject")
    assert {e["resource"]["resourceType"] for e in found["entry"]} == {"Patient"}


def test_summary_and_elements(client: FlaskClient, world: dict[str, list[str]], fhir_validate: Validate) -> None:
    counted = bundle(client, "DiagnosticReport?status=final&_summary=count", fhir_validate)
    assert counted["total"] == 3 and counted["entry"] == []
    assert bundle(client, "Patient?_summary=count")["total"] == 3
    assert bundle(client, "Patient?_summary=count&_total=none")["total"] == 3  # count is what was asked
    assert bundle(client, "Patient?_count=0&_totalMethod=count")["total"] == 3  # what fhirpy's .count() sends
    summary = bundle(client, "Patient?identifier=A1&_summary=true", fhir_validate)["entry"][0]["resource"]
    assert "text" not in summary and summary["birthDate"] == "1980-05-12" and summary["name"]
    assert {"code": "SUBSETTED"}.items() <= summary["meta"]["tag"][-1].items()
    text = bundle(client, "Patient?identifier=A1&_summary=text", fhir_validate)["entry"][0]["resource"]
    assert set(text) == {"resourceType", "id", "meta", "text"}
    data = bundle(client, "Patient?identifier=A1&_summary=data", fhir_validate)["entry"][0]["resource"]
    assert "text" not in data and data["gender"] == "female" and data["identifier"]
    whole = bundle(client, "Patient?identifier=A1&_summary=false")["entry"][0]["resource"]
    assert "text" in whole and "tag" not in whole["meta"]
    report = bundle(client, "DiagnosticReport?status=preliminary&_elements=issued,subject",
                    fhir_validate)["entry"][0]["resource"]
    # asked for issued and subject; status and code are mandatory and stay; conclusion goes
    assert set(report) == {"resourceType", "id", "meta", "issued", "subject", "status", "code"}
    effective = bundle(client, "DiagnosticReport?status=preliminary&_elements=effective[x]")["entry"][0]["resource"]
    assert effective["effectiveDateTime"] == "2026-12-01T07:00:00Z"
    assert client.get("/fhir/Patient?_summary=maybe").status_code == 400
    # on a read too
    read = client.get(f"/fhir/Patient/{world['Patient'][0]}?_elements=birthDate")
    assert read.status_code == 200 and set(read.get_json(force=True)) == {"resourceType", "id", "meta", "birthDate"}
    assert fhir_validate(read.get_json(force=True)) == []
    read = client.get(f"/fhir/Patient/{world['Patient'][0]}?_summary=true").get_json(force=True)
    assert "text" not in read and read["meta"]["tag"][-1]["code"] == "SUBSETTED"
    assert client.get(f"/fhir/Patient/{world['Patient'][0]}?_summary=count").status_code == 400


# -- with fhirpy, over HTTP ---------------------------------------------------------------------------
def test_fhirpy_habits(fhirpy_client: fhirpy.SyncFHIRClient, world: dict[str, list[str]]) -> None:
    patients = fhirpy_client.resources("Patient")
    assert sorted(p.id for p in patients.search(birthdate__ge="1980").fetch()) == pick(world["Patient"], 0, 2)
    assert patients.search(birthdate__lt="1980").count() == 1
    assert fhirpy_client.resources("DiagnosticReport").search(issued__ge="2026-12-01").count() == 3
    reports = fhirpy_client.resources("DiagnosticReport").search(subject__Patient__identifier=f"{MRN}|A1").fetch()
    assert sorted(r.id for r in reports) == pick(world["DiagnosticReport"], 0, 1)
    assert fhirpy_client.resources("DiagnosticReport").search(patient__family="tran").count() == 1
    with_reports = patients.search(identifier="A1").revinclude("DiagnosticReport", "subject").fetch_raw()
    assert sorted(e["resource"]["resourceType"] for e in with_reports["entry"]) == \
        ["DiagnosticReport", "DiagnosticReport", "Patient"]
    assert patients.search(**{"_has:DiagnosticReport:subject:status": "preliminary"}).count() == 1
    newest = fhirpy_client.resources("DiagnosticReport").sort("-issued").limit(1).fetch()
    assert [r.id for r in newest] == [world["DiagnosticReport"][3]]
    slim = patients.search(identifier="A2").elements("birthDate").first()
    assert slim is not None and slim["birthDate"] == "1975-12-31" and "name" not in slim


def test_prefixes_read_as_ranges() -> None:
    """The ranges the search module gives each prefixed value (R4 search.html#prefix), at a fixed now."""
    from interop.domain import search
    from interop.store.search_params import SearchParam

    params = {"date": SearchParam("date", "date", ("issued",)), "q": SearchParam("q", "quantity", ("valueQuantity",))}
    now = datetime(2026, 12, 1, tzinfo=UTC)
    parsed = search.parse("DiagnosticReport", [("date", "ap2016-12-01"), ("date", "2026-02"), ("q", "le1.50||mg")],
                          params, now=now)
    approx, month = parsed.query.criteria[0].comparisons[0], parsed.query.criteria[1].comparisons[0]
    assert approx.prefix == "ap" and approx.low.startswith("2015-12-01") and approx.high.startswith("2017-12-02")
    assert (month.prefix, month.low, month.high) == ("eq", "2026-02-01T00:00:00.000000Z", "2026-03-01T00:00:00.000000Z")
    assert tuple(parsed.query.criteria[2].comparisons[0]) == ("le", "1.495", "1.505", "*|mg", "1.50")
