"""Small helpers shared by tests: put a synthetic study in the PACS and describe it in FHIR."""
from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import Dataset

from interop.dicom.study import imaging_study
from interop.runtime.processes import free_port  # noqa: F401  (the tests' one way to a free port)
from scripts.synthetic.dicom import dataset_bytes, make_chest_xray


def chest_study_in_pacs(orthanc: Any, seed: int, **kwargs: Any) -> Dataset:
    ds = make_chest_xray(seed=seed, size=kwargs.pop("size", 1024), **kwargs)
    orthanc.upload(dataset_bytes(ds))
    return ds


def study_resource(datasets: list[Dataset], patient_id: str, endpoint: str | None) -> dict[str, Any]:
    return imaging_study(datasets, subject=f"Patient/{patient_id}", endpoint_address=endpoint)


def stop_process(proc: Any, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not ended within `timeout` (a peer the tests started)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(predicate: Callable[[], Any], timeout: float = 60, interval: float = 0.2, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


ROOT = Path(__file__).resolve().parent.parent  # the checkout
DATA = ROOT / "tests" / "data"  # public samples, with MANIFEST.txt per folder


# -- deliveries, as the tests look at them ------------------------------------------------------
def delivery_row(conn: Any, job_id: int) -> dict[str, Any]:
    """A delivery in the outbox's words (status pending/sending/sent/rejected/dead), with the
    message as sent under `payload`."""
    from interop.ops.admin import delivery_row as shown
    from interop.store import queue

    found = queue.job_row(conn, job_id)
    assert found is not None, f"no job {job_id}"
    return {**shown(found), "payload": found["message"]}


def time_passes(conn: Any) -> None:
    """Make every back-off due now and close every lane's breaker (instead of sleeping through them)."""
    conn.execute("UPDATE job SET run_after = now() WHERE status = 'queued'")
    conn.execute("UPDATE lane SET open_until = now() WHERE open_until > now()")


def drain(sender: Any, conn: Any, rounds: int = 20) -> int:
    """Run the delivery runner `sender` until nothing more is due, letting back-offs pass between
    tries (at most `rounds` deliveries): how many it sent."""
    sent = 0
    for _ in range(rounds):
        if not sender.run_once():
            time_passes(conn)
            if not sender.run_once():
                return sent
        sent += 1
    return sent


def new_report(conn: Any, sender: Any, rid: str, status: str = "preliminary") -> list[int]:
    """The test AI report stored as `rid` (its own identifier, with its observations) at `status`,
    and queued as the hub queues a new report version with no site: for the Subscriptions it
    matches. The queued delivery ids."""
    from interop.services import delivery
    from interop.store import resources
    from tests.test_oru import PARAMS, built_report

    built = built_report(critical=False, report_id=rid)
    built["report"]["status"] = status
    built["report"]["identifier"][0]["value"] += f"-{rid}"
    with conn.transaction():
        for body in built["observations"]:
            resources.create(conn, body, PARAMS["Observation"], rid=body["id"])
        report = resources.create(conn, built["report"], PARAMS["DiagnosticReport"], rid=rid)
        queued: list[int] = delivery.queue_report(conn, sender.ctx, report, None)
        return queued


def context(**env: str) -> Any:
    """The services' context for settings made of `env` (with this process's environment, for
    the secrets a sites file names)."""
    import os

    from interop.config import Settings
    from interop.services.context import Context

    return Context.from_settings(Settings.from_env({**os.environ, **env}))
