"""The image-quality gate: whether a model may read an image, and if not, why.

A model given an empty, saturated or noise image, or an image of another body part, still answers
with probabilities, and below threshold they read as "no finding": a false reassurance. The gate
runs before inference; an image that fails is not given to the model, and a study none of whose
images pass is reported "not analysable" with the reasons (`report.not_analysable`).

Pure: limits come from mappings/quality.yaml (parsed here, read by the caller), pixels come as the
display array of `interop.dicom.pixels.to_display_array` (0 black .. 1 white). The statistics are
documented beside the limits in mappings/quality.yaml.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SAMPLE_PX = 512  # statistics on at most this many pixels a side (strided: neighbours stay neighbours)
CLIP_TOLERANCE = 1.0 / 255.0
NOT_ANALYSABLE_SYSTEM = "urn:interop-hub:ai-result"
NOT_ANALYSABLE = {"system": NOT_ANALYSABLE_SYSTEM, "code": "not-analysable",
                  "display": "Images not analysable by the AI model"}


class QualityLimitsError(ValueError):
    """mappings/quality.yaml is malformed (names the entry)."""


@dataclass(frozen=True)
class Limits:
    min_range: float = 0.02
    max_clipped_fraction: float = 0.6
    min_neighbour_correlation: float = 0.5
    modality: frozenset[str] = frozenset()   # empty: any
    body_part: frozenset[str] = frozenset()  # empty: any
    pixels: bool = True  # False: header and emptiness only


@dataclass
class Verdicts:
    """What the gate refused while one model's input was assembled: instance UID -> reason."""

    refused: dict[str, str] = field(default_factory=dict)

    def reasons(self) -> list[str]:
        """The distinct reasons, in the order first seen."""
        return list(dict.fromkeys(self.refused.values()))


_NUMBERS = ("min_range", "max_clipped_fraction", "min_neighbour_correlation")


def _limits(entry: Mapping[str, Any], base: Limits, where: str) -> Limits:
    if not isinstance(entry, Mapping):
        raise QualityLimitsError(f"{where}: expected a mapping")
    unknown = set(entry) - {*_NUMBERS, "modality", "body_part", "pixels"}
    if unknown:
        raise QualityLimitsError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for key in _NUMBERS:
        if key in entry:
            value = entry[key]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not -1.0 <= float(value) <= 1.0:
                raise QualityLimitsError(f"{where}.{key}: a number between -1 and 1, not {value!r}")
            values[key] = float(value)
    for key in ("modality", "body_part"):
        if key in entry:
            raw = entry[key]
            if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
                raise QualityLimitsError(f"{where}.{key}: a list of codes")
            values[key] = frozenset(v.strip().upper() for v in raw)
    if "pixels" in entry:
        if not isinstance(entry["pixels"], bool):
            raise QualityLimitsError(f"{where}.pixels: true or false")
        values["pixels"] = entry["pixels"]
    return Limits(**{**base.__dict__, **values})


def parse_limits(data: Any) -> dict[str, Limits]:
    """Per model name, its limits (defaults overridden per model); "" holds the defaults."""
    if not isinstance(data, Mapping):
        raise QualityLimitsError("quality limits: expected a mapping with defaults and models")
    defaults = _limits(data.get("defaults") or {}, Limits(), "defaults")
    models = data.get("models") or {}
    if not isinstance(models, Mapping):
        raise QualityLimitsError("models: expected a mapping of model name to limits")
    out = {"": defaults}
    for name, entry in models.items():
        out[str(name)] = _limits(entry or {}, defaults, f"models.{name}")
    return out


def limits_for(limits: Mapping[str, Limits], model: str) -> Limits:
    return limits.get(model) or limits.get("") or Limits()


def _norm(value: Any) -> str:
    return str(value or "").strip().upper()


def check_header(limits: Limits, modality: Any, body_part: Any) -> str | None:
    """The reason the header rules the image out for the model, or None."""
    if limits.modality and _norm(modality) and _norm(modality) not in limits.modality:
        return f"wrong modality: the image is {_norm(modality)}, the model reads {'/'.join(sorted(limits.modality))}"
    if limits.body_part and _norm(body_part) and _norm(body_part) not in limits.body_part:
        return (f"wrong body part: the image header says {_norm(body_part)}, "
                f"the model reads {'/'.join(sorted(limits.body_part))}")
    return None


def _sample(image: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    step = max(1, -(-max(image.shape[:2]) // SAMPLE_PX))
    sample: np.ndarray[Any, Any] = np.asarray(image[::step, ::step], dtype=np.float64)
    return sample


def _correlation(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> float:
    x, y = a.ravel() - a.mean(), b.ravel() - b.mean()
    denominator = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denominator) if denominator > 0 else 1.0


@dataclass(frozen=True)
class Statistics:
    range: float
    clipped_fraction: float
    neighbour_correlation: float


def statistics(image: np.ndarray[Any, Any]) -> Statistics:
    """The three statistics mappings/quality.yaml documents, of a (rows, columns) display array."""
    s = _sample(image)
    low, high = float(s.min()), float(s.max())
    p1, p99 = np.percentile(s, [1, 99])  # one partition of the sample, not two
    spread = float(p99 - p1)
    clipped = max(float(np.mean(s <= low + CLIP_TOLERANCE)), float(np.mean(s >= high - CLIP_TOLERANCE)))
    if s.shape[0] < 2 or s.shape[1] < 2:
        correlation = 1.0
    else:
        correlation = (_correlation(s[:, 1:], s[:, :-1]) + _correlation(s[1:, :], s[:-1, :])) / 2
    return Statistics(round(spread, 4), round(clipped, 4), round(correlation, 4))


def check_pixels(limits: Limits, image: np.ndarray[Any, Any]) -> str | None:
    """The reason the pixels are unreadable for the model, or None."""
    stats = statistics(image)
    if stats.range < limits.min_range:
        shade = "black" if float(np.mean(image)) < 0.1 else "white" if float(np.mean(image)) > 0.9 else "uniform"
        return f"empty image: all {shade} (spread {stats.range:.3f} < {limits.min_range})"
    if not limits.pixels:
        return None
    if stats.clipped_fraction > limits.max_clipped_fraction:
        return (f"saturated image: {stats.clipped_fraction:.0%} of pixels at the darkest or brightest value "
                f"(limit {limits.max_clipped_fraction:.0%})")
    if stats.neighbour_correlation < limits.min_neighbour_correlation:
        return (f"noise image: neighbouring pixels correlate at {stats.neighbour_correlation:.2f} "
                f"(anatomy: above {limits.min_neighbour_correlation})")
    return None


def check(limits: Limits, modality: Any, body_part: Any, image: np.ndarray[Any, Any] | None) -> str | None:
    """Header first (no pixels needed), then pixels when given."""
    return check_header(limits, modality, body_part) or (check_pixels(limits, image) if image is not None else None)


def summary(reasons: Iterable[str]) -> str:
    return "; ".join(dict.fromkeys(reasons))
