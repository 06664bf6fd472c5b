"""Triton Python-backend model: runs this folder's model.onnx, whatever its inputs and outputs.

The same file serves every reference model (chest_xray, mammography, brain_ct, brain_mr,
spine_xray): tensor names, dtypes and dims come from config.pbtxt, so each model folder stays
self-contained for Triton (a model folder cannot import from a sibling) while the code is one
file; tests/test_models.py checks that the copies are identical. A site's own model may ship any
model.py (or another backend) instead.

Execution route (config parameter `runtime`: auto | onnxruntime | torch; default auto):
- CPU instance: ONNX Runtime on the CPU;
- GPU instance: ONNX Runtime's CUDAExecutionProvider when the Triton container's Python has
  onnxruntime-gpu; otherwise, if PyTorch with CUDA is importable, the ONNX graph is run by a
  small PyTorch interpreter (`TorchGraph`, the operators the reference models use) on the GPU;
  otherwise ONNX Runtime on the CPU, with a warning in Triton's log.

Requests that Triton's dynamic batcher groups are stacked into one call; every request gets
exactly one response, and a failure becomes an error on the response (the stub process must
never die, or Triton unloads the model).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton (benchmarks, tests of TorchGraph)
    pb_utils = None


class TorchGraph:
    """Runs an ONNX graph with PyTorch ops, node by node (Conv, BatchNormalization, pools, Gemm, ...)."""

    def __init__(self, path: str | Path, device: str = "cuda") -> None:
        import onnx
        import torch
        from onnx import numpy_helper

        self.torch = torch
        self.device = torch.device(device)
        model = onnx.load(str(path))
        g = model.graph
        self.inputs = [i.name for i in g.input]
        self.outputs = [o.name for o in g.output]
        self.consts: dict[str, Any] = {}
        for init in g.initializer:
            array = numpy_helper.to_array(init)
            t = torch.from_numpy(array.copy())
            self.consts[init.name] = t if array.dtype == np.int64 else t.to(self.device)
        self.nodes = [(n.op_type, list(n.input), list(n.output),
                       {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}) for n in g.node]
        for op, *_ in self.nodes:
            if op not in self._OPS:
                raise NotImplementedError(f"TorchGraph: operator {op} is not supported")

    def __call__(self, feeds: dict[str, Any]) -> list[Any]:
        torch = self.torch
        env = dict(self.consts)
        for name, value in feeds.items():
            env[name] = value if isinstance(value, torch.Tensor) else \
                torch.from_numpy(np.ascontiguousarray(value)).to(self.device)
        with torch.inference_mode():
            for op, ins, outs, attrs in self.nodes:
                env[outs[0]] = self._OPS[op](self, [env[i] for i in ins], attrs)
        return [env[o] for o in self.outputs]

    def run_numpy(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [t.float().cpu().numpy() for t in self(feeds)]

    # -- operators ------------------------------------------------------------------------
    def _conv(self, x: list, a: dict) -> Any:
        F = self.torch.nn.functional
        k = len(a["kernel_shape"])
        pads = a.get("pads", [0] * 2 * k)
        fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[k]
        return fn(x[0], x[1], x[2] if len(x) > 2 else None, stride=a.get("strides", 1), padding=pads[:k],
                  dilation=a.get("dilations", 1), groups=a.get("group", 1))

    def _pool(self, kind: str) -> Callable:
        def pool(self: TorchGraph, x: list, a: dict) -> Any:
            F = self.torch.nn.functional
            k = len(a["kernel_shape"])
            pads = a.get("pads", [0] * 2 * k)[:k]
            if kind == "max":
                fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[k]
                return fn(x[0], a["kernel_shape"], a.get("strides", a["kernel_shape"]), pads,
                          ceil_mode=bool(a.get("ceil_mode", 0)))
            fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[k]
            return fn(x[0], a["kernel_shape"], a.get("strides", a["kernel_shape"]), pads,
                      ceil_mode=bool(a.get("ceil_mode", 0)), count_include_pad=bool(a.get("count_include_pad", 0)))
        return pool

    def _gather(self, x: list, a: dict) -> Any:
        axis = a.get("axis", 0)
        return x[0][(slice(None),) * axis + (x[1].to(x[0].device),)]

    def _gemm(self, x: list, a: dict) -> Any:
        A = x[0].T if a.get("transA", 0) else x[0]
        B = x[1].T if a.get("transB", 0) else x[1]
        y = a.get("alpha", 1.0) * (A @ B)
        return y + a.get("beta", 1.0) * x[2] if len(x) > 2 else y

    _OPS: dict[str, Callable] = {
        "Conv": _conv,
        "BatchNormalization": lambda s, x, a: s.torch.nn.functional.batch_norm(
            x[0], x[3], x[4], x[1], x[2], False, 0.0, a.get("epsilon", 1e-5)),
        "Relu": lambda s, x, a: s.torch.relu(x[0]),
        "Sigmoid": lambda s, x, a: s.torch.sigmoid(x[0]),
        "MaxPool": _pool(None, "max"),
        "AveragePool": _pool(None, "avg"),
        "GlobalAveragePool": lambda s, x, a: x[0].mean(dim=tuple(range(2, x[0].dim())), keepdim=True),
        "Flatten": lambda s, x, a: x[0].flatten(a.get("axis", 1)) if a.get("axis", 1) else x[0].reshape(1, -1),
        "Concat": lambda s, x, a: s.torch.cat(x, dim=a["axis"]),
        "Add": lambda s, x, a: x[0] + x[1],
        "Sub": lambda s, x, a: x[0] - x[1],
        "Mul": lambda s, x, a: x[0] * x[1],
        "MatMul": lambda s, x, a: x[0] @ x[1],
        "Gemm": _gemm,
        "Reshape": lambda s, x, a: x[0].reshape([int(v) for v in x[1].tolist()]),
        "Gather": _gather,
    }


class _OnnxRuntime:
    def __init__(self, path: Path, cuda_device: int | None) -> None:
        import onnxruntime as ort

        providers: list[object] = ["CPUExecutionProvider"]
        if cuda_device is not None:
            providers = [("CUDAExecutionProvider", {"device_id": cuda_device}), "CPUExecutionProvider"]
        options = ort.SessionOptions()
        # Triton shares the host's cores with the hub (retrieval, decode, PostgreSQL): threads that
        # spin-wait between operators burn the CPU those need; they sleep instead.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.description = f"onnxruntime {self.session.get_providers()}"

    def __call__(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        return self.session.run(outputs, feeds)


class _Torch:
    def __init__(self, path: Path, device: str) -> None:
        self.graph = TorchGraph(path, device)
        self.description = f"torch {self.graph.torch.__version__} on {device}"

    def __call__(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        by_name = dict(zip(self.graph.outputs, self.graph.run_numpy(feeds)))
        return [by_name[o] for o in outputs]


def _cuda_torch() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def choose_runtime(path: Path, requested: str, gpu_device: int | None) -> tuple[Any, str | None]:
    """The execution route for this instance, and a warning to log when it is not the best one."""
    if requested not in ("auto", "onnxruntime", "torch"):
        raise ValueError(f"parameter runtime must be auto, onnxruntime or torch, got {requested!r}")
    if gpu_device is None:
        if requested == "torch":
            return _Torch(path, "cpu"), None
        return _OnnxRuntime(path, None), None
    import onnxruntime as ort

    ort_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if requested in ("auto", "onnxruntime") and ort_cuda:
        return _OnnxRuntime(path, gpu_device), None
    if requested in ("auto", "torch") and _cuda_torch():
        return _Torch(path, f"cuda:{gpu_device}"), None
    return _OnnxRuntime(path, None), (
        "GPU instance but neither onnxruntime-gpu (CUDAExecutionProvider) nor PyTorch with CUDA is "
        "installed in Triton's Python: running on the CPU (pip install onnxruntime-gpu in the container)"
    )


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self._name = config.get("name", "model")
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        if not path.is_file():
            raise pb_utils.TritonModelException(
                f"{path} is missing: run `python scripts/build_reference_models.py` first"
            )
        self._inputs = [(i["name"], tuple(int(d) for d in i["dims"])) for i in config["input"]]
        self._outputs = [o["name"] for o in config["output"]]
        params = config.get("parameters") or {}
        requested = ((params.get("runtime") or {}).get("string_value") or "auto").strip().lower()
        gpu = int(args.get("model_instance_device_id", "0")) if args.get("model_instance_kind") == "GPU" else None
        self._run, warning = choose_runtime(path, requested, gpu)
        if warning:
            pb_utils.Logger.log_warn(f"{self._name}: {warning}")
        pb_utils.Logger.log_info(f"{self._name}: loaded {path.name} with {self._run.description}")

    def _read(self, request: Any) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        rows = None
        for name, dims in self._inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"input '{name}' is missing")
            array = np.asarray(tensor.as_numpy(), dtype=np.float32)
            if array.ndim != len(dims) + 1 or any(d != -1 and d != s for d, s in zip(dims, array.shape[1:])):
                raise ValueError(f"input '{name}' must be [N,{','.join(map(str, dims))}], got {list(array.shape)}")
            if not np.isfinite(array).all():
                raise ValueError(f"input '{name}' contains NaN or infinity")
            if rows is not None and array.shape[0] != rows:
                raise ValueError(f"inputs must have the same batch size, got {rows} and {array.shape[0]}")
            rows = array.shape[0]
            arrays[name] = array
        return arrays

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        batch: dict[str, list[np.ndarray]] = {name: [] for name, _ in self._inputs}
        owners: list[tuple[int, int, int]] = []  # (request index, start row, end row)
        row = 0
        for i, request in enumerate(requests):
            try:
                arrays = self._read(request)
            except Exception as exc:  # reported on this request's response; the others still run
                responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc)))
                continue
            for name, array in arrays.items():
                batch[name].append(array)
            n = next(iter(arrays.values())).shape[0]
            owners.append((i, row, row + n))
            row += n

        if owners:
            try:
                results = self._run({name: np.concatenate(parts, axis=0) for name, parts in batch.items()}, self._outputs)
                for i, start, end in owners:
                    tensors = [pb_utils.Tensor(name, np.ascontiguousarray(result[start:end], dtype=np.float32))
                               for name, result in zip(self._outputs, results)]
                    responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
            except Exception as exc:
                error = pb_utils.TritonError(f"{self._name} inference failed: {type(exc).__name__}: {exc}")
                for i, _start, _end in owners:
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=error)
        return responses

    def finalize(self) -> None:
        self._run = None
