"""A database switchover, as CloudNativePG does one: every connection of the hub is cut at once
(pg_terminate_backend on each of them). The API answers the next requests from fresh
connections (the pool checks what it hands out) and the analysis worker reconnects and goes on
analysing, without a restart of either (issue 14)."""
from __future__ import annotations

from typing import Any

import psycopg

from interop.store import db
from tests.fixtures.hub import HubProcess
from tests.helpers import chest_study_in_pacs, study_resource, wait_for


def cut_every_connection(db_url: str) -> int:
    """Terminate every other session of the hub's database; how many were cut."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                            " WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchall()
    return len(rows)


def analysed(hub: HubProcess, study_id: str) -> bool:
    found = hub.session.get(f"{hub.fhir}/Task", params={"focus": f"ImagingStudy/{study_id}"}, timeout=10).json()
    return bool(found.get("entry")) and found["entry"][0]["resource"]["status"] == "completed"


def test_the_hub_survives_every_connection_being_cut(hub: HubProcess, orthanc: Any, db_url: str) -> None:
    first = chest_study_in_pacs(orthanc, seed=61, patient_id="SW-1")
    created = hub.session.post(f"{hub.fhir}/ImagingStudy", json=study_resource([first], "sw-1",
                                                                                orthanc.dicomweb_url), timeout=30)
    assert created.status_code == 201, created.text
    wait_for(lambda: analysed(hub, created.json()["id"]), timeout=90, what="the first study analysed")

    assert cut_every_connection(db_url) >= 3  # the API's pool, the worker, the listeners

    # the API: each request answered from a live connection, none a 500
    statuses = [hub.session.get(f"{hub.fhir}/ImagingStudy/{created.json()['id']}", timeout=10).status_code
                for _ in range(6)]
    assert set(statuses) <= {200, 503} and statuses[-1] == 200, statuses
    # the worker: reconnects and analyses a study posted after the cut
    second = chest_study_in_pacs(orthanc, seed=62, patient_id="SW-2")
    posted = wait_for(lambda: (r := hub.session.post(
        f"{hub.fhir}/ImagingStudy", json=study_resource([second], "sw-2", orthanc.dicomweb_url),
        timeout=30)).status_code == 201 and r, timeout=30, what="the second study accepted")
    wait_for(lambda: analysed(hub, posted.json()["id"]), timeout=90, what="the study posted after the cut analysed")
    assert hub.proc.poll() is None
    assert "database connection back" in hub.log_tail(200)


def test_readiness_can_leave_triton_out(db_url: str, tmp_path: Any) -> None:
    """Triton away: /readyz is 503 and says why; `?exclude=triton` (the API pods' readiness in
    deploy/k8s) is 200, since orders and studies are still accepted and their analyses wait."""
    from interop.app import create_app
    from interop.config import Settings
    from tests.helpers import free_port

    app = create_app(Settings.from_env({"DATABASE_URL": db_url, "TRITON_URL": f"127.0.0.1:{free_port()}",
                                        "INTEROP_DATA_DIR": str(tmp_path)}))
    try:
        client = app.test_client()
        whole = client.get("/readyz")
        assert whole.status_code == 503 and whole.get_json()["checks"]["database"] == "ok"
        assert whole.get_json()["checks"]["triton"] != "ok"
        api = client.get("/readyz?exclude=triton")
        assert api.status_code == 200 and "triton" not in api.get_json()["checks"]
    finally:
        app.extensions["interop"].close()


def test_worker_and_delivery_loops_touch_their_heartbeat(db_url: str, triton_url: str, tmp_path: Any) -> None:
    """INTEROP_HEARTBEAT_FILE: each turn of `interop worker`'s and `interop deliver`'s loop
    touches it (the liveness probe of deploy/k8s checks its age), idle or not."""
    import os
    import subprocess
    import sys
    import time

    from tests.helpers import stop_process, wait_for

    procs = []
    try:
        for command in ("worker", "deliver"):
            beat = tmp_path / f"{command}.beat"
            env = {**os.environ, "DATABASE_URL": db_url, "TRITON_URL": triton_url, "INTEROP_DATA_DIR": str(tmp_path),
                   "INTEROP_HEARTBEAT_FILE": str(beat)}
            procs.append((subprocess.Popen([sys.executable, "-m", "interop.cli", command], env=env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), beat))
        for proc, beat in procs:
            first = wait_for(lambda b=beat: b.exists() and b.stat().st_mtime, timeout=60, what=f"{beat.name} written")
            wait_for(lambda b=beat, t=first: b.stat().st_mtime > t, timeout=30, what=f"{beat.name} touched again")
            assert proc.poll() is None and time.time() - beat.stat().st_mtime < 30
    finally:
        for proc, _ in procs:
            stop_process(proc)


def test_the_pool_replaces_a_cut_connection_and_asks_a_live_one_nothing(db_url: str) -> None:
    def last_statement_at(pid: int) -> Any:
        with psycopg.connect(db_url, autocommit=True) as other:
            row = other.execute("SELECT query_start FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
        return row[0] if row else None

    with db.pool(db_url, min_size=1, max_size=1) as pool:
        with pool.connection() as conn:
            first = db.scalar(conn, "SELECT pg_backend_pid()")
        before = last_statement_at(first)
        with pool.connection() as conn:  # a live, idle connection: handed out without a round trip
            assert last_statement_at(first) == before
            assert db.scalar(conn, "SELECT pg_backend_pid()") == first

        with psycopg.connect(db_url, autocommit=True) as other:
            other.execute("SELECT pg_terminate_backend(%s)", (first,))
        wait_for(lambda: last_statement_at(first) is None, timeout=10, what="the backend to end")
        with pool.connection() as conn:  # the cut one is found out and replaced, not handed out
            assert db.scalar(conn, "SELECT pg_backend_pid()") != first
