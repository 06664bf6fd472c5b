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
    code: str | None  # None: no verified code; reported with text only
    display: str


ASSEMBLY_KINDS = ("image", "views", "volume")


@dataclass(frozen=True)
class View:
    laterality: str  # R | L
    view: str        # CC | MLO | ...


@dataclass(frozen=True)
class Window:
    center: float
    width: float


@dataclass(frozen=True)
class SeriesChoice:
    """How the hub picks the series of a CT/MR study that becomes the volume."""

    orientation: str | None = "axial"
    prefer_description: tuple[str, ...] = ()
    kernel: tuple[str, ...] = ()
    slice_thickness_mm: tuple[float, float] | None = None
    min_slices: int = 1


@dataclass(frozen=True)
class Assembly:
    """How the hub builds the model's input from a study.

    - image:  one row per instance, preprocessed with `preprocessing`; study result = max over rows;
    - views:  one row per exam: `views` in order into `tensor` [len(views), 1, *size], missing
              views zero with their flag 0 in `present` [len(views)];
    - volume: one row per series: resampled to [depth, *size]; `windows` (CT, one channel per
              window, each mapped to 0..1) or `normalise: zscore` (one channel).
    """

    kind: str
    tensor: str
    reduce: str = "max"
    views: tuple[View, ...] = ()
    present: str | None = None
    size: tuple[int, int] | None = None
    normalise: str | None = None
    depth: int | None = None
    windows: tuple[Window, ...] = ()
    series: SeriesChoice | None = None


@dataclass(frozen=True)
class Category:
    """A band of the score: scores >= `min` (and below the next band) get this category."""

    min: float
    key: str
    display: Display
    code: str | None = None


@dataclass(frozen=True)
class Categories:
    """Score -> category table (e.g. a BI-RADS-like assessment from the higher breast score)."""

    score: str  # how the outputs become one score: max
    bands: tuple[Category, ...]
    system: str | None = None

    def category(self, outputs: list[float] | tuple[float, ...]) -> Category:
        score = max(outputs)
        chosen = self.bands[0]
        for band in self.bands:
            if score >= band.min:
                chosen = band
        return chosen


@dataclass(frozen=True)
class ModelDescription:
    name: str
    triton_model: str
    version: str
    display: Display
    input: TensorSpec
    preprocessing: Preprocessing | None
    output: str
    labels: tuple[Label, ...]
    report_code: Coding
    reference_model: bool
    source: Path | None = None
    assembly: Assembly | None = None
    categories: Categories | None = None
    output_shape: tuple[int, ...] = ()

    @property
    def inputs(self) -> dict[str, tuple[int, ...]]:
        """Every input tensor the model takes, name -> dims without the batch."""
        tensors = {self.input.name: self.input.shape}
        if self.assembly and self.assembly.present:
            tensors[self.assembly.present] = (len(self.assembly.views),)
        return tensors

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

    def text(self, key: str, default: Any = ...) -> str:
        value = self.get(key, default)
        if not isinstance(value, str) or not value.strip():
            raise self._fail(key, f"must be a non-empty string, got {value!r}")
        return value.strip()

    def opt_text(self, key: str) -> str | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            raise self._fail(key, f"must be quoted in YAML (got the number {value}; leading zeros would be lost)")
        if not isinstance(value, str) or not value.strip():
            raise self._fail(key, f"must be a non-empty string or null, got {value!r}")
        return value.strip()

    def flag(self, key: str, default: Any = ...) -> bool:
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

    def sub(self, key: str) -> _Reader:
        return _Reader(self.get(key), f"{self.where}: {key}")

    def display(self, key: str) -> Display:
        value = self.get(key)
        if isinstance(value, str):
            raise self._fail(key, "must give both languages: {en: ..., vi: ...}")
        d = self.sub(key)
        return Display(en=d.text("en"), vi=d.text("vi"))


def _label(data: Any, where: str) -> Label:
    r = _Reader(data, where)
    threshold = r.get("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ModelDescriptionError(f"{where}: 'threshold' must be a number from 0 to 1, got {threshold!r}")
    return Label(
        key=r.text("key"),
        display=r.display("display"),
        threshold=float(threshold),
        code=r.opt_text("code"),
        system=r.text("system", SNOMED),
        critical=r.flag("critical", False),
    )


def _preprocessing(r: _Reader, tensor: TensorSpec, where: str) -> Preprocessing:
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

    return preprocessing


def _numbers(value: Any, where: str, key: str, length: int | None = None) -> tuple[float, ...]:
    if (not isinstance(value, list) or (length is not None and len(value) != length)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise ModelDescriptionError(f"{where}: '{key}' must be a list of {length or 'some'} numbers, got {value!r}")
    return tuple(float(v) for v in value)


def _strings(value: Any, where: str, key: str) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) and v.strip() for v in items):
        raise ModelDescriptionError(f"{where}: '{key}' must be a string or a list of strings, got {value!r}")
    return tuple(v.strip() for v in items)


