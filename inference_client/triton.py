"""A small Triton client: timeouts on every call, binary tensors, errors that say what to do.

Over HTTP (`host:port`, `http://host:port`) or gRPC (`grpc://host:port`), the same methods and
errors. With `shared_memory=True` (Triton on the same host: the bundled server) the input
tensors go through a POSIX shared-memory region registered with Triton instead of the socket.

The worker needs to tell "try again later" (server down, overloaded, timed out) from "this will
never work" (model not deployed, wrong input), so errors are classified here, once:
- `TritonUnavailable`: transient; the job is retried with back-off;
- `ModelNotFound`: permanent; the message names the model;
- `InferenceFailed`: the server answered with an error for this request (bad input, model error).
"""
from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype
from tritonclient.utils import shared_memory as shm

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


# gRPC status codes: the request's fault (as an HTTP 4xx) or not found; every other one is transient
_GRPC_REFUSED = ("StatusCode.INVALID_ARGUMENT", "StatusCode.FAILED_PRECONDITION", "StatusCode.UNIMPLEMENTED",
                 "StatusCode.OUT_OF_RANGE", "StatusCode.PERMISSION_DENIED", "StatusCode.UNAUTHENTICATED")
MODEL_INFO_SECONDS = 30.0  # how long a model's config (its version label) is reused before asking again


def _is_not_found(exc: InferenceServerException) -> bool:
    message = (exc.message() or "").lower()
    return exc.status() in ("404", "StatusCode.NOT_FOUND") or "unknown model" in message or "is not found" in message


def _status_code(exc: InferenceServerException) -> int | None:
    """The HTTP status of the error (gRPC codes as their HTTP equivalent: 400 or 503), None if unknown."""
    status = str(exc.status())
    if status.startswith("StatusCode."):
        return 400 if status in _GRPC_REFUSED else 503
    try:
        return int(status)
    except (TypeError, ValueError):
        return None


class _SharedInputs:
    """One POSIX shared-memory region per client, registered with Triton, that input tensors are
    written to; grown (re-registered) when a request needs more."""

    def __init__(self) -> None:
        self.name = ""
        self.handle: Any = None
        self.size = 0

    def place(self, client: Any, arrays: list[np.ndarray[Any, Any]]) -> list[int]:
        """Write the arrays one after another (64-byte aligned); their offsets."""
        offsets, total = [], 0
        for array in arrays:
            offsets.append(total)
            total += (array.nbytes + 63) // 64 * 64
        if total > self.size:
            self.release(client)
            size = max(total, 1 << 20)
            # a new name each time: Triton may still hold the old region for a request it has just
            # answered, and then refuses to unregister it or to register that name again
            self.name = f"interop-{os.getpid()}-{uuid.uuid4().hex[:12]}"
            self.handle = shm.create_shared_memory_region(self.name, f"/{self.name}", size)
            client.register_system_shared_memory(self.name, f"/{self.name}", size)
            self.size = size
        for array, offset in zip(arrays, offsets):
            shm.set_shared_memory_region(self.handle, [array], offset=offset)
        return offsets

    def release(self, client: Any) -> None:
        if self.handle is None:
            return
        for attempt in range(5):
            try:
                client.unregister_system_shared_memory(self.name)
            except InferenceServerException as exc:
                if "in use" in (exc.message() or "") and attempt < 4:
                    time.sleep(0.02 * (attempt + 1))  # held a moment longer for a request just answered
                    continue
            except Exception:
                pass  # the server is gone: it has no region left to free
            break
        shm.destroy_shared_memory_region(self.handle)
        self.handle, self.size = None, 0


