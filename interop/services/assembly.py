"""From a model's description (mappings/models/*.yaml, `assembly`) to its input tensors.

Three kinds: `image` (each instance is a row; the study-level probability is the highest over
its images), `views` (one mammography exam, four views in a fixed order, with `present`
flags), `volume` (one CT/MR series chosen by rules, resampled to a fixed grid). The DICOM work
is in interop.dicom (pixels, views, volume); this module only translates the description and
streams instances from the PACS into it, so no study is held in memory twice.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np

from inference_client.models import Assembly, ModelDescription

from ..dicom import pixels
from ..dicom.dicomweb import ImageSource, InstanceRef
from ..dicom.errors import NotAnImage
from ..dicom.views import ViewSlot, ViewSpec, assemble_views, select_views
from ..dicom.volume import (
    BRAIN_CT_RULES,
    BRAIN_MR_RULES,
    SeriesRules,
    VolumeSpec,
    build_volume,
    choose_series,
    series_facts,
)

IMAGE_BATCH = 8

# The quality gate (interop.domain.quality, closed over a model's limits by the analysis):
# (SOP Instance UID, Modality, Body Part Examined, display array or None) -> may the model read it.
Gate = Callable[[str, object, object, "np.ndarray[Any, Any] | None"], bool]


def _open(uid: str, modality: object, body_part: object, image: np.ndarray[Any, Any] | None) -> bool:
    return True


def kind(model: ModelDescription) -> str:
    return model.assembly.kind if model.assembly else "image"


def view_spec(a: Assembly) -> ViewSpec:
    assert a.size is not None
    return ViewSpec(views=tuple(ViewSlot(v.laterality.upper(), v.view.upper()) for v in a.views),  # type: ignore[arg-type]
                    height=a.size[0], width=a.size[1], chest_wall="left")


def volume_spec(a: Assembly) -> VolumeSpec:
    assert a.size is not None and a.depth is not None
    if a.windows:
        return VolumeSpec(depth=a.depth, height=a.size[0], width=a.size[1], normalise="window",
                          windows=tuple((w.center, w.width) for w in a.windows))
    normalise = a.normalise or "zscore"
    if normalise not in ("window", "zscore", "none"):
        raise ValueError(f"assembly.normalise {normalise!r} is not window, zscore or none")
    return VolumeSpec(depth=a.depth, height=a.size[0], width=a.size[1], normalise=normalise)  # type: ignore[arg-type]


def series_rules(a: Assembly, modality: str | None) -> SeriesRules:
    """The preset for the modality, refined by the description's `series` choice."""
    rules = BRAIN_MR_RULES if (modality or "").upper() == "MR" else BRAIN_CT_RULES
    choice = a.series
    if choice is None:
        return rules
    changes: dict[str, object] = {"min_slices": choice.min_slices or rules.min_slices}
    if choice.orientation:
        changes["planes"] = (choice.orientation,)
    if choice.prefer_description:
        changes["prefer_description"] = tuple(choice.prefer_description)
    if choice.kernel:
        changes["prefer_kernel"] = tuple(choice.kernel)
    if choice.slice_thickness_mm:
        changes["thickness_mm"] = tuple(choice.slice_thickness_mm)
    return replace(rules, **changes)  # type: ignore[arg-type]


def zscore(image: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    v = image.astype(np.float64)
    scored: np.ndarray[Any, Any] = ((v - v.mean()) / max(float(v.std()), 1e-6)).astype(np.float32)
    return scored


def image_batches(client: ImageSource, model: ModelDescription, refs: list[InstanceRef],
                  gate: Gate = _open) -> Iterator[dict[str, np.ndarray[Any, Any]]]:
    """Rows of one image each (instances without pixels, and images the gate refuses, are
    skipped), IMAGE_BATCH at a time."""
    prep = model.preprocessing
    assert prep is not None, f"{model.name}: kind image needs preprocessing"
    rows: list[np.ndarray[Any, Any]] = []
    for ref in refs:
        if not ref.probably_image and ref.sop_class_uid:
            continue  # the search already says there are no pixels (SR, PDF, ...)
        ds = client.retrieve_instance(ref)
        try:
            image = pixels.to_display_array(ds)
            readable = gate(ref.instance_uid, ds.get("Modality"), ds.get("BodyPartExamined"), image)
        except NotAnImage:
            continue
        finally:
            del ds
        if not readable:
            continue
        rows.append(pixels.preprocess(image, size=(prep.resize[0], prep.resize[1]), channels=prep.channels, mean=prep.mean,
                                      std=prep.std))
        if len(rows) == IMAGE_BATCH:
            yield {model.input.name: np.stack(rows).astype(np.float32)}
            rows = []
    if rows:
        yield {model.input.name: np.stack(rows).astype(np.float32)}


def views_input(client: ImageSource, model: ModelDescription, refs: list[InstanceRef],
                gate: Gate = _open) -> dict[str, np.ndarray[Any, Any]]:
    """The exam's views; every view is put to the gate (its header from the search, its plane
    before normalisation), and the caller learns of a refusal from the gate itself."""
    a = model.assembly
    assert a is not None
    spec = view_spec(a)
    chosen = select_views(refs, spec)
    for ref in chosen.values():
        gate(ref.instance_uid, ref.modality, ref.body_part, None)
    assembled = assemble_views((client.retrieve_instance(r) for r in chosen.values()), spec)
    views = assembled.pixels.copy()
    for i, present in enumerate(assembled.present):
        if present:
            gate(assembled.instance_uids[i] or "", None, None, views[i, 0])
    for i, present in enumerate(assembled.present):
        if present and a.normalise == "zscore":
            views[i] = zscore(views[i])
    return {a.tensor: views[None].astype(np.float32), (a.present or "present"): assembled.present[None].astype(np.float32)}


def volume_input(client: ImageSource, model: ModelDescription, refs: list[InstanceRef],
                 gate: Gate = _open) -> dict[str, np.ndarray[Any, Any]]:
    """The chosen series as a volume; its first instance's header and the whole volume (its first
    window, as one image) are put to the gate."""
    a = model.assembly
    assert a is not None
    modality = next((r.modality for r in refs if r.modality), None)
    chosen = choose_series(series_facts(refs), series_rules(a, modality))
    first = next((r for r in refs if r.series_uid == chosen.series_uid), None)
    if first is not None:
        gate(first.instance_uid, first.modality, first.body_part, None)
    volume = build_volume(client.retrieve_series(chosen.study_uid, chosen.series_uid), volume_spec(a))
    gate(first.instance_uid if first is not None else chosen.series_uid, None, None,
         volume.reshape(-1, volume.shape[-1]) if volume.ndim >= 2 else volume)
    return {a.tensor: volume[None].astype(np.float32)}
