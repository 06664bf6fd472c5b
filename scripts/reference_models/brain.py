"""Brain CT and MR: 3D ResNet-10 (Hara et al. 2018 / MedicalNet layout) on a resampled volume.

conv 7x7x7 stride 2 (64) -> max-pool 3/2 -> four stages of one BasicBlock (64, 128, 256, 512;
stride 1, 2, 2, 2; projection shortcuts, "type B") -> global average pool -> linear -> sigmoid.

Input 'volume' FP32 [N, C, 32, 128, 128] (depth = axial slices inferior to superior, height,
width), resampled from the chosen axial series:
- CT: C = 3 Hounsfield windows, each mapped to 0..1 with clipping: brain (centre 40, width 80),
  subdural (80, 200), bone (600, 2800);
- MR: C = 1, z-scored over the whole resampled volume.
Output 'probabilities' FP32 [N, K], sigmoid (multi-label), in the order of the model's LABELS.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import helper

from .common import IR_VERSION, OPSET, Graph, Reference, basic_block, calibrated_head, run, save, spec_hash

VERSION = "0.1.0-reference"
DEPTH, HEIGHT, WIDTH = 32, 128, 128
STAGES = (64, 128, 256, 512)
STRIDES = (1, 2, 2, 2)
STEM = 64
HEAD_SCALE = 0.6
CALIBRATION_VOLUMES = 6  # 4 head phantoms, 2 noise
CT_WINDOWS = ((40.0, 80.0), (80.0, 200.0), (600.0, 2800.0))  # (centre, width) HU

CT_LABELS: tuple[tuple[str, float], ...] = (
    ("intracranial_haemorrhage", 0.10),
    ("mass_lesion", 0.05),
    ("midline_shift", 0.05),
    ("infarct", 0.08),
    ("hydrocephalus", 0.04),
    ("skull_fracture", 0.03),
)
MR_LABELS = CT_LABELS[:5]


def _phantoms_hu(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Head-like HU volumes [D,H,W]: skull, brain, ventricles (size, shift), sometimes a bleed."""
    zz, yy, xx = np.meshgrid(np.linspace(-1, 1, DEPTH, dtype=np.float32), np.linspace(-1, 1, HEIGHT, dtype=np.float32),
                             np.linspace(-1, 1, WIDTH, dtype=np.float32), indexing="ij")
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(0.75, 0.9), rng.uniform(0.8, 0.95), rng.uniform(0.9, 1.1)
        r = (xx / a) ** 2 + (yy / b) ** 2 + (zz / c) ** 2
        hu = np.full(r.shape, -1000.0, np.float32)
        hu[r < 1.0] = rng.uniform(800, 1400)  # skull
        hu[r < 0.85] = rng.uniform(28, 40)  # brain
        shift, size = rng.uniform(-0.08, 0.08), rng.uniform(0.08, 0.2)
        for side in (-1, 1):  # lateral ventricles
            v = ((xx - shift - side * 0.15) / size) ** 2 + ((yy + 0.05) / (2.5 * size)) ** 2 + (zz / 0.5) ** 2
            hu[v < 1.0] = rng.uniform(2, 10)
        if rng.uniform() < 0.5:  # a hyperdense collection
            cx, cy, cz, rb = rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5), rng.uniform(0.08, 0.2)
            hu[((xx - cx) ** 2 + (yy - cy) ** 2 + (zz - cz) ** 2) < rb * rb] = rng.uniform(55, 85)
        out.append(hu + rng.normal(0, 4.0, hu.shape).astype(np.float32))
    return out


def ct_windows(hu: np.ndarray) -> np.ndarray:
    """[D,H,W] HU -> [3,D,H,W] in 0..1 (the assembly the hub does; kept here for calibration and tests)."""
    return np.stack([np.clip((hu - (c - w / 2)) / w, 0.0, 1.0) for c, w in CT_WINDOWS]).astype(np.float32)


def mr_zscore(volume: np.ndarray) -> np.ndarray:
    v = volume.astype(np.float64)
    return ((v - v.mean()) / max(v.std(), 1e-6)).astype(np.float32)[None]


