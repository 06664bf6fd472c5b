"""`interop triton-repo`: the reference models for Triton's ONNX Runtime backend (NVIDIA's
container on GPU nodes). Each written config is parsed as Triton parses it (its ModelConfig
protobuf) and must serve the same tensors as the ONNX graph and the Python-backend config."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from tests.helpers import ROOT

MODELS = ("brain_ct", "brain_mr", "chest_xray", "mammography", "spine_xray")


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("flags", [["--gpu", "--tensorrt"], []], ids=["gpu-tensorrt", "cpu"])
def test_every_model_is_written_for_the_onnxruntime_backend(tmp_path: Path, flags: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "interop.cli", "build-models"], cwd=ROOT, check=True, capture_output=True)
    out = tmp_path / "models"
    done = subprocess.run([sys.executable, "-m", "interop.cli", "triton-repo", "--out", str(out), *flags],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    assert "onnxruntime backend" in done.stdout
    for name in MODELS:
        config = parse(out / name / "config.pbtxt")
        original = parse(ROOT / "triton_repo" / name / "config.pbtxt")
        graph = onnx.load(str(out / name / "1" / "model.onnx"), load_external_data=False).graph
        assert config.platform == "onnxruntime_onnx" and config.backend == ""
        assert config.name == name and config.max_batch_size == original.max_batch_size > 0
        assert [i.name for i in config.input] == [i.name for i in graph.input] == [i.name for i in original.input]
        assert [o.name for o in config.output] == [o.name for o in graph.output]
        assert config.dynamic_batching == original.dynamic_batching
        assert "runtime" not in config.parameters
        assert config.parameters["model_version_label"].string_value == "0.1.0-reference"
        assert config.parameters["reference_model"].string_value == "true"
        [group] = config.instance_group
        assert group.kind == (model_config_pb2.ModelInstanceGroup.KIND_GPU if flags else
                              model_config_pb2.ModelInstanceGroup.KIND_CPU)
        accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
        assert [a.name for a in accelerators] == (["tensorrt"] if flags else [])
        if flags:
            assert accelerators[0].parameters["precision_mode"] == "FP16"
        assert (out / name / "1" / "model.onnx").read_bytes() == \
            (ROOT / "triton_repo" / name / "1" / "model.onnx").read_bytes()


def test_a_python_config_is_required(tmp_path: Path) -> None:
    from interop.runtime.model_repo import onnx_config

    with pytest.raises(ValueError, match="Python-backend"):
        onnx_config('name: "x"\nplatform: "onnxruntime_onnx"\n', gpu=True, tensorrt=False, instances=1, cache_dir="/c")
