"""CT/MR volumes: choose the series a model reads, then build a [C, D, H, W] float32 tensor from it.

Pure functions, no I/O. The worker goes from a study's QIDO-RS answer to a tensor like this:

    facts = series_facts(refs)                      # InstanceRefs grouped per series
    chosen = choose_series(facts, rules)            # axial, brain kernel, thickness, enough slices
    volume = build_volume(client.retrieve_series(chosen.study_uid, chosen.series_uid), spec)

`build_volume` consumes its datasets one at a time and keeps only each slice resized in-plane
(float32, target H x W): a 500-slice CT is never held in memory as datasets or at full size. It
sorts slices by their position along the slice normal (ImagePositionPatient . normal), refuses a
series with gaps or duplicate positions (`IncompleteSeries`), rescales to HU (CT; raw values for
MR), resamples along the normal to the requested depth, then windows CT into one channel per
window (each 0..1) or z-scores MR. Enhanced multi-frame CT/MR (one instance, many frames) works too.

Rules and specs are data (`SeriesRules.from_mapping`, `VolumeSpec.from_mapping`), so they can
live in the model descriptions under mappings/.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

from interop.dicom.dicomweb import InstanceRef
from interop.dicom.errors import IncompleteSeries, NoSuitableSeries, NotAnImage
from interop.dicom.pixels import decode_frame, modality_values
from interop.dicom.pixels import frame_item as _frame_item

# -- series facts and the choice ----------------------------------------------------------------


@dataclass(frozen=True)
class SeriesFacts:
    """What a study search tells about one series: enough to choose it without retrieving pixels."""

    study_uid: str
    series_uid: str
    modality: str | None = None
    series_description: str | None = None
    series_number: int | None = None
    body_part: str | None = None
    convolution_kernel: str | None = None
    slice_thickness: float | None = None
    image_orientation: tuple[float, ...] | None = None
    image_type: tuple[str, ...] = ()
    instances: int = 0  # image instances seen in the search
    frames: int = 0  # their frames together (enhanced multi-frame: one instance, many frames)

    @property
    def plane(self) -> str | None:
        """'axial', 'coronal', 'sagittal' or 'oblique' from ImageOrientationPatient; None if unknown."""
        return plane_of(self.image_orientation)


def plane_of(orientation: Sequence[float] | None, tolerance_deg: float = 20.0) -> str | None:
    """The anatomical plane whose normal is within `tolerance_deg` of the slice normal."""
    if not orientation or len(orientation) != 6:
        return None
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        return None
    normal /= norm
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < math.cos(math.radians(tolerance_deg)):
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def series_facts(refs: Iterable[InstanceRef]) -> list[SeriesFacts]:
    """Group a QIDO-RS answer by series; instances without pixels are not counted.

    Orientation, kernel and thickness come from the first instance that has them (PACS may not
    return ImageOrientationPatient at instance level: it then stays None).
    """
    grouped: dict[str, dict[str, Any]] = {}
    for ref in refs:
        entry = grouped.setdefault(ref.series_uid, {"study_uid": ref.study_uid, "series_uid": ref.series_uid,
                                                    "instances": 0, "frames": 0, "image_type": ()})
        if not ref.probably_image:
            continue
        entry["instances"] += 1
        entry["frames"] += ref.number_of_frames or 1
        for key, value in (("modality", ref.modality), ("series_description", ref.series_description),
                           ("series_number", ref.series_number), ("body_part", ref.body_part),
                           ("convolution_kernel", ref.convolution_kernel),
                           ("slice_thickness", ref.slice_thickness),
                           ("image_orientation", ref.image_orientation)):
            if value is not None and entry.get(key) is None:
                entry[key] = value
        if ref.image_type and not entry["image_type"]:
            entry["image_type"] = tuple(ref.image_type)
    return [SeriesFacts(**entry) for entry in grouped.values()]


def facts_from_dataset(ds: Dataset, instances: int = 1) -> SeriesFacts:
    """SeriesFacts from one instance's header (when the search gave too little)."""
    orientation = ds.get("ImageOrientationPatient") or None
    if orientation is None:
        item = _frame_item(ds, "PlaneOrientationSequence")
        orientation = item.get("ImageOrientationPatient") if item is not None else None
    kernel = ds.get("ConvolutionKernel")
    thickness = ds.get("SliceThickness")
    return SeriesFacts(
        study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID), modality=ds.get("Modality"),
        series_description=ds.get("SeriesDescription"), series_number=_int(ds.get("SeriesNumber")),
        body_part=ds.get("BodyPartExamined"),
        convolution_kernel=_join(kernel) if kernel else None,
        slice_thickness=float(thickness) if thickness not in (None, "") else None,
        image_orientation=tuple(float(v) for v in orientation) if orientation else None,
        image_type=tuple(str(v) for v in (ds.get("ImageType") or ())),
        instances=instances, frames=instances * int(ds.get("NumberOfFrames", 1) or 1),
    )


