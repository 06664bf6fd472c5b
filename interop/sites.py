"""The sites file (INTEROP_SITES, default mappings/sites.yaml): the facilities the hub serves,
keyed by the facility code senders put in MSH-4. Unknown facilities have no site: their
messages are accepted and recorded, and their results have no destination."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml


class SitesError(ValueError):
    """The sites file is malformed (the message names the site and the field)."""


@dataclass(frozen=True)
class Hl7Destination:
    host: str
    port: int
    receiving_application: str = "HIS"
    receiving_facility: str = ""


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


def _site(code: str, raw: dict[str, Any]) -> Site:
    if not isinstance(raw, dict) or not raw.get("name"):
        raise SitesError(f"site {code}: needs at least a name")
    hl7 = None
    if raw.get("hl7"):
        h = raw["hl7"]
        try:
            hl7 = Hl7Destination(str(h["host"]), int(h["port"]), str(h.get("receiving_application", "HIS")),
                                 str(h.get("receiving_facility", code)))
        except (KeyError, TypeError, ValueError) as exc:
            raise SitesError(f"site {code}: hl7 needs host and an integer port") from exc
    done = raw.get("exam_done") or {}
    known = {"name", "district", "province", "hl7", "exam_done", "pacs_wait_minutes", "fhir"}
    return Site(
        code=code, name=str(raw["name"]), district=raw.get("district"), province=raw.get("province"), hl7=hl7,
        exam_done_order_status=frozenset(map(str, done.get("order_status", ["CM"]))),
        exam_done_result_status=frozenset(map(str, done.get("result_status", []))),
        pacs_wait_minutes=int(raw.get("pacs_wait_minutes", 60)),
        extra={k: v for k, v in raw.items() if k not in known},
        fhir=_fhir(code, raw["fhir"]) if raw.get("fhir") else None,
    )


@lru_cache(maxsize=8)
def load(path: Path) -> dict[str, Site]:
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    return {str(code).upper(): _site(str(code), spec) for code, spec in (raw.get("sites") or {}).items()}


def find(sites: dict[str, Site], facility: str | None) -> Site | None:
    """The site for an MSH-4 value (HD: namespace^universal id^type; the namespace is the code)."""
    if not facility:
        return None
    return sites.get(facility.split("^")[0].strip().upper())
