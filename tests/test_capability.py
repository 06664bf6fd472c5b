"""The CapabilityStatement says what the server really does (issue 15): it is generated from the
routes and the declared table, every interaction it declares for a type answers (not 405), every
routed interaction it leaves out of a type is refused with 405, every search parameter, include and
reverse include it declares works, and it is valid R4."""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from interop.fhir import capability

Validate = Callable[[dict[str, Any]], list[str]]
FHIR = "application/fhir+json"
ID = "no-such-id"
VALUES = {"date": "ge2020-01-01", "number": "gt1", "quantity": "lt1", "string": "x", "token": "x",
          "reference": "Patient/x", "uri": "https://his.example.org/hook"}


def _statement(client: FlaskClient, validate: Validate) -> dict[str, Any]:
    answer = client.get("/fhir/metadata")
    assert answer.status_code == 200
    body: dict[str, Any] = answer.get_json(force=True)
    assert validate(body) == []
    return body


def _call(client: FlaskClient, rtype: str, interaction: str) -> Any:
    """The request of one interaction, as a client sends it (for an id the server does not hold)."""
    body = json.dumps({"resourceType": rtype, "id": ID})
    return {
        "read": lambda: client.get(f"/fhir/{rtype}/{ID}"),
        "vread": lambda: client.get(f"/fhir/{rtype}/{ID}/_history/1"),
        "history-instance": lambda: client.get(f"/fhir/{rtype}/{ID}/_history"),
        "history-type": lambda: client.get(f"/fhir/{rtype}/_history"),
        "search-type": lambda: client.get(f"/fhir/{rtype}?_count=1"),
        "create": lambda: client.post(f"/fhir/{rtype}", data=json.dumps({"resourceType": rtype}), content_type=FHIR),
        "update": lambda: client.put(f"/fhir/{rtype}/{ID}", data=body, content_type=FHIR),
        "patch": lambda: client.patch(f"/fhir/{rtype}/{ID}", data="[]", content_type="application/json-patch+json"),
        "delete": lambda: client.delete(f"/fhir/{rtype}/{ID}"),
    }[interaction]()


def test_declared_interactions_answer_and_the_others_are_405(client: FlaskClient, fhir_validate: Validate) -> None:
    rest = _statement(client, fhir_validate)["rest"][0]
    every = capability.READ + capability.WRITE
    for resource in rest["resource"]:
        rtype = resource["type"]
        declared = {i["code"] for i in resource["interaction"]}
        assert declared, rtype
        for interaction in every:
            status = _call(client, rtype, interaction).status_code
            if interaction in declared:
                assert status != 405 and status < 500, (rtype, interaction, status)
            else:
                assert status in (405, 404), (rtype, interaction, status)  # 404: no route for AuditEvent history
    assert {i["code"] for i in rest["interaction"]} == {"transaction", "batch", "history-system"}
    writable = {r["type"] for r in rest["resource"] if any(i["code"] == "create" for i in r["interaction"])}
    assert writable == {"ImagingStudy", "Endpoint", "Patient", "Subscription"}
    patient = next(r for r in rest["resource"] if r["type"] == "Patient")
    assert patient["conditionalUpdate"] is True and patient["conditionalDelete"] == "single"
    assert patient["conditionalCreate"] is True and patient["updateCreate"] is True
    report = next(r for r in rest["resource"] if r["type"] == "DiagnosticReport")
    assert report["conditionalDelete"] == "not-supported" and report["updateCreate"] is False
    assert {"review", "acknowledge-critical", "transfer-decision", "export"} <= {o["name"] for o in report["operation"]}
    assert {"export"} == {o["name"] for o in rest["operation"]}


