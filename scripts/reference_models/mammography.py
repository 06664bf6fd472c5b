"""Mammography: four-view exam model after Wu et al. 2019 (NYU, IEEE TMI 39:1184), breast-wise fusion.

A shared ResNet-22 trunk (Wu et al.'s: conv 7x7/2 with 16 filters, max-pool 3/3, five stages of
two BasicBlocks, 16-32-64-128-256 channels, global average pool) reads each view; per breast the
CC and MLO features are concatenated (a missing view is replaced by the other view of the same
breast, using the `present` flags), and a head shared by both breasts (linear 512->256, ReLU,
linear 256->1, sigmoid) gives one malignancy suspicion score per breast.

Inputs:  'views'   FP32 [N, 4, 1, 256, 208]: R-CC, L-CC, R-MLO, L-MLO; each view resized to
                   256x208 (height x width), flipped so the chest wall is on the left (the nipple
                   points right), z-scored per image; a missing view is all zeros;
         'present' FP32 [N, 4]: 1 where the view is there, 0 where missing (same order).
Output:  'breast_scores' FP32 [N, 2]: right, left. A breast with neither view has no meaningful
         score (the hub must not report it).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import helper

from .common import IR_VERSION, OPSET, Graph, Reference, basic_block, run, save, spec_hash, standardise

NAME = "mammography"
VERSION = "0.1.0-reference"
SEED = 20241103
VIEWS = ("R-CC", "L-CC", "R-MLO", "L-MLO")
HEIGHT, WIDTH = 256, 208
STEM = 16
STAGES = (16, 32, 64, 128, 256)
STRIDES = (1, 2, 2, 2, 2)
HIDDEN = 256
PRIOR = 0.08  # centre of the per-breast score (screening recall rate order of magnitude)
HEAD_SCALE = 0.8
CALIBRATION_EXAMS = 8  # 6 breast-like (two with a missing view), 2 noise
SPEC = (f"resnet22-wu2019 stem={STEM} stages={STAGES} strides={STRIDES} blocks=2 gamma=0.5 hidden={HIDDEN} "
        f"in=4x1x{HEIGHT}x{WIDTH} seed={SEED} opset={OPSET} ir={IR_VERSION} prior={PRIOR} "
        f"head_scale={HEAD_SCALE} calib={CALIBRATION_EXAMS} version={VERSION} builder=1")
SPEC_HASH = spec_hash(SPEC)
GRAPH = "resnet22_mammography_reference"
DOC = (
    f"Reference four-view mammography model ({VERSION}), ResNet-22 trunk shared by the views "
    "(Wu et al. 2019 layout) with breast-wise CC+MLO fusion. Random seeded weights with a "
    "data-calibrated head: NOT clinically validated, not for diagnostic use. Inputs 'views' FP32 "
    f"[N,4,1,{HEIGHT},{WIDTH}] in order R-CC, L-CC, R-MLO, L-MLO (per-image z-score, chest wall left, "
    "missing view = zeros) and 'present' FP32 [N,4]; output 'breast_scores' FP32 [N,2] (right, left "
    "malignancy suspicion, sigmoid)."
)


def zscore(image: np.ndarray) -> np.ndarray:
    v = image.astype(np.float64)
    return ((v - v.mean()) / max(v.std(), 1e-6)).astype(np.float32)


def calibration_exams(n: int, seed: int = SEED + 1) -> tuple[np.ndarray, np.ndarray]:
    """Breast-like exams (a half-ellipse of tissue against the chest wall, masses, texture) and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    yy, xx = yy / (HEIGHT - 1), xx / (WIDTH - 1)
    views = np.zeros((n, 4, 1, HEIGHT, WIDTH), np.float32)
    present = np.ones((n, 4), np.float32)
    for e in range(n):
        for v in range(4):
            if e >= n - n // 4:
                views[e, v, 0] = zscore(rng.uniform(0, 1, (HEIGHT, WIDTH)))
                continue
            ry, rx = rng.uniform(0.35, 0.48), rng.uniform(0.6, 0.95)
            breast = ((yy - 0.5) / ry) ** 2 + (xx / rx) ** 2 < 1.0
            img = np.where(breast, 0.35 + 0.25 * (1 - xx / rx), 0.0)
            for _ in range(int(rng.integers(3, 9))):  # fibroglandular texture and masses
                cx, cy, r = rng.uniform(0.05, 0.6), rng.uniform(0.25, 0.75), rng.uniform(0.01, 0.06)
                img = img + breast * rng.uniform(0.05, 0.3) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
            img = np.clip(img + breast * rng.normal(0, 0.02, img.shape), 0, 1)
            views[e, v, 0] = zscore(img)
        if e in (1, 3):  # a missing view: zeros, flag 0
            v = int(rng.integers(0, 4))
            views[e, v] = 0.0
            present[e, v] = 0.0
    return views, present


