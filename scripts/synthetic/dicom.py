"""Synthetic but realistic DICOM instances for the demo, the tests and the benchmarks.

`make_chest_xray` builds a full-size digital chest radiograph (DX, For Presentation, 12-bit
MONOCHROME2) whose pixels are drawn deterministically from a seed: a body outline, two lung
fields, mediastinum and heart, spine, clavicles, ribs as arcs, and noise. Different seeds give
different anatomy. `make_non_image` builds an instance of the same study that has no pixels
(a Basic Text SR or an Encapsulated PDF), as PACS studies often carry.

Everything here is fake: the names, identifiers and images describe no person.
"""
from __future__ import annotations

import datetime as _dt
from collections.abc import Iterator
from io import BytesIO
from typing import Literal

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"

_BITS = 12
_MAX = (1 << _BITS) - 1


# -- pixels --------------------------------------------------------------------------------------
def _smooth_step(distance: np.ndarray, softness: float) -> np.ndarray:
    """1 inside (distance < 0), 0 outside, with a soft edge `softness` wide."""
    return (1.0 / (1.0 + np.exp(np.clip(distance / softness, -30, 30)))).astype(np.float32)


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float, soft: float) -> np.ndarray:
    radius = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
    return _smooth_step(radius - 1.0, soft)


def chest_pixels(seed: int, size: int = 2048) -> np.ndarray:
    """A synthetic PA chest radiograph, uint16 with 12 bits stored; bright = dense (MONOCHROME2)."""
    rng = np.random.default_rng(seed)
    n = 512  # anatomy is smooth: draw it at 512 and upsample, then add full-resolution noise
    coords = np.linspace(-1.0, 1.0, n, dtype=np.float32)
    x, y = np.meshgrid(coords, coords)
    j = lambda scale: float(rng.uniform(-scale, scale))  # noqa: E731 - small jitter helper

    body = _ellipse(x, y, j(0.03), 0.08 + j(0.03), 0.86 + j(0.05), 1.05 + j(0.05), 0.03)
    img = 0.05 + 0.50 * body
    # shoulders and neck above the thorax
    img += 0.10 * _ellipse(x, y, 0.0, -0.95, 0.22 + j(0.03), 0.25, 0.05) * body

    lung_tilt = j(0.04)
    lungs = np.zeros_like(x)
    for side in (-1.0, 1.0):
        cx = side * (0.36 + j(0.04))
        cy = -0.05 + j(0.05) + side * lung_tilt
        ax = 0.27 + j(0.03) - (0.02 if side > 0 else 0.0)  # the heart leaves less room on the left
        ay = 0.58 + j(0.05)
        lung = _ellipse(x, y, cx, cy, ax, ay, 0.04)
        # costophrenic angle: the lung base is flatter than its apex
        lung *= _smooth_step(y - (cy + ay * 0.85) - 0.15 * ((x - cx) / ax) ** 2, 0.03)
        lungs = np.maximum(lungs, lung)
    img -= (0.33 + j(0.04)) * lungs

    # vessels: faint branching brightness fading toward the lung periphery
    hilum = np.exp(-((np.abs(x) - 0.2) ** 2 / 0.02 + (y + 0.05) ** 2 / 0.08)).astype(np.float32)
    img += 0.07 * hilum * lungs

    heart_ax = 0.25 + j(0.05)
    heart = _ellipse(x, y, 0.10 + j(0.04), 0.28 + j(0.04), heart_ax, 0.28 + j(0.03), 0.05)
    img += 0.22 * heart * np.maximum(lungs, 0.3)
    mediastinum = _smooth_step(np.abs(x + 0.01) - 0.10 - 0.04 * (y + 1.0), 0.03) * body
    img += 0.18 * mediastinum * _smooth_step(y - 0.6, 0.05)
    spine = _smooth_step(np.abs(x - j(0.01)) - 0.055, 0.01) * body
    img += 0.12 * spine
    # vertebral end plates: faint horizontal banding along the spine
    img += 0.03 * spine * (0.5 + 0.5 * np.cos(y * np.pi * 12.0 + j(3.0)))

    ribs = np.zeros_like(x)
    spacing = 0.125 + j(0.01)
    for side in (-1.0, 1.0):
        for k in range(10):
            y0 = -0.68 + k * spacing + j(0.01)
            bend = 0.9 + 0.05 * k + j(0.05)
            # a posterior rib: runs up from the spine, then curves down toward the flank
            centre = y0 - 0.18 * np.abs(x) + bend * (np.abs(x) - 0.35) ** 2
            thickness = 0.018 + 0.002 * k
            on_side = _smooth_step(-side * x - 0.04, 0.01)  # only on its half of the chest
            band = np.exp(-((y - centre) / thickness) ** 2) * on_side
            ribs = np.maximum(ribs, band.astype(np.float32))
    img += (0.10 + j(0.02)) * ribs * body

    for side in (-1.0, 1.0):  # clavicles
        centre = -0.72 + j(0.03) + 0.25 * (np.abs(x) - 0.35) ** 2 - 0.1 * np.abs(x)
        band = np.exp(-((y - centre) / 0.025) ** 2) * _smooth_step(np.abs(x - side * 0.3) - 0.3, 0.02)
        img += 0.12 * band.astype(np.float32) * _smooth_step(-side * x, 0.02)

    # diaphragm and abdomen below the lungs stay soft-tissue bright; a gastric bubble on the left
    img -= 0.12 * _ellipse(x, y, 0.35 + j(0.05), 0.68 + j(0.03), 0.09, 0.06, 0.02) * body

    # low-frequency detector non-uniformity
    field = rng.normal(0.0, 1.0, (8, 8)).astype(np.float32)
    img += 0.015 * np.asarray(Image.fromarray(field, mode="F").resize((n, n), Image.Resampling.BICUBIC))

    full = np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize((size, size), Image.Resampling.BICUBIC))
    full = full + rng.normal(0.0, 0.008, full.shape).astype(np.float32)
    return np.clip(np.rint(full * _MAX), 0, _MAX).astype(np.uint16)


