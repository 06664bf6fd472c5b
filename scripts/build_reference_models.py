#!/usr/bin/env python
"""Build the reference model weights that Triton serves, deterministically, without PyTorch.

The hub must run end to end on a laptop or a CI runner without downloading weights, so the
weights of every reference model are generated here as ONNX graphs written with onnx.helper,
with seeded random weights (architectures and input contracts: docs/MODELS.md):

| Triton model  | architecture                                            | input -> output                              |
|---------------|---------------------------------------------------------|----------------------------------------------|
| chest_xray    | DenseNet-121 (CheXNet layout)                           | image [N,3,224,224] -> probabilities [N,14]   |
| mammography   | ResNet-22 view trunk (Wu et al. 2019), CC+MLO per breast |
|               |   views [N,4,1,256,208] + present [N,4] -> breast_scores [N,2] |
| brain_ct      | 3D ResNet-10 (MedicalNet layout), 3 HU windows          | volume [N,3,32,128,128] -> probabilities [N,6] |
| brain_mr      | 3D ResNet-10, z-scored                                  | volume [N,1,32,128,128] -> probabilities [N,5] |
| spine_xray    | DenseNet-121                                            | image [N,3,224,224] -> probabilities [N,4]    |

These weights are NOT clinically validated. They exist so the whole pipeline (routing,
preprocessing, Triton, report building) can be exercised with real tensors of the real shapes;
each ONNX file says so in its doc_string and metadata_props, and the hub reports it.

To keep outputs useful for tests (varying with the input, never saturated at 0 or 1) each head
is set from data: the backbone is run once on a few deterministic synthetic inputs, the pooled
features are standardised with their mean and spread, and the last layer maps them to logits
around per-label priors with a small weight scale.

A model is skipped when its file is current (same build spec), and left alone when its
`config.pbtxt` does not declare `reference_model: "true"`: a site's own model dropped into
triton_repo/ under the same name is never overwritten.

Usage: python scripts/build_reference_models.py [--repo triton_repo] [--force] [--model NAME ...]
"""
from __future__ import annotations

import argparse
import hashlib
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference_models import brain, chest, mammography, spine
from reference_models.common import Reference, is_current

REPO_ROOT = Path(__file__).resolve().parent.parent
REFERENCES: dict[str, Reference] = {r.name: r for r in (
    chest.REFERENCE, mammography.REFERENCE, brain.CT, brain.MR, spine.REFERENCE,
)}
_REFERENCE_PARAM = re.compile(r'key:\s*"reference_model"\s*value:\s*\{\s*string_value:\s*"true"', re.S)


def is_site_model(model_dir: Path) -> bool:
    """True when the folder holds a config.pbtxt that does not declare reference_model "true"."""
    config = model_dir / "config.pbtxt"
    return config.is_file() and not _REFERENCE_PARAM.search(config.read_text(encoding="utf-8"))


RUNNER = Path(__file__).resolve().parent / "reference_models" / "triton_runner.py"


def install_runner(model_dir: Path) -> None:
    """Every reference model runs the same Python-backend code: one source, copied into each
    model folder (Triton loads a model folder on its own; it cannot import from a sibling)."""
    target = model_dir / "1" / "model.py"
    source = RUNNER.read_bytes()
    if not target.is_file() or target.read_bytes() != source:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source)


def build_one(ref: Reference, repo: Path, force: bool) -> str:
    path = repo / ref.name / "1" / "model.onnx"
    start = time.perf_counter()
    if is_site_model(repo / ref.name):
        return f"{repo / ref.name}: not a reference model (config.pbtxt lacks reference_model \"true\"), left alone"
    install_runner(repo / ref.name)
    if not force and is_current(path, ref.build_spec, ref.version):
        return f"{path}: current ({ref.version}, spec {ref.build_spec}), skipped in {time.perf_counter() - start:.2f} s"
    ref.build(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return (f"{path}: built {ref.version} in {time.perf_counter() - start:.1f} s "
            f"({path.stat().st_size / 1e6:.1f} MB, sha256 {digest[:16]})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=REPO_ROOT / "triton_repo", help="Triton model repository")
    parser.add_argument("--force", action="store_true", help="rebuild even if the file is current")
    parser.add_argument("--model", action="append", choices=sorted(REFERENCES), help="build only these (repeatable)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    for name in args.model or list(REFERENCES):
        print(build_one(REFERENCES[name], args.repo, args.force), flush=True)
    print(f"reference models: done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