def _trunk(g: Graph, x: str) -> tuple[str, int]:
    x = g.bn_relu(g.conv(x, 1, STEM, 7, stride=2, pad=3), STEM)
    x = g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[3, 3])
    c_in = STEM
    for c_out, stride in zip(STAGES, STRIDES):
        x = basic_block(g, x, c_in, c_out, stride, dims=2)
        x = basic_block(g, x, c_out, c_out, 1, dims=2)
        c_in = c_out
    return g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1), c_in


def _fused(g: Graph) -> tuple[str, int]:
    """[N, 2 breasts, 2*width]: per breast [CC, MLO] features, a missing view replaced by the other."""
    flat = g.op("Reshape", ["views", g.const_i64("shape", [-1, 1, HEIGHT, WIDTH])])
    feats, width = _trunk(g, flat)
    per_view = g.op("Reshape", [feats, g.const_i64("shape", [-1, 4, width])])  # [N,4,W]
    pairs = g.const_i64("breast_views", [[0, 2], [1, 3]])  # right: R-CC, R-MLO; left: L-CC, L-MLO
    f = g.op("Gather", [per_view, pairs], axis=1)  # [N,2,2,W]
    p = g.op("Gather", [g.op("Reshape", ["present", g.const_i64("shape", [-1, 4, 1])]), pairs], axis=1)  # [N,2,2,1]
    swap = g.const_i64("swap", [1, 0])
    other = g.op("Gather", [f, swap], axis=2)
    # f' = p*f + (1-p)*other: the view itself when present, else the other view of the breast
    f = g.op("Add", [g.op("Mul", [p, f]), g.op("Mul", [g.op("Sub", [g.const("one", np.ones(1)), p]), other])])
    return g.op("Reshape", [f, g.const_i64("shape", [-1, 2, 2 * width])]), 2 * width


def build(path: Path) -> None:
    rng = np.random.default_rng(SEED)
    g = Graph(rng)
    fused, width = _fused(g)
    inputs = [("views", ["N", 4, 1, HEIGHT, WIDTH]), ("present", ["N", 4])]
    views, present = calibration_exams(CALIBRATION_EXAMS)
    feats = run(g.model(GRAPH, inputs, [(fused, ["N", 2, width])], DOC, VERSION), fused,
                {"views": views, "present": present}).reshape(-1, width)
    # Hidden layer: standardised features times a random projection, then ReLU; the last layer
    # is standardised again from the hidden activations, like the single-layer heads.
    mu, sigma = standardise(feats)
    w1 = rng.standard_normal((HIDDEN, width)) / np.sqrt(width) / sigma[None, :]
    b1 = -w1 @ mu + 0.5  # a positive offset keeps about 70 % of the units active
    hidden = np.maximum(feats @ w1.T + b1, 0.0)
    mu2, sigma2 = standardise(hidden)
    w2 = HEAD_SCALE * rng.standard_normal((1, HIDDEN)) / np.sqrt(HIDDEN) / sigma2[None, :]
    b2 = np.log(PRIOR / (1 - PRIOR)) - w2 @ mu2
    h = g.op("Relu", [g.op("Add", [g.op("MatMul", [fused, g.const("fc1_w", w1.T)]), g.const("fc1_b", b1)])])
    logit = g.op("Add", [g.op("MatMul", [h, g.const("fc2_w", w2.T)]), g.const("fc2_b", b2)])  # [N,2,1]
    logit = g.op("Reshape", [logit, g.const_i64("shape", [-1, 2])])
    g.nodes.append(helper.make_node("Sigmoid", [logit], ["breast_scores"], name="breast_scores"))
    save(g.model(GRAPH, inputs, [("breast_scores", ["N", 2])], DOC, VERSION), path, {
        "name": NAME, "version": VERSION,
        "architecture": "ResNet-22 view trunk (Wu et al. 2019) + breast-wise CC/MLO fusion",
        "labels": "right_breast_malignancy,left_breast_malignancy", "views": ",".join(VIEWS),
        "build_spec": SPEC_HASH,
    })


REFERENCE = Reference(NAME, VERSION, SPEC_HASH, build)