# -- datasets ------------------------------------------------------------------------------------
def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "INTEROP_SYNTH"
    return meta


def _patient_and_study(
    ds: Dataset,
    *,
    study_uid: str,
    accession: str,
    patient_id: str,
    patient_name: str,
    patient_sex: str,
    patient_birth_date: str,
    when: _dt.datetime,
    study_description: str,
) -> None:
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = "INTEROP-DEMO"
    ds.PatientBirthDate = patient_birth_date
    ds.PatientSex = patient_sex
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = when.strftime("%Y%m%d")
    ds.StudyTime = when.strftime("%H%M%S")
    ds.AccessionNumber = accession
    ds.StudyID = accession[-16:]
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study_description
    ds.InstitutionName = "Demo Provincial Hospital"


def make_chest_xray(
    seed: int,
    study_uid: str | None = None,
    accession: str | None = None,
    patient_id: str = "DEMO-0001",
    *,
    patient_name: str = "DEMO^PATIENT",
    patient_sex: str = "O",
    patient_birth_date: str = "19700101",
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    size: int = 2048,
    modality: Literal["DX", "CR"] = "DX",
    view_position: str = "PA",
    photometric: Literal["MONOCHROME2", "MONOCHROME1"] = "MONOCHROME2",
    when: _dt.datetime | None = None,
) -> Dataset:
    """A full-size synthetic chest radiograph as a complete DICOM dataset (with file meta).

    `modality="CR"` writes a Computed Radiography instance instead of DX For Presentation.
    `photometric="MONOCHROME1"` stores the same image inverted (bright = less dense), as many
    CR/DX devices do.
    """
    rng = np.random.default_rng(seed)
    when = when or _dt.datetime(2024, 1, 1, 8, 0, 0) + _dt.timedelta(minutes=int(rng.integers(0, 525_600)))
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    sop_instance_uid = sop_instance_uid or generate_uid()
    accession = accession or f"ACC{seed:08d}"
    sop_class = DX_FOR_PRESENTATION if modality == "DX" else CR_IMAGE

    pixels = chest_pixels(seed, size)
    if photometric == "MONOCHROME1":
        pixels = (_MAX - pixels).astype(np.uint16)

    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_instance_uid)
    _patient_and_study(
        ds,
        study_uid=study_uid,
        accession=accession,
        patient_id=patient_id,
        patient_name=patient_name,
        patient_sex=patient_sex,
        patient_birth_date=patient_birth_date,
        when=when,
        study_description=f"XR CHEST {view_position}",
    )
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.InstanceCreationDate = ds.StudyDate
    ds.InstanceCreationTime = ds.StudyTime
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = ds.StudyTime
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S")
    ds.Modality = modality
    ds.Manufacturer = "Interop Synthetic"
    ds.ManufacturerModelName = "SYNTH-CXR"
    ds.StationName = "XR01"
    ds.SeriesDescription = f"CHEST {view_position}"
    ds.ProtocolName = f"CHEST {view_position}"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view_position
    ds.PatientOrientation = ["L", "F"] if view_position == "PA" else ["R", "F"]
    ds.KVP = 120
    ds.ExposureTime = 10
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImageLaterality = "U"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.DetectorType = "SCINTILLATOR"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"

    spacing = round(410.0 / size, 4)  # a 41 cm detector
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelSpacing = [spacing, spacing]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = _BITS
    ds.HighBit = _BITS - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    # a lung window: centred between the lung fields and the mediastinum
    low, high = np.percentile(pixels[:: 8, :: 8], [1.0, 99.0])
    ds.WindowCenter = int(round((low + high) / 2))
    ds.WindowWidth = int(round(max(high - low, 1)))
    ds.VOILUTFunction = "LINEAR"
    ds.PixelData = pixels.tobytes()
    return ds


