"""Crash safety (issue 10): orders over 8 connections while `interop serve` is killed with
SIGKILL three times. Every order the hub acknowledged is stored exactly once and processed
once, and no tritonserver outlives the supervisor that started it. (bench/crash_orders.py runs
the same with 10,000 orders.)"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil

from tests.fixtures.hub import HubProcess, start_hub, stop_hub
from tests.fixtures.mllp import Resender, orm
from tests.helpers import free_port
from tests.test_mllp import rows

ORDERS = 1200
KILLS = 3


def gone(group: int, timeout: float = 30) -> None:
    """Wait until no process of the killed supervisor's group is left (its children die with it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes of group {group} outlived their supervisor")


def test_acknowledged_orders_survive_three_kill_9(db_url: str, tmp_path: Path) -> None:
    ports = {"INTEROP_MLLP_PORT": str(free_port()), "INTEROP_HTTP_PORT": str(free_port()),
             "INTEROP_DICOM_PORT": str(free_port())}
    env = {"DATABASE_URL": db_url, "TRITON_URL": "", "INTEROP_TRITON_MODELS": "chest_xray",  # bundled: owned by serve
           "INTEROP_HTTP_WORKERS": "1", **ports}
    messages = [(f"K{n}", orm(f"K{n}", placer=f"PK{n}", filler=f"FK{n}", accession=f"AK{n}", patient_id=f"PK{n}"))
                for n in range(ORDERS)]
    sender = Resender(int(ports["INTEROP_MLLP_PORT"]), messages, connections=8, deadline_s=400)
    hubs: list[HubProcess] = [start_hub(env, tmp_path)]
    tritons = [int((tmp_path / "triton" / "tritonserver.pid").read_text().split()[0])]
    done = threading.Event()

    def killer() -> None:
        for k in range(KILLS):
            while len(sender.acked) < ORDERS * (k + 1) // (KILLS + 1) and not done.is_set():
                time.sleep(0.05)
            os.kill(hubs[-1].proc.pid, signal.SIGKILL)  # the supervisor: no chance to clean up
            hubs[-1].proc.wait(10)
            gone(hubs[-1].proc.pid)  # as an init system does, restart once the old processes are gone
            hubs.append(start_hub(env, tmp_path))
            tritons.append(int((tmp_path / "triton" / "tritonserver.pid").read_text().split()[0]))

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        acked = sender.run()
        done.set()
        thread.join(120)
    finally:
        stop_hub(hubs[-1])
    assert len(hubs) == KILLS + 1 and sender.resends > 0  # it was killed under load, and senders resent
    assert len(acked) == ORDERS
    stored = rows(db_url, "SELECT control_id, count(*) FROM hl7_message WHERE status <> 'rejected'"
                          " GROUP BY control_id HAVING count(*) > 1")
    assert stored == []  # no acknowledged order stored twice
    accepted = {r[0] for r in rows(db_url, "SELECT control_id FROM hl7_message WHERE status <> 'rejected'")}
    assert accepted == set(acked)  # and none lost
    jobs = rows(db_url, "SELECT count(*), count(DISTINCT payload->>'message') FROM job WHERE kind = 'process-hl7'")
    assert jobs == [(ORDERS, ORDERS)]  # each queued once
    for pid in tritons:  # no tritonserver outlived the supervisor that started it
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid
