"""A report's image, rendered by the hub from the PACS: QIDO-RS, WADO-RS, the hub's own display
pipeline (modality LUT, VOI LUT / windowing, MONOCHROME1 inverted), downscaled PNG.

The hub renders rather than asking the PACS for WADO-RS `/rendered`, which many PACS lack or
window differently: the radiologist sees the pixels the way the model's preprocessing read them.
For CT/MR the middle instance of the first series is shown. Rendered images are kept per process
(a small LRU) so the worklist's thumbnails and the study page do not fetch the same study twice.

The study page's DICOM viewer (Cornerstone3D) reads the instances themselves through the hub:
`layout` says what to show (series in order, the four mammography views), `instance` is a
read-only WADO-RS retrieval of one instance of the report's own study, passed through from the PACS
(the browser never talks to the PACS, and asks for nothing the report does not point at).
"""
from __future__ import annotations

import io
import time
from functools import lru_cache
from typing import Any

import numpy as np
import psycopg
from PIL import Image

from ..dicom.dicomweb import DicomWebClient, InstanceRef
from ..dicom.errors import DicomError, NotAnImage, StudyNotFound
from ..dicom.pixels import to_display_array
from ..dicom.views import view_of_ref
from ..domain.vocabulary import study_uid
from ..services import intake
from ..services.errors import IntakeError
from ..store import resources
from ..tls import ClientTls

MAX_PX = 1024
THUMB_PX = 256
MAMMOGRAPHY_VIEWS = ("RCC", "LCC", "RMLO", "LMLO")  # side by side as radiologists hang them
_SEARCH_SECONDS = 60.0  # how long a study's instance list is reused by the viewer's requests


class ImageUnavailable(Exception):
    """`reason` is safe to show (no patient data); `status` is the HTTP status to answer."""

    def __init__(self, reason: str, status: int):
        super().__init__(reason)
        self.reason = reason
        self.status = status


def source(conn: psycopg.Connection[Any], report_id: str, default_url: str | None) -> tuple[str, str]:
    """(DICOMweb base URL, Study Instance UID) of the report's first ImagingStudy."""
    try:
        report = resources.read(conn, "DiagnosticReport", report_id)
        ref = str((report.get("imagingStudy") or [{}])[0].get("reference", ""))
        if not ref.startswith("ImagingStudy/"):
            raise ImageUnavailable("the report names no ImagingStudy", 404)
        study = resources.read(conn, "ImagingStudy", ref.split("/", 1)[1])
    except resources.StoreError:
        raise ImageUnavailable("the report or its study is not known", 404) from None
    try:
        base = intake.resolve_endpoint(conn, study) or default_url
    except IntakeError as exc:
        raise ImageUnavailable(exc.reason, 502) from None
    uid = study_uid(study)
    if not base or not uid:
        raise ImageUnavailable("the study has no DICOMweb endpoint or no Study Instance UID", 404)
    return base, uid


