"""Everything the hub writes or serves in a full run is valid FHIR R4 (issue 15).

One end-to-end run of the real `interop serve` (Triton, Orthanc, PostgreSQL): an HL7 ORM^O01
over MLLP (Patient, Encounter, ServiceRequest from HL7), its images in the PACS and
the AI analysis (Task, DiagnosticReport, Observation, Device, Provenance), a radiologist's review
over `$review` adding a critical finding (a new report version and its Provenance, critical
Communications to the site's contact and to its referral hospital, the transfer ServiceRequest and
the acknowledgement Task), the acknowledgement and the transfer decision; what two Subscriptions (classic rest-hook with a
payload, R4 Backport topic-based) were sent; a HIS's FHIR Patient and ImagingStudy whose PACS never
answers (a failed Task with its reason); a study a modality pushes to the hub's DICOM Storage SCP
(the ImagingStudy the hub builds from its headers, and its analysis); a person's login and a failed one; refused requests.

Then every version of every resource in the resource table (SQL), every AuditEvent of the trail
(FHIR search, paged) and every answer the API gave (searchsets, histories, OperationOutcomes,
the CapabilityStatement) is checked, by type, with HL7's R4 JSON schema, the
npm `fhir` validator (FHIR.js), Medplum's validator and R4's data type invariants
(tests/fixtures/fhir_check.py); a failure names the type, id, version and each validator's message.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from pynetdicom import AE

from inference_client.models import load_models
from scripts.synthetic.dicom import make_chest_xray
from tests.fixtures.auth import csrf_of, person_session
from tests.fixtures.fhir_check import FhirCheck, started
from tests.fixtures.hub import HubProcess, start_hub, stop_hub
from tests.fixtures.mllp import SEP, orm, send
from tests.fixtures.postgres import database_of_module
from tests.fixtures.receiver import Receiver
from tests.helpers import ROOT, chest_study_in_pacs, free_port, study_resource, wait_for

REVIEWER = "BS. Trần Văn Bình"
MODEL = load_models(ROOT / "mappings")["chest-xray"]
CRITICAL = next(label for label in MODEL.labels if label.critical)


def sites(pacs: str) -> dict[str, Any]:
    return {"sites": {
        "BVDKDN": {"name": "Benh vien Da khoa Dong Nai", "district": "Bien Hoa", "province": "Dong Nai",
                   "pacs_wait_minutes": 1, "critical_contacts": ["BS. Lê An", "BS. Phạm Hà"], "referral": "BVND115",
                   "dicom_aets": ["BVDKDN_DX"], "dicomweb": pacs},
        "BVND115": {"name": "Benh vien Nhan dan 115", "district": "Quan 10", "province": "Ho Chi Minh"},
    }}

BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"

# Every type the hub writes or serves in a full run (issue 15 names them), and sends: Subscription
# notifications (history Bundles of the R4 Backport, each with a Parameters status; a classic
# rest-hook's PUT of the DiagnosticReport).
WRITTEN = ["Patient", "Encounter", "ServiceRequest", "ImagingStudy", "Task", "DiagnosticReport", "Observation",
           "Device", "Provenance", "Communication", "Subscription"]
SERVED = ["AuditEvent", "Bundle", "OperationOutcome", "CapabilityStatement", "Parameters"]


def order(control_id: str, **kwargs: Any) -> bytes:
    """The test ORM^O01 with the patient's phone in PID-13 as many HIS send it (a number alone, no
    use or equipment type) and the visit number in PV1-19 (so the hub stores an Encounter)."""
    segments = orm(control_id, **kwargs).decode("utf-8").split(SEP)
    pid = segments[1].split("|")
    pid += [""] * (14 - len(pid))
    pid[13] = "0912345678"
    segments[1] = "|".join(pid)
    pv1 = segments[2].split("|")[:8]
    pv1 += [""] * (20 - len(pv1))
    pv1[19] = f"V{control_id}^^^BVDKDN"
    segments[2] = "|".join(pv1)
    return SEP.join(segments).encode("utf-8")


class Run:
    """What one end-to-end run left: the stored resources and the API's answers, by type."""

    def __init__(self, hub: HubProcess):
        self.hub = hub
        self.found: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)  # type -> [(where, body)]

    def answer(self, where: str, body: dict[str, Any]) -> dict[str, Any]:
        self.found[body.get("resourceType", "?")].append((where, body))
        return body

    def get(self, path: str, expect: int = 200, **params: str) -> dict[str, Any]:
        response = self.hub.session.get(f"{self.hub.fhir}/{path}", params=params, timeout=30)
        assert response.status_code == expect, f"GET {path}: {response.status_code} {response.text[:500]}"
        return self.answer(f"GET /fhir/{path} {params or ''}".strip(), response.json())

    def post(self, path: str, body: Any, expect: int = 200, **headers: str) -> dict[str, Any]:
        data = body if isinstance(body, (str, bytes)) else json.dumps(body)
        response = self.hub.session.post(f"{self.hub.fhir}/{path}", data=data, timeout=60,
                                         headers={"Content-Type": "application/fhir+json", **headers})
        assert response.status_code == expect, f"POST {path}: {response.status_code} {response.text[:500]}"
        return self.answer(f"POST /fhir/{path}", response.json())


