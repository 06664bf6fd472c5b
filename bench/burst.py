"""A burst of chest studies, drained by the hub, against the chest model alone (issue 14, goal 1).

Starts everything real on loopback (Orthanc, embedded PostgreSQL, the bundled CPU Triton,
`interop serve` with its default workers), stores N distinct full-size synthetic chest
radiographs (2048², 16-bit, 8.4 MB) in Orthanc, then posts N ImagingStudies at once (a district
hospital back from an outage) and measures from the first POST to the last analysis done.

The reference, in the same run on the same machine: the same ONNX model (triton_repo/chest_xray)
called directly with ONNX Runtime, batch 1, preprocessed input already in memory: images/s.
The figure is the ratio hub studies/s ÷ model images/s.

    python bench/burst.py [--studies 40] [--size 2048] [--workers N]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

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


def model_alone(seconds: float = 8.0) -> float:
    """Images/s of the chest model called directly: ONNX Runtime on this CPU, batch 1, its defaults."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    image = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    for _ in range(5):
        session.run(None, {name: image})
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, {name: image})
        done += 1
    return done / (time.perf_counter() - start)


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


def run(count: int, size: int, workers: str | None) -> dict[str, Any]:
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

            start = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(post, studies[2:]))
            posted = time.perf_counter() - start
            elapsed = wait_done(pg.url, count + 2) - start
            with connect(pg.url) as conn:
                rows = conn.execute("SELECT timings FROM job WHERE kind = 'analyse-study' AND status = 'done'"
                                    " ORDER BY id OFFSET 2").fetchall()
            used = hub.env.get("INTEROP_WORKERS", "default")
        finally:
            stop_hub(hub)
    alone = model_alone()
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
        "ratio": round(rate / alone, 3),
        "worker_stage_median_s": {k: round(statistics.median(v), 4) for k, v in stages.items() if v},
        "worker_stage_p95_s": {k: round(pct(v, 0.95), 4) for k, v in stages.items() if v},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--workers", help="INTEROP_WORKERS for the hub (default: the hub's own default)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "burst.json")
    args = parser.parse_args()
    result = run(args.studies, args.size, args.workers)
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
