"""Spine X-ray (CR/DX; cervical, thoracic, lumbar): DenseNet-121 classifier, 4 findings.

DenseNet-121 rather than ResNet-50: the same backbone as the chest model (proven on radiographs,
one code path to maintain) at a quarter of ResNet-50's weights (28 MB against 100 MB).
Input 'image' FP32 [N,3,224,224] (greyscale repeated into 3 channels, ImageNet mean/std);
output 'probabilities' FP32 [N,4] (sigmoid, multi-label), in LABELS order.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import helper

from . import densenet
from .chest import imagenet
from .common import IR_VERSION, OPSET, Graph, Reference, calibrated_head, run, save, spec_hash

NAME = "spine_xray"
VERSION = "0.1.0-reference"
SEED = 20241104
# Label order and rough prevalences in radiograph series (used only to centre the logits).
LABELS: tuple[tuple[str, float], ...] = (
    ("vertebral_compression_fracture", 0.08),
    ("spondylolisthesis", 0.06),
    ("scoliosis", 0.10),
    ("spondylosis", 0.25),
)
HEAD_SCALE = 0.6
CALIBRATION_IMAGES = 12
SPEC = (f"{densenet.SPEC} seed={SEED} opset={OPSET} ir={IR_VERSION} head_scale={HEAD_SCALE} "
        f"calib={CALIBRATION_IMAGES} version={VERSION} labels={[n for n, _ in LABELS]} builder=1")
SPEC_HASH = spec_hash(SPEC)
GRAPH = "densenet121_spine_xray_reference"
DOC = (
    f"Reference DenseNet-121 spine radiograph classifier ({VERSION}). Random seeded weights with a "
    "data-calibrated head: NOT clinically validated, not for diagnostic use. Input 'image' FP32 "
    "[N,3,224,224], ImageNet-normalised; output 'probabilities' FP32 [N,4]: "
    + ", ".join(n for n, _ in LABELS) + "."
)


def calibration_images(n: int, seed: int = SEED + 1) -> np.ndarray:
    """Spine-radiograph-like images (a column of vertebral bodies, discs, curvature) and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:224, 0:224].astype(np.float32) / 223.0
    images = []
    for i in range(n):
        if i >= n - n // 3:
            images.append(rng.uniform(0.0, 1.0, (224, 224)).astype(np.float32))
            continue
        img = 0.15 + 0.25 * np.exp(-((xx - 0.5) / 0.3) ** 2)  # soft tissue
        curve, phase = rng.uniform(0.0, 0.08), rng.uniform(0, np.pi)  # scoliosis-like bend
        levels = int(rng.integers(5, 8))
        for k in range(levels):
            cy = 0.08 + (k + 0.5) * 0.84 / levels
            cx = 0.5 + curve * np.sin(np.pi * cy + phase) + rng.uniform(-0.01, 0.01)
            h = 0.84 / levels * (0.72 if rng.uniform() < 0.15 else 0.8)  # an occasional compressed body
            body = (np.abs(xx - cx) < rng.uniform(0.07, 0.1)) & (np.abs(yy - cy) < h / 2)
            img = np.where(body, img + rng.uniform(0.3, 0.45), img)
        img = np.clip(img + rng.normal(0, 0.03, img.shape), 0.0, 1.0).astype(np.float32)
        images.append(img)
    return imagenet(np.stack(images))


def build(path: Path) -> None:
    rng = np.random.default_rng(SEED)
    g = Graph(rng)
    features, width = densenet.backbone(g)
    inputs = [("image", ["N", 3, 224, 224])]
    pooled = run(g.model(GRAPH, inputs, [(features, ["N", width])], DOC, VERSION), features,
                 {"image": calibration_images(CALIBRATION_IMAGES)})
    weight, bias = calibrated_head(rng, pooled, [p for _, p in LABELS], HEAD_SCALE)
    logits = g.op("Gemm", [features, g.const("fc_w", weight), g.const("fc_b", bias)], transB=1)
    g.nodes.append(helper.make_node("Sigmoid", [logits], ["probabilities"], name="probabilities"))
    save(g.model(GRAPH, inputs, [("probabilities", ["N", len(LABELS)])], DOC, VERSION), path, {
        "name": NAME, "version": VERSION, "architecture": "DenseNet-121",
        "labels": ",".join(n for n, _ in LABELS), "build_spec": SPEC_HASH,
    })


REFERENCE = Reference(NAME, VERSION, SPEC_HASH, build)