def operation(**values: Any) -> dict[str, Any]:
    params = []
    for name, value in values.items():
        key = "valueCode" if name in ("action", "decision") else "valueString"
        params.append({"name": name, key: value})
    return {"resourceType": "Parameters", "parameter": params}


def subscribe(run: Run, hook: Receiver) -> None:
    """A classic rest-hook Subscription with a payload (the report PUT at the endpoint) and a
    topic-based one of the R4 Backport (full-resource notification Bundles), both to `hook`."""
    run.post("Subscription", {"resourceType": "Subscription", "status": "requested", "reason": "AI results for the EMR",
                              "criteria": "DiagnosticReport?status=preliminary,final",
                              "channel": {"type": "rest-hook", "endpoint": f"{hook.url}/classic",
                                          "payload": "application/fhir+json"}}, expect=201)
    run.post("Subscription", {
        "resourceType": "Subscription", "status": "requested", "reason": "AI results for the EMR",
        "meta": {"profile": [f"{BACKPORT}/backport-subscription"]},
        "criteria": "urn:interop-hub:SubscriptionTopic:diagnostic-report",
        "channel": {"type": "rest-hook", "endpoint": f"{hook.url}/topic", "payload": "application/fhir+json",
                    "_payload": {"extension": [{"url": f"{BACKPORT}/backport-payload-content",
                                                "valueCode": "full-resource"}]}}}, expect=201)
    # active once the handshake is accepted: the reports to come are notified
    wait_for(lambda: len(run.get("Subscription", status="active").get("entry", [])) == 2, 30,
             what="the Subscriptions to be active")


