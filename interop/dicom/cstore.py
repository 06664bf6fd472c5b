"""C-STORE of one instance to a PACS (pynetdicom SCU): how SR results reach a site whose PACS
takes DICOM over the network rather than STOW-RS (`dicom_store` in the sites file)."""
from __future__ import annotations

from io import BytesIO

from pydicom import dcmread
from pynetdicom import AE

from interop.dicom.errors import DicomError, PacsUnavailable

# C-STORE statuses (PS3.4 B.2.3): warnings mean stored
WARNINGS = (0xB000, 0xB006, 0xB007)
OUT_OF_RESOURCES = 0xA700  # A7xx: try again later


def store(data: bytes, *, aet: str, host: str, port: int, calling_aet: str, timeout_s: float) -> int:
    """Send a DICOM Part 10 file; returns the C-STORE status (0 or a warning: stored).
    PacsUnavailable when no association or no answer (try again), DicomError for a refusal."""
    ds = dcmread(BytesIO(data))
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate(host, port, ae_title=aet)
    if not assoc.is_established:
        if assoc.is_rejected:
            raise DicomError(f"the PACS {aet} rejected the association")
        raise PacsUnavailable(f"no association with the PACS {aet}")
    try:
        answer = assoc.send_c_store(ds)
    finally:
        assoc.release()
    if "Status" not in answer:
        raise PacsUnavailable(f"the PACS {aet} did not answer the C-STORE")
    status = int(answer.Status)
    if status == 0 or status in WARNINGS:
        return status
    if status & 0xFF00 == OUT_OF_RESOURCES:
        raise PacsUnavailable(f"the PACS {aet} is out of resources (C-STORE status 0x{status:04X})", status=status)
    raise DicomError(f"the PACS {aet} refused the SR (C-STORE status 0x{status:04X})", status=status)
