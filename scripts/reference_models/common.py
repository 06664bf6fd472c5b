"""Shared by every reference model: the ONNX graph builder, the calibrated head, writing and skipping.

Determinism: every weight comes from a seeded numpy Generator, drawn in a fixed order; ONNX
Runtime runs calibration on one thread (one summation order); statistics taken from data are
rounded before they enter the weights, so tiny floating-point differences between CPUs do not
change the bytes. A model file records a hash of everything that changes its bytes (`build_spec`)
so a rerun can skip it.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13
IR_VERSION = 8  # readable by the onnxruntime of older Triton containers too
BN_EPS = 1e-5
PRODUCER = "interop-hub scripts/build_reference_models.py"
NOT_VALIDATED = "not clinically validated; reference weights for testing only"


def spec_hash(spec: str) -> str:
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def _tuple(value: int | Sequence[int], dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * dims


class Graph:
    """Collects nodes and initializers while the network is laid out layer by layer."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n}"

    def const(self, prefix: str, value: np.ndarray) -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(value).astype(np.float32), name))
        return name

    def const_i64(self, prefix: str, value: Sequence[int] | np.ndarray) -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.int64), name))
        return name

    def conv(self, x: str, c_in: int, c_out: int, k: int | Sequence[int], stride: int | Sequence[int] = 1,
             pad: int | Sequence[int] = 0, dims: int = 2) -> str:
        """Convolution without bias (a BatchNormalization follows), He-initialised."""
        kernel, strides, pads = _tuple(k, dims), _tuple(stride, dims), _tuple(pad, dims)
        fan_in = c_in * int(np.prod(kernel))
        w = self.rng.standard_normal((c_out, c_in, *kernel), dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        out = self.name("conv")
        self.nodes.append(helper.make_node(
            "Conv", [x, self.const("conv_w", w)], [out], name=out,
            kernel_shape=list(kernel), strides=list(strides), pads=list(pads) * 2,
        ))
        return out

    def bn(self, x: str, c: int, gamma: float = 1.0) -> str:
        # Identity statistics: with He-initialised convolutions the activations keep an
        # order-one scale through the network; the head is standardised from data.
        bn = self.name("bn")
        self.nodes.append(helper.make_node(
            "BatchNormalization",
            [x, self.const("bn_scale", np.full(c, gamma)), self.const("bn_bias", np.zeros(c)),
             self.const("bn_mean", np.zeros(c)), self.const("bn_var", np.ones(c))],
            [bn], name=bn, epsilon=BN_EPS,
        ))
        return bn

    def bn_relu(self, x: str, c: int) -> str:
        bn = self.bn(x, c)
        out = self.name("relu")
        self.nodes.append(helper.make_node("Relu", [bn], [out], name=out))
        return out

    def op(self, op_type: str, inputs: list[str], **attrs: object) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def model(self, graph_name: str, inputs: Sequence[tuple[str, list]], outputs: Sequence[tuple[str, list]],
              doc: str, version: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, graph_name,
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in inputs],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in outputs],
            initializer=self.inits,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name=PRODUCER, producer_version=version, doc_string=doc,
        )
        model.ir_version = IR_VERSION
        model.model_version = 1
        return model


RESIDUAL_GAMMA = 0.5  # last BN of a residual branch: keeps the activations' scale through the stages


def basic_block(g: Graph, x: str, c_in: int, c_out: int, stride: int, dims: int) -> str:
    """ResNet BasicBlock (two 3x3(x3) convolutions, projection shortcut when the shape changes)."""
    y = g.bn_relu(g.conv(x, c_in, c_out, 3, stride, 1, dims), c_out)
    y = g.bn(g.conv(y, c_out, c_out, 3, 1, 1, dims), c_out, gamma=RESIDUAL_GAMMA)
    shortcut = x
    if stride != 1 or c_in != c_out:
        shortcut = g.bn(g.conv(x, c_in, c_out, 1, stride, 0, dims), c_out)
    return g.op("Relu", [g.op("Add", [y, shortcut])])


def run(model: onnx.ModelProto, output: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """One-thread ONNX Runtime run (the same summation order, the same bytes), as float64."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run([output], feeds)[0].astype(np.float64)


def standardise(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rounded mean and spread per feature; dead or constant features get the median spread."""
    mu = np.round(features.mean(axis=0), 4)
    sigma = np.round(features.std(axis=0), 4)
    return mu, np.maximum(sigma, max(float(np.median(sigma)), 1e-3))


def calibrated_head(rng: np.random.Generator, pooled: np.ndarray, priors: Sequence[float],
                    scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Linear layer mapping standardised features to logits around the priors, spread `scale`."""
    mu, sigma = standardise(pooled)
    width = pooled.shape[1]
    w = rng.standard_normal((len(priors), width)) / np.sqrt(width)  # w . z has unit spread
    p = np.asarray(priors, dtype=np.float64)
    weight = scale * w / sigma[None, :]
    bias = np.log(p / (1.0 - p)) - weight @ mu
    return weight, bias


def save(model: onnx.ModelProto, path: Path, props: dict[str, str]) -> None:
    if "clinical_validation" not in props:
        props = {**props, "clinical_validation": NOT_VALIDATED}
    helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".onnx.tmp")
    tmp.write_bytes(model.SerializeToString())
    tmp.replace(path)  # atomic: Triton never sees a half-written file


def is_current(path: Path, build_spec: str, version: str) -> bool:
    """True when `path` was built by this script with the same spec (so a rerun can skip)."""
    if not path.is_file():
        return False
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # a truncated or foreign file is rebuilt, not trusted
        return False
    props = {p.key: p.value for p in model.metadata_props}
    return props.get("build_spec") == build_spec and props.get("version") == version


@dataclass(frozen=True)
class Reference:
    """One reference model: its Triton name, version, spec hash and builder."""

    name: str
    version: str
    build_spec: str
    build: Callable[[Path], None]
