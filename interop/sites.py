"""The sites file (INTEROP_SITES, default mappings/sites.yaml): the facilities the hub serves,
keyed by the facility code senders put in MSH-4. Unknown facilities have no site: their
messages are accepted and recorded, and their results have no destination.

`Sites` is what processes hold: it reads the file again when it changes (checked at most once a
second) or on `reload()` (SIGHUP), so an operator's edit takes effect without a restart. A file
that no longer parses is logged and the last good version is kept.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("interop.sites")


class SitesError(ValueError):
    """The sites file is malformed (the message names the site and the field)."""


@dataclass(frozen=True)
class Hl7Destination:
    host: str
    port: int
    receiving_application: str = "HIS"
    receiving_facility: str = ""
    connect_timeout_seconds: float = 10.0
    ack_timeout_seconds: float = 30.0
    tls: bool = False  # MLLP over TLS: the peer's certificate and host name verified (INTEROP_TLS_CA_FILE)
    version: str = "2.5.1"  # the HL7 version of the ORU^R01 results sent there (MSH-12): 2.3.1, 2.5.1 or 2.6


HL7_VERSIONS = ("2.3.1", "2.5.1", "2.6")  # the versions the hub writes ORU^R01 in (interop.hl7.oru.VERSIONS)


@dataclass(frozen=True)
class Address:
    """Where application acknowledgements (MSH-16) go: the sender's return address over MLLP."""

    host: str
    port: int
    tls: bool = False


@dataclass(frozen=True)
class DicomStore:
    """A PACS that takes SRs by C-STORE (the sites file's `dicom_store`)."""

    aet: str
    host: str
    port: int


@dataclass(frozen=True)
class Unmatched:
    """What to do with a pushed study no order matches (`unmatched_studies`): analyse it at once,
    wait `wait_minutes` for the order (then analyse), or hold it for a person."""

    policy: str = "analyse"  # analyse | wait | hold
    wait_minutes: int = 0


@dataclass(frozen=True)
class FhirAuth:
    """How the hub authenticates to a site's FHIR server. Secrets are never in the sites file:
    it names the environment variables that hold them (read when a request is made)."""

    type: str = "none"                      # none | bearer | client_credentials
    token_env: str | None = None            # bearer: variable holding the token
    token_url: str | None = None            # client_credentials: the OAuth2 token endpoint
    client_id: str | None = None
    client_secret_env: str | None = None    # client_credentials: variable holding the secret
    scope: str | None = None


@dataclass(frozen=True)
class FhirDestination:
    """A site's HIS/EMR FHIR R4 server: reports are pushed there as transaction Bundles."""

    base: str
    auth: FhirAuth = FhirAuth()
    timeout_seconds: float = 30.0
    max_bundle_entries: int = 0  # 0: one Bundle; else split (servers that cap conditional transactions)


@dataclass(frozen=True)
class Site:
    code: str
    name: str
    district: str | None = None
    province: str | None = None
    hl7: Hl7Destination | None = None
    exam_done_order_status: frozenset[str] = frozenset({"CM"})
    exam_done_result_status: frozenset[str] = frozenset()
    pacs_wait_minutes: int = 60
    extra: dict[str, Any] = field(default_factory=dict)
    fhir: FhirDestination | None = None
    app_ack: Address | None = None
    dicomweb: str | None = None  # this site's PACS (DICOMweb base URL)
    # URL prefixes the hub may call for this site's Subscriptions and Endpoint addresses (beside
    # its own destinations above and INTEROP_URL_ALLOW)
    allow_urls: tuple[str, ...] = ()
    # SHA-256 fingerprints (lower-case hex, no colons) of the client certificates that may send
    # HL7 v2 as this site over MLLP; empty: any sender the listener lets in
    tls_client_certs: tuple[str, ...] = ()
    # DICOM (issue 13): the calling AE titles of its modalities and PACS, what to do with a pushed
    # study no order matches, and where its SR results go (STOW-RS to `dicomweb`, or C-STORE)
    dicom_aets: tuple[str, ...] = ()
    unmatched_studies: Unmatched = Unmatched()
    results_to_pacs: bool = False
    dicom_store: DicomStore | None = None

    @property
    def ack_address(self) -> Address | None:
        """Where application acknowledgements go: `app_ack`, else the `hl7` destination."""
        if self.app_ack is not None:
            return self.app_ack
        return Address(self.hl7.host, self.hl7.port, self.hl7.tls) if self.hl7 is not None else None

    @property
    def referral(self) -> str | None:
        """The code of the higher-level hospital this site transfers to (`referral`), as written."""
        code = self.extra.get("referral")
        return str(code) if code else None


AUTH_FIELDS = {
    "none": (set(), set()),
    "bearer": ({"token_env"}, set()),
    "client_credentials": ({"token_url", "client_id", "client_secret_env"}, {"scope"}),
}


