"""Mammography: the standard views of one exam to a [V, 1, H, W] float32 tensor and a `present` vector.

Pure functions, no I/O. The worker picks the instances on the QIDO-RS answer first, retrieves only
those, and hands them over one at a time:

    chosen = select_views(refs, spec)                      # {ViewSlot: InstanceRef}
    views = assemble_views((client.retrieve_instance(r) for r in chosen.values()), spec)
    views.pixels  # [V, 1, H, W] in the order of spec.views; a missing view is zeros
    views.present # [V] float32, 1 where the view was found

A view is (laterality, view position): laterality from ImageLaterality (0020,0062), else the
series' Laterality (0020,0060); the view from ViewPosition (0018,5101), else ViewCodeSequence
(0054,0220, SNOMED CT codes of DICOM CID 4014). Every image is turned so that the chest wall is on
the same side (`spec.chest_wall`), from PatientOrientation (0020,0020) — its first value is the
direction of the rows: A means the nipple points right (chest wall on the left), P the other way —
or, when that is missing, from where the breast tissue touches the image edge.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

from interop.dicom.dicomweb import InstanceRef
from interop.dicom.errors import NotAnImage, NoViews
from interop.dicom.pixels import to_display_array

# ViewCodeSequence (CID 4014) codes of the views used here: SNOMED CT, and the older SNOMED RT ones.
VIEW_CODES = {
    "399162004": "CC", "R-10242": "CC",
    "399368009": "MLO", "R-10226": "MLO",
    "399260004": "ML", "R-10224": "ML",
    "399352003": "LM", "R-10228": "LM",
}
_VIEW_ALIASES = {"CC": "CC", "MLO": "MLO", "ML": "ML", "LM": "LM", "CRANIO-CAUDAL": "CC",
                 "MEDIO-LATERAL OBLIQUE": "MLO", "MEDIOLATERAL OBLIQUE": "MLO"}


@dataclass(frozen=True)
class ViewSlot:
    laterality: Literal["L", "R"]
    view: str  # "CC", "MLO", ...

    def __str__(self) -> str:
        return f"{self.laterality}{self.view}"


STANDARD_VIEWS = (ViewSlot("R", "CC"), ViewSlot("L", "CC"), ViewSlot("R", "MLO"), ViewSlot("L", "MLO"))


@dataclass(frozen=True)
class ViewSpec:
    """The tensor a mammography model reads: `views` in this order, each (1, height, width).

    Each image is windowed to 0..1 (`pixels.to_display_array`), turned so the chest wall is on
    `chest_wall`, scaled to fit height x width keeping its aspect ratio, placed against the chest
    wall side and centred vertically (zeros elsewhere), then (x - mean) / std.
    """

    views: tuple[ViewSlot, ...] = STANDARD_VIEWS
    height: int = 1024
    width: int = 832
    chest_wall: Literal["left", "right"] = "left"
    mean: float = 0.0
    std: float = 1.0

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ViewSpec:
        """From YAML/JSON: `views: [{laterality: R, view: CC}, ...]` and the other field names."""
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown view setting(s): {', '.join(sorted(unknown))}")
        values = dict(data)
        if "views" in values:
            values["views"] = tuple(ViewSlot(str(v["laterality"]).upper(), str(v["view"]).upper())  # type: ignore[arg-type]
                                    for v in values["views"])
        return cls(**values)


@dataclass
class AssembledViews:
    pixels: np.ndarray[Any, Any]  # float32 [V, 1, H, W]
    present: np.ndarray[Any, Any]  # float32 [V]: 1.0 found, 0.0 missing (its plane is zeros)
    instance_uids: tuple[str | None, ...]  # the SOP Instance UID used for each view
    undecodable: int = 0  # candidates skipped because their pixels could not be read
    flipped: tuple[bool, ...] = field(default_factory=tuple)


# -- which view is an instance ---------------------------------------------------------------------
def _laterality(*values: Any) -> str | None:
    for value in values:
        text = str(value or "").strip().upper()
        if text in ("L", "R"):
            return text
    return None


def _view_name(value: Any) -> str | None:
    text = str(value or "").strip().upper()
    return _VIEW_ALIASES.get(text)


def view_of_dataset(ds: Dataset) -> ViewSlot | None:
    """The (laterality, view) of a mammogram from its header; None when either is unknown."""
    laterality = _laterality(ds.get("ImageLaterality"), ds.get("Laterality"))
    view = _view_name(ds.get("ViewPosition"))
    if view is None:
        for item in ds.get("ViewCodeSequence") or ():
            view = VIEW_CODES.get(str(item.get("CodeValue", ""))) or _view_name(item.get("CodeMeaning"))
            if view:
                break
    if laterality is None or view is None:
        return None
    return ViewSlot(laterality, view)  # type: ignore[arg-type]


def view_of_ref(ref: InstanceRef) -> ViewSlot | None:
    """The same from a QIDO-RS result (ViewCodeSequence is not searched: ViewPosition only)."""
    laterality = _laterality(ref.image_laterality, ref.laterality)
    view = _view_name(ref.view_position)
    if laterality is None or view is None:
        return None
    return ViewSlot(laterality, view)  # type: ignore[arg-type]


def select_views(refs: Iterable[InstanceRef], spec: ViewSpec) -> dict[ViewSlot, InstanceRef]:
    """One instance per required view, from the search alone; the highest InstanceNumber wins
    (a repeated exposure replaces the first). Views missing here may still be found in the
    datasets' ViewCodeSequence: retrieve the instances whose view is unknown too if few are found."""
    wanted = set(spec.views)
    chosen: dict[ViewSlot, InstanceRef] = {}
    for ref in refs:
        if not ref.probably_image or (ref.modality or "MG").upper() != "MG":
            continue
        slot = view_of_ref(ref)
        if slot not in wanted:
            continue
        assert slot is not None
        current = chosen.get(slot)
        if current is None or (ref.instance_number or 0) > (current.instance_number or 0):
            chosen[slot] = ref
    return chosen


