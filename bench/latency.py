"""Latency from ImagingStudy POST to DiagnosticReport available, one study at a time.

Starts everything real on loopback (Orthanc, embedded PostgreSQL, bundled CPU Triton,
`interop serve` with one worker), stores N distinct full-size synthetic studies of one family
in the PACS, then posts one ImagingStudy at a time and polls its Task until the report exists.
Prints median/p95, studies per minute, the worker's stages (retrieval, decode/preprocess,
inference, report) and the share of the worker's time spent outside Triton, from the timings
each job records.

    python bench/latency.py [--family chest] [--studies 50] [--size 2048]
    python bench/latency.py --family all --studies 10
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from interop.dicom.study import imaging_study  # noqa: E402
from interop.runtime.postgres import EmbeddedPostgres  # noqa: E402
from interop.runtime.triton import BundledTriton  # noqa: E402
from interop.store.db import connect, migrate  # noqa: E402
from scripts.peers.orthanc import Orthanc  # noqa: E402
from scripts.synthetic import dicom as synthetic  # noqa: E402
from scripts.synthetic.dicom import dataset_bytes  # noqa: E402
from tests.fixtures.hub import start_hub, stop_hub  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


FAMILIES = {
    "chest": lambda seed, size: [synthetic.make_chest_xray(seed=seed, size=size)],
    "spine": lambda seed, size: [synthetic.make_spine_xray(seed)],
    "mammography": lambda seed, size: synthetic.make_mammography_exam(seed),
    "brain-ct": lambda seed, size: synthetic.make_ct_head_series(seed, slices=32, size=512),
    "brain-mr": lambda seed, size: synthetic.make_mr_brain_series(seed, slices=24, size=256),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--family", default="chest", choices=[*FAMILIES, "all"])
    parser.add_argument("--studies", type=int, default=50)
    parser.add_argument("--size", type=int, default=2048, help="pixel matrix of each chest radiograph")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    results = {}
    for family in (FAMILIES if args.family == "all" else [args.family]):
        results[family] = run(family, args.studies, args.size)
        print(json.dumps({family: results[family]}, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    name = "latency.json" if args.family == "chest" else f"latency-{args.family}.json"
    (args.out / name).write_text(json.dumps(results if args.family == "all" else results[args.family], indent=2))
    return 0


def run(family: str, count: int, size: int) -> dict[str, object]:

    work = Path(tempfile.mkdtemp(prefix="interop-bench-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    with Orthanc(work / "pacs") as pacs, EmbeddedPostgres(work / "pg") as pg, \
            BundledTriton(ROOT / "triton_repo", work / "triton", environ=os.environ) as triton:
        migrate(pg.url)
        hub = start_hub({"DATABASE_URL": pg.url, "TRITON_URL": triton.url, "DICOMWEB_URL": pacs.dicomweb_url,
                         "INTEROP_WORKERS": "1"}, work)
        try:
            studies = []
            for i in range(count + 2):
                datasets = FAMILIES[family](1000 + i, size)
                for ds in datasets:
                    pacs.upload(dataset_bytes(ds))
                studies.append(imaging_study(datasets, subject=f"Patient/bench-{i}", endpoint_address=pacs.dicomweb_url))
            session = hub.session  # a registered backend client (its tokens renewed as they expire)
            latencies = []
            for i, body in enumerate(studies):
                start = time.perf_counter()
                created = session.post(f"{hub.fhir}/ImagingStudy", json=body, timeout=30)
                created.raise_for_status()
                sid = created.json()["id"]
                while True:
                    found = session.get(f"{hub.fhir}/Task", params={"focus": f"ImagingStudy/{sid}"}, timeout=30).json()
                    if not found.get("entry"):
                        raise RuntimeError(f"no Task for study {i}: {created.status_code} {found}")
                    entry = found["entry"][0]
                    status = entry["resource"]["status"]
                    if status == "completed":
                        break
                    if status in ("failed", "rejected"):
                        raise RuntimeError(f"study {i} ended {status}")
                    time.sleep(0.01)
                if i >= 2:  # the first two warm the model and the connection pools
                    latencies.append(time.perf_counter() - start)
            with connect(pg.url) as conn:
                rows = conn.execute("SELECT timings FROM job WHERE status = 'done' ORDER BY id OFFSET 2").fetchall()
        finally:
            stop_hub(hub)
    stages = {k: [r["timings"].get(k, 0.0) for r in rows] for k in ("retrieve", "decode", "inference", "store", "total")}
    outside = [1 - inf / tot for inf, tot in zip(stages["inference"], stages["total"]) if tot]
    return {
        "what": f"ImagingStudy POST -> DiagnosticReport available, sequential, CPU Triton, {family}",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "studies": len(latencies),
        "latency_s": {"median": statistics.median(latencies), "p95": pct(latencies, 0.95),
                      "min": min(latencies), "max": max(latencies)},
        "studies_per_minute": 60 / statistics.mean(latencies),
        "worker_stage_median_s": {k: statistics.median(v) for k, v in stages.items()},
        "share_outside_triton": {"median": statistics.median(outside), "p95": pct(outside, 0.95)},
    }


if __name__ == "__main__":
    sys.exit(main())
