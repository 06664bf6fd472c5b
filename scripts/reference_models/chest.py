"""Chest X-ray: DenseNet-121 (CheXNet layout: global average pool, linear 1024->14, sigmoid).

Input 'image' FP32 [N,3,224,224] (greyscale radiograph repeated into 3 channels, ImageNet
mean/std); output 'probabilities' FP32 [N,14] in ChestX-ray14 label order. The head is set from
data: the backbone is run on deterministic synthetic images, the pooled features standardised,
and the linear layer maps them to logits around per-label priors (ChestX-ray14 prevalences).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import helper

from . import densenet
from .common import IR_VERSION, NOT_VALIDATED, OPSET, Graph, Reference, calibrated_head, run, save, spec_hash

NAME = "chest_xray"
VERSION = "0.1.0-reference"
SEED = 20240601

# ChestX-ray14 label order (Wang et al. 2017, as used by CheXNet) and the approximate
# prevalence of each finding in that data set; used only to centre the reference logits.
LABELS: tuple[tuple[str, float], ...] = (
    ("Atelectasis", 0.103), ("Cardiomegaly", 0.025), ("Effusion", 0.119), ("Infiltration", 0.177),
    ("Mass", 0.052), ("Nodule", 0.056), ("Pneumonia", 0.013), ("Pneumothorax", 0.047),
    ("Consolidation", 0.042), ("Edema", 0.021), ("Emphysema", 0.022), ("Fibrosis", 0.015),
    ("Pleural_Thickening", 0.030), ("Hernia", 0.002),
)
HEAD_SCALE = 0.6  # std of the logit around its prior over the calibration images
CALIBRATION_IMAGES = 12  # 8 radiograph-like, 4 noise: tests and smoke checks feed both

# Unchanged from the first builder, so the bytes (and the skip on rerun) stay the same.
SPEC = (
    f"densenet121 blocks={densenet.BLOCKS} growth={densenet.GROWTH} bn_size={densenet.BN_SIZE} "
    f"init={densenet.INIT_FEATURES} compression={densenet.COMPRESSION} seed={SEED} opset={OPSET} "
    f"ir={IR_VERSION} head_scale={HEAD_SCALE} calib={CALIBRATION_IMAGES} version={VERSION} "
    f"labels={[name for name, _ in LABELS]} builder=3"
)
SPEC_HASH = spec_hash(SPEC)
GRAPH = "densenet121_chest_xray_reference"
DOC = (
    f"Reference DenseNet-121 chest X-ray classifier ({VERSION}). Random seeded weights "
    "with a data-calibrated head: NOT clinically validated, not for diagnostic use. "
    "Input 'image' FP32 [N,3,224,224], ImageNet-normalised; output 'probabilities' FP32 [N,14] "
    "in ChestX-ray14 label order."
)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)[None, :, None, None]
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)[None, :, None, None]


def imagenet(grey: np.ndarray) -> np.ndarray:
    """[N,H,W] in 0..1 -> [N,3,H,W] ImageNet-normalised."""
    return ((np.repeat(grey[:, None], 3, axis=1) - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def calibration_images(n: int) -> np.ndarray:
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
    model = g.model(GRAPH, inputs, [("probabilities", ["N", len(LABELS)])], DOC, VERSION)
    save(model, path, {
        "name": NAME, "version": VERSION, "architecture": "DenseNet-121 (CheXNet layout)",
        "labels": ",".join(name for name, _ in LABELS), "clinical_validation": NOT_VALIDATED,
        "build_spec": SPEC_HASH,
    })


REFERENCE = Reference(NAME, VERSION, SPEC_HASH, build)
