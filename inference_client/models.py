"""Model descriptions as data: one YAML file per model in `<mappings>/models/`.

What a model means clinically (labels, codes, thresholds, which finding is critical) lives in
reviewable data files rather than code, so a site can add or retune a model without a release.
Files are validated when loaded; an error names the file and the field, so a broken mapping
stops the service at start-up instead of producing wrong reports later.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
DTYPES = frozenset({"FP32", "FP16", "UINT8", "INT8", "INT16", "INT32", "INT64"})


class ModelDescriptionError(ValueError):
    """A model description file is missing a field or has a wrong value (message names both)."""


@dataclass(frozen=True)
class Display:
    en: str
    vi: str

    def text(self, language: str = "en") -> str:
        return self.vi if language.lower().startswith("vi") else self.en


@dataclass(frozen=True)
class Label:
    """One output of the model, in output order, with the code reported for it."""

    key: str
    display: Display
    threshold: float
    code: str | None = None  # None: no verified code; reported with text only
    system: str = SNOMED
    critical: bool = False


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class Preprocessing:
    channels: int
    resize: tuple[int, int]  # height, width
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class Coding:
    system: str
    code: str
    display: str


@dataclass(frozen=True)
class ModelDescription:
    name: str
    triton_model: str
    version: str
    display: Display
    input: TensorSpec
    preprocessing: Preprocessing
    output: str
    labels: tuple[Label, ...]
    report_code: Coding
    reference_model: bool
    source: Path | None = None

    @property
    def critical_labels(self) -> tuple[Label, ...]:
        return tuple(label for label in self.labels if label.critical)


class _Reader:
    """Typed access to one YAML mapping with errors that say file and field."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise ModelDescriptionError(f"{where}: expected a mapping, got {type(data).__name__}")
        self.data = data
        self.where = where

    def _fail(self, key: str, message: str) -> ModelDescriptionError:
        return ModelDescriptionError(f"{self.where}: '{key}' {message}")

    def get(self, key: str, default: Any = ..., *, required: bool = True) -> Any:
        if key not in self.data or self.data[key] is None:
            if default is not ...:
                return default
            raise self._fail(key, "is required")
        return self.data[key]

    def str(self, key: str, default: Any = ...) -> str:
        value = self.get(key, default)
        if not isinstance(value, str) or not value.strip():
            raise self._fail(key, f"must be a non-empty string, got {value!r}")
        return value.strip()

    def opt_str(self, key: str) -> str | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            raise self._fail(key, f"must be quoted in YAML (got the number {value}; leading zeros would be lost)")
        if not isinstance(value, str) or not value.strip():
            raise self._fail(key, f"must be a non-empty string or null, got {value!r}")
        return value.strip()

    def bool(self, key: str, default: Any = ...) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise self._fail(key, f"must be true or false, got {value!r}")
        return value

    def ints(self, key: str, length: int | None = None) -> tuple[int, ...]:
        value = self.get(key)
        if (not isinstance(value, list) or not value
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
            raise self._fail(key, f"must be a list of positive integers, got {value!r}")
        if length is not None and len(value) != length:
            raise self._fail(key, f"must have {length} values, got {len(value)}")
        return tuple(value)

    def floats(self, key: str, length: int) -> tuple[float, ...]:
        value = self.get(key)
        if (not isinstance(value, list) or len(value) != length
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise self._fail(key, f"must be a list of {length} numbers, got {value!r}")
        return tuple(float(v) for v in value)

    def sub(self, key: str) -> "_Reader":
        return _Reader(self.get(key), f"{self.where}: {key}")

    def display(self, key: str) -> Display:
        value = self.get(key)
        if isinstance(value, str):
            raise self._fail(key, "must give both languages: {en: ..., vi: ...}")
        d = self.sub(key)
        return Display(en=d.str("en"), vi=d.str("vi"))


def _label(data: Any, where: str) -> Label:
    r = _Reader(data, where)
    threshold = r.get("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ModelDescriptionError(f"{where}: 'threshold' must be a number from 0 to 1, got {threshold!r}")
    return Label(
        key=r.str("key"),
        display=r.display("display"),
        threshold=float(threshold),
        code=r.opt_str("code"),
        system=r.str("system", SNOMED),
        critical=r.bool("critical", False),
    )


def parse_model(data: Any, source: Path | None = None) -> ModelDescription:
    """Validate one description (already parsed from YAML) and build the dataclass."""
    where = str(source) if source else "model description"
    r = _Reader(data, where)
    name = r.str("name")

    inp = r.sub("input")
    dtype = inp.str("dtype").upper()
    if dtype not in DTYPES:
        raise ModelDescriptionError(f"{where}: input: 'dtype' must be one of {sorted(DTYPES)}, got {dtype!r}")
    tensor = TensorSpec(name=inp.str("name"), shape=inp.ints("shape", 3), dtype=dtype)

    pre = r.sub("preprocessing")
    channels = pre.get("channels")
    if channels not in (1, 3):
        raise ModelDescriptionError(f"{where}: preprocessing: 'channels' must be 1 or 3, got {channels!r}")
    resize = pre.ints("resize", 2)
    preprocessing = Preprocessing(
        channels=channels, resize=(resize[0], resize[1]),
        mean=pre.floats("mean", channels), std=pre.floats("std", channels),
    )
    if any(s <= 0 for s in preprocessing.std):
        raise ModelDescriptionError(f"{where}: preprocessing: 'std' values must be positive")
    if (channels, *preprocessing.resize) != tensor.shape:
        raise ModelDescriptionError(
            f"{where}: preprocessing gives [{channels}, {resize[0]}, {resize[1]}] "
            f"but input 'shape' is {list(tensor.shape)}"
        )

    raw_labels = r.get("labels")
    if not isinstance(raw_labels, list) or not raw_labels:
        raise ModelDescriptionError(f"{where}: 'labels' must be a non-empty list")
    labels = tuple(_label(item, f"{where}: labels[{i}]") for i, item in enumerate(raw_labels))
    seen: set[str] = set()
    for label in labels:
        if label.key in seen:
            raise ModelDescriptionError(f"{where}: labels: duplicate key {label.key!r}")
        seen.add(label.key)

    rc = r.sub("report_code")
    report_code = Coding(system=rc.str("system", LOINC), code=rc.str("code"), display=rc.str("display"))

    output = r.sub("output")
    return ModelDescription(
        name=name,
        triton_model=r.str("triton_model"),
        version=str(r.get("version")),
        display=r.display("display"),
        input=tensor,
        preprocessing=preprocessing,
        output=output.str("name"),
        labels=labels,
        report_code=report_code,
        reference_model=r.bool("reference_model"),
        source=source,
    )


def load_models(mappings_dir: Path) -> dict[str, ModelDescription]:
    """All descriptions in `<mappings_dir>/models/*.yaml`, keyed by name; raises on the first bad file."""
    folder = Path(mappings_dir) / "models"
    if not folder.is_dir():
        raise ModelDescriptionError(f"{folder}: no such folder (INTEROP_MAPPINGS_DIR points to {mappings_dir})")
    models: dict[str, ModelDescription] = {}
    for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ModelDescriptionError(f"{path}: not valid YAML: {exc}") from exc
        model = parse_model(data, path)
        if model.name in models:
            raise ModelDescriptionError(f"{path}: model name {model.name!r} is also used by {models[model.name].source}")
        models[model.name] = model
    return models