def make_non_image(
    study_uid: str,
    kind: Literal["sr", "pdf"] = "sr",
    *,
    accession: str = "ACC00000000",
    patient_id: str = "DEMO-0001",
    patient_name: str = "DEMO^PATIENT",
    patient_sex: str = "O",
    patient_birth_date: str = "19700101",
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    text: str = "Request form scanned at the front desk.",
) -> Dataset:
    """An instance of `study_uid` without pixel data: a Basic Text SR or an Encapsulated PDF."""
    sop_instance_uid = sop_instance_uid or generate_uid()
    sop_class = BASIC_TEXT_SR if kind == "sr" else ENCAPSULATED_PDF
    when = _dt.datetime(2024, 1, 1, 8, 0, 0)
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_instance_uid)
    _patient_and_study(
        ds,
        study_uid=study_uid,
        accession=accession,
        patient_id=patient_id,
        patient_name=patient_name,
        patient_sex=patient_sex,
        patient_birth_date=patient_birth_date,
        when=when,
        study_description="XR CHEST",
    )
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance_uid
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    ds.Manufacturer = "Interop Synthetic"
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    if kind == "sr":
        ds.Modality = "SR"
        ds.SeriesDescription = "Request notes"
        ds.CompletionFlag = "COMPLETE"
        ds.VerificationFlag = "UNVERIFIED"
        ds.ValueType = "CONTAINER"
        ds.ContinuityOfContent = "SEPARATE"
        ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic imaging report")])
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = "TEXT"
        item.ConceptNameCodeSequence = Sequence([_code("121060", "DCM", "History")])
        item.TextValue = text
        ds.ContentSequence = Sequence([item])
        ds.ReferencedPerformedProcedureStepSequence = Sequence()
        ds.PerformedProcedureCodeSequence = Sequence()
    else:
        ds.Modality = "DOC"
        ds.SeriesDescription = "Scanned request"
        ds.ConversionType = "SD"
        ds.BurnedInAnnotation = "YES"
        ds.DocumentTitle = "Scanned request"
        ds.ConceptNameCodeSequence = Sequence()
        ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
        ds.EncapsulatedDocument = _minimal_pdf(text)
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _minimal_pdf(text: str) -> bytes:
    safe = text.encode("latin-1", "replace").replace(b"(", b"[").replace(b")", b"]")
    stream = b"BT /F1 12 Tf 72 720 Td (" + safe + b") Tj ET"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    if len(out) % 2:
        out += b"\n"  # DICOM OB values have even length
    return bytes(out)