def full_run(hub: HubProcess, orthanc: Any, hook: Receiver) -> Run:
    run = Run(hub)
    subscribe(run, hook)
    ds = chest_study_in_pacs(orthanc, seed=151, size=256, accession="ACC15101", patient_id="BN15101")
    answers = send(int(hub.env["INTEROP_MLLP_PORT"]),
                   order("V1", accession="ACC15101", placer="PL151", filler="FL151", patient_id="BN15101"),
                   order("V2", order_control="SC", order_status="CM", accession="ACC15101", placer="PL151",
                       filler="FL151", patient_id="BN15101", study_uid=ds.StudyInstanceUID))
    assert all("MSA|AA" in a for a in answers), answers

    # Meanwhile a HIS's FHIR client: a Patient and an ImagingStudy whose PACS never answers (the analysis
    # Task fails with its reason).
    patient = run.post("Patient", {"resourceType": "Patient", "identifier": [{"system": "urn:test:mrn", "value": "F151"}],
                                   "name": [{"family": "Lê", "given": ["Thị", "Hoa"]}], "gender": "female",
                                   "birthDate": "1961-03-08"}, expect=201)
    dead = study_resource([make_chest_xray(seed=152, size=64)], patient["id"], "http://127.0.0.1:9/dicom-web")
    study = run.post("ImagingStudy", dead, expect=201)
    # A modality pushes a study to the hub's Storage SCP: the ImagingStudy the hub builds from
    # the DICOM headers, and its analysis.
    pushed = make_chest_xray(seed=153, size=256, patient_id="BN15103", accession="ACC15103")
    ae = AE(ae_title="BVDKDN_DX")
    ae.add_requested_context(str(pushed.SOPClassUID))
    assoc = ae.associate("127.0.0.1", int(hub.env["INTEROP_DICOM_PORT"]), ae_title="AIHUB")
    assert assoc.is_established
    try:
        assert int(assoc.send_c_store(pushed).Status) == 0
    finally:
        assoc.release()

    found = wait_for(lambda: run.get("ServiceRequest", identifier="ACC15101").get("entry"), 30, what="the order")
    order_ref = f"ServiceRequest/{found[0]['resource']['id']}"
    report = wait_for(lambda: run.get("DiagnosticReport", **{"based-on": order_ref}).get("entry"), 90,
                      what="the AI report")[0]["resource"]
    assert report["status"] == "preliminary"
    run.get("DiagnosticReport", **{"based-on": order_ref, "_include": "DiagnosticReport:result"})
    run.get(f"DiagnosticReport/{report['id']}/_history")
    run.get("Task", focus=report["imagingStudy"][0]["reference"])

    # The radiologist adds the critical finding the AI did not call: a new version, its Provenance,
    # and the critical alert (Communications, transfer recommendation, acknowledgement Task).
    review = operation(action="edit", reviewer=REVIEWER, conclusion="Small apical pneumothorax.")
    review["parameter"].append({"name": "added", "part": [{"name": "code", "valueCoding": {
        "system": "http://snomed.info/sct", "code": CRITICAL.code, "display": CRITICAL.display.en}}]})
    edited = run.post(f"DiagnosticReport/{report['id']}/$review", review)
    assert edited["resourceType"] == "DiagnosticReport" and edited["status"] == "final", edited
    notices = run.get("Communication", **{"based-on": f"DiagnosticReport/{report['id']}"})
    assert len(notices.get("entry", [])) == 2, notices  # the site's first contact, and the referral hospital
    run.post(f"DiagnosticReport/{report['id']}/$acknowledge-critical", operation(by="BS. Lê An"))
    run.post(f"DiagnosticReport/{report['id']}/$transfer-decision", operation(decision="transfer", by="BS. Lê An"))
    run.get("Provenance", target=f"DiagnosticReport/{report['id']}")
    run.get("Patient", identifier="BN15101")
    run.get("Encounter", patient=report["subject"]["reference"])
    run.get("metadata")

    wait_for(lambda: [e for e in run.get("Task", focus=f"ImagingStudy/{study['id']}").get("entry", [])
                      if e["resource"]["status"] == "failed"], 60, what="the failed analysis Task")
    wait_for(lambda: run.get("DiagnosticReport", identifier=f"{pushed.StudyInstanceUID}/chest-xray").get("entry"), 90,
             what="the report of the pushed study")
    run.get("ImagingStudy", identifier=f"urn:dicom:uid|urn:oid:{pushed.StudyInstanceUID}")

    # A person's login to the worklist, then a wrong password.
    browser, _ = person_session(hub.base, hub.env["DATABASE_URL"], "bs-hoa")
    assert browser.get(f"{hub.base}/worklist/", timeout=10).status_code == 200
    stranger = hub.session.__class__()
    page = stranger.get(f"{hub.base}/login", timeout=10)
    stranger.post(f"{hub.base}/login", data={"username": "bs-hoa", "password": "wrong", "csrf_token": csrf_of(page.text)},
                  allow_redirects=False, timeout=30)

    # Refusals: each an OperationOutcome with its status.
    run.post("ImagingStudy", "{not json", expect=400)
    run.post("ImagingStudy", {"resourceType": "ImagingStudy", "status": "bogus", "subject": {"reference": "Patient/x"}},
             expect=400)
    run.post("DiagnosticReport", {"resourceType": "DiagnosticReport", "status": "final", "code": {"text": "x"}},
             expect=405)
    run.get("Observation/no-such-id", expect=404)
    run.get("Patient", expect=400, unknown="1")
    run.get("NotAType", expect=404)
    run.post(f"DiagnosticReport/{report['id']}/$review", operation(action="sign", reviewer=""), expect=422)

    # What the Subscriptions were sent: the handshake, then each report version (AI, edited).
    def sent() -> list[tuple[str, bytes]]:
        return [(f"{r['method']} {r['path']}", r["body"]) for r in hook.received]

    wait_for(lambda: sum(where.startswith("PUT /hook/classic") for where, _ in sent()) >= 2
             and sum(where.startswith("POST /hook/topic") for where, _ in sent()) >= 3, 60,
             what="the Subscriptions' notifications")
    for where, body in sent():
        sent = run.answer(f"sent to the Subscription endpoint: {where}", json.loads(body))
        for entry in sent.get("entry", []) if sent["resourceType"] == "Bundle" else []:
            if entry.get("resource", {}).get("resourceType") == "Parameters":  # the notification's status
                run.answer(f"{where}: its subscription status", entry["resource"])
    return run


