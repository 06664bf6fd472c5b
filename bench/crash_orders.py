#!/usr/bin/env python3
"""Crash safety at scale (issue 10): 10,000 HL7 orders over 8 connections while `interop serve`
is killed with SIGKILL three times; each sender resends what was not acknowledged, as
integration engines do. Not part of `make test` (tests/test_crash.py runs 1,200).

    python bench/crash_orders.py [--orders 10000] [--connections 8] [--kills 3] [--write]

Passes when every acknowledged order is stored exactly once and queued exactly once, and no
tritonserver outlives the supervisor that started it.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import append_to_benchmarks  # noqa: E402
from interop.runtime.postgres import EmbeddedPostgres  # noqa: E402
from interop.runtime.processes import free_port  # noqa: E402
from interop.store import db  # noqa: E402
from tests.fixtures.hub import HubProcess, start_hub, stop_hub  # noqa: E402
from tests.fixtures.mllp import Resender, orm  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--orders", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="append the figures to docs/BENCHMARKS.md")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="crash-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    server = EmbeddedPostgres(work / "pg")
    url = server.start()
    db.migrate(url)
    ports = {"INTEROP_MLLP_PORT": str(free_port()), "INTEROP_HTTP_PORT": str(free_port()),
             "INTEROP_DICOM_PORT": str(free_port())}
    env = {"DATABASE_URL": url, "TRITON_URL": "", "INTEROP_TRITON_MODELS": "chest_xray", **ports}
    messages = [(f"C{n}", orm(f"C{n}", placer=f"PC{n}", filler=f"FC{n}", accession=f"AC{n}", patient_id=f"PC{n}"))
                for n in range(args.orders)]
    sender = Resender(int(ports["INTEROP_MLLP_PORT"]), messages, connections=args.connections, deadline_s=1800)
    hubs: list[HubProcess] = [start_hub(env, work)]
    tritons = [int((work / "triton" / "tritonserver.pid").read_text().split()[0])]
    restarts: list[float] = []

    def killer() -> None:
        for k in range(args.kills):
            while len(sender.acked) < args.orders * (k + 1) // (args.kills + 1):
                time.sleep(0.05)
            os.kill(hubs[-1].proc.pid, signal.SIGKILL)
            hubs[-1].proc.wait(10)
            began = time.monotonic()
            while True:  # restart once the killed supervisor's processes are gone
                try:
                    os.killpg(hubs[-1].proc.pid, 0)
                    time.sleep(0.1)
                except ProcessLookupError:
                    break
            hubs.append(start_hub(env, work))
            restarts.append(round(time.monotonic() - began, 1))
            tritons.append(int((work / "triton" / "tritonserver.pid").read_text().split()[0]))

    thread = threading.Thread(target=killer, daemon=True)
    started = time.perf_counter()
    thread.start()
    try:
        acked = sender.run()
        elapsed = time.perf_counter() - started
        thread.join(300)
    finally:
        stop_hub(hubs[-1])
    with db.connect(url) as conn:
        twice = conn.execute("SELECT count(*) AS n FROM (SELECT control_id FROM hl7_message WHERE status <> 'rejected'"
                             " GROUP BY control_id HAVING count(*) > 1) t").fetchone()["n"]
        stored = {r["control_id"] for r in conn.execute(
            "SELECT control_id FROM hl7_message WHERE status <> 'rejected'").fetchall()}
        jobs = conn.execute("SELECT count(*) AS n, count(DISTINCT payload->>'message') AS d FROM job"
                            " WHERE kind = 'process-hl7'").fetchone()
    server.stop()
    orphans = [pid for pid in tritons if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    result = {"orders": args.orders, "connections": args.connections, "kills": len(hubs) - 1,
              "acknowledged": len(acked), "resends": sender.resends, "stored_twice": twice,
              "acknowledged_but_not_stored": len(set(acked) - stored), "jobs": jobs["n"], "distinct_jobs": jobs["d"],
              "orphaned_tritons": len(orphans), "restart_seconds": restarts, "seconds": round(elapsed, 1)}
    passed = (result["acknowledged"] == args.orders and twice == 0 and not result["acknowledged_but_not_stored"]
              and jobs["n"] == jobs["d"] == len(stored) and not orphans)
    print(json.dumps({**result, "passed": passed}, indent=2))
    if args.write:
        append_to_benchmarks(f"\n## Crash safety (issue 10)\n\n`python bench/crash_orders.py` on {os.cpu_count()} CPUs,"
                             f" {time.strftime('%Y-%m-%d')}: {args.orders:,} ORM^O01 over {args.connections} connections,"
                             f" `interop serve` killed with SIGKILL {result['kills']} times (restarted in"
                             f" {', '.join(f'{s} s' for s in restarts)}); {result['acknowledged']:,} acknowledged after"
                             f" {result['resends']:,} resends, {twice} stored twice, {result['acknowledged_but_not_stored']}"
                             f" lost, {jobs['n']:,} jobs for {len(stored):,} messages, {len(orphans)} orphaned"
                             f" tritonserver; {result['seconds']} s in all.\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
