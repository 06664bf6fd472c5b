"""DICOM boundary: DICOMweb client (QIDO-RS / WADO-RS), pixel decoding, volume and view assembly."""
from interop.dicom.errors import (
    DicomError,
    IncompleteSeries,
    NoSuitableSeries,
    NotAnImage,
    NoViews,
    PacsUnavailable,
    StudyNotFound,
)

__all__ = ["DicomError", "IncompleteSeries", "NoSuitableSeries", "NoViews", "NotAnImage", "PacsUnavailable",
           "StudyNotFound"]