def dataset_bytes(ds: Dataset) -> bytes:
    """The dataset as a DICOM Part 10 file (preamble, file meta, explicit VR little endian)."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# ================================================================================================
# More model families: mammography, CT/MR head series, spine radiographs; and compression.
# ================================================================================================
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
_ORIENTATIONS = {"axial": AXIAL, "coronal": CORONAL, "sagittal": SAGITTAL}

# ViewCodeSequence codes (SNOMED CT, as in DICOM CID 4014) and the breast's orientation as stored:
# chest wall on the image's left for a left breast (row direction A), on its right for a right one.
_MG_VIEWS = {
    "CC": ("399162004", "cranio-caudal"),
    "MLO": ("399368009", "medio-lateral oblique"),
}
_MG_ORIENTATION = {("L", "CC"): ["A", "R"], ("R", "CC"): ["P", "L"],
                   ("L", "MLO"): ["A", "FR"], ("R", "MLO"): ["P", "FL"]}


def _upsample(img: np.ndarray, rows: int, cols: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize((cols, rows), Image.Resampling.BICUBIC))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    field = rng.normal(0.0, 1.0, (cells, cells)).astype(np.float32)
    return _upsample(field, *shape)


def _image_pixel_module(ds: Dataset, pixels: np.ndarray, bits: int, photometric: str = "MONOCHROME2") -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()


def _common(ds: Dataset, *, sop_class: str, sop_instance: str, series_uid: str, modality: str,
            series_number: int, instance_number: int, series_description: str, when: _dt.datetime) -> None:
    ds.file_meta = _file_meta(sop_class, sop_instance)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.SeriesDescription = series_description
    ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = when.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = when.strftime("%H%M%S")
    ds.Manufacturer = "Interop Synthetic"
    ds.BurnedInAnnotation = "NO"


def _when(rng: np.random.Generator, when: _dt.datetime | None) -> _dt.datetime:
    return when or _dt.datetime(2024, 1, 1, 8, 0, 0) + _dt.timedelta(minutes=int(rng.integers(0, 525_600)))


# -- mammography ---------------------------------------------------------------------------------
def mammogram_pixels(seed: int, laterality: str, view: str, rows: int = 3328, cols: int = 2560) -> np.ndarray:
    """A synthetic FFDM image, uint16 with 12 bits stored, chest wall where the standard puts it
    (left edge for a left breast, right edge for a right one); MLO views show the pectoral muscle."""
    rng = np.random.default_rng([seed, ord(laterality[0]), len(view)])
    r, c = max(rows // 4, 64), max(cols // 4, 48)
    y, x = np.mgrid[0:r, 0:c].astype(np.float32)
    y, x = y / r, x / c  # 0..1; x measured from the chest wall
    depth = 0.62 + float(rng.uniform(-0.08, 0.08))  # how far the breast reaches from the chest wall
    centre = 0.5 + float(rng.uniform(-0.05, 0.05))
    half = 0.42 + float(rng.uniform(-0.04, 0.04))
    radius = np.sqrt((x / depth) ** 2 + ((y - centre) / half) ** 2)
    breast = _smooth_step(radius - 1.0, 0.01)
    thickness = np.sqrt(np.clip(1.0 - radius**2, 0.0, 1.0))  # compressed tissue thins toward the skin
    gland = _smooth_noise(rng, (r, c), 12) * 0.5 + _smooth_noise(rng, (r, c), 40) * 0.25
    img = 0.08 + breast * (0.30 + 0.25 * thickness + 0.10 * np.clip(gland, -1.5, 1.5) * thickness)
    if view == "MLO":  # pectoral muscle: a bright triangle in the upper chest-wall corner
        pect = _smooth_step(x / 0.30 + y / (0.45 + float(rng.uniform(-0.05, 0.05))) - 1.0, 0.02)
        img += 0.25 * pect * breast
    for _ in range(int(rng.integers(2, 6))):  # a few calcification-like specks
        cy, cx = float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.1, depth * 0.8))
        img += 0.25 * np.exp(-(((y - cy) * r) ** 2 + ((x - cx) * c) ** 2) / 2.0) * breast
    full = _upsample(img, rows, cols) + rng.normal(0.0, 0.006, (rows, cols)).astype(np.float32)
    out = np.clip(np.rint(full * _MAX), 0, _MAX).astype(np.uint16)
    return out[:, ::-1].copy() if laterality == "R" else out


def make_mammogram(
    seed: int,
    laterality: Literal["L", "R"],
    view: Literal["CC", "MLO"],
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    accession: str | None = None,
    patient_id: str = "DEMO-0002",
    patient_name: str = "DEMO^MAMMO",
    rows: int = 3328,
    cols: int = 2560,
    instance_number: int = 1,
    with_view_code: bool = True,
    with_view_position: bool = True,
    when: _dt.datetime | None = None,
) -> Dataset:
    """One full-field digital mammogram (MG, For Presentation, 12-bit MONOCHROME2)."""
    rng = np.random.default_rng(seed)
    when = _when(rng, when)
    sop_instance_uid = sop_instance_uid or generate_uid()
    ds = Dataset()
    _common(ds, sop_class=MG_FOR_PRESENTATION, sop_instance=sop_instance_uid, series_uid=series_uid or generate_uid(),
            modality="MG", series_number=1, instance_number=instance_number,
            series_description=f"{laterality} {view}", when=when)
    _patient_and_study(ds, study_uid=study_uid or generate_uid(), accession=accession or f"MG{seed:08d}",
                       patient_id=patient_id, patient_name=patient_name, patient_sex="F",
                       patient_birth_date="19700101", when=when, study_description="MG SCREENING BILATERAL")
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ManufacturerModelName = "SYNTH-FFDM"
    ds.BodyPartExamined = "BREAST"
    ds.ImageLaterality = laterality
    ds.Laterality = laterality
    if with_view_position:
        ds.ViewPosition = view
    if with_view_code:
        code, meaning = _MG_VIEWS[view]
        ds.ViewCodeSequence = Sequence([_code(code, "SCT", meaning)])
    ds.PatientOrientation = _MG_ORIENTATION[(laterality, view)]
    ds.DetectorType = "DIRECT"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.PresentationLUTShape = "IDENTITY"
    ds.KVP = 29
    ds.BodyPartThickness = 50
    ds.CompressionForce = 100
    ds.ImagerPixelSpacing = [0.085, 0.085]
    ds.PixelSpacing = [0.085, 0.085]
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.LossyImageCompression = "00"
    pixels = mammogram_pixels(seed, laterality, view, rows, cols)
    low, high = np.percentile(pixels[::16, ::16], [5.0, 99.5])
    ds.WindowCenter = int(round((low + high) / 2))
    ds.WindowWidth = int(round(max(high - low, 1)))
    ds.VOILUTFunction = "LINEAR"
    _image_pixel_module(ds, pixels, _BITS)
    return ds


def make_mammography_exam(
    seed: int,
    *,
    views: tuple[tuple[str, str], ...] = (("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO")),
    rows: int = 3328,
    cols: int = 2560,
    study_uid: str | None = None,
    accession: str | None = None,
    patient_id: str = "DEMO-0002",
    **kwargs: object,
) -> list[Dataset]:
    """The four standard screening views (RCC, LCC, RMLO, LMLO) of one study, one series per breast."""
    study_uid = study_uid or generate_uid()
    accession = accession or f"MG{seed:08d}"
    series = {"L": generate_uid(), "R": generate_uid()}
    return [
        make_mammogram(seed * 10 + i, lat, view, study_uid=study_uid, series_uid=series[lat],  # type: ignore[arg-type]
                       accession=accession, patient_id=patient_id, rows=rows, cols=cols, instance_number=i + 1,
                       when=_dt.datetime(2024, 3, 1, 9, 0, 0), **kwargs)  # type: ignore[arg-type]
        for i, (lat, view) in enumerate(views)
    ]


# -- CT / MR head --------------------------------------------------------------------------------
def _head_labels(size: int, z_mm: float, fov_mm: float, seed: int) -> dict[str, np.ndarray]:
    """Soft masks of a head phantom on one axial plane at height z (mm from the head's centre)."""
    rng = np.random.default_rng(seed)
    half = fov_mm / 2.0
    coords = np.linspace(-half, half, size, dtype=np.float32)
    x, y = np.meshgrid(coords, coords)
    a, b, c = 72.0 + float(rng.uniform(-4, 4)), 92.0 + float(rng.uniform(-4, 4)), 95.0
    zr = min(abs(z_mm) / c, 1.0)
    shrink = float(np.sqrt(max(1.0 - zr**2, 0.0)))
    if shrink <= 0.02:
        zeros = np.zeros_like(x)
        return {"head": zeros, "brain": zeros, "ventricles": zeros}
    head = _ellipse(x, y, 0.0, 0.0, a * shrink, b * shrink, 0.01)
    inner = max(shrink * 0.90 - 0.02, 0.01)
    brain = _ellipse(x, y, 0.0, 0.0, a * inner, b * inner, 0.01)
    vent = np.zeros_like(x)
    if abs(z_mm) < 30:  # lateral ventricles: two crescents near the midline
        for side in (-1.0, 1.0):
            vent = np.maximum(vent, _ellipse(x, y, side * 9.0, -8.0, 5.0, 22.0 * (1 - abs(z_mm) / 35), 0.08))
    return {"head": head, "brain": brain, "ventricles": vent}


def _iter_head_series(
    seed: int, *, modality: str, slices: int, size: int, thickness: float, spacing: float | None,
    missing: tuple[int, ...], orientation: str, kernel: str | None, description: str,
    haemorrhage: bool, study_uid: str | None, series_uid: str | None, accession: str | None,
    patient_id: str, series_number: int, fov_mm: float, image_type: tuple[str, ...],
) -> Iterator[Dataset]:
    rng = np.random.default_rng(seed)
    when = _when(rng, None)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    spacing = spacing or thickness
    iop = _ORIENTATIONS[orientation]
    row, col = np.array(iop[:3]), np.array(iop[3:])
    normal = np.cross(row, col)
    pixel = fov_mm / size
    skip = set(missing)
    for index in range(slices):
        if index in skip:
            continue
        z = (index - (slices - 1) / 2.0) * spacing  # along the normal, centred on the head
        labels = _head_labels(size, z, fov_mm, seed)
        head, brain, vent = labels["head"], labels["brain"], labels["ventricles"]
        noise = rng.normal(0.0, 1.0, (size, size)).astype(np.float32)
        ds = Dataset()
        sop = generate_uid()
        _common(ds, sop_class=CT_IMAGE if modality == "CT" else MR_IMAGE, sop_instance=sop, series_uid=series_uid,
                modality=modality, series_number=series_number, instance_number=index + 1,
                series_description=description, when=when)
        _patient_and_study(ds, study_uid=study_uid, accession=accession or f"{modality}{seed:08d}",
                           patient_id=patient_id, patient_name="DEMO^HEAD", patient_sex="O",
                           patient_birth_date="19600101", when=when, study_description=f"{modality} HEAD")
        ds.ImageType = list(image_type)
        ds.BodyPartExamined = "HEAD"
        ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid, "frame-of-reference"])
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = "HFS"
        ds.SliceThickness = thickness
        ds.SpacingBetweenSlices = spacing
        ds.PixelSpacing = [round(pixel, 6), round(pixel, 6)]
        ds.ImageOrientationPatient = [float(v) for v in iop]
        origin = -row * fov_mm / 2 - col * fov_mm / 2 + normal * z
        ds.ImagePositionPatient = [round(float(v), 4) for v in origin]
        ds.SliceLocation = round(float(z), 4)
        if modality == "CT":
            hu = -1000.0 + head * (1000.0 + 40.0)  # scalp/soft tissue ~40 HU
            skull = np.clip(head - brain, 0, 1) * (1.0 - labels["brain"])
            hu = hu + skull * 960.0  # bone ~1000 HU
            hu = hu * (1 - brain) + brain * (35.0 - 30.0 * vent)  # brain ~35 HU, ventricles ~5 HU
            if haemorrhage and -25.0 < z < 15.0:
                coords = np.linspace(-fov_mm / 2, fov_mm / 2, size, dtype=np.float32)
                xx, yy = np.meshgrid(coords, coords)
                blob = _ellipse(xx, yy, 30.0, 10.0, 14.0, 18.0, 0.05) * brain
                hu = hu * (1 - blob) + blob * 70.0
            hu = hu + noise * 4.0
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
            ds.ConvolutionKernel = kernel or "H30s"
            ds.KVP = 120
            ds.XRayTubeCurrent = 250
            ds.WindowCenter, ds.WindowWidth = [40, 80], [80, 200]  # brain, subdural
            stored = np.clip(np.rint(hu + 1024.0), 0, 4095)
        else:
            signal = head * 900.0  # scalp fat bright on T1
            skull = np.clip(head - brain, 0, 1) * (1.0 - brain)
            signal = signal * (1 - skull) + skull * 60.0
            signal = signal * (1 - brain) + brain * (650.0 - 450.0 * vent)
            stored = np.clip(np.rint(signal + noise * 15.0 * head), 0, 4095)
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "GR", "SP", ""
            ds.MRAcquisitionType = "2D"
            ds.RepetitionTime, ds.EchoTime, ds.MagneticFieldStrength = 450, 10, 1.5
            ds.SequenceName = "*tse2d1_3"
            ds.ImagingFrequency = 63.6
        _image_pixel_module(ds, stored, 12)
        yield ds


