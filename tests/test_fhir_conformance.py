"""FHIR R4 conformance with HL7's own examples (tests/data/fhir-r4, CC0), against the real
`interop serve` over HTTP.

For each official example of a type the CapabilityStatement lists:

* create: POST when /fhir/metadata declares `create` for the type; the types only the hub writes
  (reports, observations, tasks...) are stored the way the hub's own writers store them
  (interop.store.resources.create), then served by the API like any other;
* read: the content comes back as sent, apart from `id` and `meta`;
* search: every search parameter /fhir/metadata declares for the type, with each value that
  HL7's definition of that parameter (the official R4 SearchParameter's FHIRPath, evaluated by
  Medplum) extracts from the stored resource, must find it. The cases come from the server's own
  statement, so a parameter it starts to declare is tested from then on;
* _include and _revinclude: every one the statement declares, between examples that name each
  other by id (stored again at their own ids), brings the other resource;
* the declared search parameters are R4's, with R4's types (or the hub's own, listed);
* the latest AuditEvents of the trail are found by every declared parameter they have a value for.

Every answer (the resource, the search Bundles, the history, the statement) is checked with
HL7's R4 JSON schema, the npm `fhir` validator (FHIR.js), Medplum's StructureDefinition validator
and R4's data type invariants (tests/fixtures/fhir_check.py). No departure is known: each case
must pass.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests

from tests.fixtures.fhir_check import FhirCheck, started
from tests.fixtures.hub import TEST_URL_ALLOW, HubProcess, start_hub, stop_hub
from tests.fixtures.postgres import database_of_module
from tests.helpers import DATA, ROOT

EXAMPLES = sorted((DATA / "fhir-r4").glob("*.json"))
FHIR_JSON = {"Content-Type": "application/fhir+json"}
# The examples' own addresses (Endpoint.address): a client may name them once the operator allows
# them. Nothing calls them: this hub runs no analysis worker (INTEROP_WORKERS=0).
EXAMPLE_URLS = "http://fhir3.healthintersections.com.au/open,https://pacs.hospital.org"

# Examples the hub refuses by a rule it documents: the status and what its OperationOutcome says.
# Subscription-example watches Observations; the hub's Subscriptions watch DiagnosticReports
# (interop.domain.subscriptions).
REFUSED = {"Subscription-example.json": (422, "only DiagnosticReport can be subscribed to")}


def example(path: Path) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return body


def content(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k not in ("id", "meta")}


@pytest.fixture(scope="module")
def check(fhir_validate: Any) -> Iterator[FhirCheck]:
    with started(fhir_validate) as checker:
        yield checker


@pytest.fixture(scope="module")
def served(pg_server_url: str, pg_template: str, triton_url: str, orthanc: Any,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    """One `interop serve` for the module, on its own database (each example gets its own ids)."""
    with database_of_module(pg_server_url, pg_template, f"interop_conformance_{os.getpid()}") as url:
        hub = start_hub({"DATABASE_URL": url, "TRITON_URL": triton_url,
                         "DICOMWEB_URL": orthanc.dicomweb_url, "INTEROP_WORKERS": "0",
                         "INTEROP_URL_ALLOW": f"{TEST_URL_ALLOW},{EXAMPLE_URLS}"},
                        tmp_path_factory.mktemp("conformance"))
        try:
            yield hub
        finally:
            stop_hub(hub)


@pytest.fixture(scope="module")
def statement(served: HubProcess) -> dict[str, dict[str, Any]]:
    """The served CapabilityStatement's rest resources, by type."""
    answer = served.session.get(f"{served.fhir}/metadata", timeout=10)
    assert answer.status_code == 200, answer.text
    return {r["type"]: r for r in answer.json()["rest"][0]["resource"]}


def valid(check: FhirCheck, body: dict[str, Any], what: str) -> None:
    problems = check.problems(body)
    assert not problems, f"{what}: {body.get('resourceType')}/{body.get('id')} is not valid R4:\n" + "\n".join(problems)


def get(hub: HubProcess, path: str, **params: str) -> requests.Response:
    return hub.session.get(f"{hub.fhir}/{path}", params=params, timeout=10)


