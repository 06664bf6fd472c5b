"""The hub's own storage as a source of images, for studies pushed to a hub with no archive PACS
(`DICOMWEB_URL` unset): the same four calls the analysis makes of a DICOMweb client.

It is given the study's instances as recorded (InstanceRef, and the file each was kept in), so
it does no search of its own: what was acknowledged is what is analysed.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from .dicomweb import InstanceRef
from .errors import DicomError, StudyNotFound

# The `dicomweb` of an analysis job whose images are in the hub's own storage.
LOCAL = "local:"


class LocalArchive:
    """Instances kept under INTEROP_DATA_DIR, by SOP Instance UID -> file."""

    def __init__(self, refs: list[InstanceRef], files: dict[str, Path]):
        self._refs, self._files = refs, files

    def search_instances(self, study_uid: str) -> list[InstanceRef]:
        found = [r for r in self._refs if r.study_uid == study_uid]
        if not found:
            raise StudyNotFound("the study has no instance in the hub's storage")
        return found

    def retrieve_instance(self, ref: InstanceRef) -> Dataset:
        path = self._files.get(ref.instance_uid)
        if path is None:
            raise StudyNotFound("instance not in the hub's storage")
        try:
            return dcmread(path)
        except (InvalidDicomError, EOFError, ValueError, OSError) as exc:
            raise DicomError("an instance in the hub's storage cannot be read") from exc

    def retrieve_series(self, study_uid: str, series_uid: str) -> Iterator[Dataset]:
        for ref in self._refs:
            if ref.study_uid == study_uid and ref.series_uid == series_uid:
                yield self.retrieve_instance(ref)

    def close(self) -> None:
        """Nothing to release (the DICOMweb client's counterpart closes its session)."""