def _int(value: Any) -> int | None:
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _join(value: Any) -> str:
    if isinstance(value, (list, tuple)) or (hasattr(value, "__iter__") and not isinstance(value, (str, bytes))):
        return "\\".join(str(v) for v in value)
    return str(value)


@dataclass(frozen=True)
class SeriesRules:
    """How a model's series is chosen. Hard filters first, then a score among what is left.

    Filters: modality in `modalities`; at least `min_slices` frames; slice thickness within
    `thickness_mm` (when known); plane in `planes` (when ImageOrientationPatient is known;
    `require_orientation` also rejects series whose orientation is unknown); nothing matching
    `exclude` (regular expressions, case-insensitive, on description, kernel and ImageType:
    localizers, scouts, bone kernels, reformats...).
    Score: +4 for a kernel matching `prefer_kernel`, +2 for a description matching
    `prefer_description`, +1 for a known axial orientation, minus the distance of the thickness
    from `preferred_thickness_mm`, and more slices break ties.
    """

    modalities: tuple[str, ...] = ("CT",)
    planes: tuple[str, ...] = ("axial",)
    require_orientation: bool = False
    min_slices: int = 10
    thickness_mm: tuple[float, float] = (0.0, 10.0)
    preferred_thickness_mm: float | None = None
    prefer_kernel: tuple[str, ...] = ()
    prefer_description: tuple[str, ...] = ()
    exclude: tuple[str, ...] = (r"LOCALI[ZS]ER", r"SCOUT", r"TOPOGRAM", r"SURVIEW", r"\bDOSE\b", r"\bMIP\b")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> SeriesRules:
        """From a YAML/JSON mapping with the field names; lists become tuples."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown series rule(s): {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {key: tuple(value) if isinstance(value, list) else value for key, value in data.items()}
        return cls(**values)


# Defaults for the brain models: non-contrast head CT read in a soft-tissue ("brain") kernel.
BRAIN_CT_RULES = SeriesRules(
    modalities=("CT",), min_slices=16, thickness_mm=(0.5, 7.0), preferred_thickness_mm=5.0,
    prefer_kernel=(r"^H[1-4]\d", r"^J[3-4]\d", r"^Hr[3-4]\d", r"^Br[3-4]\d", r"BRAIN", r"STAND", r"STND", r"SOFT",
                   r"^UB$", r"^FC2[0-9]", r"^H\d\d?s?$"),
    prefer_description=(r"BRAIN", r"HEAD", r"CEREBRUM", r"NON.?CON", r"AXIAL", r"\bAX\b"),
    exclude=SeriesRules().exclude + (r"BONE", r"LUNG", r"SHARP", r"^H[6-9]\d", r"^Hr[6-9]\d", r"^Br[6-9]\d",
                                     r"^FC3\d", r"^FC8\d", r"\bCOR\b", r"\bSAG\b", r"\bMPR\b", r"\b3D\b"),
)
BRAIN_MR_RULES = SeriesRules(
    modalities=("MR",), min_slices=16, thickness_mm=(0.5, 7.0), preferred_thickness_mm=5.0,
    prefer_description=(r"\bT1\b", r"T1W", r"MPRAGE", r"\bAX\b", r"AXIAL"),
)


def choose_series(series: Sequence[SeriesFacts], rules: SeriesRules) -> SeriesFacts:
    """The best series under `rules`; `NoSuitableSeries` (safe reason: counts per cause) if none fits."""
    rejected: dict[str, int] = {}
    candidates: list[tuple[tuple[float, int, int], int, SeriesFacts]] = []
    patterns = [re.compile(p, re.IGNORECASE) for p in rules.exclude]
    kernel_patterns = [re.compile(p, re.IGNORECASE) for p in rules.prefer_kernel]
    description_patterns = [re.compile(p, re.IGNORECASE) for p in rules.prefer_description]
    for position, facts in enumerate(series):
        cause = _rejection(facts, rules, patterns)
        if cause:
            rejected[cause] = rejected.get(cause, 0) + 1
            continue
        score = 0.0
        if facts.convolution_kernel and any(p.search(facts.convolution_kernel) for p in kernel_patterns):
            score += 4
        if facts.series_description and any(p.search(facts.series_description) for p in description_patterns):
            score += 2
        if facts.plane == "axial":
            score += 1
        if rules.preferred_thickness_mm is not None and facts.slice_thickness is not None:
            score -= abs(facts.slice_thickness - rules.preferred_thickness_mm) / 5.0
        candidates.append(((score, facts.frames, -position), position, facts))
    if not candidates:
        if not series:
            raise NoSuitableSeries("no image series in the study")
        causes = ", ".join(f"{count} {cause}" for cause, count in sorted(rejected.items()))
        raise NoSuitableSeries(f"no series fits the model's rules ({causes})")
    return max(candidates, key=lambda c: c[0])[2]


def _rejection(facts: SeriesFacts, rules: SeriesRules, exclude: list[re.Pattern[str]]) -> str | None:
    if (facts.modality or "").upper() not in {m.upper() for m in rules.modalities}:
        return "of another modality"
    if facts.frames < rules.min_slices:
        return "with too few slices"
    texts = [facts.series_description or "", facts.convolution_kernel or "", "\\".join(facts.image_type)]
    if any(p.search(text) for p in exclude for text in texts if text):
        return "excluded (localizer, bone kernel, reformat...)"
    low, high = rules.thickness_mm
    if facts.slice_thickness is not None and not low <= facts.slice_thickness <= high:
        return "with slice thickness out of range"
    plane = facts.plane
    if plane is None and rules.require_orientation:
        return "without known orientation"
    if plane is not None and rules.planes and plane not in rules.planes:
        return "not in the required plane"
    return None


# -- the volume ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class VolumeSpec:
    """The tensor a model reads: [channels, depth, height, width] float32.

    `windows`: CT (centre, width) pairs in HU, one channel each, (HU - (c - w/2)) / w clipped to
    0..1; empty means one channel of raw HU. `normalise="zscore"` (MR) gives one channel of
    (x - mean) / std over the voxels above the volume's minimum (the head, not the air).
    `interpolation` applies in-plane and along the slices. In-plane, the slice is padded to a
    square (with its minimum) before resizing, keeping the aspect ratio.
    `gap_factor`: a step between neighbouring slices larger than this times the median step is a
    missing slice. `min_slices`: fewer slices than this is an incomplete series.
    """

    depth: int = 32
    height: int = 256
    width: int = 256
    windows: tuple[tuple[float, float], ...] = ((40.0, 80.0), (80.0, 200.0), (600.0, 2800.0))
    normalise: Literal["window", "zscore", "none"] = "window"
    interpolation: Literal["linear", "nearest"] = "linear"
    gap_factor: float = 1.5
    min_slices: int = 3

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> VolumeSpec:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown volume setting(s): {', '.join(sorted(unknown))}")
        values = dict(data)
        if "windows" in values:
            values["windows"] = tuple((float(c), float(w)) for c, w in values["windows"])
        return cls(**values)

    @property
    def channels(self) -> int:
        return len(self.windows) if self.normalise == "window" and self.windows else 1


BRAIN_CT_WINDOWS = ((40.0, 80.0), (80.0, 200.0))  # brain, subdural


@dataclass
class _Slice:
    position: float
    plane: np.ndarray[Any, Any]  # float32 (height, width), already resized


def build_volume(datasets: Iterable[Dataset], spec: VolumeSpec) -> np.ndarray[Any, Any]:
    """Slices (or frames) of one series, in any order, to a float32 [C, D, H, W] tensor.

    Raises IncompleteSeries (gaps, duplicates, mixed orientation or series, too few slices) and
    NotAnImage (a slice that cannot be decoded, no slices at all). Reasons carry no patient data.
    """
    slices: list[_Slice] = []
    normal: np.ndarray[Any, Any] | None = None
    orientation: np.ndarray[Any, Any] | None = None
    series_uid: str | None = None
    skipped_localizers = 0
    for ds in datasets:
        if "LOCALIZER" in [str(v).upper() for v in (ds.get("ImageType") or ())]:
            skipped_localizers += 1
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        if series_uid is None:
            series_uid = uid
        elif uid != series_uid:
            raise IncompleteSeries("slices from more than one series were given")
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        for frame in range(frames):
            iop, ipp = _geometry(ds, frame)
            if orientation is None:
                orientation = iop
                normal = np.cross(iop[:3], iop[3:])
                normal /= max(float(np.linalg.norm(normal)), 1e-9)
            assert normal is not None
            if float(np.abs(np.dot(np.cross(iop[:3], iop[3:]), normal))) < 0.999:  # > 2.5 degrees apart
                raise IncompleteSeries("slices of different orientations in one series")
            stored = decode_frame(ds, frame)
            if stored.ndim != 2:
                raise NotAnImage("a volume needs single-sample (grayscale) slices")
            values = modality_values(stored, ds, frame)
            del stored
            slices.append(_Slice(float(np.dot(ipp, normal)), _resize(values, spec)))
            del values
        del ds  # the dataset (and its pixel bytes) goes now, before the next one is read
    if not slices:
        raise NotAnImage("the series has no image slices" + (" (localizers only)" if skipped_localizers else ""))
    slices.sort(key=lambda s: s.position)
    positions = np.array([s.position for s in slices], dtype=np.float64)
    _check_spacing(positions, spec)
    planes = [s.plane for s in slices]  # no np.stack: that would hold every slice twice
    slices.clear()
    volume = _resample_depth(planes, positions, spec.depth, spec.interpolation)
    del planes
    return _normalise(volume, spec)


def _geometry(ds: Dataset, frame: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    iop = ds.get("ImageOrientationPatient")
    ipp = ds.get("ImagePositionPatient")
    if iop is None:
        item = _frame_item(ds, "PlaneOrientationSequence", frame)
        iop = item.get("ImageOrientationPatient") if item is not None else None
    if ipp is None or int(ds.get("NumberOfFrames", 1) or 1) > 1:
        item = _frame_item(ds, "PlanePositionSequence", frame)
        ipp = item.get("ImagePositionPatient") if item is not None else ipp
    if iop is None or ipp is None or len(iop) != 6 or len(ipp) != 3:
        raise IncompleteSeries("a slice has no position or orientation (ImagePositionPatient / ImageOrientationPatient)")
    return np.asarray([float(v) for v in iop]), np.asarray([float(v) for v in ipp])


def _check_spacing(positions: np.ndarray[Any, Any], spec: VolumeSpec) -> None:
    if len(positions) < max(spec.min_slices, 2):
        raise IncompleteSeries(f"the series has {len(positions)} slice(s); at least {max(spec.min_slices, 2)} needed")
    steps = np.diff(positions)
    median = float(np.median(steps))
    if median <= 1e-3:
        raise IncompleteSeries("slices share one position (a duplicated or multi-phase series)")
    duplicates = int(np.sum(steps < 0.01 * median))
    if duplicates:
        raise IncompleteSeries(f"{duplicates} slice(s) duplicated at the same position")
    gaps = steps > spec.gap_factor * median
    if gaps.any():
        missing = int(np.sum(np.rint(steps[gaps] / median) - 1))
        raise IncompleteSeries(
            f"{max(missing, 1)} slice(s) missing in {int(gaps.sum())} gap(s) (median spacing {median:.2f} mm)")


def _resize(values: np.ndarray[Any, Any], spec: VolumeSpec) -> np.ndarray[Any, Any]:
    rows, cols = values.shape
    if (rows, cols) == (spec.height, spec.width):
        return np.ascontiguousarray(values, dtype=np.float32)
    if rows != cols:  # pad to a square with the slice's minimum, keeping the aspect ratio
        side = max(rows, cols)
        square = np.full((side, side), float(values.min()), dtype=np.float32)
        top, left = (side - rows) // 2, (side - cols) // 2
        square[top:top + rows, left:left + cols] = values
        values = square
    method = Image.Resampling.BILINEAR if spec.interpolation == "linear" else Image.Resampling.NEAREST
    resized = Image.fromarray(np.ascontiguousarray(values, dtype=np.float32), mode="F").resize(
        (spec.width, spec.height), method)
    return np.asarray(resized, dtype=np.float32).copy()


def _resample_depth(stack: Sequence[np.ndarray[Any, Any]], positions: np.ndarray[Any, Any], depth: int,
                    interpolation: str) -> np.ndarray[Any, Any]:
    """`depth` planes evenly spaced from the first slice's position to the last one's (sorted `stack`)."""
    if depth < 1:
        raise ValueError("depth must be at least 1")
    targets = np.linspace(positions[0], positions[-1], depth) if depth > 1 else np.array([positions.mean()])
    if interpolation == "nearest":
        nearest = np.abs(positions[None, :] - targets[:, None]).argmin(axis=1)
        planes: np.ndarray[Any, Any] = np.stack([stack[i] for i in nearest]).astype(np.float32, copy=False)
        return planes
    upper = np.clip(np.searchsorted(positions, targets, side="right"), 1, len(positions) - 1)
    lower = upper - 1
    span = positions[upper] - positions[lower]
    weight = np.clip((targets - positions[lower]) / np.where(span > 0, span, 1.0), 0.0, 1.0).astype(np.float32)
    out = np.empty((depth,) + stack[0].shape, dtype=np.float32)
    for i in range(depth):  # one plane at a time: no (depth, H, W) temporaries beside the output
        np.multiply(stack[lower[i]], 1.0 - weight[i], out=out[i])
        out[i] += stack[upper[i]] * weight[i]
    return out


def _normalise(volume: np.ndarray[Any, Any], spec: VolumeSpec) -> np.ndarray[Any, Any]:
    if spec.normalise == "window" and spec.windows:
        out = np.empty((len(spec.windows),) + volume.shape, dtype=np.float32)
        for channel, (centre, width) in enumerate(spec.windows):
            if width <= 0:
                raise ValueError("window width must be positive")
            np.subtract(volume, centre - width / 2.0, out=out[channel])
            out[channel] *= 1.0 / width
            np.clip(out[channel], 0.0, 1.0, out=out[channel])
        return out
    if spec.normalise == "zscore":
        mask = volume > volume.min()
        sample = volume[mask] if mask.any() else volume
        mean, std = float(sample.mean()), float(sample.std())
        volume = (volume - mean) / (std if std > 1e-6 else 1.0)
    return volume[np.newaxis].astype(np.float32, copy=False)