def test_declared_search_parameters_includes_and_reverse_includes_work(client: FlaskClient,
                                                                       fhir_validate: Validate) -> None:
    rest = _statement(client, fhir_validate)["rest"][0]
    checked = 0
    for resource in rest["resource"]:
        rtype = resource["type"]
        for param in resource["searchParam"]:
            value = VALUES[param["type"]] if param["name"] != "_id" else "x"
            if param["name"] == "_lastUpdated":
                value = "ge2020-01-01T00:00:00Z"
            answer = client.get(f"/fhir/{rtype}", query_string={param["name"]: value})
            assert answer.status_code == 200, (rtype, param, answer.get_data(as_text=True))
            checked += 1
        for include in resource.get("searchInclude", []):
            assert client.get(f"/fhir/{rtype}?_include={include}").status_code == 200, include
        for include in resource.get("searchRevInclude", []):
            assert client.get(f"/fhir/{rtype}?_revinclude={include}").status_code == 200, include
        # and what it does not declare is refused, not ignored
        assert client.get(f"/fhir/{rtype}?no-such-parameter=1").status_code == 400
    assert checked > 80
    patient = next(r for r in rest["resource"] if r["type"] == "Patient")
    assert {"birthdate": "date", "family": "string"}.items() <= {p["name"]: p["type"] for p in patient["searchParam"]}.items()
    assert "DiagnosticReport:subject" in patient["searchRevInclude"] and "Provenance:target" in patient["searchRevInclude"]
    assert "DiagnosticReport:result" not in patient["searchRevInclude"]  # result refers to Observations only
    assert client.get("/fhir/Patient?_has:DiagnosticReport:subject:status=final").status_code == 200


def test_the_statement_follows_the_routes(app: Flask) -> None:
    """A route taken away (or a type's writes refused in the table) leaves the statement: nothing is
    declared that is not both routed and allowed."""
    with app.app_context():
        routes = capability.routed()
        full = capability.statement("http://h/fhir", "http://h/auth/token", app.extensions["interop"].params, "2026")
        without = capability.statement("http://h/fhir", "http://h/auth/token", app.extensions["interop"].params, "2026",
                                       [r for r in routes if r[0] != "DELETE"])
    assert ("DELETE", "/fhir/*/*") in routes and ("POST", "/fhir") in routes

    def codes(statement: dict[str, Any], rtype: str) -> set[str]:
        return {i["code"] for r in statement["rest"][0]["resource"] if r["type"] == rtype for i in r["interaction"]}

    assert "delete" in codes(full, "Patient") and "delete" not in codes(without, "Patient")
    assert next(r for r in without["rest"][0]["resource"] if r["type"] == "Patient")["conditionalDelete"] == "not-supported"
    assert codes(full, "Observation") == set(capability.READ)
    unknown = [(m, r) for m, r in routes if r.startswith("/fhir") and "$" not in r and (m, r) not in capability.ROUTED
               and r != "/fhir/metadata"]
    assert unknown == [], f"routes the statement does not know how to declare: {unknown}"


def test_the_statement_names_the_guides_it_serves_and_a_conditional_read(client: FlaskClient,
                                                                          fhir_validate: Validate) -> None:
    """Bulk Data and the Subscriptions backport are declared as their IGs ask, from the routed
    operations; a conditional read declared is a conditional read answered (304)."""
    body = _statement(client, fhir_validate)
    assert set(body["instantiates"]) == set(capability.INSTANTIATES.values())
    subscription = next(r for r in body["rest"][0]["resource"] if r["type"] == "Subscription")
    assert subscription["extension"] == [{"url": capability.TOPIC_CANONICAL,
                                          "valueCanonical": "urn:interop-hub:SubscriptionTopic:diagnostic-report"}]
    patient = next(r for r in body["rest"][0]["resource"] if r["type"] == "Patient")
    assert patient["conditionalRead"] == "full-support"
    made = client.post("/fhir/Patient", data=json.dumps({"resourceType": "Patient", "gender": "female"}),
                       content_type=FHIR)
    assert made.status_code == 201
    rid = made.headers["Location"].split("/Patient/")[1].split("/")[0]
    again = client.get(f"/fhir/Patient/{rid}", headers={"If-None-Match": made.headers["ETag"]})
    assert again.status_code == 304
    with client.application.app_context():
        bare = capability.statement("http://h/fhir", "http://h/auth/token", client.application.extensions["interop"].params,
                                    "2026", [r for r in capability.routed() if "$" not in r[1]])
    assert "instantiates" not in bare
