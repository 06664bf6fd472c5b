"""Every reference model: loads in the bundled Triton, right shapes, outputs vary and stay in (0,1);
descriptions match the Triton configs; routing for every family; the build is deterministic."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from inference_client.models import check_against_triton, load_models
from inference_client.routing import StudyFacts, load_rules, route
from inference_client.triton import InferenceFailed, TritonClient
from tests.helpers import ROOT as REPO_ROOT

MAPPINGS = REPO_ROOT / "mappings"
TRITON_REPO = REPO_ROOT / "triton_repo"
sys.path.insert(0, str(REPO_ROOT / "scripts"))
from reference_models import brain, mammography, spine  # noqa: E402

MODELS = load_models(MAPPINGS)


def inputs_for(name: str, seed: int) -> dict[str, np.ndarray]:
    """Two rows of valid, different inputs, assembled as the description says."""
    if name == "mammography":
        views, present = mammography.calibration_exams(4, seed=seed)
        return {"views": views[:2], "present": present[:2]}
    if name == "brain-ct":
        return {"volume": brain.calibration_volumes("ct", 3, seed)[:2]}
    if name == "brain-mr":
        return {"volume": brain.calibration_volumes("mr", 3, seed)[:2]}
    return {"image": spine.calibration_images(3, seed=seed)[:2]}


@pytest.fixture(scope="module")
def client(triton_url: str):
    with TritonClient(triton_url, timeout_s=120) as c:
        yield c


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_infers_with_the_described_shapes(client: TritonClient, name: str) -> None:
    model = MODELS[name]
    assert client.model_ready(model.triton_model)
    feeds = inputs_for(name, 11)
    out = client.infer(model.triton_model, feeds, [model.output])[model.output]
    assert out.shape == (2, len(model.labels)) and out.dtype == np.float32
    assert np.all((out > 0.0) & (out < 1.0)), out
    assert np.abs(out[0] - out[1]).max() > 1e-4, "different inputs must give different outputs"
    again = client.infer(model.triton_model, {k: v[:1] for k, v in feeds.items()}, [model.output])[model.output]
    np.testing.assert_allclose(again[0], out[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_description_matches_triton_config(client: TritonClient, name: str) -> None:
    assert check_against_triton(MODELS[name], client) == []


def test_check_against_triton_reports_differences(client: TritonClient) -> None:
    from dataclasses import replace

    ct = MODELS["brain-ct"]
    wrong = replace(ct, input=replace(ct.input, shape=(1, 32, 128, 128)), labels=ct.labels[:5], output_shape=(5,))
    problems = check_against_triton(wrong, client)
    assert any("input 'volume'" in p for p in problems) and any("output 'probabilities'" in p for p in problems)


def test_missing_mammography_input_fails_the_request(client: TritonClient) -> None:
    feeds = inputs_for("mammography", 3)
    with pytest.raises(InferenceFailed):
        client.infer("mammography", {"views": feeds["views"]}, ["breast_scores"])
    assert client.model_ready("mammography")


def test_mammography_missing_view_uses_the_other_view() -> None:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(TRITON_REPO / "mammography" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    views, present = mammography.calibration_exams(2, seed=5)
    full = sess.run(None, {"views": views[:1], "present": present[:1] * 0 + 1})[0]
    views2, present2 = views[:1].copy(), np.ones((1, 4), np.float32)
    views2[0, 2] = 0.0  # R-MLO missing
    present2[0, 2] = 0.0
    partial = sess.run(None, {"views": views2, "present": present2})[0]
    assert np.all((partial > 0) & (partial < 1))
    np.testing.assert_allclose(partial[0, 1], full[0, 1], rtol=1e-5)  # left breast unchanged


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (StudyFacts(modality="MG", body_part="BREAST", laterality="L", view_position="CC"), ["mammography"]),
        (StudyFacts(modality="MG", procedure_codes=("24606-6",)), ["mammography"]),
        (StudyFacts(modality="CT", body_part="BRAIN"), ["brain-ct"]),
        (StudyFacts(modality="CT", procedure_codes=("24725-4",)), ["brain-ct"]),
        (StudyFacts(modality="MR", body_part="HEAD"), ["brain-mr"]),
        (StudyFacts(modality="MR", procedure_codes=("24590-2",)), ["brain-mr"]),
        (StudyFacts(modality="DX", body_part="LSPINE"), ["spine-xray"]),
        (StudyFacts(modality="CR", body_part="cspine"), ["spine-xray"]),
        (StudyFacts(modality="CT", body_part="LSPINE"), []),
        (StudyFacts(modality="MR", body_part="BREAST"), []),
    ],
)
def test_routing_for_every_family(facts: StudyFacts, expected: list[str]) -> None:
    assert route(facts, load_rules(MAPPINGS)) == expected


def test_every_described_model_has_a_triton_folder_and_routing() -> None:
    routed = {m for rule in load_rules(MAPPINGS) for m in rule.models}
    for name, model in MODELS.items():
        assert (TRITON_REPO / model.triton_model / "config.pbtxt").is_file(), name
        assert name in routed, f"{name} is described but no routing rule sends studies to it"
        assert model.reference_model


def test_model_py_is_one_file() -> None:
    """The build installs the one runner into every reference model folder."""
    source = (REPO_ROOT / "scripts" / "reference_models" / "triton_runner.py").read_bytes()
    copies = {p.parent.parent.name: p.read_bytes() for p in TRITON_REPO.glob("*/1/model.py")}
    assert set(copies) == {"chest_xray", "mammography", "brain_ct", "brain_mr", "spine_xray"}
    assert all(copy == source for copy in copies.values())


def test_critical_labels_and_categories() -> None:
    assert [label.key for label in MODELS["brain-ct"].critical_labels] == ["intracranial_haemorrhage", "midline_shift"]
    assert MODELS["brain-ct"].labels[0].code == "1386000"
    cats = MODELS["mammography"].categories
    assert cats is not None
    assert cats.category([0.05, 0.02]).key == "1" and cats.category([0.1, 0.95]).key == "5"


def test_build_is_deterministic(tmp_path: Path) -> None:
    """A fresh build gives, byte for byte, the weights `make models` built into triton_repo/."""
    script = REPO_ROOT / "scripts" / "build_reference_models.py"
    subprocess.run([sys.executable, str(script), "--repo", str(tmp_path / "a"), "--force"], check=True,
                   capture_output=True)
    digests = [{p.relative_to(repo).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(repo.glob("*/1/model.onnx"))} for repo in (tmp_path / "a", TRITON_REPO)]
    assert len(digests[0]) == 5 and digests[0] == digests[1]
    again = subprocess.run([sys.executable, str(script), "--repo", str(tmp_path / "a")], check=True,
                           capture_output=True, text=True).stdout
    assert again.count("skipped") == 5


def test_site_model_is_left_alone(tmp_path: Path) -> None:
    site = tmp_path / "brain_ct"
    (site / "1").mkdir(parents=True)
    (site / "config.pbtxt").write_text('name: "brain_ct"\nbackend: "onnxruntime"\n')
    (site / "1" / "model.onnx").write_bytes(b"site weights")
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "build_reference_models.py"), "--repo", str(tmp_path),
                    "--model", "brain_ct"], check=True, capture_output=True)
    assert (site / "1" / "model.onnx").read_bytes() == b"site weights"
