"""Small helpers shared by tests: put a synthetic study in the PACS and describe it in FHIR."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from pydicom import Dataset

from interop.dicom.study import imaging_study
from interop.dicom.synthetic import dataset_bytes, make_chest_xray


def chest_study_in_pacs(orthanc: Any, seed: int, **kwargs: Any) -> Dataset:
    ds = make_chest_xray(seed=seed, size=kwargs.pop("size", 1024), **kwargs)
    orthanc.upload(dataset_bytes(ds))
    return ds


def study_resource(datasets: list[Dataset], patient_id: str, endpoint: str | None) -> dict[str, Any]:
    return imaging_study(datasets, subject=f"Patient/{patient_id}", endpoint_address=endpoint)


def wait_for(predicate: Callable[[], Any], timeout: float = 60, interval: float = 0.2, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


DATA = Path(__file__).resolve().parent / "data"  # public samples, with MANIFEST.txt per folder
