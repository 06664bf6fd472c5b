"""A small Triton HTTP client: timeouts on every call, binary tensors, errors that say what to do.

The worker needs to tell "try again later" (server down, overloaded, timed out) from "this will
never work" (model not deployed, wrong input), so errors are classified here, once:
- `TritonUnavailable`: transient; the job is retried with back-off;
- `ModelNotFound`: permanent; the message names the model;
- `InferenceFailed`: the server answered with an error for this request (bad input, model error).
"""
from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

T = TypeVar("T")


class TritonError(Exception):
    """Base of the errors of this module."""


class TritonUnavailable(TritonError):
    """Triton cannot be reached, is not ready, answered 5xx or timed out: retry later."""


class ModelNotFound(TritonError):
    """The model is not in Triton's repository or not loaded: retrying will not help."""

    def __init__(self, model: str, detail: str = "") -> None:
        self.model = model
        super().__init__(f"Triton has no ready model {model!r}" + (f": {detail}" if detail else ""))


class InferenceFailed(TritonError):
    """Triton rejected or failed this inference request (4xx other than 404, or a model error)."""


_TRANSIENT = (ConnectionError, TimeoutError, socket.timeout, socket.gaierror, OSError)


def _is_not_found(exc: InferenceServerException) -> bool:
    message = (exc.message() or "").lower()
    return exc.status() in ("404", "StatusCode.NOT_FOUND") or "unknown model" in message or "is not found" in message


def _status_code(exc: InferenceServerException) -> int | None:
    try:
        return int(str(exc.status()))
    except (TypeError, ValueError):
        return None


class TritonClient:
    """Client for one Triton HTTP endpoint (`host:port`); no network I/O until a method is called."""

    def __init__(self, url: str, timeout_s: float = 60.0, connect_timeout_s: float | None = None) -> None:
        self.url = url.removeprefix("http://").rstrip("/")
        self.timeout_s = float(timeout_s)
        self.connect_timeout_s = float(connect_timeout_s if connect_timeout_s is not None else min(5.0, timeout_s))
        self._client: httpclient.InferenceServerClient | None = None

    def _http(self) -> httpclient.InferenceServerClient:
        if self._client is None:
            self._client = httpclient.InferenceServerClient(
                self.url, connection_timeout=self.connect_timeout_s, network_timeout=self.timeout_s,
            )
        return self._client

    def close(self) -> None:
        """Close pooled connections (Triton waits for open ones when it shuts down)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> TritonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, fn: Callable[[httpclient.InferenceServerClient], T], model: str | None = None) -> T:
        try:
            return fn(self._http())
        except InferenceServerException as exc:
            code = _status_code(exc)
            if model is not None and _is_not_found(exc):
                raise ModelNotFound(model, exc.message() or "") from exc
            if code is None or code >= 500 or code == 429:
                self.close()  # the connection may be half-dead; open a new one next time
                raise TritonUnavailable(f"Triton at {self.url}: {what}: {exc.message()} (status {exc.status()})") from exc
            raise InferenceFailed(f"Triton at {self.url}: {what}: {exc.message()} (status {exc.status()})") from exc
        except _TRANSIENT as exc:
            self.close()
            raise TritonUnavailable(f"Triton at {self.url}: {what}: {type(exc).__name__}: {exc}") from exc

    def is_ready(self) -> bool:
        """Whether the server is ready (False when it cannot be reached)."""
        try:
            return bool(self._call("server ready", lambda c: c.is_server_ready()))
        except TritonUnavailable:
            return False

    def model_ready(self, name: str) -> bool:
        """Whether `name` is loaded and ready; raises TritonUnavailable when the server is down."""
        try:
            return bool(self._call(f"model {name} ready", lambda c: c.is_model_ready(name), model=name))
        except ModelNotFound:
            return False

    def model_config(self, name: str) -> dict[str, Any]:
        return dict(self._call(f"config of {name}", lambda c: c.get_model_config(name), model=name))

    def model_version_label(self, name: str) -> str | None:
        """The `model_version_label` parameter of the model's config.pbtxt, if set."""
        params = self.model_config(name).get("parameters") or {}
        value = (params.get("model_version_label") or {}).get("string_value")
        return str(value) if value else None

    def infer(self, model: str, inputs: dict[str, np.ndarray[Any, Any]], outputs: list[str]) -> dict[str, np.ndarray[Any, Any]]:
        """Run one request with binary tensors; returns the named outputs as numpy arrays."""
        request_inputs = []
        for name, array in inputs.items():
            array = np.ascontiguousarray(array)
            tensor = httpclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array, binary_data=True)
            request_inputs.append(tensor)
        request_outputs = [httpclient.InferRequestedOutput(name, binary_data=True) for name in outputs]
        result = self._call(
            f"infer {model}",
            lambda c: c.infer(model, request_inputs, outputs=request_outputs, timeout=None),
            model=model,
        )
        out: dict[str, np.ndarray[Any, Any]] = {}
        for name in outputs:
            array = result.as_numpy(name)
            if array is None:
                raise InferenceFailed(f"Triton at {self.url}: {model} returned no output {name!r}")
            out[name] = array
        return out