def stored(run: Run) -> None:
    """Every version of every resource the hub holds, from its tables, and the audit trail."""
    with psycopg.connect(run.hub.env["DATABASE_URL"]) as conn:
        rows = conn.execute("SELECT type, id, version, body FROM resource_history ORDER BY type, id, version").fetchall()
    for rtype, rid, version, body in rows:
        run.found[rtype].append((f"stored {rtype}/{rid}/_history/{version}", body))
    page = run.get("AuditEvent", _count="200")
    pages = 1
    while next_url := next((link["url"] for link in page.get("link", []) if link["relation"] == "next"), None):
        response = run.hub.session.get(next_url, timeout=30)
        assert response.status_code == 200, response.text
        page = run.answer(f"GET {next_url}", response.json())
        pages += 1
        assert pages < 50, "the audit trail pages do not end"
    for where, bundle in list(run.found["Bundle"]):
        if where.startswith("GET /fhir/AuditEvent") or "/fhir/AuditEvent?" in where:
            for entry in bundle.get("entry", []):
                run.found["AuditEvent"].append((f"served AuditEvent/{entry['resource'].get('id')}", entry["resource"]))


@pytest.fixture(scope="module")
def run(pg_server_url: str, pg_template: str, triton_url: str, orthanc: Any,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    workdir: Path = tmp_path_factory.mktemp("outputs")
    (workdir / "sites.yaml").write_text(yaml.safe_dump(sites(orthanc.dicomweb_url), allow_unicode=True), encoding="utf-8")
    with database_of_module(pg_server_url, pg_template, f"interop_outputs_{os.getpid()}") as url:
        hub = start_hub({"DATABASE_URL": url, "TRITON_URL": triton_url,
                         "DICOMWEB_URL": orthanc.dicomweb_url, "INTEROP_SITES": str(workdir / "sites.yaml"),
                         "INTEROP_RETRY_BASE_SECONDS": "1", "INTEROP_JOB_MAX_ATTEMPTS": "2",
                         "INTEROP_DICOM_PORT": str(free_port()), "INTEROP_DICOM_STABLE_SECONDS": "1",
                         "INTEROP_WORKERS": "1"}, workdir)
        hook = Receiver()
        try:
            done = full_run(hub, orthanc, hook)
            stored(done)
            yield done
        finally:
            stop_hub(hub)
            hook.close()


@pytest.fixture(scope="module")
def check(fhir_validate: Any) -> Iterator[FhirCheck]:
    with started(fhir_validate) as checker:
        yield checker


def invalid(run: Run, check: FhirCheck, rtype: str) -> list[str]:
    """Each output of `rtype` that a validator refuses: where it was, its id, every message."""
    out = []
    for where, body in run.found.get(rtype, []):
        problems = check.problems(body)
        if problems:
            out.append(f"{where} (id {body.get('id')}):\n    " + "\n    ".join(problems))
    return out


def test_every_output_of_every_type_is_valid_r4(run: Run, check: FhirCheck) -> None:
    """One test for the whole run, so that parallel test processes do not each make it."""
    failures = [f"the run produced no {rtype}: the test no longer covers it"
                for rtype in WRITTEN + SERVED if not run.found.get(rtype)]
    # a type the hub starts to write or serve shows here, to be added to WRITTEN or SERVED
    failures += [f"{rtype} is not checked by type: add it to WRITTEN or SERVED"
                 for rtype in sorted(set(run.found) - set(WRITTEN + SERVED))]
    for rtype in WRITTEN + SERVED:
        if bad := invalid(run, check, rtype):
            failures.append(f"{len(bad)} of {len(run.found[rtype])} {rtype} outputs are not valid R4:\n" + "\n".join(bad))
    assert not failures, "\n".join(failures)

