"""The DICOM Storage SCP's network side (pynetdicom): which SOP classes and transfer syntaxes it
accepts, which calling AE titles may associate, and how a received C-STORE reaches the hub.

Datasets are received to a temporary file as they arrive (pynetdicom's
STORE_RECV_CHUNKED_DATASET), never held whole in memory by the network side; `on_store` (the
hub's `interop.services.inbound`, wired by `interop.workers.dicom_scp`) keeps the file and says
which status to answer. Whatever happens in it, the association and the SCP stay up.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.uid import (
    JPEG2000,
    UID,
    BreastTomosynthesisImageStorage,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MRImageStorage,
    RLELossless,
)
from pynetdicom import AE, _config, evt

log = logging.getLogger("interop.dicom.scp")

STORAGE_CLASSES = (
    ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation, DigitalXRayImageStorageForProcessing,
    DigitalMammographyXRayImageStorageForPresentation, DigitalMammographyXRayImageStorageForProcessing,
    BreastTomosynthesisImageStorage, CTImageStorage, EnhancedCTImageStorage, MRImageStorage, EnhancedMRImageStorage,
)
TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, RLELossless,
)
PROCESSING_FAILURE = 0x0110
VERIFICATION = UID("1.2.840.10008.1.1")
NOBODY = "(NONE ALLOWED)"  # no site lists an AE title and unknown callers are refused

# on_store(path of the received file, SOP class of its context, transfer syntax, calling AE, peer address) -> status
OnStore = Callable[[Path, str, str, str, str], int]


def _aet(value: Any) -> str:
    return (value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")).strip()


# The largest PDU the hub accepts. pynetdicom holds a whole received PDU in memory before the
# dataset reaches its temporary file: "unlimited" (0) let a sender put a 17 MB mammogram in one
# PDU (bench/dicom_store.py: +100 MiB with pynetdicom as sender); dcmtk's storescu sends 128 KiB.
MAX_PDU = 1 << 20


def build(aet: str, on_store: OnStore, *, max_pdu: int = MAX_PDU) -> tuple[AE, list[Any]]:
    """The application entity and its event handlers (give both to `start_server`)."""
    _config.STORE_RECV_CHUNKED_DATASET = True  # received to a temporary file, not to memory
    ae = AE(ae_title=aet)
    ae.maximum_pdu_size = max_pdu
    ae.network_timeout = 60
    ae.dimse_timeout = 120
    ae.acse_timeout = 30
    ae.maximum_associations = 32
    ae.add_supported_context(VERIFICATION)
    for sop_class in STORAGE_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))

    def on_c_store(event: Any) -> int:
        assoc = event.assoc
        calling = _aet(assoc.requestor.ae_title)
        try:
            return on_store(Path(event.dataset_path), str(event.context.abstract_syntax),
                            str(event.context.transfer_syntax), calling, str(assoc.requestor.address))
        except Exception as exc:  # never the association's end: a failure status
            log.error("C-STORE from %s: unexpected %s", calling, type(exc).__name__)
            log.debug("C-STORE failure", exc_info=exc)
            return PROCESSING_FAILURE

    def on_c_echo(_event: Any) -> int:
        return 0x0000

    return ae, [(evt.EVT_C_STORE, on_c_store), (evt.EVT_C_ECHO, on_c_echo)]


def allow_callers(ae: AE, aets: list[str] | None) -> None:
    """Refuse associations from calling AE titles not in `aets` (None: anyone may associate)."""
    if aets is None:
        ae.require_calling_aet = []
    else:  # an empty list would let anyone in: name a title no AE has
        ae.require_calling_aet = list(aets) or [NOBODY]
