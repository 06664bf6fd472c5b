#!/usr/bin/env python
"""Build the reference model weights that Triton serves, deterministically, without PyTorch.

The hub must run end to end on a laptop or a CI runner without downloading weights, so the
weights of the reference chest X-ray classifier are generated here: a real DenseNet-121
(the CheXNet architecture: dense blocks 6/12/24/16, growth 32, bn_size 4, compression 0.5,
global average pool, linear 1024->14, sigmoid) with seeded random weights.

These weights are NOT clinically validated. They exist so the whole pipeline (routing,
preprocessing, Triton, report building) can be exercised with real tensors of the real shapes;
the ONNX file says so in its doc_string and metadata_props, and the hub reports it.

To keep outputs useful for tests (varying with the input, never saturated at 0 or 1) the head
is set from the data: the backbone is run once on a few deterministic synthetic images, the
pooled features are standardised with their mean and spread, and the linear layer maps them to
logits around per-label priors (ChestX-ray14 prevalences) with a small weight scale.

Usage: python scripts/build_reference_models.py [--repo triton_repo] [--force]
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO_ROOT = Path(__file__).resolve().parent.parent

MODEL_NAME = "chest_xray"
MODEL_VERSION = "0.1.0-reference"
SEED = 20240601
OPSET = 13
IR_VERSION = 8  # readable by the onnxruntime of older Triton containers too

BLOCKS = (6, 12, 24, 16)
GROWTH = 32
BN_SIZE = 4
INIT_FEATURES = 64
COMPRESSION = 0.5
BN_EPS = 1e-5

# ChestX-ray14 label order (Wang et al. 2017, as used by CheXNet) and the approximate
# prevalence of each finding in that data set; used only to centre the reference logits.
LABELS: tuple[tuple[str, float], ...] = (
    ("Atelectasis", 0.103),
    ("Cardiomegaly", 0.025),
    ("Effusion", 0.119),
    ("Infiltration", 0.177),
    ("Mass", 0.052),
    ("Nodule", 0.056),
    ("Pneumonia", 0.013),
    ("Pneumothorax", 0.047),
    ("Consolidation", 0.042),
    ("Edema", 0.021),
    ("Emphysema", 0.022),
    ("Fibrosis", 0.015),
    ("Pleural_Thickening", 0.030),
    ("Hernia", 0.002),
)
HEAD_SCALE = 0.6  # std of the logit around its prior over the calibration images
CALIBRATION_IMAGES = 12  # 8 radiograph-like, 4 noise: tests and smoke checks feed both

# Everything that changes the bytes; stored in the file so a rerun can tell whether it matches.
SPEC = (
    f"densenet121 blocks={BLOCKS} growth={GROWTH} bn_size={BN_SIZE} init={INIT_FEATURES} "
    f"compression={COMPRESSION} seed={SEED} opset={OPSET} ir={IR_VERSION} "
    f"head_scale={HEAD_SCALE} calib={CALIBRATION_IMAGES} version={MODEL_VERSION} "
    f"labels={[name for name, _ in LABELS]} builder=3"
)
SPEC_HASH = hashlib.sha256(SPEC.encode()).hexdigest()[:16]

DOC = (
    f"Reference DenseNet-121 chest X-ray classifier ({MODEL_VERSION}). Random seeded weights "
    "with a data-calibrated head: NOT clinically validated, not for diagnostic use. "
    "Input 'image' FP32 [N,3,224,224], ImageNet-normalised; output 'probabilities' FP32 [N,14] "
    "in ChestX-ray14 label order."
)


class _Graph:
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
        self.inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def conv(self, x: str, c_in: int, c_out: int, k: int, stride: int = 1, pad: int = 0) -> str:
        fan_in = c_in * k * k
        w = self.rng.standard_normal((c_out, c_in, k, k), dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        out = self.name("conv")
        self.nodes.append(helper.make_node(
            "Conv", [x, self.const("conv_w", w)], [out], name=out,
            kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4,
        ))
        return out

    def bn_relu(self, x: str, c: int) -> str:
        # Identity statistics: with He-initialised convolutions the activations keep an
        # order-one scale through the network; the head is standardised from data below.
        bn = self.name("bn")
        self.nodes.append(helper.make_node(
            "BatchNormalization",
            [x, self.const("bn_scale", np.ones(c)), self.const("bn_bias", np.zeros(c)),
             self.const("bn_mean", np.zeros(c)), self.const("bn_var", np.ones(c))],
            [bn], name=bn, epsilon=BN_EPS,
        ))
        out = self.name("relu")
        self.nodes.append(helper.make_node("Relu", [bn], [out], name=out))
        return out

    def op(self, op_type: str, inputs: list[str], **attrs: object) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def _backbone(g: _Graph) -> tuple[str, int]:
    """DenseNet-121 features up to the 1024-wide global average pool, as in torchvision."""
    x = g.conv("image", 3, INIT_FEATURES, 7, stride=2, pad=3)
    x = g.bn_relu(x, INIT_FEATURES)
    x = g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    channels = INIT_FEATURES
    for block, n_layers in enumerate(BLOCKS):
        features = [x]
        for _ in range(n_layers):
            cat = features[0] if len(features) == 1 else g.op("Concat", features, axis=1)
            y = g.bn_relu(cat, channels)
            y = g.conv(y, channels, BN_SIZE * GROWTH, 1)
            y = g.bn_relu(y, BN_SIZE * GROWTH)
            y = g.conv(y, BN_SIZE * GROWTH, GROWTH, 3, pad=1)
            features.append(y)
            channels += GROWTH
        x = g.op("Concat", features, axis=1)
        if block != len(BLOCKS) - 1:
            out_channels = int(channels * COMPRESSION)
            x = g.bn_relu(x, channels)
            x = g.conv(x, channels, out_channels, 1)
            x = g.op("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])
            channels = out_channels
    x = g.bn_relu(x, channels)
    x = g.op("GlobalAveragePool", [x])
    x = g.op("Flatten", [x], axis=1)
    return x, channels


def _model(g: _Graph, output: str, output_width: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        g.nodes, "densenet121_chest_xray_reference",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", output_width])],
        initializer=g.inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="interop-hub scripts/build_reference_models.py", producer_version=MODEL_VERSION,
        doc_string=DOC,
    )
    model.ir_version = IR_VERSION
    model.model_version = 1
    return model


def _calibration_images(n: int) -> np.ndarray:
    """Deterministic synthetic images: radiograph-like (lung fields, opacities) and plain noise."""
    rng = np.random.default_rng(SEED + 1)
    yy, xx = np.mgrid[0:224, 0:224].astype(np.float32) / 223.0
    images = []
    for _ in range(n):
        img = 0.2 + 0.3 * yy * rng.uniform(0.5, 1.5)
        for cx in (0.3, 0.7):  # two darker lung fields on a brighter background
            cx += rng.uniform(-0.05, 0.05)
            rx, ry = rng.uniform(0.12, 0.2), rng.uniform(0.25, 0.38)
            mask = ((xx - cx) / rx) ** 2 + ((yy - 0.5) / ry) ** 2 < 1.0
            img = np.where(mask, img - rng.uniform(0.1, 0.3), img)
        for _ in range(rng.integers(0, 4)):  # a few blobs standing in for opacities
            cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.02, 0.1)
            img = img + rng.uniform(0.1, 0.4) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        img = np.clip(img + rng.normal(0, 0.03, img.shape), 0.0, 1.0).astype(np.float32)
        images.append(img)
    n_noise = n // 3
    images[len(images) - n_noise:] = [
        rng.uniform(0.0, 1.0, (224, 224)).astype(np.float32) if i % 2 else
        np.clip(rng.normal(0.5, 0.25, (224, 224)), 0.0, 1.0).astype(np.float32)
        for i in range(n_noise)
    ]
    grey = np.stack(images)[:, None]
    mean = np.array([0.485, 0.456, 0.406], np.float32)[None, :, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[None, :, None, None]
    return ((np.repeat(grey, 3, axis=1) - mean) / std).astype(np.float32)


def _pooled_features(backbone: onnx.ModelProto, output: str, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # one thread: the same summation order, the same bytes
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(backbone.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run([output], {"image": images})[0].astype(np.float64)


def build(path: Path) -> None:
    rng = np.random.default_rng(SEED)
    g = _Graph(rng)
    features, width = _backbone(g)

    pooled = _pooled_features(_model(g, features, width), features, _calibration_images(CALIBRATION_IMAGES))
    # Round the statistics so tiny floating-point differences between CPUs do not change the bytes.
    mu = np.round(pooled.mean(axis=0), 4)
    sigma = np.round(pooled.std(axis=0), 4)
    sigma = np.maximum(sigma, max(float(np.median(sigma)), 1e-3))  # dead or constant features

    n_labels = len(LABELS)
    w = rng.standard_normal((n_labels, width)) / np.sqrt(width)  # w . z has unit spread
    priors = np.array([p for _, p in LABELS])
    prior_logit = np.log(priors / (1.0 - priors))
    weight = HEAD_SCALE * w / sigma[None, :]
    bias = prior_logit - weight @ mu
    logits = g.op("Gemm", [features, g.const("fc_w", weight), g.const("fc_b", bias)], transB=1)
    g.nodes.append(helper.make_node("Sigmoid", [logits], ["probabilities"], name="probabilities"))

    model = _model(g, "probabilities", n_labels)
    helper.set_model_props(model, {
        "name": MODEL_NAME,
        "version": MODEL_VERSION,
        "architecture": "DenseNet-121 (CheXNet layout)",
        "labels": ",".join(name for name, _ in LABELS),
        "clinical_validation": "not clinically validated; reference weights for testing only",
        "build_spec": SPEC_HASH,
    })
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".onnx.tmp")
    tmp.write_bytes(model.SerializeToString())
    tmp.replace(path)  # atomic: Triton never sees a half-written file


def is_current(path: Path) -> bool:
    """True when `path` was built by this script with the same spec (so a rerun can skip)."""
    if not path.is_file():
        return False
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # a truncated or foreign file is rebuilt, not trusted
        return False
    props = {p.key: p.value for p in model.metadata_props}
    return props.get("build_spec") == SPEC_HASH and props.get("version") == MODEL_VERSION


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=REPO_ROOT / "triton_repo", help="Triton model repository")
    parser.add_argument("--force", action="store_true", help="rebuild even if the file is current")
    args = parser.parse_args(argv)

    path = args.repo / MODEL_NAME / "1" / "model.onnx"
    start = time.perf_counter()
    if not args.force and is_current(path):
        print(f"{path}: current ({MODEL_VERSION}, spec {SPEC_HASH}), skipped in {time.perf_counter() - start:.2f} s")
        return 0
    build(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    print(f"{path}: built {MODEL_VERSION} in {time.perf_counter() - start:.1f} s "
          f"({path.stat().st_size / 1e6:.1f} MB, sha256 {digest[:16]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
