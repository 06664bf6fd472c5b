"""`interop dicom-scp`: the DICOM Storage SCP that modalities and PACS push studies to (C-STORE,
C-ECHO), started by `interop serve`. Calling AE titles are those the sites file lists
(`dicom_aets`), unless INTEROP_DICOM_ALLOW_UNKNOWN_AE; SIGHUP reads the sites file again.

Each received instance is kept by `interop.services.inbound.keep` before it is acknowledged;
what it refuses is answered with its DICOM failure status, and the association goes on.
"""
from __future__ import annotations

import errno
import logging
import signal
import tempfile
from pathlib import Path
from threading import Event

from .. import tls
from ..config import Settings
from ..dicom import scp
from ..domain import audit
from ..services import inbound
from ..services.context import Context
from ..store import db

log = logging.getLogger("interop.dicom_scp")

EXIT_PORT_IN_USE = 3


class StorageScp:
    """The hub's side of each C-STORE: read, keep, record; the status to answer."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.pool = db.pool(ctx.settings.database_url or "", max_size=8)
        self.pool.open(wait=True, timeout=30)
        self.ae, self.handlers = scp.build(ctx.settings.dicom_aet, self.on_store)
        self.reload()

    def reload(self) -> None:
        self.ctx.sites.reload()
        allowed = None if self.ctx.settings.dicom_unknown_ae_allowed else \
            sorted({a for s in self.ctx.sites.current().values() for a in s.dicom_aets})
        scp.allow_callers(self.ae, allowed)

    def on_store(self, path: Path, sop_class: str, transfer_syntax: str, calling: str, address: str) -> int:
        try:
            item = inbound.read_header(path, sender=calling, max_bytes=self.ctx.settings.dicom_max_bytes,
                                       expected_sop_class=sop_class, transfer_syntax=transfer_syntax)
            with self.pool.connection() as conn:
                inbound.keep(conn, self.ctx, path, item, site=self.ctx.sites.by_aet(calling),
                             who=audit.Who(address, client=f"dicom:{calling}"))
        except inbound.Refused as exc:
            log.warning("C-STORE from %s refused (0x%04X): %s", calling, exc.status, exc.reason)
            return exc.status
        return 0x0000

    def close(self) -> None:
        self.ae.shutdown()
        self.pool.close()


def main(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT."""
    stop = Event()
    if not settings.dicomweb_url:  # kept on this disk: receive there too, so keeping is a link, not a copy
        incoming = settings.data_dir / "dicom" / "incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        tempfile.tempdir = str(incoming)  # pynetdicom's temporary files (this process only serves DICOM)
    service = StorageScp(Context.from_settings(settings))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: service.reload())
    try:
        # DICOM TLS (PS3.15 B.1) with the hub's certificate when one is configured, mutual with
        # INTEROP_TLS_CLIENT_CA, as the MLLP listener
        service.ae.start_server((settings.dicom_host, settings.dicom_port), block=False, evt_handlers=service.handlers,
                                ssl_context=tls.server_context(settings))
    except OSError as exc:
        service.pool.close()
        if exc.errno != errno.EADDRINUSE:
            raise
        log.error("DICOM port %s:%s is already in use: the Storage SCP cannot start", settings.dicom_host,
                  settings.dicom_port)
        raise SystemExit(EXIT_PORT_IN_USE) from None
    log.info("DICOM Storage SCP %s listening on %s:%s%s", settings.dicom_aet, settings.dicom_host, settings.dicom_port,
             " (TLS)" if settings.tls else "")
    try:
        while not stop.wait(1.0):
            pass
    finally:
        service.close()