def _assembly(r: _Reader, tensor: TensorSpec, where: str) -> Assembly:
    """The `assembly` section; absent means `{kind: image}` (the first schema)."""
    if r.data.get("assembly") is None:
        return Assembly(kind="image", tensor=tensor.name)
    a = r.sub("assembly")
    where = a.where
    kind = a.text("kind")
    if kind not in ASSEMBLY_KINDS:
        raise ModelDescriptionError(f"{where}: 'kind' must be one of {list(ASSEMBLY_KINDS)}, got {kind!r}")
    name = a.text("tensor", tensor.name)
    if name != tensor.name:
        raise ModelDescriptionError(f"{where}: 'tensor' is {name!r} but input 'name' is {tensor.name!r}")
    if kind == "image":
        reduce = a.text("reduce", "max")
        if reduce != "max":
            raise ModelDescriptionError(f"{where}: 'reduce' must be max, got {reduce!r}")
        return Assembly(kind=kind, tensor=name, reduce=reduce)
    size = a.ints("size", 2)
    normalise = a.data.get("normalise")
    if normalise not in (None, "zscore"):
        raise ModelDescriptionError(f"{where}: 'normalise' must be zscore or left out, got {normalise!r}")
    if kind == "views":
        raw = a.get("views")
        if not isinstance(raw, list) or not raw:
            raise ModelDescriptionError(f"{where}: 'views' must be a non-empty list of {{laterality, view}}")
        views = []
        for i, item in enumerate(raw):
            v = _Reader(item, f"{where}: views[{i}]")
            laterality = v.text("laterality").upper()
            if laterality not in ("R", "L"):
                raise ModelDescriptionError(f"{v.where}: 'laterality' must be R or L, got {laterality!r}")
            views.append(View(laterality=laterality, view=v.text("view").upper()))
        expected = (len(views), 1, size[0], size[1])
        if tensor.shape != expected:
            raise ModelDescriptionError(f"{where}: {len(views)} views of {list(size)} give {list(expected)} "
                                        f"but input 'shape' is {list(tensor.shape)}")
        return Assembly(kind=kind, tensor=name, views=tuple(views), present=a.opt_text("present"),
                        size=(size[0], size[1]), normalise=normalise)
    depth = a.ints("depth", 1)[0] if isinstance(a.get("depth"), list) else a.get("depth")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth <= 0:
        raise ModelDescriptionError(f"{where}: 'depth' must be a positive integer, got {depth!r}")
    windows = tuple(
        Window(center=float(w["center"]), width=float(w["width"]))
        for w in (a.data.get("windows") or [])
        if isinstance(w, dict) and isinstance(w.get("center"), (int, float)) and isinstance(w.get("width"), (int, float))
    )
    if len(windows) != len(a.data.get("windows") or []) or any(w.width <= 0 for w in windows):
        raise ModelDescriptionError(f"{where}: 'windows' must be a list of {{center, width}} with width > 0")
    if bool(windows) == (normalise == "zscore"):
        raise ModelDescriptionError(f"{where}: a volume needs exactly one of 'windows' (CT) or 'normalise: zscore'")
    channels = len(windows) or 1
    expected = (channels, depth, size[0], size[1])
    if tensor.shape != expected:
        raise ModelDescriptionError(f"{where}: {channels} channel(s) x depth {depth} x {list(size)} give "
                                    f"{list(expected)} but input 'shape' is {list(tensor.shape)}")
    series = None
    if a.data.get("series") is not None:
        sr = a.sub("series")
        thickness = sr.data.get("slice_thickness_mm")
        min_slices = sr.get("min_slices", 1)
        if isinstance(min_slices, bool) or not isinstance(min_slices, int) or min_slices < 1:
            raise ModelDescriptionError(f"{sr.where}: 'min_slices' must be a positive integer, got {min_slices!r}")
        bounds = _numbers(thickness, sr.where, "slice_thickness_mm", 2) if thickness is not None else None
        series = SeriesChoice(
            orientation=sr.opt_text("orientation"),
            prefer_description=_strings(sr.data.get("prefer_description") or [], sr.where, "prefer_description"),
            kernel=_strings(sr.data.get("kernel") or [], sr.where, "kernel"),
            slice_thickness_mm=(bounds[0], bounds[1]) if bounds else None,
            min_slices=min_slices,
        )
    return Assembly(kind=kind, tensor=name, size=(size[0], size[1]), normalise=normalise, depth=depth,
                    windows=windows, series=series)