class TritonClient:
    """Client for one Triton endpoint (`host:port` or `http://`: HTTP; `grpc://host:port`: gRPC);
    no network I/O until a method is called."""

    def __init__(self, url: str, timeout_s: float = 60.0, connect_timeout_s: float | None = None,
                 *, shared_memory: bool = False) -> None:
        self.grpc = url.startswith("grpc://")
        self.url = url.removeprefix("grpc://").removeprefix("http://").rstrip("/")
        self.timeout_s = float(timeout_s)
        self.connect_timeout_s = float(connect_timeout_s if connect_timeout_s is not None else min(5.0, timeout_s))
        self._client: Any = None
        self._shared = _SharedInputs() if shared_memory else None
        self._configs: dict[str, tuple[float, dict[str, Any]]] = {}

    def _http(self) -> Any:
        if self._client is None:
            if self.grpc:
                self._client = grpcclient.InferenceServerClient(self.url)
            else:
                self._client = httpclient.InferenceServerClient(
                    self.url, connection_timeout=self.connect_timeout_s, network_timeout=self.timeout_s,
                )
        return self._client

    def close(self) -> None:
        """Close pooled connections (Triton waits for open ones when it shuts down) and give the
        shared-memory region back."""
        if self._client is not None:
            if self._shared is not None:
                self._shared.release(self._client)
            self._client.close()
            self._client = None

    def __enter__(self) -> TritonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, fn: Callable[[Any], T], model: str | None = None) -> T:
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

    def _timeout(self) -> dict[str, Any]:
        return {"client_timeout": self.timeout_s} if self.grpc else {}

    def is_ready(self) -> bool:
        """Whether the server is ready (False when it cannot be reached)."""
        try:
            return bool(self._call("server ready", lambda c: c.is_server_ready(**self._timeout())))
        except TritonUnavailable:
            return False

    def model_ready(self, name: str) -> bool:
        """Whether `name` is loaded and ready; raises TritonUnavailable when the server is down."""
        try:
            return bool(self._call(f"model {name} ready", lambda c: c.is_model_ready(name, **self._timeout()), model=name))
        except ModelNotFound:
            return False

    def model_config(self, name: str) -> dict[str, Any]:
        """The model's configuration as Triton serves it (the same JSON shape over HTTP and gRPC)."""
        if self.grpc:
            answer = self._call(f"config of {name}", lambda c: c.get_model_config(name, as_json=True,
                                                                                    **self._timeout()), model=name)
            return dict(answer.get("config", answer))
        return dict(self._call(f"config of {name}", lambda c: c.get_model_config(name), model=name))

    def _recent_config(self, name: str) -> dict[str, Any]:
        """The model's config, asked at most every MODEL_INFO_SECONDS (not a round trip per study)."""
        now = time.monotonic()
        cached = self._configs.get(name)
        if cached is None or now - cached[0] > MODEL_INFO_SECONDS:
            cached = (now, self.model_config(name))
            self._configs[name] = cached
        return cached[1]

    def model_version_label(self, name: str) -> str | None:
        """The `model_version_label` parameter of the model's config.pbtxt, if set."""
        params = self._recent_config(name).get("parameters") or {}
        value = (params.get("model_version_label") or {}).get("string_value")
        return str(value) if value else None

    def max_batch_size(self, name: str) -> int:
        """The most rows one request may hold (0 in the config: the model does not batch: 1)."""
        return max(1, int(self._recent_config(name).get("max_batch_size") or 0))

    def infer(self, model: str, inputs: dict[str, np.ndarray[Any, Any]], outputs: list[str]) -> dict[str, np.ndarray[Any, Any]]:
        """Run one request with binary tensors (or the shared-memory region); returns the named
        outputs as numpy arrays."""
        api: Any = grpcclient if self.grpc else httpclient
        arrays = {name: np.ascontiguousarray(array) for name, array in inputs.items()}
        request_inputs = [api.InferInput(name, list(a.shape), np_to_triton_dtype(a.dtype)) for name, a in arrays.items()]
        if self._shared is not None:
            offsets = self._call("shared memory", lambda c: self._shared.place(c, list(arrays.values())))  # type: ignore[union-attr]
            for tensor, array, offset in zip(request_inputs, arrays.values(), offsets):
                tensor.set_shared_memory(self._shared.name, array.nbytes, offset=offset)
        else:
            for tensor, array in zip(request_inputs, arrays.values()):
                if self.grpc:
                    tensor.set_data_from_numpy(array)
                else:
                    tensor.set_data_from_numpy(array, binary_data=True)
        request_outputs = [api.InferRequestedOutput(name) if self.grpc else api.InferRequestedOutput(name, binary_data=True)
                           for name in outputs]
        result = self._call(
            f"infer {model}",
            lambda c: c.infer(model, request_inputs, outputs=request_outputs,
                              **({"client_timeout": self.timeout_s} if self.grpc else {"timeout": None})),
            model=model,
        )
        out: dict[str, np.ndarray[Any, Any]] = {}
        for name in outputs:
            array = result.as_numpy(name)
            if array is None:
                raise InferenceFailed(f"Triton at {self.url}: {model} returned no output {name!r}")
            out[name] = array
        return out
