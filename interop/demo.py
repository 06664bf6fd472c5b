"""`interop demo` (what `make demo` runs): one real study through the hub on its embedded defaults.

Starts a PACS (Orthanc with DICOMweb), starts `interop serve`, stores a synthetic full-size
chest radiograph in the PACS, posts a FHIR ImagingStudy naming it, waits for the AI result,
prints the DiagnosticReport and its Observations as FHIR JSON, then stops all it started.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from typing import Any

import requests

from .config import Settings
from .dicom.study import imaging_study
from .dicom.synthetic import dataset_bytes, make_chest_xray
from .runtime.orthanc import Orthanc

FHIR_JSON = "application/fhir+json"


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


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    response = requests.post(url, data=json.dumps(body), headers={"Content-Type": FHIR_JSON}, timeout=30)
    if response.status_code not in (200, 201):
        raise RuntimeError(f"POST {url} -> {response.status_code}: {response.text}")
    return response.json()  # type: ignore[no-any-return]


def wait_task(fhir: str, study_id: str, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        bundle = requests.get(f"{fhir}/Task", params={"focus": f"ImagingStudy/{study_id}"}, timeout=10).json()
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


def run_demo(settings: Settings, keep: bool = False) -> int:
    data = settings.data_dir
    data.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with Orthanc(data / "demo-pacs") as pacs:
        say(f"PACS (Orthanc + DICOMweb) at {pacs.dicomweb_url}")
        env = dict(os.environ)
        env.update(replace(settings, dicomweb_url=pacs.dicomweb_url).as_env())
        hub = subprocess.Popen([sys.executable, "-m", "interop.cli", "serve"], env=env)
        base = f"http://{settings.http_host}:{settings.http_port}"
        fhir = f"{base}/fhir"
        try:
            say("starting the hub (embedded PostgreSQL and Triton unless DATABASE_URL/TRITON_URL are set)")
            wait_ready(base, hub)
            say(f"hub ready at {fhir} after {time.monotonic() - started:.1f}s")
            ds = make_chest_xray(seed=int(time.time()) % 100_000)
            pacs.upload(dataset_bytes(ds))
            say(f"stored a {ds.Rows}x{ds.Columns} {ds.Modality} chest radiograph in the PACS")
            patient = post(f"{fhir}/Patient", {
                "resourceType": "Patient",
                "identifier": [{"system": "urn:interop-hub:demo:patient", "value": str(ds.PatientID)}],
                "gender": "unknown",
            })
            study = post(f"{fhir}/ImagingStudy", imaging_study(
                [ds], subject=f"Patient/{patient['id']}", endpoint_address=pacs.dicomweb_url))
            say(f"posted ImagingStudy/{study['id']}")
            sent = time.monotonic()
            task = wait_task(fhir, study["id"])
            if task["status"] != "completed":
                say(f"analysis ended {task['status']}: {task.get('statusReason', {}).get('text')}")
                return 1
            report_ref = task["output"][0]["valueReference"]["reference"]
            bundle = requests.get(f"{fhir}/DiagnosticReport", timeout=10, params={
                "_id": report_ref.split("/")[1], "_include": "DiagnosticReport:result"}).json()
            say(f"report available {time.monotonic() - sent:.2f}s after the ImagingStudy was posted")
            print(json.dumps(bundle, indent=2, ensure_ascii=False))
            report = bundle["entry"][0]["resource"]
            say(f"{report['resourceType']}/{report['id']} status={report['status']}")
            for line in report["conclusion"].splitlines():
                say("  " + line)
            return 0
        finally:
            hub.send_signal(signal.SIGTERM)
            try:
                hub.wait(60)
            except subprocess.TimeoutExpired:
                hub.kill()
            say(f"stopped everything; demo took {time.monotonic() - started:.1f}s")
    if not keep:
        shutil.rmtree(data / "demo-pacs", ignore_errors=True)
