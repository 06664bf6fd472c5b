"""`interop demo` (what `make demo` runs): real studies through the hub on its embedded defaults.

Starts a PACS (Orthanc with DICOMweb), a stand-in RIS that receives results over MLLP, and
`interop serve`. The demo registers itself as a SMART backend client (`interop clients add`, its
own key pair) and a radiologist (`interop users add`), as an operator would. Then, as a HIS/EMR
would, with an access token: stores a synthetic full-size chest radiograph in the PACS and posts a
FHIR ImagingStudy naming it; the radiologist logs in and signs that report on the worklist. And as
a hospital integration engine would: sends an HL7 v2 ORM^O01 order, then its exam-done update, for a second radiograph. Prints
each DiagnosticReport with its Observations as FHIR JSON and the ORU^R01 the RIS received,
then stops all it started.
"""
from __future__ import annotations

import json
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import requests
from pynetdicom import AE

from interop.config import Settings
from interop.dicom.dicomweb import DicomWebClient
from interop.dicom.study import imaging_study
from interop.hl7.client import MllpClient

from . import smart
from .peers.orthanc import Orthanc
from .peers.ris import DemoRis
from .smart import ClientKey
from .synthetic.dicom import dataset_bytes, make_chest_xray

FHIR_JSON = "application/fhir+json"
DEMO_AET = "DEMO_DX"  # the demo modality's AE title, listed in the demo site's dicom_aets
DEMO_SCOPES = "system/Patient.crs system/ImagingStudy.crs system/Task.rs system/DiagnosticReport.rs system/Observation.rs"


def say(text: str) -> None:
    print(f"[demo] {text}", file=sys.stderr, flush=True)


def wait_ready(base: str, hub: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if hub.poll() is not None:
            raise RuntimeError(f"the hub exited with {hub.returncode} while starting")
        try:
            if requests.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError("the hub did not become ready in time")


def interop(env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    """Run an `interop` command as the operator would; its output."""
    done = subprocess.run([sys.executable, "-m", "interop.cli", *args], env=env, input=stdin, capture_output=True,
                          text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"interop {' '.join(args[:2])} failed: {done.stderr.strip()}")
    return done.stdout


def register(env: dict[str, str], base: str, data: Path) -> requests.Session:
    """The demo as a HIS vendor: a key pair, registered with `interop clients add`; a session with tokens."""
    key = ClientKey.new()
    jwks = data / "demo-client-jwks.json"
    jwks.write_text(json.dumps(key.jwks), encoding="utf-8")
    client_id = interop(env, "clients", "add", "demo HIS", "--jwks", str(jwks), "--scopes", DEMO_SCOPES).split()[-1]
    say(f"registered the demo as SMART backend client {client_id} ({DEMO_SCOPES})")
    return smart.session(smart.Smart(f"{base}/auth/token", client_id, key, DEMO_SCOPES))


def sign_as_radiologist(env: dict[str, str], base: str, report_id: str) -> None:
    """A radiologist logs in (a local account made with `interop users add`) and signs the AI report."""
    name, password = f"demo-radiologist-{secrets.token_hex(3)}", secrets.token_urlsafe(18)
    interop(env, "users", "add", name, "--role", "radiologist", "--password-stdin", stdin=password + "\n")
    browser = requests.Session()
    login = browser.get(f"{base}/login", timeout=10)
    browser.post(f"{base}/login", data={"username": name, "password": password, "csrf_token": _csrf(login.text)},
                 timeout=30).raise_for_status()
    page = browser.get(f"{base}/worklist/{report_id}", timeout=30)
    version = re.search(r'name="version" value="(\d+)"', page.text)
    signed = browser.post(f"{base}/worklist/{report_id}/review", allow_redirects=False, timeout=30, data={
        "action": "sign", "csrf_token": _csrf(page.text), "version": version.group(1) if version else ""})
    if signed.status_code != 303:
        raise RuntimeError(f"signing on the worklist -> {signed.status_code}")
    say(f"{name} logged in to the worklist and signed DiagnosticReport/{report_id}")


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]*)"', html)
    if found is None:
        raise RuntimeError("the page carries no CSRF token")
    return found.group(1)