def _fhir(code: str, raw: Any) -> FhirDestination:
    if not isinstance(raw, dict) or not isinstance(raw.get("base"), str) or not raw["base"].startswith(("http://", "https://")):
        raise SitesError(f"site {code}: fhir needs base, an http(s) URL")
    auth_raw = raw.get("auth") or {"type": "none"}
    if not isinstance(auth_raw, dict) or auth_raw.get("type", "none") not in AUTH_FIELDS:
        raise SitesError(f"site {code}: fhir.auth.type must be one of {', '.join(AUTH_FIELDS)}")
    kind = auth_raw.get("type", "none")
    required, optional = AUTH_FIELDS[kind]
    missing = sorted(k for k in required if not auth_raw.get(k))
    if missing:
        raise SitesError(f"site {code}: fhir.auth ({kind}) needs {', '.join(missing)}")
    unknown = sorted(set(auth_raw) - required - optional - {"type"})
    if unknown:  # e.g. `token:` or `client_secret:` written in the file: secrets belong in the environment
        raise SitesError(f"site {code}: fhir.auth ({kind}) does not take {', '.join(unknown)}"
                         " (secrets are named by *_env variables, never written here)")
    auth = FhirAuth(kind, **{k: str(v) for k, v in auth_raw.items() if k != "type"})
    try:
        timeout = float(raw.get("timeout_seconds", 30))
        max_entries = int(raw.get("max_bundle_entries", 0))
    except (TypeError, ValueError) as exc:
        raise SitesError(f"site {code}: fhir.timeout_seconds and max_bundle_entries must be numbers") from exc
    if max_entries < 0 or max_entries == 1:
        raise SitesError(f"site {code}: fhir.max_bundle_entries must be 0 (no limit) or at least 2")
    return FhirDestination(raw["base"].rstrip("/"), auth, timeout, max_entries)


_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


def _tls_flag(code: str, where: str, raw: dict[str, Any]) -> bool:
    value = raw.get("tls", False)
    if not isinstance(value, bool):
        raise SitesError(f"site {code}: {where}.tls must be true or false")
    return value


def _fingerprints(code: str, raw: Any) -> tuple[str, ...]:
    """`tls_client_certs`: SHA-256 fingerprints, hex, colons allowed, any case -> lower-case hex."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        raise SitesError(f"site {code}: tls_client_certs must be a list of SHA-256 certificate fingerprints")
    out = []
    for item in raw:
        value = item.strip().replace(":", "").lower()
        if not _FINGERPRINT.fullmatch(value):
            raise SitesError(f"site {code}: tls_client_certs: {item[:100]!r} is not a SHA-256 fingerprint"
                             " (64 hex digits, colons allowed)")
        out.append(value)
    return tuple(dict.fromkeys(out))


def _dicom(code: str, raw: dict[str, Any]) -> dict[str, Any]:
    """The DICOM keys of a site: dicom_aets, unmatched_studies, results_to_pacs, dicom_store."""
    aets = raw.get("dicom_aets") or []
    if not isinstance(aets, list) or not all(isinstance(a, str) and 0 < len(a.strip()) <= 16 for a in aets):
        raise SitesError(f"site {code}: dicom_aets must be a list of AE titles (1 to 16 characters)")
    unmatched = raw.get("unmatched_studies", "analyse")
    if unmatched in ("analyse", "analyze", "hold"):
        policy = Unmatched("hold" if unmatched == "hold" else "analyse")
    elif isinstance(unmatched, dict) and set(unmatched) == {"wait_minutes"} and isinstance(unmatched["wait_minutes"], int) \
            and unmatched["wait_minutes"] > 0:
        policy = Unmatched("wait", unmatched["wait_minutes"])
    else:
        raise SitesError(f"site {code}: unmatched_studies must be analyse, hold, or {{wait_minutes: N}}")
    if not isinstance(raw.get("results_to_pacs", False), bool):
        raise SitesError(f"site {code}: results_to_pacs must be true or false")
    store = None
    if raw.get("dicom_store"):
        d = raw["dicom_store"]
        try:
            store = DicomStore(str(d["aet"]).strip(), str(d["host"]), int(d["port"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise SitesError(f"site {code}: dicom_store needs aet, host and an integer port") from exc
        if not 0 < len(store.aet) <= 16:
            raise SitesError(f"site {code}: dicom_store.aet must be 1 to 16 characters")
    return {"dicom_aets": tuple(a.strip() for a in aets), "unmatched_studies": policy,
            "results_to_pacs": bool(raw.get("results_to_pacs", False)), "dicom_store": store}


def _site(code: str, raw: dict[str, Any]) -> Site:
    if not isinstance(raw, dict) or not raw.get("name"):
        raise SitesError(f"site {code}: needs at least a name")
    hl7 = None
    if raw.get("hl7"):
        h = raw["hl7"]
        version = str(h.get("version", "2.5.1")) if isinstance(h, dict) else ""
        if isinstance(h, dict) and version not in HL7_VERSIONS:
            raise SitesError(f"site {code}: hl7.version must be one of {', '.join(HL7_VERSIONS)} (a quoted string,"
                             f" \"2.3.1\"), not {version[:20]!r}")
        try:
            hl7 = Hl7Destination(str(h["host"]), int(h["port"]), str(h.get("receiving_application", "HIS")),
                                 str(h.get("receiving_facility", code)),
                                 float(h.get("connect_timeout_seconds", 10)), float(h.get("ack_timeout_seconds", 30)),
                                 _tls_flag(code, "hl7", h), version)
        except SitesError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise SitesError(f"site {code}: hl7 needs host and an integer port (timeouts in seconds)") from exc
    app_ack = None
    if raw.get("app_ack"):
        try:
            app_ack = Address(str(raw["app_ack"]["host"]), int(raw["app_ack"]["port"]),
                              _tls_flag(code, "app_ack", raw["app_ack"]))
        except SitesError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise SitesError(f"site {code}: app_ack needs host and an integer port") from exc
    done = raw.get("exam_done") or {}
    allow = raw.get("allow_urls") or []
    if not isinstance(allow, list) or not all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in allow):
        raise SitesError(f"site {code}: allow_urls must be a list of http(s) URL prefixes")
    known = {"name", "district", "province", "hl7", "exam_done", "pacs_wait_minutes", "fhir", "app_ack", "dicomweb",
             "allow_urls", "tls_client_certs", "dicom_aets", "unmatched_studies", "results_to_pacs", "dicom_store"}
    return Site(
        code=code, name=str(raw["name"]), district=raw.get("district"), province=raw.get("province"), hl7=hl7,
        exam_done_order_status=frozenset(map(str, done.get("order_status", ["CM"]))),
        exam_done_result_status=frozenset(map(str, done.get("result_status", []))),
        pacs_wait_minutes=int(raw.get("pacs_wait_minutes", 60)),
        extra={k: v for k, v in raw.items() if k not in known},
        fhir=_fhir(code, raw["fhir"]) if raw.get("fhir") else None, app_ack=app_ack,
        dicomweb=str(raw["dicomweb"]).rstrip("/") if raw.get("dicomweb") else None,
        allow_urls=tuple(allow), tls_client_certs=_fingerprints(code, raw.get("tls_client_certs")),
        **_dicom(code, raw),
    )


def load(path: Path) -> dict[str, Site]:
    """Parse a sites file: code (upper case) -> Site. Raises SitesError, OSError."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise SitesError(f"{path}: not valid YAML ({type(exc).__name__})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("sites") or {}, dict):
        raise SitesError(f"{path}: expected a mapping `sites:` of site codes")
    return {str(code).upper(): _site(str(code), spec) for code, spec in (raw.get("sites") or {}).items()}


