"""DICOM boundary: DICOMweb client (QIDO-RS / WADO-RS), pixel decoding and preprocessing."""
from interop.dicom.errors import DicomError, NotAnImage, PacsUnavailable, StudyNotFound

__all__ = ["DicomError", "NotAnImage", "PacsUnavailable", "StudyNotFound"]
