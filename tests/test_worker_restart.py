"""Crash safety of the queue: a worker killed mid-job leaves the job to another worker after its
lease runs out, and the study ends with exactly one report."""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from interop.store.db import connect
from tests.fixtures.hub import start_hub, stop_hub
from tests.helpers import chest_study_in_pacs, study_resource, wait_for


def job_row(db_url: str) -> dict[str, Any]:
    with connect(db_url) as conn:
        row = conn.execute("SELECT status, attempts, worker FROM job WHERE kind = %s", ("analyse-study",)).fetchone()
    assert row is not None
    return dict(row)


def test_killed_worker_job_completes_once(client: Any, db_url: str, triton_url: str, orthanc: Any,
                                          pacs_proxy: Any, tmp_path: Path) -> None:
    ds = chest_study_in_pacs(orthanc, seed=21)
    endpoint = f"http://127.0.0.1:{pacs_proxy.port}/dicom-web"
    pacs_proxy.hold()
    created = client.post("/fhir/ImagingStudy", json=study_resource([ds], "restart", endpoint))
    assert created.status_code == 201
    study_id = created.get_json()["id"]

    env = {"DATABASE_URL": db_url, "TRITON_URL": triton_url, "INTEROP_JOB_LEASE_SECONDS": "3"}
    first = start_hub(env, tmp_path, command="worker")
    assert pacs_proxy.held.wait(30), "the worker never reached the PACS"
    assert job_row(db_url)["status"] == "running"
    stop_hub(first, signal.SIGKILL)  # killed mid-retrieval: no chance to clean up
    pacs_proxy.release()

    (tmp_path / "second").mkdir()
    second = start_hub(env, tmp_path / "second", command="worker")
    try:
        wait_for(lambda: job_row(db_url)["status"] == "done", timeout=60, what="the job to complete")
    finally:
        stop_hub(second)
    row = job_row(db_url)
    assert row["attempts"] == 2
    reports = client.get("/fhir/DiagnosticReport?subject=Patient/restart").get_json()
    assert reports["total"] == 1
    assert reports["entry"][0]["resource"]["imagingStudy"] == [{"reference": f"ImagingStudy/{study_id}"}]
    task = client.get(f"/fhir/Task?focus=ImagingStudy/{study_id}").get_json()["entry"][0]["resource"]
    assert task["status"] == "completed"