def choose(refs: list[InstanceRef]) -> InstanceRef:
    """The instance to show: the middle image of the first series (by series number)."""
    images = [r for r in refs if r.probably_image]
    if not images:
        raise ImageUnavailable("the study holds no image instance", 404)
    far = 1 << 30
    first_series = min(images, key=lambda r: (r.series_number if r.series_number is not None else far)).series_uid
    series = sorted((r for r in images if r.series_uid == first_series),
                    key=lambda r: (r.instance_number if r.instance_number is not None else far, r.instance_uid))
    return series[len(series) // 2]


def to_image(display: np.ndarray[Any, Any], max_px: int = MAX_PX) -> Image.Image:
    """A float (H, W) display array in 0..1 as an 8-bit greyscale image no larger than max_px."""
    image = Image.fromarray(np.clip(display * 255.0 + 0.5, 0, 255).astype(np.uint8))
    image.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    return image


@lru_cache(maxsize=16)
def _rendered(base_url: str, study_uid: str, timeout_s: float, tls: ClientTls) -> Image.Image:
    try:
        with DicomWebClient(base_url, timeout_s, tls=tls) as pacs:
            ds = pacs.retrieve_instance(choose(pacs.search_instances(study_uid)))
            return to_image(to_display_array(ds))
    except DicomError as exc:  # reasons never name a patient (interop/dicom/errors.py)
        raise ImageUnavailable(exc.reason, 404 if isinstance(exc, (StudyNotFound, NotAnImage)) else 502) from None


def png(base_url: str, study_uid: str, *, timeout_s: float, tls: ClientTls, max_px: int = MAX_PX) -> bytes:
    image = _rendered(base_url, study_uid, float(timeout_s), tls).copy()
    image.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


_searched: dict[tuple[str, str], tuple[float, list[InstanceRef]]] = {}


def instances(base_url: str, study_uid: str, *, timeout_s: float, tls: ClientTls) -> list[InstanceRef]:
    """The study's instances (QIDO-RS), reused for a minute: the viewer asks for each of them."""
    key = (base_url, study_uid)
    found = _searched.get(key)
    if found is not None and time.monotonic() - found[0] < _SEARCH_SECONDS:
        return found[1]
    try:
        with DicomWebClient(base_url, timeout_s, tls=tls) as pacs:
            refs = pacs.search_instances(study_uid)
    except DicomError as exc:
        raise ImageUnavailable(exc.reason, 404 if isinstance(exc, StudyNotFound) else 502) from None
    if len(_searched) > 64:
        _searched.clear()
    _searched[key] = (time.monotonic(), refs)
    return refs


def layout(refs: list[InstanceRef]) -> dict[str, Any]:
    """What the viewer shows: image series by series number, instances by instance number; a
    mammography exam as its four views (the latest exposure of each)."""
    far = 1 << 30
    images = [r for r in refs if r.probably_image]
    if not images:
        raise ImageUnavailable("the study holds no image instance", 404)
    series: dict[str, list[InstanceRef]] = {}
    for ref in sorted(images, key=lambda r: (r.series_number if r.series_number is not None else far,
                                              r.series_uid, r.instance_number if r.instance_number is not None
                                              else far, r.instance_uid)):
        series.setdefault(ref.series_uid, []).append(ref)
    out: dict[str, Any] = {"study": images[0].study_uid, "series": [{
        "uid": uid, "modality": members[0].modality or "", "description": members[0].series_description or "",
        "instances": [{"series": r.series_uid, "uid": r.instance_uid} for r in members]}
        for uid, members in series.items()]}
    views: dict[str, InstanceRef] = {}
    for ref in images:
        slot = view_of_ref(ref) if (ref.modality or "").upper() == "MG" else None
        if slot is not None and str(slot) in MAMMOGRAPHY_VIEWS:
            current = views.get(str(slot))
            if current is None or (ref.instance_number or 0) > (current.instance_number or 0):
                views[str(slot)] = ref
    if views:
        out["views"] = {name: {"series": ref.series_uid, "uid": ref.instance_uid} for name, ref in views.items()}
    return out


def instance(base_url: str, study_uid: str, series_uid: str, instance_uid: str, *, timeout_s: float,
             tls: ClientTls) -> bytes:
    """One instance of the study as a DICOM Part 10 file, if the study holds it."""
    ref = next((r for r in instances(base_url, study_uid, timeout_s=timeout_s, tls=tls)
                if r.series_uid == series_uid and r.instance_uid == instance_uid), None)
    if ref is None:
        raise ImageUnavailable("the study holds no such instance", 404)
    try:
        with DicomWebClient(base_url, timeout_s, tls=tls) as pacs:
            ds = pacs.retrieve_instance(ref)
    except DicomError as exc:
        raise ImageUnavailable(exc.reason, 404 if isinstance(exc, (StudyNotFound, NotAnImage)) else 502) from None
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
