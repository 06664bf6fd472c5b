"""Pixel data to model input: pure functions, no I/O.

`to_display_array` follows the DICOM grayscale pipeline (PS3.3 C.11 / PS3.4 N.2.1): stored
values -> Modality LUT (or rescale slope/intercept) -> VOI LUT (or window centre/width) ->
0..1, with MONOCHROME1 inverted so that 1 is always the brightest display value. Colour images
become luminance. `preprocess` turns that image into a normalised (C, H, W) tensor.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, get_decoder, pixel_array

from interop.dicom.errors import NotAnImage

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_NON_IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated documents
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.481.",  # radiotherapy objects
)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as DICOM YBR uses
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# The plugins tried, in order, for each compressed transfer syntax: the fastest installed one first,
# as measured by bench/pixel_decoders.py on a 2048x2048 12-bit image. GDCM is listed only where
# nothing else decodes the syntax without the GPL libjpeg: on a garbled JPEG baseline header it
# aborts the whole process (seen with python-gdcm 3.2), which no `except` can catch.
DECODING_PLUGINS: dict[str, tuple[str, ...]] = {
    uid.RLELossless: ("pylibjpeg", "pydicom"),  # pylibjpeg-rle: 10 ms vs pydicom's own 81 ms
    uid.JPEGLSLossless: ("pyjpegls", "pylibjpeg"),  # CharLS: 88 ms vs GDCM 161 ms, libjpeg 444 ms
    uid.JPEGLSNearLossless: ("pyjpegls", "pylibjpeg"),
    uid.JPEGLossless: ("gdcm", "pylibjpeg"),  # 115 ms vs pylibjpeg-libjpeg 152 ms
    uid.JPEGLosslessSV1: ("gdcm", "pylibjpeg"),
    uid.JPEGBaseline8Bit: ("pillow", "pylibjpeg"),  # 8 ms vs libjpeg 37 ms, GDCM 40 ms
    uid.JPEGExtended12Bit: ("pylibjpeg", "pillow"),  # 12-bit needs libjpeg (the `jpeg12` extra)
    uid.JPEG2000Lossless: ("pylibjpeg", "pillow"),  # openjpeg; GDCM and Pillow are within 10 %
    uid.JPEG2000: ("pylibjpeg", "pillow"),
}


def check_image(ds: Dataset) -> None:
    """Raise NotAnImage when `ds` cannot hold pixels (non-image SOP class, no pixel data, no size)."""
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class.startswith(_NON_IMAGE_SOP_PREFIXES):
        raise NotAnImage("not an image SOP class")
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise NotAnImage("instance has no pixel data")
    if not ds.get("Rows") or not ds.get("Columns"):
        raise NotAnImage("instance has no image size")


def decode_frame(ds: Dataset, index: int = 0) -> np.ndarray[Any, Any]:
    """Stored values of frame `index` (rows, columns[, samples]); NotAnImage if they cannot be decoded.

    Only that frame is decoded, and nothing is cached on `ds` (unlike `ds.pixel_array`). The
    installed plugins of `DECODING_PLUGINS` are tried in order (all of pydicom's for other syntaxes).
    """
    check_image(ds)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if not 0 <= index < frames:
        raise NotAnImage("frame number out of range")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    name = getattr(syntax, "name", None) or "unknown transfer syntax"
    plugins: tuple[str, ...] = ("",)  # "": every plugin pydicom has for the syntax
    if syntax and str(syntax) in DECODING_PLUGINS:
        available = get_decoder(syntax).available_plugins
        plugins = tuple(p for p in DECODING_PLUGINS[str(syntax)] if p in available)
    failure: Exception | None = None
    for plugin in plugins:
        try:
            stored = pixel_array(ds, index=index, decoding_plugin=plugin)
            break
        except Exception as exc:  # pydicom raises many types (ValueError, RuntimeError, NotImplementedError...)
            failure = exc
    else:
        raise NotAnImage(f"pixel data cannot be decoded ({name})") from failure
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if stored.ndim == 3 and samples == 1 and stored.shape[0] == frames:
        stored = stored[index]  # a decoder that ignored `index`
    expected = (int(ds.Rows), int(ds.Columns))
    if stored.shape[:2] != expected:
        raise NotAnImage("decoded pixels do not match the image size")
    return stored


def to_display_array(ds: Dataset) -> np.ndarray[Any, Any]:
    """The first frame of `ds` as float32 (rows, columns) in [0, 1]; raises NotAnImage."""
    stored = decode_frame(ds, 0)

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(stored, ds)
        except Exception as exc:  # missing or malformed lookup tables raise several types
            raise NotAnImage("palette colour lookup table is unusable") from exc
        image = _luminance(rgb, 8 if rgb.dtype == np.uint8 else 16)
    elif samples == 3 or stored.ndim == 3:
        if stored.ndim != 3 or stored.shape[-1] != 3:
            raise NotAnImage("unexpected colour pixel layout")
        image = _luminance(stored, int(ds.get("BitsStored", 8) or 8))
    else:
        if stored.ndim != 2:
            raise NotAnImage("unexpected pixel array shape")
        image = _grayscale(stored, ds)
        if photometric == "MONOCHROME1":
            image = 1.0 - image
    if not np.all(np.isfinite(image)):
        raise NotAnImage("pixel values are not finite")
    return np.ascontiguousarray(image, dtype=np.float32)


def _luminance(rgb: np.ndarray[Any, Any], bits: int) -> np.ndarray[Any, Any]:
    scale = float((1 << bits) - 1) if np.issubdtype(rgb.dtype, np.integer) else max(float(rgb.max()), 1e-6)
    luminance: np.ndarray[Any, Any] = np.clip((rgb.astype(np.float32) @ _LUMA) / scale, 0.0, 1.0)
    return luminance


def _frame_item(ds: Dataset, sequence: str, frame: int = 0) -> Dataset | None:
    """The item of a functional group macro for one frame (enhanced multi-frame objects)."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        outer = ds.get(groups)
        if outer and len(outer) > index and sequence in outer[index] and outer[index][sequence]:
            return outer[index][sequence][0]  # type: ignore[no-any-return]
    return None


frame_item = _frame_item  # public name for volume assembly


def _first_number(value: Any) -> float | None:
    """The first of a possibly multi-valued DS/IS element (several windows: take the first)."""
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def modality_values(stored: np.ndarray[Any, Any], ds: Dataset, frame: int = 0) -> np.ndarray[Any, Any]:
    """Stored values through the Modality LUT or rescale slope/intercept (HU for CT), as float32.

    The rescale comes from the top level, else from frame `frame`'s functional groups (enhanced
    multi-frame CT/MR). A new array is returned; `stored` is left alone.
    """
    if "ModalityLUTSequence" in ds:
        return apply_modality_lut(stored, ds).astype(np.float32)
    source: Dataset = ds
    if "RescaleSlope" not in ds and "RescaleIntercept" not in ds:
        source = _frame_item(ds, "PixelValueTransformationSequence", frame) or ds
    slope = _first_number(source.get("RescaleSlope"))
    intercept = _first_number(source.get("RescaleIntercept"))
    values = stored.astype(np.float32)
    if slope is not None and slope != 1.0:
        values *= np.float32(slope)
    if intercept:
        values += np.float32(intercept)
    return values


def _grayscale(stored: np.ndarray[Any, Any], ds: Dataset) -> np.ndarray[Any, Any]:
    values = modality_values(stored, ds)

    # VOI: a lookup table first (what the modality intended for display), then a window.
    if "VOILUTSequence" in ds and ds.VOILUTSequence:
        item = ds.VOILUTSequence[0]
        # The LUT is indexed by the modality LUT output: integers, as the standard defines it.
        indices = np.rint(values).astype(np.int64)
        out = apply_voi(indices, ds, index=0).astype(np.float32)
        lut = np.asarray(item.LUTData, dtype=np.float32).ravel()
        return _scale(out, float(lut.min()), float(lut.max()))

    source = ds
    if "WindowCenter" not in ds:
        source = _frame_item(ds, "FrameVOILUTSequence") or ds
    centre = _first_number(source.get("WindowCenter"))
    width = _first_number(source.get("WindowWidth"))
    if centre is not None and width is not None and width > 0:
        function = str(source.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        return window(values, centre, width, function, inplace=True)  # `values` is ours: no copies

    sample = values[:: max(1, values.shape[0] // 512), :: max(1, values.shape[1] // 512)]
    low, high = np.percentile(sample, [0.5, 99.5])
    return _scale(values, float(low), float(high), inplace=True)


def _scale(values: np.ndarray[Any, Any], low: float, high: float, *, inplace: bool = False) -> np.ndarray[Any, Any]:
    """`values` from [low, high] to [0, 1], clipped; `inplace` overwrites a float32 `values`
    (a 2048² radiograph: one pass over 16 MB instead of three new arrays)."""
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    if inplace and values.dtype == np.float32:
        out = np.subtract(values, np.float32(low), out=values)
        out *= np.float32(1.0 / (high - low))
    else:
        out = (values - np.float32(low)) * np.float32(1.0 / (high - low))
    return np.clip(out, 0.0, 1.0, out=out)


def window(values: np.ndarray[Any, Any], centre: float, width: float, function: str = "LINEAR", *,
           inplace: bool = False) -> np.ndarray[Any, Any]:
    """Window centre/width to [0, 1], per PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT, SIGMOID);
    `inplace`: `values` may be overwritten."""
    values = values.astype(np.float32, copy=False)
    if function == "SIGMOID":
        sigmoid: np.ndarray[Any, Any] = (1.0 / (1.0 + np.exp(-4.0 * (values - centre) / width))).astype(np.float32)
        return sigmoid
    if function == "LINEAR_EXACT":
        return _scale(values, centre - width / 2.0, centre + width / 2.0, inplace=inplace)
    # LINEAR: x <= c - 0.5 - (w-1)/2 -> 0; x > c - 0.5 + (w-1)/2 -> 1; linear between.
    width = max(width, 1.0)
    if width == 1.0:
        return (values > centre - 0.5).astype(np.float32)
    low = centre - 0.5 - (width - 1.0) / 2.0
    return _scale(values, low, low + (width - 1.0), inplace=inplace)


def preprocess(
    image: np.ndarray[Any, Any],
    *,
    size: tuple[int, int] = (224, 224),
    channels: int = 3,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    pad_value: float = 0.0,
) -> np.ndarray[Any, Any]:
    """A (H, W) image in [0, 1] to a float32 (channels, height, width) model input.

    The aspect ratio is kept: the image is padded to a square with `pad_value` (centred), then
    resized with Pillow's bilinear filter (antialiased when shrinking), replicated to `channels`
    and normalised per channel: (x - mean[c]) / std[c]. `mean`/`std` of length 1 apply to all.
    """
    if image.ndim != 2:
        raise ValueError(f"expected a (H, W) image, got shape {image.shape}")
    if channels < 1:
        raise ValueError("channels must be at least 1")
    mean_arr = _per_channel(mean, channels, "mean")
    std_arr = _per_channel(std, channels, "std")
    if np.any(std_arr == 0):
        raise ValueError("std must not contain zero")
    height, width = int(size[0]), int(size[1])

    rows, cols = image.shape
    side = max(rows, cols)
    if rows == cols and image.dtype == np.float32 and image.flags.c_contiguous:
        square = image  # already square: no padded copy
    else:
        square = np.full((side, side), pad_value, dtype=np.float32)
        top, left = (side - rows) // 2, (side - cols) // 2
        square[top : top + rows, left : left + cols] = image
    resized = Image.fromarray(square, mode="F").resize((width, height), Image.Resampling.BILINEAR)
    plane = np.asarray(resized, dtype=np.float32)
    out = np.repeat(plane[np.newaxis, :, :], channels, axis=0)
    out -= mean_arr[:, None, None]
    out /= std_arr[:, None, None]
    return out


def _per_channel(values: Sequence[float], channels: int, name: str) -> np.ndarray[Any, Any]:
    arr = np.asarray(list(values), dtype=np.float32).ravel()
    if arr.size == 1:
        return np.repeat(arr, channels)
    if arr.size != channels:
        raise ValueError(f"{name} has {arr.size} values for {channels} channels")
    return arr