def iter_ct_head_series(
    seed: int, *, slices: int = 32, size: int = 512, thickness: float = 5.0, spacing: float | None = None,
    missing: tuple[int, ...] | list[int] = (), orientation: Literal["axial", "coronal", "sagittal"] = "axial",
    kernel: str = "H30s", description: str = "HEAD 5.0 H30s", haemorrhage: bool = False,
    study_uid: str | None = None, series_uid: str | None = None, accession: str | None = None,
    patient_id: str = "DEMO-0003", series_number: int = 2, fov_mm: float = 250.0,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
) -> Iterator[Dataset]:
    """CT Image Storage slices of a head phantom, made one at a time (a 300-slice series needs no list).

    Stored values are HU + 1024 (RescaleIntercept -1024): air -1000, scalp ~40, skull ~1000,
    brain ~35, ventricles ~5, and, with `haemorrhage=True`, a ~70 HU blob in the right hemisphere.
    `missing` lists slice indices left out (a series with gaps).
    """
    return _iter_head_series(
        seed, modality="CT", slices=slices, size=size, thickness=thickness, spacing=spacing, missing=tuple(missing),
        orientation=orientation, kernel=kernel, description=description, haemorrhage=haemorrhage,
        study_uid=study_uid, series_uid=series_uid, accession=accession, patient_id=patient_id,
        series_number=series_number, fov_mm=fov_mm, image_type=image_type)