def post(api: requests.Session, url: str, body: dict[str, Any]) -> dict[str, Any]:
    response = api.post(url, data=json.dumps(body), headers={"Content-Type": FHIR_JSON}, timeout=30)
    if response.status_code not in (200, 201):
        raise RuntimeError(f"POST {url} -> {response.status_code}: {response.text}")
    return response.json()  # type: ignore[no-any-return]


def wait_task(api: requests.Session, fhir: str, study_id: str, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        bundle = api.get(f"{fhir}/Task", params={"focus": f"ImagingStudy/{study_id}"}, timeout=10).json()
        if bundle.get("entry"):
            task = bundle["entry"][0]["resource"]
            state = (task["status"], task.get("businessStatus", {}).get("text"))
            if state != last:
                say(f"analysis task: {state[0]}" + (f" ({state[1]})" if state[1] else ""))
                last = state
            if task["status"] in ("completed", "failed", "rejected", "cancelled"):
                return task  # type: ignore[no-any-return]
        time.sleep(0.3)
    raise RuntimeError("no result in time")


def demo_order(control_id: str, status: str, control: str, accession: str, study_uid: str, patient_id: str) -> str:
    """An ORM^O01 as a district hospital's HIS sends it (v2.3.1, UTF-8, ZDS with the study UID)."""
    now = time.strftime("%Y%m%d%H%M%S")
    return "\r".join([
        f"MSH|^~\\&|HIS|DEMO_HOSPITAL|AIHUB|PROVINCE|{now}||ORM^O01|{control_id}|P|2.3.1||||||UNICODE UTF-8",
        f"PID|||{patient_id}^^^DEMO_HOSPITAL^MR||NGUYỄN^VĂN AN||19580214|M|||12 Lê Lợi^^Biên Hòa^^^VN",
        "PV1||O|XQ^^^DEMO_HOSPITAL",
        f"ORC|{control}|P{accession}^HIS|F{accession}^RIS||{status}||^^^{now}^^R||{now}|||1234^TRAN^BINH^^^BS",
        f"OBR|1|P{accession}^HIS|F{accession}^RIS|36554-4^XR Chest Single view^LN|||{now}|||||||||"
        f"1234^TRAN^BINH^^^BS||{accession}||||||DX||^^^{now}^^R||||^ho kéo dài 3 tuần",
        f"ZDS|{study_uid}^HUB^Application^DICOM",
    ])


def report_bundle(api: requests.Session, fhir: str, report_ref: str) -> dict[str, Any]:
    return api.get(f"{fhir}/DiagnosticReport", timeout=10, params={
        "_id": report_ref.split("/")[1], "_include": "DiagnosticReport:result"}).json()  # type: ignore[no-any-return]


def show(title: str, bundle: dict[str, Any]) -> None:
    print(json.dumps({"demo": title, "bundle": bundle}, indent=2, ensure_ascii=False))
    report = bundle["entry"][0]["resource"]
    say(f"{title}: {report['resourceType']}/{report['id']} status={report['status']}")
    for line in report["conclusion"].splitlines():
        say("  " + line)


def wait_report(api: requests.Session, fhir: str, params: dict[str, str], timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entries = api.get(f"{fhir}/DiagnosticReport", params=params, timeout=10).json().get("entry")
        if entries:
            return f"DiagnosticReport/{entries[0]['resource']['id']}"
        time.sleep(0.3)
    raise RuntimeError("no report in time")


def push_by_c_store(settings: Settings, api: requests.Session, fhir: str, pacs_url: str) -> int:
    """A modality (AE title DEMO_DX) stores an image in the hub; the report's SR appears in the PACS."""
    image = make_chest_xray(seed=int(time.time()) % 100_000 + 2, accession=f"CS{int(time.time()) % 1_000_000:06d}",
                            patient_id="BN-DEMO-2")
    ae = AE(ae_title=DEMO_AET)
    ae.add_requested_context(image.SOPClassUID)
    assoc = ae.associate(settings.dicom_host, settings.dicom_port, ae_title=settings.dicom_aet)
    if not assoc.is_established:
        say("the hub's DICOM Storage SCP refused the association")
        return 1
    try:
        status = assoc.send_c_store(image)
    finally:
        assoc.release()
    say(f"DICOM: C-STORE of a {image.Modality} image from {DEMO_AET} to {settings.dicom_aet} answered"
        f" 0x{int(status.Status):04X}")
    pushed = time.monotonic()
    ref = wait_report(api, fhir, {"identifier": f"urn:interop-hub:report|{image.StudyInstanceUID}/chest-xray"})
    say(f"report available {time.monotonic() - pushed:.2f}s after the C-STORE (3 s of it waiting for more images)")
    show("DICOM C-STORE -> DiagnosticReport", report_bundle(api, fhir, ref))
    with DicomWebClient(pacs_url, 30) as pacs:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            srs = [r for r in pacs.search_instances(image.StudyInstanceUID) if r.modality == "SR"]
            if srs:
                sr = pacs.retrieve_instance(srs[0])
                equipment = sr.ContributingEquipmentSequence[0]
                say(f"the PACS holds the result as a DICOM SR in the same study: {sr.SOPClassUID.name},"
                    f" {sr.CompletionFlag}/{sr.VerificationFlag}, {len(sr.ContentSequence)} content items,"
                    f" algorithm {equipment.ManufacturerModelName} {equipment.SoftwareVersions}")
                return 0
            time.sleep(0.5)
    say("no SR reached the PACS in time")
    return 1


def run_demo(settings: Settings, keep: bool = False) -> int:
    data = settings.data_dir
    data.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    ris = DemoRis()
    sites = data / "demo-sites.yaml"
    with Orthanc(data / "demo-pacs") as pacs:
        say(f"PACS (Orthanc + DICOMweb) at {pacs.dicomweb_url}; demo RIS (MLLP) on port {ris.port}")
        sites.write_text(
            "sites:\n  DEMO_HOSPITAL:\n    name: Demo district hospital\n    district: Bien Hoa\n"
            f"    province: Dong Nai\n    hl7: {{host: 127.0.0.1, port: {ris.port}, receiving_application: RIS}}\n"
            f"    dicomweb: {pacs.dicomweb_url}\n    dicom_aets: [{DEMO_AET}]\n    results_to_pacs: true\n",
            encoding="utf-8")
        # a pushed study is analysed after 3 s without a new image (the default 10 s suits real modalities)
        env = replace(settings, dicomweb_url=pacs.dicomweb_url, sites_file=sites, dicom_stable_seconds=3).as_env()
        hub = subprocess.Popen([sys.executable, "-m", "interop.cli", "serve"], env=env)
        base = f"http://{settings.http_host}:{settings.http_port}"
        fhir = f"{base}/fhir"
        try:
            say("starting the hub (embedded PostgreSQL and Triton unless DATABASE_URL/TRITON_URL are set)")
            wait_ready(base, hub)
            say(f"hub ready at {fhir} after {time.monotonic() - started:.1f}s")
            api = register(env, base, data)

            # 1. FHIR: a HIS/EMR posts an ImagingStudy naming the PACS.
            ds = make_chest_xray(seed=int(time.time()) % 100_000)
            pacs.upload(dataset_bytes(ds))
            say(f"stored a {ds.Rows}x{ds.Columns} {ds.Modality} chest radiograph in the PACS")
            patient = post(api, f"{fhir}/Patient", {
                "resourceType": "Patient",
                "identifier": [{"system": "urn:interop-hub:demo:patient", "value": str(ds.PatientID)}],
                "gender": "unknown",
            })
            study = post(api, f"{fhir}/ImagingStudy", imaging_study(
                [ds], subject=f"Patient/{patient['id']}", endpoint_address=pacs.dicomweb_url))
            say(f"FHIR: posted ImagingStudy/{study['id']}")
            sent = time.monotonic()
            task = wait_task(api, fhir, study["id"])
            if task["status"] != "completed":
                say(f"analysis ended {task['status']}: {task.get('statusReason', {}).get('text')}")
                return 1
            say(f"report available {time.monotonic() - sent:.2f}s after the ImagingStudy was posted")
            report_ref = task["output"][0]["valueReference"]["reference"]
            show("FHIR ImagingStudy -> DiagnosticReport", report_bundle(api, fhir, report_ref))
            sign_as_radiologist(env, base, report_ref.split("/")[-1])
            signed = api.get(f"{fhir}/{report_ref}", timeout=10).json()
            say(f"the report is now {signed['status']}, signed by {signed['resultsInterpreter'][0]['display']}")

            # 2. HL7 v2: an integration engine sends an order, then "exam done" when the images are in.
            accession = f"DEMO{int(time.time()) % 1_000_000:06d}"
            second = make_chest_xray(seed=int(time.time()) % 100_000 + 1, accession=accession, patient_id="BN-DEMO-1")
            pacs.upload(dataset_bytes(second))
            client = MllpClient(settings.mllp_host, settings.mllp_port)
            for n, (status, control) in enumerate((("SC", "NW"), ("CM", "SC")), 1):
                message = demo_order(f"{accession}-{n}", status, control, accession, second.StudyInstanceUID, "BN-DEMO-1")
                answer = client.exchange(message, f"{accession}-{n}")
                say(f"HL7: ORM^O01 {control}/{status} acknowledged {answer.code.value}")
            order_sent = time.monotonic()
            ref = wait_report(api, fhir, {"identifier": f"urn:interop-hub:report|{second.StudyInstanceUID}/chest-xray"})
            say(f"report available {time.monotonic() - order_sent:.2f}s after the exam-done message")
            show("HL7 ORM^O01 -> DiagnosticReport", report_bundle(api, fhir, ref))
            if ris.received.wait(60):
                say("the RIS received the result as ORU^R01:")
                for line in ris.messages[0].split("\r"):
                    say("  " + line)
            else:
                say("no ORU^R01 reached the RIS in time")
                return 1

            # 3. DICOM: a modality pushes a study by C-STORE; the result comes back into the PACS as an SR.
            return push_by_c_store(settings, api, fhir, pacs.dicomweb_url)
        finally:
            hub.send_signal(signal.SIGTERM)
            try:
                hub.wait(60)
            except subprocess.TimeoutExpired:
                hub.kill()
            ris.close()
            say(f"stopped everything; demo took {time.monotonic() - started:.1f}s")
            if not keep:
                shutil.rmtree(data / "demo-pacs", ignore_errors=True)


def seed_analytics(settings: Settings, n: int) -> int:
    """`interop demo --seed-analytics N`: synthetic studies for the dashboard, then exit."""
    from interop.runtime.postgres import EmbeddedPostgres
    from interop.store import analytics, db

    from .synthetic import analytics as seed

    server = None
    url = settings.database_url
    if not url:
        server = EmbeddedPostgres(settings.data_dir / "postgres")
        url = server.start()
    try:
        db.migrate(url)
        with db.connect(url, autocommit=True) as conn:
            # One transaction: a run that fails writes nothing and leaves earlier studies as they were.
            written = seed.add(conn, n, sites_file=settings.sites_file, mappings_dir=settings.mappings_dir)
            analytics.refresh(conn)
            total = analytics.synthetic_count(conn)
        print(f"{written} synthetic studies added to the analytics schema ({total} in all; remove them with"
              f" `interop analytics clear-synthetic`); dashboard at"
              f" http://{settings.http_host}:{settings.http_port}/analytics/")
    finally:
        if server is not None:
            server.stop()
    return 0
