"""Errors of the DICOM boundary.

Every error carries a short `reason` that is safe to show to an operator or store on a job:
it never contains patient data (no names, identifiers or UIDs, no server response bodies).
`is_transient` tells the pipeline whether retrying later can help.
"""
from __future__ import annotations


class DicomError(Exception):
    """A DICOMweb exchange or a DICOM dataset could not be used. Permanent unless a subclass says otherwise."""

    is_transient: bool = False
    default_reason = "DICOM error"

    def __init__(self, reason: str | None = None, *, status: int | None = None) -> None:
        self.reason = reason or self.default_reason
        self.status = status  # HTTP status of the PACS answer, when there was one
        super().__init__(self.reason)


class PacsUnavailable(DicomError):
    """The PACS could not be reached or failed (connection refused, timeout, HTTP 5xx, 429): retry later."""

    is_transient = True
    default_reason = "PACS unavailable"


class StudyNotFound(DicomError):
    """The PACS answered, and has no such study (or instance)."""

    default_reason = "study not found on the PACS"


class NotAnImage(DicomError):
    """The instance carries no usable image: no pixel data, a non-image SOP class, or pixels that cannot be decoded."""

    default_reason = "instance is not an image"


class NoSuitableSeries(NotAnImage):
    """No series of the study fits the model's rules (orientation, kernel, thickness, slice count)."""

    default_reason = "no series of the study fits the model"


class IncompleteSeries(DicomError):
    """The chosen series cannot make a volume: missing or duplicated slices, mixed orientations.

    Permanent by default; a caller that knows the PACS may still be receiving the series (fewer
    instances than NumberOfSeriesRelatedInstances) may treat it as transient and retry later.
    """

    default_reason = "the series is incomplete"


class NoViews(NotAnImage):
    """None of the views a model needs is in the study (e.g. no CC or MLO mammogram)."""

    default_reason = "none of the required views is in the study"