@pytest.fixture(scope="module")
def stored(served: HubProcess, statement: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each example, created once: file name -> the create's answer (a served resource), or the
    refusal's OperationOutcome for the examples in REFUSED."""
    from interop.store import resources
    from interop.store.search_params import load

    params = load(ROOT / "mappings")
    # Examples that reference each other by id (ImagingStudy-example-xr names Endpoint/example-wadors):
    # those Endpoints are put at their own ids first (update as create, declared by the statement).
    for path in EXAMPLES:
        body = example(path)
        if body["resourceType"] == "Endpoint":
            assert statement["Endpoint"]["updateCreate"] is True
            put = served.session.put(f"{served.fhir}/Endpoint/{body['id']}", json=body, headers=FHIR_JSON, timeout=10)
            assert put.status_code in (200, 201), put.text
    made: dict[str, dict[str, Any]] = {}
    with psycopg.connect(served.env["DATABASE_URL"], autocommit=True) as conn:
        for path in EXAMPLES:
            body = example(path)
            rtype = body["resourceType"]
            interactions = {i["code"] for i in statement[rtype]["interaction"]}
            if "create" in interactions:
                answer = served.session.post(f"{served.fhir}/{rtype}", json=body, headers=FHIR_JSON, timeout=10)
                expected = REFUSED.get(path.name, (201, ""))[0]
                assert answer.status_code == expected, f"{path.name}: {answer.status_code} {answer.text[:500]}"
                made[path.name] = answer.json()
            else:  # written by the hub only: stored as its writers store them
                body.pop("id", None)
                with conn.transaction():
                    made[path.name] = resources.create(conn, body, params[rtype])
    return made


def test_every_example_is_of_a_type_the_statement_lists(statement: dict[str, dict[str, Any]], check: FhirCheck) -> None:
    types = {example(p)["resourceType"] for p in EXAMPLES}
    assert types <= set(statement), f"examples of types the server does not list: {types - set(statement)}"
    for path in EXAMPLES:  # the examples themselves are valid for every validator: they judge the hub, not HL7
        valid(check, example(path), f"the official example {path.name}")


def test_the_capability_statement_is_valid_r4(served: HubProcess, check: FhirCheck) -> None:
    answer = get(served, "metadata")
    assert answer.headers["Content-Type"].startswith("application/fhir+json")
    valid(check, answer.json(), "GET /fhir/metadata")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_create_then_read_gives_the_example_back(path: Path, served: HubProcess, stored: dict[str, dict[str, Any]],
                                                 check: FhirCheck) -> None:
    sent = example(path)
    answer = stored[path.name]
    if path.name in REFUSED:
        assert answer["resourceType"] == "OperationOutcome", answer
        assert REFUSED[path.name][1] in json.dumps(answer), answer
        valid(check, answer, f"the refusal of {path.name}")
        return
    valid(check, answer, f"the create's answer for {path.name}")
    assert answer["id"] and answer["meta"]["versionId"] == "1" and answer["meta"]["lastUpdated"]
    read = get(served, f"{sent['resourceType']}/{answer['id']}")
    assert read.status_code == 200, read.text
    assert read.headers["ETag"] == 'W/"1"'
    body = read.json()
    valid(check, body, f"GET {sent['resourceType']}/{answer['id']}")
    assert content(body) == content(sent), f"{path.name} came back changed"
    assert body == answer
    history = get(served, f"{sent['resourceType']}/{answer['id']}/_history")
    assert history.status_code == 200, history.text
    assert [e["resource"] for e in history.json()["entry"]] == [body]
    valid(check, history.json(), f"the history of {path.name}")


def search_values(ptype: str, typed: list[dict[str, Any]]) -> list[str]:
    """The search strings R4 says find a resource holding these values (typed as the element they
    came from); elements a plain search cannot name (contained or identifier-only references,
    text-only concepts, Timing) give none."""
    out: list[str] = []
    for item in typed:
        kind, value = item["type"], item["value"]
        if ptype == "token":
            if kind == "Identifier" and value.get("value"):
                out.append(f"{value['system']}|{value['value']}" if value.get("system") else value["value"])
            elif kind in ("CodeableConcept", "Coding"):
                for coding in value.get("coding", [value] if kind == "Coding" else []):
                    if coding.get("code"):
                        out.append(f"{coding['system']}|{coding['code']}" if coding.get("system") else coding["code"])
            elif kind == "ContactPoint" and value.get("value"):
                out.append(value["value"])
            elif kind == "boolean":
                out.append("true" if value else "false")
            elif isinstance(value, str):
                out.append(value)
        elif ptype == "reference":
            if kind == "Reference":
                ref = value.get("reference")
                if isinstance(ref, str) and not ref.startswith("#"):
                    out.append(ref)
            elif isinstance(value, str):  # canonical, uri
                out.append(value)
        elif ptype == "string":
            if kind == "HumanName":
                out += [value["family"]] if value.get("family") else value.get("given", [])[:1] or (
                    [value["text"]] if value.get("text") else [])
            elif kind == "Address":
                out += [v for v in (*value.get("line", []), value.get("city"), value.get("text")) if v][:1]
            elif isinstance(value, str):
                out.append(value)
        elif ptype == "date":
            if kind == "Period":
                out += [f"ge{value['start']}"] if value.get("start") else [f"le{value['end']}"] if value.get("end") else []
            elif isinstance(value, str):
                out.append(f"eq{value}")
        elif ptype == "number" and isinstance(value, (int, float)):
            out.append(str(value))
        elif ptype == "quantity" and kind == "Quantity" and "value" in value:
            unit = value.get("code") or value.get("unit")
            out.append(f"{value['value']}|{value.get('system', '')}|{unit}" if unit else str(value["value"]))
        elif ptype == "uri" and isinstance(value, str):
            out.append(value)
    return list(dict.fromkeys(out))


def search_cases(path: Path, served: HubProcess, statement: dict[str, dict[str, Any]], stored: dict[str, Any],
                 check: FhirCheck) -> list[tuple[str, str]]:
    """(parameter, value) for every parameter the statement declares for the example's type that
    HL7's definition finds a value for in the stored example."""
    answer = stored[path.name]
    body = get(served, f"{answer['resourceType']}/{answer['id']}").json()
    cases = []
    for declared in statement[body["resourceType"]].get("searchParam", []):
        ptype, typed = check.search_values(body, declared["name"])
        if ptype is None:
            continue  # a parameter of the hub's own: not R4's to define
        assert ptype == declared["type"], \
            f"{body['resourceType']}?{declared['name']} is a {ptype} in R4, declared a {declared['type']}"
        cases += [(declared["name"], v) for v in search_values(ptype, typed)]
    return cases


def finds(served: HubProcess, check: FhirCheck, rtype: str, rid: str, param: str, value: str,
          validate: bool = False) -> str | None:
    """None when `rtype?param=value` answers a searchset holding `rid` (valid R4, when asked to
    `validate` it: the resources in it are checked one by one elsewhere); else what went wrong."""
    answer = get(served, rtype, **{param: value, "_count": "200"})
    if answer.status_code != 200:
        return f"{param}={value}: {answer.status_code} {answer.text[:300]}"
    bundle = answer.json()
    problems = check.problems(bundle) if validate else []
    if problems:
        return f"{param}={value}: the searchset is not valid R4: {problems}"
    if rid not in {e["resource"]["id"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == "match"}:
        return f"{param}={value}: not found"
    return None


@pytest.mark.parametrize("path", [p for p in EXAMPLES if p.name not in REFUSED], ids=lambda p: p.stem)
def test_search_by_every_declared_parameter_finds_the_example(
        path: Path, served: HubProcess, statement: dict[str, dict[str, Any]], stored: dict[str, Any],
        check: FhirCheck) -> None:
    answer = stored[path.name]
    cases = search_cases(path, served, statement, stored, check)
    assert any(p == "_id" for p, _ in cases), cases  # every type declares _id
    missed = [why for n, (param, value) in enumerate(cases)
              if (why := finds(served, check, answer["resourceType"], answer["id"], param, value, validate=n == 0))]
    assert not missed, f"{path.name} ({answer['resourceType']}/{answer['id']}):\n" + "\n".join(missed)


# -- _include and _revinclude, between examples that name each other by id ----------------------------
@pytest.fixture(scope="module")
def linked(served: HubProcess, statement: dict[str, dict[str, Any]], stored: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The examples stored again at their own ids, so that their references to each other resolve
    (DiagnosticReport-102's result Observation/bmd, DiagnosticReport-ultrasound's subject
    Patient/example...): "Type/id" -> the stored resource. Clients' types are put at the id
    (update as create); the hub's own types stored as its writers store them, at that id.
    ImagingStudies stay out: a second copy of a DICOM study is the same study to the hub."""
    from interop.store import resources
    from interop.store.search_params import load

    params = load(ROOT / "mappings")
    out: dict[str, dict[str, Any]] = {}
    with psycopg.connect(served.env["DATABASE_URL"], autocommit=True) as conn:
        for path in EXAMPLES:
            body = example(path)
            rtype = body["resourceType"]
            if path.name in REFUSED or rtype == "ImagingStudy":
                continue
            if "update" in {i["code"] for i in statement[rtype]["interaction"]}:
                put = served.session.put(f"{served.fhir}/{rtype}/{body['id']}", json=body, headers=FHIR_JSON, timeout=10)
                assert put.status_code in (200, 201), f"{path.name}: {put.status_code} {put.text[:300]}"
                out[f"{rtype}/{body['id']}"] = put.json()
            else:
                with conn.transaction():
                    out[f"{rtype}/{body['id']}"] = resources.create(conn, body, params[rtype], rid=body["id"])
    return out


_LINKS: dict[tuple[str, str], list[tuple[str, str]]] = {}


def links(check: FhirCheck, linked: dict[str, dict[str, Any]], rtype: str, param: str) -> list[tuple[str, str]]:
    """(source "Type/id", target "Type/id") for each reference `rtype`.`param` (R4's definition) of a
    linked example that names another linked example."""
    if (rtype, param) in _LINKS:
        return _LINKS[(rtype, param)]
    out = []
    for ref, body in linked.items():
        if body["resourceType"] != rtype:
            continue
        ptype, typed = check.search_values(body, param)
        if ptype == "reference":
            out += [(ref, target) for target in search_values(ptype, typed) if target in linked and target != ref]
    _LINKS[(rtype, param)] = out
    return out


def included(served: HubProcess, check: FhirCheck, rtype: str, rid: str, how: str, spec: str) -> dict[str, str]:
    answer = get(served, rtype, _id=rid, **{how: spec})
    assert answer.status_code == 200, f"{rtype}?_id={rid}&{how}={spec}: {answer.status_code} {answer.text[:300]}"
    valid(check, answer.json(), f"{rtype}?_id={rid}&{how}={spec}")
    return {f"{e['resource']['resourceType']}/{e['resource']['id']}": e["search"]["mode"] for e in answer.json()["entry"]}


def test_include_brings_every_declared_reference(served: HubProcess, statement: dict[str, dict[str, Any]],
                                                 linked: dict[str, dict[str, Any]], check: FhirCheck) -> None:
    tried, missed = 0, []
    for declared in statement.values():
        for spec in declared.get("searchInclude", []):
            source_type, param = spec.split(":")[:2]
            for source, target in links(check, linked, source_type, param):
                tried += 1
                got = included(served, check, source_type, source.split("/")[1], "_include", spec)
                if got.get(source) != "match" or got.get(target) != "include":
                    missed.append(f"{source_type}?_id={source.split('/')[1]}&_include={spec}: {target} not included ({got})")
    assert tried >= 5, f"only {tried} _include cases among the examples"
    assert not missed, "\n".join(missed)


def test_revinclude_brings_every_declared_referrer(served: HubProcess, statement: dict[str, dict[str, Any]],
                                                   linked: dict[str, dict[str, Any]], check: FhirCheck) -> None:
    specs = list(dict.fromkeys(spec for declared in statement.values() for spec in declared.get("searchRevInclude", [])))
    if not specs:
        pytest.skip("the CapabilityStatement declares no _revinclude")
    tried, missed = 0, []
    for spec in specs:
        source_type, param = spec.split(":")[:2]
        for source, target in links(check, linked, source_type, param):
            target_type, target_id = target.split("/")
            if spec not in statement[target_type].get("searchRevInclude", []):
                continue
            tried += 1
            got = included(served, check, target_type, target_id, "_revinclude", spec)
            if got.get(target) != "match" or got.get(source) != "include":
                missed.append(f"{target_type}?_id={target_id}&_revinclude={spec}: {source} not included ({got})")
    assert tried >= 3, f"only {tried} _revinclude cases among the examples"
    assert not missed, "\n".join(missed)


# -- the declared search parameters are R4's -------------------------------------------------------
# Parameters the hub declares that R4 does not define for the type, and why (its own extensions).
HUB_PARAMETERS = {
    ("Observation", "interpretation"): "AI findings by interpretation (POS, AA for critical): a worklist and HIS need",
    ("ImagingStudy", "based-on"): "kept for the hub's callers beside R4's own name, basedon",
}


def parameter_problem(check: FhirCheck, rtype: str, declared: dict[str, Any]) -> str | None:
    """What is wrong with one declared search parameter against R4's definition, if anything."""
    r4_type, _ = check.search_values({"resourceType": rtype}, declared["name"])
    if r4_type is None:
        if (rtype, declared["name"]) in HUB_PARAMETERS:
            return None
        return f"{rtype}?{declared['name']}: not an R4 search parameter of {rtype}"
    if r4_type != declared["type"]:
        return f"{rtype}?{declared['name']}: declared {declared['type']}, R4 defines a {r4_type} parameter"
    return None


def test_every_declared_search_parameter_is_r4s(statement: dict[str, dict[str, Any]], check: FhirCheck) -> None:
    problems = [problem for rtype, resource in statement.items() for declared in resource.get("searchParam", [])
                if (problem := parameter_problem(check, rtype, declared))]
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def audit_misses(served: HubProcess, statement: dict[str, dict[str, Any]], stored: dict[str, Any],
                 check: FhirCheck) -> list[str]:
    """The trail of this module's own requests (creates, reads, searches): each of the latest
    AuditEvents, searched by `_id` and each declared parameter with a value R4's definition finds
    in it, must be in the answer; what was missed, for each that is not."""
    patient = stored["Patient-example.json"]
    assert get(served, f"Patient/{patient['id']}").status_code == 200
    assert get(served, "Patient", family="Chalmers").status_code == 200
    assert served.session.post(f"{served.fhir}/Patient", json=example(DATA / "fhir-r4" / "Patient-dicom.json"),
                               headers=FHIR_JSON, timeout=10).status_code == 201
    latest = get(served, "AuditEvent", _sort="-date", _count="40")
    assert latest.status_code == 200, latest.text
    valid(check, latest.json(), "AuditEvent?_sort=-date")
    events = [e["resource"] for e in latest.json()["entry"]]
    # reads are written in batches by each API process: the latest may not be there yet
    assert {e["subtype"][0]["code"] for e in events} >= {"create", "search-type"}, [e["subtype"] for e in events]
    tried, missed = set(), []
    for event in events:
        for declared in statement["AuditEvent"]["searchParam"]:
            if declared["name"] == "_id":
                continue
            ptype, typed = check.search_values(event, declared["name"])
            for value in search_values(ptype or "", typed):
                tried.add(declared["name"])
                answer = get(served, "AuditEvent", _id=event["id"], **{declared["name"]: value})
                ids = [e["resource"]["id"] for e in answer.json().get("entry", [])] if answer.status_code == 200 else []
                if ids != [event["id"]]:
                    missed.append(f"AuditEvent?_id={event['id']}&{declared['name']}={value}: {answer.status_code} {ids}")
    assert {"date", "subtype", "action", "outcome", "entity", "agent-name", "address"} <= tried, tried
    return missed


def test_audit_events_are_found_by_every_declared_parameter(audit_misses: list[str]) -> None:
    assert not audit_misses, "\n".join(audit_misses[:40])

