"""inference_client against a real Triton (bundled tritonserver or TRITON_URL), and its mappings."""
from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from inference_client.models import ModelDescriptionError, load_models
from inference_client.routing import StudyFacts, check_models_known, load_rules, route
from inference_client.triton import InferenceFailed, ModelNotFound, TritonClient, TritonUnavailable
from tests.helpers import ROOT as REPO_ROOT

MAPPINGS = REPO_ROOT / "mappings"
MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]


def image(seed: int) -> np.ndarray:
    """A deterministic radiograph-like image, preprocessed as the description says ([3,224,224])."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:224, 0:224].astype(np.float32) / 223.0
    grey = 0.3 + 0.4 * yy
    for cx in (0.3, 0.7):
        grey -= 0.25 * ((((xx - cx) / 0.17) ** 2 + ((yy - 0.5) / 0.33) ** 2) < 1.0)
    cx, cy = rng.uniform(0.2, 0.8, 2)
    grey += rng.uniform(0.2, 0.6) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 0.06 ** 2))
    grey = np.clip(grey + rng.normal(0, 0.05, grey.shape), 0, 1).astype(np.float32)
    return ((np.repeat(grey[None], 3, axis=0) - MEAN) / STD).astype(np.float32)


@pytest.fixture(scope="module")
def client(triton_url: str):
    with TritonClient(triton_url, timeout_s=60) as c:
        yield c


@pytest.fixture(scope="module")
def chest():
    return load_models(MAPPINGS)["chest-xray"]


def test_server_and_model_ready(client: TritonClient, chest) -> None:
    assert client.is_ready()
    assert client.model_ready(chest.triton_model)
    assert client.model_version_label(chest.triton_model) == chest.version


def test_batch_of_two_images(client: TritonClient, chest) -> None:
    batch = np.stack([image(1), image(2)])
    probs = client.infer(chest.triton_model, {chest.input.name: batch}, [chest.output])[chest.output]
    assert probs.shape == (2, len(chest.labels)) and probs.dtype == np.float32
    assert np.all((probs > 0.0) & (probs < 1.0)), probs
    assert np.abs(probs[0] - probs[1]).max() > 1e-4, "different images must give different probabilities"

    again = client.infer(chest.triton_model, {chest.input.name: image(1)[None]}, [chest.output])[chest.output]
    np.testing.assert_allclose(again[0], probs[0], rtol=1e-4, atol=1e-6)


def test_unknown_model_is_permanent(client: TritonClient) -> None:
    with pytest.raises(ModelNotFound, match="no_such_model"):
        client.infer("no_such_model", {"image": image(1)[None]}, ["probabilities"])
    assert client.model_ready("no_such_model") is False


def test_wrong_input_shape_fails_the_request(client: TritonClient, chest) -> None:
    with pytest.raises(InferenceFailed):
        client.infer(chest.triton_model, {chest.input.name: np.zeros((1, 3, 16, 16), np.float32)}, [chest.output])
    assert client.model_ready(chest.triton_model)  # the model survives a bad request


def test_dead_port_is_transient_and_quick() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = TritonClient(f"127.0.0.1:{port}", timeout_s=2)
    started = time.perf_counter()
    assert dead.is_ready() is False
    with pytest.raises(TritonUnavailable):
        dead.infer("chest_xray", {"image": image(1)[None]}, ["probabilities"])
    assert time.perf_counter() - started < 3


def test_silent_server_times_out_as_transient() -> None:
    with socket.socket() as sock:  # accepts connections, never answers
        sock.bind(("127.0.0.1", 0))
        sock.listen(4)
        silent = TritonClient(f"127.0.0.1:{sock.getsockname()[1]}", timeout_s=0.5)
        started = time.perf_counter()
        with pytest.raises(TritonUnavailable):
            silent.infer("chest_xray", {"image": image(1)[None]}, ["probabilities"])
        assert time.perf_counter() - started < 3


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (StudyFacts(modality="CR", body_part="CHEST"), ["chest-xray"]),
        (StudyFacts(modality="dx", body_part=" chest ", view_position="PA"), ["chest-xray"]),
        (StudyFacts(modality="DX", procedure_codes=("36554-4",)), ["chest-xray"]),
        (StudyFacts(modality="CT", body_part="HEAD"), ["brain-ct"]),
        (StudyFacts(modality="CT", body_part="CHEST"), []),
        (StudyFacts(modality="CR"), []),
    ],
)
def test_routing_from_mappings(facts: StudyFacts, expected: list[str]) -> None:
    rules = load_rules(MAPPINGS)
    assert route(facts, rules) == expected
    assert route(facts, MAPPINGS) == expected


def test_routing_names_only_described_models() -> None:
    check_models_known(load_rules(MAPPINGS), load_models(MAPPINGS))


def test_chest_description(chest) -> None:
    assert chest.reference_model is True
    assert [label.key for label in chest.labels][:3] == ["Atelectasis", "Cardiomegaly", "Effusion"]
    assert len(chest.labels) == 14
    assert [label.key for label in chest.critical_labels] == ["Pneumothorax"]
    assert chest.input.shape == (3, 224, 224)


def _write_broken(tmp_path: Path, mutate) -> Path:
    data = yaml.safe_load((MAPPINGS / "models" / "chest-xray.yaml").read_text(encoding="utf-8"))
    mutate(data)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "chest-xray.yaml").write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["labels"][7].__setitem__("threshold", 1.5), r"labels\[7\]: 'threshold' must be a number from 0 to 1"),
        (lambda d: d.pop("triton_model"), r"'triton_model' is required"),
        (lambda d: d["preprocessing"].__setitem__("resize", [256, 256]), r"input 'shape' is \[3, 224, 224\]"),
        (lambda d: d["labels"][0].__setitem__("code", 46621007), r"labels\[0\]: 'code' must be quoted"),
        (lambda d: d["labels"][1].__setitem__("key", "Atelectasis"), r"duplicate key 'Atelectasis'"),
    ],
)
def test_load_models_rejects_broken_description(tmp_path: Path, mutate, message: str) -> None:
    with pytest.raises(ModelDescriptionError, match=message) as info:
        load_models(_write_broken(tmp_path, mutate))
    assert "chest-xray.yaml" in str(info.value)


# -- gRPC and shared memory (issue 14): the same answers by every route ------------------------------
def _shm_regions(url: str) -> list[str]:
    import tritonclient.http as httpclient

    with httpclient.InferenceServerClient(url) as admin:
        return [r["name"] for r in admin.get_system_shared_memory_status()]


def test_grpc_and_shared_memory_give_the_same_answers_as_http(triton_url: str, triton_grpc_url: str) -> None:
    batch = np.stack([image(1), image(2)])
    volume = np.random.default_rng(3).standard_normal((1, 3, 32, 128, 128)).astype(np.float32)
    with TritonClient(triton_url) as http:
        want_chest = http.infer("chest_xray", {"image": batch}, ["probabilities"])["probabilities"]
        want_ct = http.infer("brain_ct", {"volume": volume}, ["probabilities"])["probabilities"]
    for url, shared in ((triton_grpc_url, False), (triton_url, True), (triton_grpc_url, True)):
        client = TritonClient(url, shared_memory=shared)
        try:
            got = client.infer("chest_xray", {"image": batch}, ["probabilities"])["probabilities"]
            np.testing.assert_allclose(got, want_chest, rtol=1e-5)
            # a bigger input than the first region: it grows, and the answer is still the volume's
            np.testing.assert_allclose(client.infer("brain_ct", {"volume": volume}, ["probabilities"])["probabilities"],
                                       want_ct, rtol=1e-5)
            assert client.model_version_label("chest_xray") == "0.1.0-reference"
            assert client.model_ready("chest_xray") and not client.model_ready("no_such_model")
            if shared:
                name = client._shared.name  # type: ignore[union-attr]
                assert name in _shm_regions(triton_url) and Path(f"/dev/shm/{name}").exists()
        finally:
            client.close()
        if shared:  # closing gives the region back, to Triton and to the host
            assert name not in _shm_regions(triton_url) and not Path(f"/dev/shm/{name}").exists()


def test_grpc_errors_are_classified_like_http(triton_grpc_url: str) -> None:
    with TritonClient(triton_grpc_url, timeout_s=30) as client:
        with pytest.raises(ModelNotFound):
            client.infer("no_such_model", {"image": image(1)[None]}, ["probabilities"])
        with pytest.raises(InferenceFailed):  # wrong shape: the request's fault, not retried
            client.infer("chest_xray", {"image": np.zeros((1, 3, 10, 10), np.float32)}, ["probabilities"])
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    dead = port.getsockname()[1]
    port.close()
    with TritonClient(f"grpc://127.0.0.1:{dead}", timeout_s=2) as client:
        with pytest.raises(TritonUnavailable):
            client.infer("chest_xray", {"image": image(1)[None]}, ["probabilities"])
        assert not client.is_ready()


# -- several studies in one request (issue 14): the hub batches images across studies ---------------
def test_studies_inferred_together_get_the_answers_they_get_alone(triton_url: str) -> None:
    """`Analyser.infer` of several prepared studies (one Triton request per model while
    max_batch_size allows, split when it does not) equals inferring each study on its own."""
    from interop.services.analysis import Analyser, Prepared, Timings
    from tests.helpers import context

    ctx = context(TRITON_URL=triton_url)
    chest, ct = ctx.models["chest-xray"], ctx.models["brain-ct"]
    rng = np.random.default_rng(7)

    def rows(n: int) -> dict[str, np.ndarray]:
        return {"image": np.stack([image(int(rng.integers(1000))) for _ in range(n)])}

    def study(*inputs: tuple) -> Prepared:
        return Prepared(study={}, inputs=list(inputs), timings=Timings(), seconds=0.0)

    volume = {"volume": rng.standard_normal((1, 3, 32, 128, 128)).astype(np.float32)}
    studies = [
        study((chest, [], [rows(1)], None)),
        study((chest, [], [rows(3), rows(2)], None), (ct, [], [volume], None)),  # two batches, and a second model
        study((chest, [], [rows(20)], None)),
        study((chest, [], [rows(20)], None)),  # 46 chest rows in all: more than one request of 32
    ]
    with TritonClient(triton_url, timeout_s=120) as triton:
        analyser = Analyser(ctx, triton)
        together = analyser.infer(studies)
        alone = [analyser.infer([s])[0] for s in studies]
    assert [[len(batches) for batches in per_model] for per_model in together] == [[1], [2, 1], [1], [1]]
    for got, want in zip(together, alone):
        for got_batches, want_batches in zip(got, want):
            for g, w in zip(got_batches, want_batches):
                assert g.shape == w.shape
                np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
