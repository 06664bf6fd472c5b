"""A burst of chest studies, drained by the hub, against the chest model alone (issue 14, goal 1).

Starts everything real on loopback (Orthanc, embedded PostgreSQL, the bundled CPU Triton,
`interop serve` with its default workers), stores N distinct full-size synthetic chest
radiographs (2048², 16-bit, 8.4 MB) in Orthanc, then posts N ImagingStudies at once (a district
hospital back from an outage) and measures from the first POST to the last analysis done.

The reference, in the same run on the same machine: the same ONNX model (triton_repo/chest_xray)
called directly with ONNX Runtime, batch 1, preprocessed input already in memory: images/s,
measured just before and just after the burst (the mean of both). The figure is the ratio hub
studies/s ÷ model images/s. Because the machine is shared and its load changes, the CPU time
each side spends is also counted (every process of the hub, Triton, Orthanc and PostgreSQL per
study, against the model's per image): on a busy machine that ratio is the steadier one.

    python bench/burst.py [--studies 40] [--size 2048] [--workers N] [--profile DIR]

--profile DIR samples each analysis worker with py-spy during the burst (`pip install py-spy`)
and writes collapsed stacks there (DIR/worker-PID.txt), for flame graphs or `sort | head`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from interop.dicom.study import imaging_study  # noqa: E402
from interop.runtime.postgres import EmbeddedPostgres  # noqa: E402
from interop.runtime.triton import BundledTriton  # noqa: E402
from interop.store.db import connect, migrate  # noqa: E402
from scripts.peers.orthanc import Orthanc  # noqa: E402
from scripts.synthetic.dicom import dataset_bytes, make_chest_xray  # noqa: E402
from tests.fixtures.hub import start_hub, stop_hub  # noqa: E402

MODEL = ROOT / "triton_repo" / "chest_xray" / "1" / "model.onnx"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _label(proc: psutil.Process) -> str:
    """Which part of the system a process is: worker, api, deliver, triton, pacs, postgres, ..."""
    try:
        line = " ".join(proc.cmdline())
    except psutil.Error:
        return "gone"
    for needle, label in (("interop.cli worker", "worker"), ("gunicorn", "api"), ("interop.cli deliver", "deliver"),
                          ("interop.cli", "other hub"), ("triton", "triton"), ("stub", "triton"),
                          ("Orthanc", "pacs"), ("postgres", "postgres")):
        if needle in line:
            return label
    return "other"


def cpu_by_part(roots: list[int]) -> dict[str, float]:
    """CPU time (user + system, with reaped children) of these processes and all their descendants,
    by part (`_label`)."""
    parts: dict[str, float] = {}
    seen: set[int] = set()
    for root in roots:
        try:
            top = psutil.Process(root)
            family = [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in family:
            if proc.pid in seen:
                continue
            seen.add(proc.pid)
            try:
                t = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            label = _label(proc)
            parts[label] = parts.get(label, 0.0) + t.user + t.system + t.children_user + t.children_system
    return parts


def cpu_seconds(roots: list[int]) -> float:
    """CPU time (user + system, with reaped children) of these processes and all their descendants."""
    total, seen = 0.0, set()
    for root in roots:
        try:
            top = psutil.Process(root)
            family = [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in family:
            if proc.pid in seen:
                continue
            seen.add(proc.pid)
            try:
                t = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system + t.children_user + t.children_system
    return total


def model_alone(seconds: float = 8.0) -> tuple[float, float]:
    """Images/s of the chest model called directly (ONNX Runtime on this CPU, batch 1, its
    defaults), and CPU seconds per image."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    image = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    for _ in range(5):
        session.run(None, {name: image})
    done, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        session.run(None, {name: image})
        done += 1
    return done / (time.perf_counter() - start), (time.process_time() - cpu) / done


def wait_done(db_url: str, expected: int, timeout: float = 900) -> float:
    """Seconds until `expected` analyses are over (done or failed); the clock of the caller."""
    deadline = time.monotonic() + timeout
    with connect(db_url) as conn:
        while time.monotonic() < deadline:
            row = conn.execute("SELECT count(*) AS n, count(*) FILTER (WHERE status <> 'done') AS bad FROM job"
                               " WHERE kind = 'analyse-study' AND status IN ('done', 'failed', 'dead')").fetchone()
            assert row is not None
            if row["n"] >= expected:
                if row["bad"]:
                    raise RuntimeError(f"{row['bad']} analyses failed")
                return time.perf_counter()
            time.sleep(0.02)
    raise RuntimeError("the burst did not drain in time")