def calibration_volumes(kind: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n_noise = n // 3
    heads = _phantoms_hu(n - n_noise, rng)
    vols = []
    for hu in heads:
        if kind == "ct":
            vols.append(ct_windows(hu))
        else:  # a T2-like contrast: CSF bright, brain grey, bone and air dark
            mr = np.select([hu < -500, hu > 500, hu < 15], [0.0, 0.1, 1.0], 0.55).astype(np.float32)
            vols.append(mr_zscore(mr + rng.normal(0, 0.03, mr.shape).astype(np.float32)))
    channels = 3 if kind == "ct" else 1
    for _ in range(n_noise):
        vols.append(rng.uniform(0, 1, (channels, DEPTH, HEIGHT, WIDTH)).astype(np.float32))
    return np.stack(vols)


def backbone(g: Graph, channels: int) -> tuple[str, int]:
    x = g.bn_relu(g.conv("volume", channels, STEM, 7, stride=2, pad=3, dims=3), STEM)
    x = g.op("MaxPool", [x], kernel_shape=[3, 3, 3], strides=[2, 2, 2], pads=[1] * 6)
    c_in = STEM
    for c_out, stride in zip(STAGES, STRIDES):
        x = basic_block(g, x, c_in, c_out, stride, dims=3)
        c_in = c_out
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1)
    return x, c_in


def _reference(name: str, kind: str, labels: tuple[tuple[str, float], ...], seed: int) -> Reference:
    channels = 3 if kind == "ct" else 1
    spec = (f"resnet10-3d stem={STEM} stages={STAGES} strides={STRIDES} gamma=0.5 in={channels}x{DEPTH}x{HEIGHT}x{WIDTH} "
            f"windows={CT_WINDOWS if kind == 'ct' else 'zscore'} seed={seed} opset={OPSET} ir={IR_VERSION} "
            f"head_scale={HEAD_SCALE} calib={CALIBRATION_VOLUMES} version={VERSION} "
            f"labels={[n for n, _ in labels]} builder=1")
    spec_h = spec_hash(spec)
    graph_name = f"resnet10_3d_{name}_reference"
    contract = ("3 HU windows (brain 40/80, subdural 80/200, bone 600/2800) each scaled to 0..1"
                if kind == "ct" else "1 channel z-scored over the volume")
    doc = (f"Reference 3D ResNet-10 {kind.upper()} head classifier ({VERSION}). Random seeded weights with a "
           f"data-calibrated head: NOT clinically validated, not for diagnostic use. Input 'volume' FP32 "
           f"[N,{channels},{DEPTH},{HEIGHT},{WIDTH}] (axial, inferior to superior; {contract}); output "
           f"'probabilities' FP32 [N,{len(labels)}]: " + ", ".join(n for n, _ in labels) + ".")

    def build(path: Path) -> None:
        rng = np.random.default_rng(seed)
        g = Graph(rng)
        features, width = backbone(g, channels)
        inputs = [("volume", ["N", channels, DEPTH, HEIGHT, WIDTH])]
        pooled = run(g.model(graph_name, inputs, [(features, ["N", width])], doc, VERSION), features,
                     {"volume": calibration_volumes(kind, CALIBRATION_VOLUMES, seed + 1)})
        weight, bias = calibrated_head(rng, pooled, [p for _, p in labels], HEAD_SCALE)
        logits = g.op("Gemm", [features, g.const("fc_w", weight), g.const("fc_b", bias)], transB=1)
        g.nodes.append(helper.make_node("Sigmoid", [logits], ["probabilities"], name="probabilities"))
        save(g.model(graph_name, inputs, [("probabilities", ["N", len(labels)])], doc, VERSION), path, {
            "name": name, "version": VERSION, "architecture": "3D ResNet-10 (MedicalNet layout)",
            "labels": ",".join(n for n, _ in labels), "build_spec": spec_h,
        })

    return Reference(name, VERSION, spec_h, build)


CT = _reference("brain_ct", "ct", CT_LABELS, 20241105)
MR = _reference("brain_mr", "mr", MR_LABELS, 20241106)