def _categories(r: _Reader, where: str) -> Categories:
    c = r.sub("categories")
    score = c.text("score", "max")
    if score != "max":
        raise ModelDescriptionError(f"{c.where}: 'score' must be max, got {score!r}")
    raw = c.get("bands")
    if not isinstance(raw, list) or not raw:
        raise ModelDescriptionError(f"{c.where}: 'bands' must be a non-empty list")
    bands = []
    for i, item in enumerate(raw):
        b = _Reader(item, f"{c.where}: bands[{i}]")
        low = b.get("min")
        if isinstance(low, bool) or not isinstance(low, (int, float)) or not 0.0 <= low <= 1.0:
            raise ModelDescriptionError(f"{b.where}: 'min' must be a number from 0 to 1, got {low!r}")
        bands.append(Category(min=float(low), key=b.text("key") if not isinstance(b.get("key"), int) else str(b.get("key")),
                              display=b.display("display"), code=b.opt_text("code")))
    if bands[0].min != 0.0 or any(x.min >= y.min for x, y in zip(bands, bands[1:])):
        raise ModelDescriptionError(f"{c.where}: 'bands' must start at min 0 and increase")
    return Categories(score=score, bands=tuple(bands), system=c.opt_text("system"))


def check_against_triton(description: ModelDescription, triton_client: Any) -> list[str]:
    """Differences between a description and the model Triton serves (empty list: consistent).

    Compares input names and dims (batch dimension excluded), the output name and its width
    (the number of labels), and the model_version_label parameter when the config has one.
    `triton_client` is an inference_client.triton.TritonClient (anything with model_config()).
    """
    config = triton_client.model_config(description.triton_model)
    problems: list[str] = []
    served = {i["name"]: tuple(int(d) for d in i["dims"]) for i in config.get("input", [])}
    for name, dims in description.inputs.items():
        if name not in served:
            problems.append(f"input {name!r} is not an input of {description.triton_model} (it has {sorted(served)})")
        elif served[name] != dims:
            problems.append(f"input {name!r}: description {list(dims)}, Triton {list(served[name])}")
    for name in sorted(set(served) - set(description.inputs)):
        problems.append(f"Triton input {name!r} is not described")
    outputs = {o["name"]: tuple(int(d) for d in o["dims"]) for o in config.get("output", [])}
    if description.output not in outputs:
        problems.append(f"output {description.output!r} is not an output of {description.triton_model}"
                        f" (it has {sorted(outputs)})")
    elif outputs[description.output] != description.output_shape:
        problems.append(f"output {description.output!r}: description {list(description.output_shape)}, "
                        f"Triton {list(outputs[description.output])}")
    if description.output_shape != (len(description.labels),):
        problems.append(f"output shape {list(description.output_shape)} does not match {len(description.labels)} labels")
    label = ((config.get("parameters") or {}).get("model_version_label") or {}).get("string_value")
    if label and label != description.version:
        problems.append(f"version: description {description.version!r}, Triton model_version_label {label!r}")
    return problems


def parse_model(data: Any, source: Path | None = None) -> ModelDescription:
    """Validate one description (already parsed from YAML) and build the dataclass."""
    where = str(source) if source else "model description"
    r = _Reader(data, where)
    name = r.text("name")

    inp = r.sub("input")
    dtype = inp.text("dtype").upper()
    if dtype not in DTYPES:
        raise ModelDescriptionError(f"{where}: input: 'dtype' must be one of {sorted(DTYPES)}, got {dtype!r}")
    tensor = TensorSpec(name=inp.text("name"), shape=inp.ints("shape"), dtype=dtype)
    assembly = _assembly(r, tensor, where)

    preprocessing = None
    if assembly.kind == "image" or r.data.get("preprocessing") is not None:
        preprocessing = _preprocessing(r, tensor, where)

    raw_labels = r.get("labels")
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
    report_code = Coding(system=rc.text("system", LOINC), code=rc.opt_text("code"), display=rc.text("display"))
    categories = _categories(r, where) if r.data.get("categories") is not None else None

    output = r.sub("output")
    return ModelDescription(
        name=name,
        triton_model=r.text("triton_model"),
        version=str(r.get("version")),
        display=r.display("display"),
        input=tensor,
        preprocessing=preprocessing,
        output=output.text("name"),
        labels=labels,
        report_code=report_code,
        reference_model=r.flag("reference_model"),
        source=source,
        assembly=assembly,
        categories=categories,
        output_shape=output.ints("shape") if output.data.get("shape") is not None else (len(labels),),
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
