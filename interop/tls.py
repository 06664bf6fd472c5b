"""TLS for the hub's connections, decided in one place from `Settings`.

In: `server_context` is what the MLLP listener serves with (INTEROP_TLS_CERT/KEY, TLS 1.2 at
least; with INTEROP_TLS_CLIENT_CA every sender must present a certificate signed by it). gunicorn
builds its own context from the same files (`runtime/supervisor.py`).

Out: `ClientTls` is how the hub meets its peers (EMR FHIR servers, RIS and integration engines over
MLLP, PACS, token endpoints): their certificate is verified against INTEROP_TLS_CA_FILE, or the
system's trust store when that is unset, and their host name is checked; the hub presents
INTEROP_TLS_CLIENT_CERT/KEY to peers that ask for a certificate. Nothing here turns verification
off.

`fingerprint` is the SHA-256 of a certificate (DER), as the sites file pins senders by it
(`tls_client_certs`). No I/O at import; files are read when a context is built.
"""
from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .config import Settings

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class TlsError(ValueError):
    """The TLS settings cannot be used (the message names the variable, never a key)."""


def problems(settings: Settings) -> list[str]:
    """What is wrong with the TLS settings, in words an operator can act on (empty: nothing).
    A certificate without its key would otherwise serve in plain text without a word."""
    out = []
    if (settings.tls_cert is None) != (settings.tls_key is None):
        out.append("INTEROP_TLS_CERT and INTEROP_TLS_KEY must be set together")
    if settings.tls_client_ca is not None and not settings.tls:
        out.append("INTEROP_TLS_CLIENT_CA needs INTEROP_TLS_CERT and INTEROP_TLS_KEY (mutual TLS is TLS first)")
    if settings.tls_client_key is not None and settings.tls_client_cert is None:
        out.append("INTEROP_TLS_CLIENT_KEY is set without INTEROP_TLS_CLIENT_CERT")
    for name, path in (("INTEROP_TLS_CERT", settings.tls_cert), ("INTEROP_TLS_KEY", settings.tls_key),
                       ("INTEROP_TLS_CLIENT_CA", settings.tls_client_ca),
                       ("INTEROP_TLS_CA_FILE", settings.tls_ca_file),
                       ("INTEROP_TLS_CLIENT_CERT", settings.tls_client_cert),
                       ("INTEROP_TLS_CLIENT_KEY", settings.tls_client_key)):
        if path is not None and not path.is_file():
            out.append(f"{name} names {path}, which is not a readable file")
    return out


def check(settings: Settings) -> None:
    """Raise TlsError when the TLS settings cannot be used: the files are named but missing, or a
    certificate does not load (wrong key, not PEM). Run at start, so that no process serves plain
    text by mistake or fails on its first connection."""
    found = problems(settings)
    if found:
        raise TlsError("; ".join(found))
    server_context(settings)
    ClientTls.from_settings(settings).context()


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The MLLP listener's context; None when the hub serves without TLS."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MINIMUM_VERSION
    try:
        ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"INTEROP_TLS_CERT/INTEROP_TLS_KEY do not load ({_reason(exc)})") from None
    if settings.tls_client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=settings.tls_client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise TlsError(f"INTEROP_TLS_CLIENT_CA does not load ({_reason(exc)})") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@dataclass(frozen=True)
class ClientTls:
    """How the hub verifies a peer and what it presents to one."""

    ca_file: Path | None = None  # unset: the system's trust store
    cert: Path | None = None
    key: Path | None = None      # unset with `cert`: the key is in the certificate's file

    @classmethod
    def from_settings(cls, settings: Settings) -> ClientTls:
        return cls(settings.tls_ca_file, settings.tls_client_cert, settings.tls_client_key)

    def requests_kwargs(self) -> dict[str, Any]:
        """`verify` and `cert` for every `requests` call to a peer (given on each call: a
        Session's own `verify` loses to REQUESTS_CA_BUNDLE in the environment)."""
        cert: str | tuple[str, str] | None = None
        if self.cert is not None:
            cert = (str(self.cert), str(self.key)) if self.key is not None else str(self.cert)
        return {"verify": str(self.ca_file) if self.ca_file is not None else True, "cert": cert}

    def context(self) -> ssl.SSLContext:
        """A client context: the peer's certificate and host name verified, TLS 1.2 at least."""
        try:
            ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file is not None else None)
        except (ssl.SSLError, OSError) as exc:
            raise TlsError(f"INTEROP_TLS_CA_FILE does not load ({_reason(exc)})") from None
        ctx.minimum_version = MINIMUM_VERSION
        if self.cert is not None:
            try:
                ctx.load_cert_chain(self.cert, self.key)
            except (ssl.SSLError, OSError) as exc:
                raise TlsError(f"INTEROP_TLS_CLIENT_CERT/INTEROP_TLS_CLIENT_KEY do not load ({_reason(exc)})") from None
        return ctx


@lru_cache(maxsize=8)
def client_context(tls: ClientTls) -> ssl.SSLContext:
    """`tls.context()`, built once per process for the same files (a context is safe to share
    between threads; a failure is not remembered, so a fixed file is read on the next try)."""
    return tls.context()


def fingerprint(der: bytes) -> str:
    """SHA-256 of a certificate in DER form: lower-case hex, no colons (as `sites.py` keeps pins)."""
    return hashlib.sha256(der).hexdigest()


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or getattr(exc, "strerror", None) or type(exc).__name__)
