"""Peak memory of CT volume assembly: 300 slices of 512x512 streamed through `build_volume`.

Each mode runs in a fresh process and reports its peak RSS above the process's baseline (numpy,
pydicom and the hub imported, nothing built):

* stream   - slices made one at a time by a generator, consumed by build_volume (the worker's way
             with `retrieve_series`): only the resized float32 slices are kept;
* list     - every dataset made first and held in a list, then build_volume (what streaming avoids);
* naive    - list of datasets, then `np.stack([ds.pixel_array ...])` to float32 HU (the usual script).

    python bench/volume_memory.py [--slices 300] [--size 512] [--out-size 256] [--depth 64]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(mode: str, slices: int, size: int, out_size: int, depth: int) -> dict[str, float]:
    import numpy as np

    from interop.dicom.volume import VolumeSpec, build_volume
    from scripts.synthetic.dicom import iter_ct_head_series

    spec = VolumeSpec(depth=depth, height=out_size, width=out_size)
    list(iter_ct_head_series(0, slices=2, size=size))  # warm imports and caches
    base = peak_mib()
    series = iter_ct_head_series(1, slices=slices, size=size, thickness=1.0)
    if mode == "stream":
        volume = build_volume(series, spec)
    elif mode == "list":
        volume = build_volume(list(series), spec)
    else:
        datasets = list(series)
        volume = np.stack([ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                           for ds in datasets])
    return {"mode": mode, "baseline_mib": round(base, 1), "peak_above_baseline_mib": round(peak_mib() - base, 1),
            "output_mib": round(volume.nbytes / 2**20, 1),
            "raw_series_mib": round(slices * size * size * 2 / 2**20, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--out-size", type=int, default=256)
    parser.add_argument("--depth", type=int, default=64)
    parser.add_argument("--child")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "volume_memory.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.slices, args.size, args.out_size, args.depth)))
        return 0
    rows = []
    for mode in ("stream", "list", "naive"):
        done = subprocess.run([sys.executable, __file__, "--child", mode, "--slices", str(args.slices), "--size",
                               str(args.size), "--out-size", str(args.out_size), "--depth", str(args.depth)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"slices": args.slices, "size": args.size, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