def profile_workers(directory: Path, seconds: int) -> list[subprocess.Popen[bytes]]:
    """py-spy on every `interop worker` process now running."""
    directory.mkdir(parents=True, exist_ok=True)
    pids = subprocess.run(["pgrep", "-f", "interop.cli worker"], capture_output=True, text=True).stdout.split()
    return [subprocess.Popen(["py-spy", "record", "--format", "raw", "--nonblocking", "-d", str(seconds),
                              "-o", str(directory / f"worker-{pid}.txt"), "-p", pid],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for pid in pids]


def run(count: int, size: int, workers: str | None, profile: Path | None = None) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="interop-burst-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    with Orthanc(work / "pacs") as pacs, EmbeddedPostgres(work / "pg") as pg, \
            BundledTriton(ROOT / "triton_repo", work / "triton", environ=os.environ) as triton:
        migrate(pg.url)
        studies = []
        for i in range(count + 2):
            ds = make_chest_xray(seed=5000 + i, size=size)
            pacs.upload(dataset_bytes(ds))
            studies.append(imaging_study([ds], subject=f"Patient/burst-{i}", endpoint_address=pacs.dicomweb_url))
        env = {"DATABASE_URL": pg.url, "TRITON_URL": triton.url, "DICOMWEB_URL": pacs.dicomweb_url}
        if workers:
            env["INTEROP_WORKERS"] = workers
        hub = start_hub(env, work)
        try:
            session = hub.session
            for body in studies[:2]:  # warm the model, the pools and the connections
                session.post(f"{hub.fhir}/ImagingStudy", json=body, timeout=60).raise_for_status()
            wait_done(pg.url, 2)
            time.sleep(1)

            def post(body: dict[str, Any]) -> None:
                session.post(f"{hub.fhir}/ImagingStudy", json=body, timeout=120).raise_for_status()

            spies = profile_workers(profile, 30) if profile else []
            before_rate, before_cpu = model_alone()
            postmaster = int(next((work / "pg").rglob("postmaster.pid")).read_text().split()[0])
            roots = [hub.proc.pid, triton._proc.pid, pacs._process.pid, postmaster]  # type: ignore[union-attr]
            cpu_start, parts_start = cpu_seconds(roots), cpu_by_part(roots)
            start = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(post, studies[2:]))
            posted = time.perf_counter() - start
            elapsed = wait_done(pg.url, count + 2) - start
            hub_cpu = (cpu_seconds(roots) - cpu_start) / count
            parts = {k: round((v - parts_start.get(k, 0.0)) / count, 4) for k, v in cpu_by_part(roots).items()}
            after_rate, after_cpu = model_alone()
            with connect(pg.url) as conn:
                rows = conn.execute("SELECT timings FROM job WHERE kind = 'analyse-study' AND status = 'done'"
                                    " ORDER BY id OFFSET 2").fetchall()
            used = hub.env.get("INTEROP_WORKERS", "default")
            stats = requests.get(f"http://{triton.url}/v2/models/chest_xray/stats", timeout=10).json()["model_stats"][0]
            for spy in spies:
                spy.send_signal(signal.SIGINT)
                spy.wait()
        finally:
            stop_hub(hub)
    alone, alone_cpu = (before_rate + after_rate) / 2, (before_cpu + after_cpu) / 2
    stages = {k: [r["timings"].get(k, 0.0) for r in rows] for k in ("retrieve", "decode", "inference", "store", "total")}
    rate = count / elapsed
    return {
        "what": f"{count} chest studies ({size}² DX) posted at once -> all analysed, CPU Triton",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "workers": used,
        "posted_in_s": round(posted, 3),
        "drained_in_s": round(elapsed, 3),
        "hub_studies_per_s": round(rate, 2),
        "model_alone_images_per_s": round(alone, 2),
        "model_alone_before_after": [round(before_rate, 2), round(after_rate, 2)],
        "ratio": round(rate / alone, 3),
        "hub_cpu_s_per_study": round(hub_cpu, 4),
        "model_cpu_s_per_image": round(alone_cpu, 4),
        "cpu_ratio": round(alone_cpu / hub_cpu, 3),
        "cpu_s_per_study_by_part": dict(sorted(parts.items(), key=lambda kv: -kv[1])),
        "triton_images_per_execution": round(stats["inference_count"] / max(1, stats["execution_count"]), 2),
        "triton_ms_per_execution": {k: round(v["ns"] / 1e6 / max(1, stats["execution_count"]), 2)
                                    for k, v in stats["inference_stats"].items() if k in (
                                        "queue", "compute_input", "compute_infer", "compute_output")},
        "worker_stage_median_s": {k: round(statistics.median(v), 4) for k, v in stages.items() if v},
        "worker_stage_p95_s": {k: round(pct(v, 0.95), 4) for k, v in stages.items() if v},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--workers", help="INTEROP_WORKERS for the hub (default: the hub's own default)")
    parser.add_argument("--profile", type=Path, help="sample the workers with py-spy into this directory")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "burst.json")
    args = parser.parse_args()
    result = run(args.studies, args.size, args.workers, args.profile)
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
