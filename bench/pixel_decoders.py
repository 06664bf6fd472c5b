"""Decode speed of pydicom's pixel-data plugins on a full-size 2048x2048 12-bit radiograph.

For each compressed transfer syntax the hub must read, the synthetic chest radiograph is encoded
once (see `scripts.synthetic.dicom.compress`), then decoded with every installed plugin that
pydicom offers for that syntax: median of `--repeat` runs. A second figure shows whether the
plugin releases the GIL: `--threads` threads each decode their own copy at once; a speed-up
near the thread count means the decoder runs without the GIL. Prints a table and writes JSON.

    python bench/pixel_decoders.py [--size 2048] [--repeat 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydicom import uid  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.pixels import get_decoder, pixel_array  # noqa: E402

from scripts.synthetic.dicom import compress, make_chest_xray  # noqa: E402

SYNTAXES = (uid.RLELossless, uid.JPEGLosslessSV1, uid.JPEGLSLossless, uid.JPEGLSNearLossless,
            uid.JPEG2000Lossless, uid.JPEG2000, uid.JPEGBaseline8Bit)


def decode(ds: Dataset, plugin: str) -> None:
    pixel_array(ds, decoding_plugin=plugin)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pixel_decoders.json")
    args = parser.parse_args()

    original = make_chest_xray(11, size=args.size)
    rows = []
    for ts in SYNTAXES:
        try:
            encoded = compress(original, ts)
        except ValueError as exc:
            print(f"{ts.name}: no encoder ({exc})")
            continue
        for plugin in sorted(get_decoder(ts).available_plugins):
            try:
                decode(encoded, plugin)
            except Exception as exc:  # a plugin that cannot decode this variant: report and go on
                rows.append({"syntax": ts.name, "plugin": plugin, "error": type(exc).__name__})
                continue
            times = []
            for _ in range(args.repeat):
                began = time.perf_counter()
                decode(encoded, plugin)
                times.append(time.perf_counter() - began)
            single = statistics.median(times)
            with ThreadPoolExecutor(args.threads) as pool:
                began = time.perf_counter()
                list(pool.map(lambda _: decode(encoded, plugin), range(args.threads * 2)))
                threaded = time.perf_counter() - began
            speedup = single * args.threads * 2 / threaded
            rows.append({"syntax": ts.name, "plugin": plugin, "bytes": len(encoded.PixelData),
                         "median_ms": round(single * 1000, 1), "threads": args.threads,
                         "thread_speedup": round(speedup, 2)})
    print(f"{'transfer syntax':58} {'plugin':10} {'median ms':>9} {'x' + str(args.threads) + ' threads':>11}")
    for row in rows:
        if "error" in row:
            print(f"{row['syntax'][:58]:58} {row['plugin']:10} {'fails: ' + row['error']:>21}")
        else:
            print(f"{row['syntax'][:58]:58} {row['plugin']:10} {row['median_ms']:9.1f} {row['thread_speedup']:10.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                "platform": platform.platform()},
                                    "size": args.size, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
