"""The model repository for NVIDIA's Triton container: the same models, served by Triton's own
ONNX Runtime backend instead of the Python backend (issue 14, goal 2).

`triton_repo/` serves every model through the Python backend, so that the bundled CPU
`tritonserver` (nvidia-pytriton, which has no other backend) can load it. On a GPU node that
costs a Python process, numpy copies and a hand-written runner per request. NVIDIA's container
ships the `onnxruntime` backend: this writes a repository of the same names, inputs, outputs,
batch sizes and dynamic batching, with `platform: "onnxruntime_onnx"`, GPU instances and,
when asked, the TensorRT execution provider (FP16, engines cached on the volume).

    interop triton-repo --out /models [--gpu] [--tensorrt] [--instances 2]
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

_BACKEND = re.compile(r'^backend:\s*"python"\s*$', re.MULTILINE)
_RUNTIME = re.compile(r'parameters:\s*\{\s*key:\s*"runtime"\s*value:\s*\{[^}]*\}\s*\}\s*', re.MULTILINE)
_COMMENT = re.compile(r"^#.*\n", re.MULTILINE)


def onnx_config(python_config: str, *, gpu: bool, tensorrt: bool, instances: int, cache_dir: str) -> str:
    """The config.pbtxt of one model for the ONNX Runtime backend, from its Python-backend one."""
    text = _COMMENT.sub("", python_config)
    if not _BACKEND.search(text):
        raise ValueError("expected a Python-backend config (backend: \"python\")")
    text = _BACKEND.sub('platform: "onnxruntime_onnx"', text)
    text = _RUNTIME.sub("", text)  # the Python runner's own choice of runtime
    kind = "KIND_GPU" if gpu else "KIND_CPU"
    text += f"\ninstance_group [ {{ count: {instances} kind: {kind} }} ]\n"
    if gpu and tensorrt:
        text += ("\noptimization { execution_accelerators { gpu_execution_accelerator: [ {\n"
                 '  name: "tensorrt"\n'
                 '  parameters { key: "precision_mode" value: "FP16" }\n'
                 '  parameters { key: "max_workspace_size_bytes" value: "4294967296" }\n'
                 '  parameters { key: "trt_engine_cache_enable" value: "1" }\n'
                 f'  parameters {{ key: "trt_engine_cache_path" value: "{cache_dir}" }}\n'
                 "} ] } }\n")
    if gpu:
        # input shapes are fixed per model: cuDNN's exhaustive search, paid once at load, picks the fastest
        text += '\nparameters { key: "cudnn_conv_algo_search" value: { string_value: "0" } }\n'
    return "# written by `interop triton-repo` from triton_repo/ (reference models: NOT clinically validated)\n" + text


def write_onnx_repo(source: Path, out: Path, *, gpu: bool = True, tensorrt: bool = False, instances: int = 1) -> list[str]:
    """Write the ONNX Runtime backend repository of every built model in `source` to `out`; their names."""
    written = []
    for config in sorted(source.glob("*/config.pbtxt")):
        model = config.parent
        weights = sorted(model.glob("[0-9]*/model.onnx"))
        if not weights:
            continue  # not built: `interop build-models` first
        target = out / model.name
        target.mkdir(parents=True, exist_ok=True)
        (target / "config.pbtxt").write_text(onnx_config(
            config.read_text(encoding="utf-8"), gpu=gpu, tensorrt=tensorrt, instances=instances,
            cache_dir=str(out / ".trt-cache" / model.name)), encoding="utf-8")
        for onnx in weights:
            version = target / onnx.parent.name
            version.mkdir(exist_ok=True)
            shutil.copyfile(onnx, version / "model.onnx")
        written.append(model.name)
    if not written:
        raise FileNotFoundError(f"no built model in {source}: run `interop build-models` first")
    return written
