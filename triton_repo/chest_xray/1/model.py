"""Triton Python-backend model: the reference chest X-ray classifier, run with ONNX Runtime.

Only the Python backend ships with the bundled tritonserver, so the ONNX graph runs inside it.
Requests that Triton's dynamic batcher groups are stacked into one ONNX Runtime call; every
request gets exactly one response, and a failure becomes an error on the response (the stub
process must never die, or Triton unloads the model).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

INPUT = "image"
OUTPUT = "probabilities"


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        if not path.is_file():
            raise pb_utils.TritonModelException(
                f"{path} is missing: run `python scripts/build_reference_models.py` first"
            )
        providers: list[object] = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            device = int(args.get("model_instance_device_id", "0"))
            providers = [("CUDAExecutionProvider", {"device_id": device}), "CPUExecutionProvider"]
        self._session = ort.InferenceSession(str(path), providers=providers)
        self._channels_hw = tuple(next(i for i in config["input"] if i["name"] == INPUT)["dims"])
        self._providers = self._session.get_providers()
        pb_utils.Logger.log_info(f"chest_xray: loaded {path.name} with {self._providers}")

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        batch: list[np.ndarray] = []
        owners: list[tuple[int, int, int]] = []  # (request index, start row, end row)
        row = 0
        for i, request in enumerate(requests):
            try:
                tensor = pb_utils.get_input_tensor_by_name(request, INPUT)
                if tensor is None:
                    raise ValueError(f"input '{INPUT}' is missing")
                image = np.asarray(tensor.as_numpy(), dtype=np.float32)
                if image.ndim != 4 or tuple(image.shape[1:]) != self._channels_hw:
                    raise ValueError(f"input '{INPUT}' must be [N,{','.join(map(str, self._channels_hw))}], got {list(image.shape)}")
                if not np.isfinite(image).all():
                    raise ValueError(f"input '{INPUT}' contains NaN or infinity")
            except Exception as exc:  # reported on this request's response; the others still run
                responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc)))
                continue
            batch.append(image)
            owners.append((i, row, row + image.shape[0]))
            row += image.shape[0]

        if batch:
            try:
                probabilities = self._session.run([OUTPUT], {INPUT: np.concatenate(batch, axis=0)})[0]
                for i, start, end in owners:
                    out = pb_utils.Tensor(OUTPUT, np.ascontiguousarray(probabilities[start:end], dtype=np.float32))
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[out])
            except Exception as exc:
                error = pb_utils.TritonError(f"chest_xray inference failed: {type(exc).__name__}: {exc}")
                for i, _start, _end in owners:
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=error)
        return responses

    def finalize(self) -> None:
        self._session = None