def make_ct_head_series(seed: int, **kwargs: object) -> list[Dataset]:
    """`iter_ct_head_series` as a list (see there for the arguments)."""
    return list(iter_ct_head_series(seed, **kwargs))  # type: ignore[arg-type]


def make_mr_brain_series(
    seed: int, *, slices: int = 24, size: int = 256, thickness: float = 5.0, spacing: float | None = 6.0,
    missing: tuple[int, ...] | list[int] = (), orientation: Literal["axial", "coronal", "sagittal"] = "axial",
    description: str = "T1 AX", study_uid: str | None = None, series_uid: str | None = None,
    accession: str | None = None, patient_id: str = "DEMO-0004", series_number: int = 3,
    fov_mm: float = 230.0,
) -> list[Dataset]:
    """MR Image Storage slices of the same head phantom, T1-like (fat bright, CSF dark), no rescale."""
    return list(_iter_head_series(
        seed, modality="MR", slices=slices, size=size, thickness=thickness, spacing=spacing, missing=tuple(missing),
        orientation=orientation, kernel=None, description=description, haemorrhage=False, study_uid=study_uid,
        series_uid=series_uid, accession=accession, patient_id=patient_id, series_number=series_number,
        fov_mm=fov_mm, image_type=("ORIGINAL", "PRIMARY", "M", "ND")))


