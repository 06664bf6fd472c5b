"""One immutable settings object, read from the environment once per process.

Operators script against these names: keep them stable and documented in the README
and in `interop --help`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping

REPO_ROOT = Path(__file__).resolve().parent.parent

# name -> (attribute, default, help). The single list `interop --help` prints.
ENVIRONMENT: list[tuple[str, str, str | None, str]] = [
    ("INTEROP_HTTP_PORT", "http_port", "8080", "port of the FHIR API, /healthz, /readyz, /metrics"),
    ("INTEROP_HTTP_HOST", "http_host", "127.0.0.1", "address the FHIR API binds to"),
    ("INTEROP_MLLP_PORT", "mllp_port", "2575", "port of the HL7 v2 MLLP listener"),
    ("INTEROP_MLLP_HOST", "mllp_host", "127.0.0.1", "address the HL7 v2 MLLP listener binds to"),
    ("INTEROP_MLLP_MAX_BYTES", "mllp_max_bytes", str(1024 * 1024), "largest HL7 v2 message accepted over MLLP (AR and close above)"),
    ("INTEROP_MLLP_IDLE_SECONDS", "mllp_idle_seconds", "300", "an MLLP connection silent this long is closed"),
    ("DATABASE_URL", "database_url", None, "PostgreSQL URL; unset: an embedded PostgreSQL under INTEROP_DATA_DIR"),
    ("ANALYTICS_DATABASE_URL", "analytics_database_url", None, "PostgreSQL the analytics dashboard reads (a replica of DATABASE_URL); unset: DATABASE_URL"),
    ("TRITON_URL", "triton_url", None, "Triton HTTP host:port; unset: the bundled tritonserver on INTEROP_TRITON_REPO"),
    ("DICOMWEB_URL", "dicomweb_url", None, "DICOMweb base URL of the PACS used when a study names no endpoint"),
    ("INTEROP_DATA_DIR", "data_dir", str(REPO_ROOT / "var"), "where the embedded PostgreSQL and logs live"),
    ("INTEROP_MAPPINGS_DIR", "mappings_dir", str(REPO_ROOT / "mappings"), "routing rules, model descriptions, sites"),
    ("INTEROP_SITES", "sites_file", str(REPO_ROOT / "mappings" / "sites.yaml"), "facilities served: names, districts, result destinations"),
    ("INTEROP_TRITON_REPO", "triton_repo", str(REPO_ROOT / "triton_repo"), "Triton model repository for the bundled server"),
    ("INTEROP_WORKERS", "workers", "1", "inference worker processes started by `interop serve`"),
    ("INTEROP_HTTP_WORKERS", "http_workers", "2", "gunicorn worker processes for the FHIR API"),
    ("INTEROP_JOB_LEASE_SECONDS", "job_lease_seconds", "120", "a claimed job whose worker stops renewing it is retried after this"),
    ("INTEROP_JOB_MAX_ATTEMPTS", "job_max_attempts", "8", "attempts before an analysis job is marked failed"),
    ("INTEROP_RETRY_BASE_SECONDS", "retry_base_seconds", "5", "first retry delay; doubles each attempt, capped at 10 minutes"),
    ("INTEROP_TRITON_TIMEOUT", "triton_timeout", "60", "seconds for one Triton inference call"),
    ("INTEROP_DICOMWEB_TIMEOUT", "dicomweb_timeout", "30", "seconds for one DICOMweb request"),
    ("INTEROP_MAX_BODY_BYTES", "max_body_bytes", str(10 * 1024 * 1024), "largest FHIR request body accepted (413 above)"),
    ("INTEROP_CRITICAL_ESCALATE_MINUTES", "critical_escalate_minutes", "15", "an unacknowledged critical result goes to the next contact after this"),
    ("INTEROP_ANALYTICS_REFRESH_MINUTES", "analytics_refresh_minutes", "15", "how often a worker refreshes the analytics summary views"),
    ("INTEROP_BASE_URL", "base_url", None, "public base URL of the FHIR API, for Location and Bundle links"),
]


def _bool_int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {value!r}") from exc


@dataclass(frozen=True)
class Settings:
    http_port: int = 8080
    http_host: str = "127.0.0.1"
    mllp_port: int = 2575
    mllp_host: str = "127.0.0.1"
    mllp_max_bytes: int = 1024 * 1024
    mllp_idle_seconds: int = 300
    database_url: str | None = None
    analytics_database_url: str | None = None
    triton_url: str | None = None
    dicomweb_url: str | None = None
    data_dir: Path = REPO_ROOT / "var"
    mappings_dir: Path = REPO_ROOT / "mappings"
    sites_file: Path = REPO_ROOT / "mappings" / "sites.yaml"
    triton_repo: Path = REPO_ROOT / "triton_repo"
    workers: int = 1
    http_workers: int = 2
    job_lease_seconds: int = 120
    job_max_attempts: int = 8
    retry_base_seconds: int = 5
    triton_timeout: int = 60
    dicomweb_timeout: int = 30
    max_body_bytes: int = 10 * 1024 * 1024
    critical_escalate_minutes: int = 15
    analytics_refresh_minutes: int = 15
    base_url: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Build settings from `env` (default: os.environ); unknown variables are ignored."""
        env = os.environ if env is None else env
        types = {f.name: f.type for f in fields(cls)}
        values: dict[str, object] = {}
        for name, attr, default, _help in ENVIRONMENT:
            raw = env.get(name, default)
            if raw is None or raw == "":
                values[attr] = None if default is None else default
                if values[attr] is None:
                    continue
                raw = str(values[attr])
            kind = types[attr]
            if kind == "int":
                values[attr] = _bool_int(raw, name)
            elif kind == "Path":
                values[attr] = Path(raw)
            else:
                values[attr] = raw
        return cls(**values)  # type: ignore[arg-type]

    def public_base(self) -> str:
        """Base URL used in Location headers and Bundle links."""
        if self.base_url:
            return self.base_url.rstrip("/")
        return f"http://{self.http_host}:{self.http_port}/fhir"

    def as_env(self) -> dict[str, str]:
        """The settings as environment variables, to hand to child processes."""
        out: dict[str, str] = {}
        for name, attr, _default, _help in ENVIRONMENT:
            value = getattr(self, attr)
            if value is not None:
                out[name] = str(value)
        return out