class Sites:
    """The sites file as a live registry, reloaded when it changes. Thread-safe."""

    CHECK_SECONDS = 1.0

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._sites: dict[str, Site] = {}
        self._stamp: tuple[float, int] | None = None
        self._checked = 0.0
        self.reload()

    def _file_stamp(self) -> tuple[float, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime, st.st_size)

    def reload(self) -> None:
        """Read the file now (SIGHUP); keep the last good version if it does not parse."""
        with self._lock:
            stamp = self._file_stamp()
            try:
                sites = load(self.path) if stamp is not None else {}
            except (SitesError, OSError) as exc:
                log.error("sites file %s not reloaded, the previous version stays: %s", self.path, exc)
                self._stamp = stamp
                return
            if self._stamp is not None and stamp != self._stamp:
                log.info("sites file %s reloaded: %d site(s)", self.path, len(sites))
            self._sites, self._stamp = sites, stamp
            self._checked = time.monotonic()

    def current(self) -> dict[str, Site]:
        """Every site, as the file says now."""
        if time.monotonic() - self._checked >= self.CHECK_SECONDS:
            self._checked = time.monotonic()
            if self._file_stamp() != self._stamp:
                self.reload()
        return self._sites

    def get(self, code: str | None) -> Site | None:
        return self.current().get((code or "").strip().upper()) if code else None

    def find(self, facility: str | None) -> Site | None:
        """The site for an MSH-4 value (HD: namespace^universal id^type; the namespace is the code)."""
        return self.get(facility.split("^")[0]) if facility else None

    def by_pacs(self, dicomweb: str | None) -> Site | None:
        """The site whose PACS is at this DICOMweb base URL (a study posted over FHIR names its PACS)."""
        if not dicomweb:
            return None
        wanted = dicomweb.rstrip("/")
        return next((s for s in self.current().values() if s.dicomweb == wanted), None)

    def by_aet(self, aet: str | None) -> Site | None:
        """The site whose `dicom_aets` lists this calling AE title (DICOM pads it with spaces)."""
        wanted = (aet or "").strip()
        if not wanted:
            return None
        return next((s for s in self.current().values() if wanted in s.dicom_aets), None)

    def allowed_urls(self) -> tuple[str, ...]:
        """URL prefixes the sites file lets the hub call: every site's PACS and FHIR server, and
        its `allow_urls`."""
        out: list[str] = []
        for site in self.current().values():
            out.extend(u for u in (site.dicomweb, site.fhir.base if site.fhir else None) if u)
            out.extend(site.allow_urls)
        return tuple(out)

    def referral(self, site: Site | None) -> Site | None:
        """The site's higher-level hospital, when the sites file names one the hub knows."""
        if site is None or not site.referral or site.referral.upper() == site.code.upper():
            return None
        return self.get(site.referral)