# -- pixels ----------------------------------------------------------------------------------------
def chest_wall_side(ds: Dataset, image: np.ndarray[Any, Any]) -> Literal["left", "right"]:
    """Where the chest wall is in the stored image: PatientOrientation, else the tissue at the edges."""
    orientation = ds.get("PatientOrientation")
    if orientation is not None and not isinstance(orientation, str) and len(orientation) >= 1:
        row = str(orientation[0]).strip().upper()
        if row.startswith("A"):
            return "left"  # moving right goes toward the nipple
        if row.startswith("P"):
            return "right"
    strip = max(1, image.shape[1] // 20)
    return "left" if float(image[:, :strip].mean()) >= float(image[:, -strip:].mean()) else "right"


def _fit(image: np.ndarray[Any, Any], spec: ViewSpec) -> np.ndarray[Any, Any]:
    rows, cols = image.shape
    scale = min(spec.height / rows, spec.width / cols)
    new_rows, new_cols = max(1, round(rows * scale)), max(1, round(cols * scale))
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(image, dtype=np.float32), mode="F").resize(
        (new_cols, new_rows), Image.Resampling.BILINEAR), dtype=np.float32)
    out = np.zeros((spec.height, spec.width), dtype=np.float32)
    top = (spec.height - new_rows) // 2
    left = 0 if spec.chest_wall == "left" else spec.width - new_cols
    out[top:top + new_rows, left:left + new_cols] = resized
    return out


def view_image(ds: Dataset, spec: ViewSpec) -> tuple[np.ndarray[Any, Any], bool]:
    """One mammogram to a (height, width) plane in 0..1 with the chest wall on `spec.chest_wall`."""
    image = to_display_array(ds)
    flip = chest_wall_side(ds, image) != spec.chest_wall
    if flip:
        image = image[:, ::-1]
    return _fit(image, spec), flip


def assemble_views(datasets: Iterable[Dataset], spec: ViewSpec) -> AssembledViews:
    """Datasets of one exam (any order, any extra instances) to the views of `spec`.

    The first decodable dataset of each required view is used; the others are skipped without
    decoding. Datasets are consumed one at a time and only the resized planes are kept.
    NoViews when not one required view is found.
    """
    index = {slot: i for i, slot in enumerate(spec.views)}
    if spec.std == 0:
        raise ValueError("std must not be zero")
    out = np.zeros((len(spec.views), 1, spec.height, spec.width), dtype=np.float32)
    present = np.zeros(len(spec.views), dtype=np.float32)
    uids: list[str | None] = [None] * len(spec.views)
    flipped = [False] * len(spec.views)
    undecodable = 0
    for ds in datasets:
        slot = view_of_dataset(ds)
        if slot is None or slot not in index or present[index[slot]]:
            continue
        i = index[slot]
        try:
            plane, flipped[i] = view_image(ds, spec)
        except NotAnImage:
            undecodable += 1
            continue
        out[i, 0] = plane
        present[i] = 1.0
        uids[i] = str(ds.get("SOPInstanceUID", "")) or None
        del ds, plane
    if not present.any():
        extra = f"; {undecodable} could not be decoded" if undecodable else ""
        raise NoViews(f"none of the views {', '.join(str(s) for s in spec.views)} is in the study{extra}")
    if spec.mean or spec.std != 1.0:
        for view in np.flatnonzero(present):  # missing views stay zeros: the model also gets `present`
            out[view] -= np.float32(spec.mean)
            out[i] /= np.float32(spec.std)
    return AssembledViews(out, present, tuple(uids), undecodable, tuple(flipped))
