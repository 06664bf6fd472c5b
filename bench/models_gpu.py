#!/usr/bin/env python
"""Reference models on a GPU: items per second, called directly and through tritonserver.

For every model in triton_repo/ with a built model.onnx:
1. direct: the ONNX graph on the GPU, with ONNX Runtime's CUDAExecutionProvider when this
   Python's onnxruntime has it, else with the PyTorch interpreter that the models' own model.py
   uses on GPU instances (TorchGraph). Two figures per batch size: host to host (numpy in,
   numpy out, as the Python backend does it) and GPU-resident (tensors already on the GPU);
2. with --triton: the bundled tritonserver (nvidia-pytriton) on the same triton_repo, called
   over HTTP with binary tensors, 2 requests in flight, batch sizes up to max_batch_size.
Items are images (chest, spine), exams of four views (mammography) or volumes (brain CT/MR).

Usage (GPU machine): python bench/models_gpu.py [--repo triton_repo] [--triton] [--out figures.json]
Writes a Markdown table on stdout (for docs/BENCHMARKS.md) and the raw numbers to --out.
"""
from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
BATCHES = (1, 2, 4, 8, 16, 32)


def load_model_py(repo: Path):
    spec = importlib.util.spec_from_file_location("reference_model_py", repo / "chest_xray" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def onnx_inputs(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [(i.name, tuple(d.dim_value for d in i.type.tensor_type.shape.dim[1:])) for i in graph.input]


def feeds_for(inputs, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for name, dims in inputs:
        out[name] = (np.ones((batch, *dims), np.float32) if name == "present"
                     else rng.standard_normal((batch, *dims), dtype=np.float32))
    return out


def timed(fn, min_s: float = 1.0, min_iter: int = 5) -> float:
    """Median seconds per call after warm-up."""
    for _ in range(3):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_iter or time.perf_counter() - start < min_s:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if len(times) >= 200:
            break
    return statistics.median(times)


def direct(repo: Path, models: list[str], batches: tuple[int, ...]) -> dict:
    import onnxruntime as ort
    import torch

    torch.backends.cudnn.benchmark = True
    model_py = load_model_py(repo)
    ort_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    info = {"onnxruntime": ort.__version__, "ort_providers": ort.get_available_providers(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0),
            "route": "onnxruntime CUDAExecutionProvider" if ort_cuda else
                     "TorchGraph (PyTorch CUDA, fp32, cuDNN; TF32 convolutions allowed as PyTorch's default)"}
    print(f"direct route: {info['route']}; {info}", flush=True)
    results: dict = {"info": info, "models": {}}
    rng = np.random.default_rng(0)
    for name in models:
        path = repo / name / "1" / "model.onnx"
        inputs = onnx_inputs(path)
        if ort_cuda:
            sess = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
            host = lambda f: sess.run(None, f)  # noqa: E731
            graph = None
        else:
            graph = model_py.TorchGraph(path, "cuda")
            host = graph.run_numpy
        # check against ONNX Runtime on the CPU (the reference) on a small batch
        cpu = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        f = feeds_for(inputs, 2, rng)
        ref, got = cpu.run(None, f)[0], host(f)[0]
        rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        rows = {}
        for b in batches:
            f = feeds_for(inputs, b, rng)
            try:
                t_host = timed(lambda: host(f))
                t_gpu = None
                if graph is not None:
                    dev = {k: torch.from_numpy(v).cuda() for k, v in f.items()}

                    def on_gpu():
                        graph(dev)  # noqa: F821 (bound in the loop, called at once)
                        torch.cuda.synchronize()
                    t_gpu = timed(on_gpu)
            except torch.cuda.OutOfMemoryError:
                break
            rows[b] = {"host_items_s": b / t_host, "gpu_items_s": (b / t_gpu) if t_gpu else None}
            print(f"direct {name} b={b}: {rows[b]}", flush=True)
        results["models"][name] = {"rel_err_vs_cpu": rel, "batches": rows}
        del graph
        torch.cuda.empty_cache()
    return results


# -- Triton ------------------------------------------------------------------------------
def _infer(conn: http.client.HTTPConnection, model: str, feeds: dict[str, np.ndarray]) -> None:
    header = {"inputs": [{"name": n, "shape": list(a.shape), "datatype": "FP32",
                          "parameters": {"binary_data_size": a.nbytes}} for n, a in feeds.items()],
              "outputs": []}
    head = json.dumps(header).encode()
    conn.request("POST", f"/v2/models/{model}/infer", head + b"".join(a.tobytes() for a in feeds.values()),
                 {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"})
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError(f"{model}: HTTP {response.status}: {body[:300]!r}")


def _config(url: str, model: str) -> dict:
    conn = http.client.HTTPConnection(url, timeout=60)
    conn.request("GET", f"/v2/models/{model}/config")
    return json.loads(conn.getresponse().read())


def through_triton(repo: Path, models: list[str], batches: tuple[int, ...], log_dir: Path,
                   concurrency: int = 2, seconds: float = 2.0) -> dict:
    import importlib.util as iu

    import interop.runtime.triton as bundled
    from interop.runtime.triton import BundledTriton

    # Find the wheel's tritonserver without importing pytriton (its own Python dependencies are
    # not needed to run the server and may be absent on a GPU machine).
    spec = iu.find_spec("pytriton")
    if spec and spec.submodule_search_locations:
        root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
        bundled._pytriton_root = lambda: root  # type: ignore[attr-defined]

    # The Python backend stub links libpython; point the loader at this interpreter's library.
    import sysconfig
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH", "")) if p)
    results: dict = {"models": {}}
    rng = np.random.default_rng(1)
    with BundledTriton(repo, log_dir, models=tuple(models), ready_timeout_s=300, environ=os.environ) as server:
        log = (log_dir / "tritonserver.log").read_text(errors="replace")
        results["loaded_with"] = [line.split("] ", 1)[-1] for line in log.splitlines() if "loaded model.onnx with" in line]
        print("\n".join(results["loaded_with"]), flush=True)
        for name in models:
            cfg = _config(server.url, name)
            inputs = onnx_inputs(repo / name / "1" / "model.onnx")
            rows = {}
            for b in [b for b in batches if b <= int(cfg.get("max_batch_size", 1))]:
                feeds = feeds_for(inputs, b, rng)
                warm = http.client.HTTPConnection(server.url, timeout=300)
                for _ in range(3):
                    _infer(warm, name, feeds)
                warm.close()
                done = [0] * concurrency
                stop = time.perf_counter() + seconds

                def client(k: int) -> None:
                    conn = http.client.HTTPConnection(server.url, timeout=300)
                    while time.perf_counter() < stop:
                        _infer(conn, name, feeds)
                        done[k] += 1
                    conn.close()
                start = time.perf_counter()
                threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                elapsed = time.perf_counter() - start
                rows[b] = {"items_s": sum(done) * b / elapsed, "requests": sum(done)}
                print(f"triton {name} b={b}: {rows[b]}", flush=True)
            results["models"][name] = {"batches": rows}
    return results


def table(direct_r: dict, triton_r: dict | None) -> str:
    lines = ["| model | item | best direct, host→host (batch) | best direct, GPU-resident (batch)"
             " | best via Triton (batch) | Triton / direct host→host |",
             "|---|---|---|---|---|---|"]
    items = {"mammography": "exam (4 views)", "brain_ct": "volume", "brain_mr": "volume"}
    for name, r in direct_r["models"].items():
        rows = r["batches"]
        bh = max(rows, key=lambda b: rows[b]["host_items_s"])
        gpu = {b: v["gpu_items_s"] for b, v in rows.items() if v["gpu_items_s"]}
        bg = max(gpu, key=gpu.get) if gpu else None
        cell_t, ratio = "—", "—"
        if triton_r and name in triton_r["models"] and triton_r["models"][name]["batches"]:
            tr = triton_r["models"][name]["batches"]
            bt = max(tr, key=lambda b: tr[b]["items_s"])
            cell_t = f"{tr[bt]['items_s']:.0f} ({bt})"
            ratio = f"{tr[bt]['items_s'] / rows[bh]['host_items_s']:.2f}"
        lines.append(f"| {name} | {items.get(name, 'image')} | {rows[bh]['host_items_s']:.0f} ({bh}) | "
                     f"{(f'{gpu[bg]:.0f} ({bg})' if bg else '—')} | {cell_t} | {ratio} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=REPO_ROOT / "triton_repo")
    parser.add_argument("--models", default="chest_xray,mammography,brain_ct,brain_mr,spine_xray")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--triton", action="store_true", help="also measure through the bundled tritonserver")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--direct-json", type=Path, default=None,
                        help="reuse the direct figures of an earlier --out file instead of measuring them")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if (args.repo / m / "1" / "model.onnx").is_file()]
    batches = tuple(int(b) for b in args.batches.split(","))
    if args.direct_json:
        direct_r = json.loads(args.direct_json.read_text())["direct"]
        for r in direct_r["models"].values():
            r["batches"] = {int(b): v for b, v in r["batches"].items()}
    else:
        direct_r = direct(args.repo, models, batches)
    triton_r = None
    if args.triton:
        log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "bench_triton"
        try:
            triton_r = through_triton(args.repo, models, batches, log_dir)
        except Exception as exc:  # report what happened; the direct figures still count
            log = log_dir / "tritonserver.log"
            tail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
            triton_r = {"error": f"{type(exc).__name__}: {exc}", "log_tail": tail, "models": {}}
            print(f"Triton run failed: {triton_r['error']}\n{tail}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"direct": direct_r, "triton": triton_r}, indent=1, default=str))
    print(table(direct_r, triton_r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
