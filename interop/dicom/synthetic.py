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
from io import BytesIO
from typing import Literal

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

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