# -- spine radiographs ---------------------------------------------------------------------------
_SPINE = {"CSPINE": (7, "C-SPINE AP", (2048, 1664)), "TSPINE": (12, "T-SPINE AP", (3000, 1500)),
          "LSPINE": (5, "L-SPINE AP", (2560, 2048))}


def make_spine_xray(
    seed: int, region: Literal["CSPINE", "TSPINE", "LSPINE"] = "LSPINE", *, view_position: str = "AP",
    rows: int | None = None, cols: int | None = None, study_uid: str | None = None,
    accession: str | None = None, patient_id: str = "DEMO-0005",
    photometric: Literal["MONOCHROME2", "MONOCHROME1"] = "MONOCHROME2",
) -> Dataset:
    """A DX spine radiograph (BodyPartExamined CSPINE/TSPINE/LSPINE): stacked vertebral bodies and discs."""
    count, title, (default_rows, default_cols) = _SPINE[region]
    rows, cols = rows or default_rows, cols or default_cols
    rng = np.random.default_rng(seed)
    n_r, n_c = max(rows // 4, 64), max(cols // 4, 48)
    y, x = np.mgrid[0:n_r, 0:n_c].astype(np.float32)
    y, x = y / n_r * 2 - 1, x / n_c * 2 - 1
    img = 0.10 + 0.35 * _smooth_step(np.abs(x) - 0.85, 0.05)  # the body
    tilt = float(rng.uniform(-0.05, 0.05))
    height = 1.8 / count
    for k in range(count):
        cy = -0.9 + height * (k + 0.5)
        width = 0.16 + 0.02 * k / max(count - 1, 1)
        body = _smooth_step(np.maximum(np.abs(x - tilt * cy) - width, np.abs(y - cy) - height * 0.38), 0.01)
        img += (0.35 + float(rng.uniform(-0.03, 0.03))) * body
        for side in (-1.0, 1.0):  # pedicles
            img += 0.12 * _ellipse(x, y, tilt * cy + side * width * 0.6, cy - height * 0.1, 0.03, 0.05, 0.05)
    img += 0.02 * _smooth_noise(rng, (n_r, n_c), 8)
    full = _upsample(img, rows, cols) + rng.normal(0.0, 0.008, (rows, cols)).astype(np.float32)
    pixels = np.clip(np.rint(full * _MAX), 0, _MAX).astype(np.uint16)
    if photometric == "MONOCHROME1":
        pixels = (_MAX - pixels).astype(np.uint16)
    when = _when(rng, None)
    ds = Dataset()
    _common(ds, sop_class=DX_FOR_PRESENTATION, sop_instance=generate_uid(), series_uid=generate_uid(),
            modality="DX", series_number=1, instance_number=1, series_description=f"{title}", when=when)
    _patient_and_study(ds, study_uid=study_uid or generate_uid(), accession=accession or f"SP{seed:08d}",
                       patient_id=patient_id, patient_name="DEMO^SPINE", patient_sex="O",
                       patient_birth_date="19650101", when=when, study_description=f"XR {title}")
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BodyPartExamined = region
    ds.ViewPosition = view_position
    ds.ImageLaterality = "U"
    ds.PatientOrientation = ["L", "F"] if view_position == "AP" else ["A", "F"]
    ds.ImagerPixelSpacing = ds.PixelSpacing = [0.15, 0.15]
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
    ds.LossyImageCompression = "00"
    _image_pixel_module(ds, pixels, _BITS, photometric)
    return ds


# -- compression -----------------------------------------------------------------------------------
def compress(ds: Dataset, transfer_syntax: str, **options: object) -> Dataset:
    """A compressed copy of `ds` (the original is left alone). Encoders used:

    * RLE Lossless: pydicom (pylibjpeg-rle's faster encoder when installed);
    * JPEG-LS Lossless / Near-Lossless: pyjpegls (`jls_error=2` for near-lossless by default);
    * JPEG 2000 Lossless / JPEG 2000: pylibjpeg-openjpeg (`j2k_cr=[20]` for lossy by default);
    * JPEG Lossless (Process 14, SV1 or not): GDCM (python-gdcm);
    * JPEG Baseline: Pillow, 8-bit only: a 12/16-bit image is first scaled to 8 bits (lossy, as
      PACS that store "JPEG baseline" copies do), with its window scaled along.

    Raises ValueError when no encoder is installed for `transfer_syntax`.
    """
    import copy

    from pydicom import uid as _uid
    from pydicom.pixels import get_encoder

    out = copy.deepcopy(ds)
    ts = _uid.UID(transfer_syntax)
    if ts == _uid.JPEGBaseline8Bit:
        return _compress_jpeg_baseline(out, int(options.get("quality", 90)))  # type: ignore[call-overload]
    if ts in (_uid.JPEGLossless, _uid.JPEGLosslessSV1):
        return _compress_gdcm(out, ts)
    if ts == _uid.JPEGLSNearLossless:
        options.setdefault("jls_error", 2)
    if ts == _uid.JPEG2000:
        options.setdefault("j2k_cr", [20])
    try:
        encoder = get_encoder(ts)
    except NotImplementedError as exc:
        raise ValueError(f"no encoder for {ts.name}") from exc
    if not encoder.is_available:
        raise ValueError(f"no encoder installed for {ts.name}")
    plugin = "pylibjpeg" if ts == _uid.RLELossless and "pylibjpeg" in encoder.available_plugins else ""
    out.compress(ts, encoding_plugin=plugin, **options)
    if ts in (_uid.JPEGLSNearLossless, _uid.JPEG2000):
        out.LossyImageCompression = "01"
    return out


def _compress_jpeg_baseline(ds: Dataset, quality: int) -> Dataset:
    from pydicom.encaps import encapsulate
    from pydicom.multival import MultiValue
    from pydicom.uid import JPEGBaseline8Bit

    bits = int(ds.BitsStored)
    pixels = ds.pixel_array
    if bits > 8:
        shift = bits - 8
        pixels = (pixels >> shift).astype(np.uint8)
        for name in ("WindowCenter", "WindowWidth"):
            if name in ds:
                value = ds.data_element(name).value
                values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
                scaled = [round(float(v) / (1 << shift), 2) for v in values]
                setattr(ds, name, scaled if len(scaled) > 1 else scaled[0])
        if "RescaleSlope" in ds:
            ds.RescaleSlope = float(ds.RescaleSlope) * (1 << shift)
    buffer = BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(buffer, format="JPEG", quality=quality)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    return ds


def _compress_gdcm(ds: Dataset, ts: str) -> Dataset:
    try:
        import gdcm  # type: ignore[import-not-found]
    except ImportError as exc:
        raise ValueError("JPEG Lossless encoding needs python-gdcm") from exc
    import tempfile
    from pathlib import Path

    from pydicom import dcmread

    target = gdcm.TransferSyntax.JPEGLosslessProcess14_1 if ts.endswith(".70") else gdcm.TransferSyntax.JPEGLosslessProcess14
    with tempfile.TemporaryDirectory() as folder:
        source, result = Path(folder) / "in.dcm", Path(folder) / "out.dcm"
        source.write_bytes(dataset_bytes(ds))
        reader = gdcm.ImageReader()
        reader.SetFileName(str(source))
        if not reader.Read():
            raise ValueError("GDCM could not read the dataset")
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(target))
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise ValueError("GDCM could not encode JPEG Lossless")
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(result))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        if not writer.Write():
            raise ValueError("GDCM could not write the result")
        return dcmread(result)
