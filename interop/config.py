"""One immutable settings object, read from the environment once per process.

`Settings` is the only reader of the environment: every other module takes what it needs from
it (paths, timeouts, and the secrets the sites file names by variable, through `secret()`).
Operators script against these names: keep them stable and documented in the README and in
`interop --help`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

# name -> (attribute, default, help). The single list `interop --help` prints. Relative paths are
# taken from the working directory (a checkout, or the deployment's working directory).
ENVIRONMENT: list[tuple[str, str, str | None, str]] = [
    ("INTEROP_HTTP_PORT", "http_port", "8080", "port of the FHIR API, /healthz, /readyz, /metrics"),
    ("INTEROP_HTTP_HOST", "http_host", "127.0.0.1", "address the FHIR API binds to"),
    ("INTEROP_MLLP_PORT", "mllp_port", "2575", "port of the HL7 v2 MLLP listener"),
    ("INTEROP_MLLP_HOST", "mllp_host", "127.0.0.1", "address the HL7 v2 MLLP listener binds to"),
    ("INTEROP_MLLP_MAX_BYTES", "mllp_max_bytes", str(1024 * 1024),
     "largest HL7 v2 message accepted over MLLP (AR and close above)"),
    ("INTEROP_MLLP_IDLE_SECONDS", "mllp_idle_seconds", "300", "an MLLP connection silent this long is closed"),
    ("DATABASE_URL", "database_url", None, "PostgreSQL URL; unset: an embedded PostgreSQL under INTEROP_DATA_DIR"),
    ("ANALYTICS_DATABASE_URL", "analytics_database_url", None,
     "PostgreSQL the analytics dashboard reads (a replica of DATABASE_URL); unset: DATABASE_URL"),
    ("TRITON_URL", "triton_url", None,
     "Triton: host:port or http://host:port (HTTP), grpc://host:port (gRPC); unset: the bundled tritonserver"
     " on INTEROP_TRITON_REPO"),
    ("INTEROP_TRITON_SHARED_MEMORY", "triton_shared_memory", "auto",
     "system: send input tensors through POSIX shared memory (Triton on the same host); none;"
     " auto: system with the bundled tritonserver, else none"),
    ("DICOMWEB_URL", "dicomweb_url", None, "DICOMweb base URL of the PACS used when a study names no endpoint"),
    ("INTEROP_DATA_DIR", "data_dir", "var", "where the embedded PostgreSQL and logs live"),
    ("INTEROP_MAPPINGS_DIR", "mappings_dir", "mappings", "routing rules, model descriptions, HL7 v2 tables, queue policies"),
    ("INTEROP_SITES", "sites_file", None,
     "facilities served: names, districts, result destinations; unset: INTEROP_MAPPINGS_DIR/sites.yaml"),
    ("INTEROP_TRITON_REPO", "triton_repo", "triton_repo", "Triton model repository for the bundled server"),
    ("INTEROP_TRITON_MODELS", "triton_models", None,
     "models the bundled Triton loads, comma-separated (e.g. chest_xray); unset: every model of the repository"),
    ("INTEROP_WORKERS", "workers", "auto",
     "analysis worker processes started by `interop serve`; auto: one per CPU core the hub may use"),
    ("INTEROP_HTTP_WORKERS", "http_workers", "2", "gunicorn worker processes for the FHIR API"),
    ("INTEROP_DELIVERY_LANES", "delivery_lanes", "32", "destinations the delivery process serves at once (one thread each)"),
    ("INTEROP_HEARTBEAT_FILE", "heartbeat_file", None,
     "a file `interop worker` and `interop deliver` touch at every turn of their loop (a liveness probe"
     " checks its age); unset: none"),
    ("INTEROP_JOB_LEASE_SECONDS", "job_lease_seconds", "120",
     "a claimed job whose worker stops renewing it is retried after this"),
    ("INTEROP_JOB_MAX_ATTEMPTS", "job_max_attempts", "8", "attempts before an analysis job is marked failed"),
    ("INTEROP_RETRY_BASE_SECONDS", "retry_base_seconds", "5", "first retry delay; doubles each attempt, capped at 10 minutes"),
    ("INTEROP_TRITON_TIMEOUT", "triton_timeout", "60", "seconds for one Triton inference call"),
    ("INTEROP_DICOMWEB_TIMEOUT", "dicomweb_timeout", "30", "seconds for one DICOMweb request"),
    ("INTEROP_PACS_WAIT_MINUTES", "pacs_wait_minutes", "60",
     "how long a study not yet in the PACS is looked for (a site's pacs_wait_minutes wins)"),
    ("INTEROP_MAX_BODY_BYTES", "max_body_bytes", str(10 * 1024 * 1024), "largest FHIR request body accepted (413 above)"),
    ("INTEROP_CRITICAL_ESCALATE_MINUTES", "critical_escalate_minutes", "15",
     "an unacknowledged critical result goes to the next contact after this"),
    ("INTEROP_ANALYTICS_REFRESH_MINUTES", "analytics_refresh_minutes", "15",
     "how often a worker refreshes the analytics summary views"),
    ("INTEROP_PSEUDONYM_KEY", "pseudonym_key", None, "secret of the analytics patient keys (at least 16 characters)"),
    ("INTEROP_PSEUDONYM_KEY_FILE", "pseudonym_key_file", None,
     "file holding that secret; unset with no key: INTEROP_DATA_DIR/pseudonym.key, created"),
    ("INTEROP_BASE_URL", "base_url", None, "public base URL of the FHIR API, for Location and Bundle links"),
    ("INTEROP_CORS_ORIGINS", "cors_origins", None,
     "origins (comma-separated, e.g. https://viewer.example.org, or *) whose web pages may call the FHIR API"
     " with a token (CORS); unset: none"),
    ("PROMETHEUS_MULTIPROC_DIR", "metrics_dir", None,
     "set by `interop serve`: where gunicorn workers share their request metrics"),
    # -- security: who may call the hub, and how its connections are protected --------------------
    ("INTEROP_TOKEN_SECONDS", "token_seconds", "300", "lifetime of the access tokens the hub issues (at most 300)"),
    ("INTEROP_SIGNING_KEY_FILE", "signing_key_file", None,
     "PEM private key (EC P-384) the hub signs its access tokens with; unset: one kept in the database"),
    ("INTEROP_TRUSTED_ISSUER", "trusted_issuer", None,
     "also accept access tokens from this identity provider (its `iss`), with the same scope rules"),
    ("INTEROP_TRUSTED_JWKS_URL", "trusted_jwks_url", None, "the trusted identity provider's JWKS URL"),
    ("INTEROP_TRUSTED_AUDIENCE", "trusted_audience", None,
     "the `aud` its tokens must carry; unset: the hub's FHIR base URL"),
    ("INTEROP_OIDC_ISSUER", "oidc_issuer", None,
     "OpenID Connect provider people log in with (authorization code + PKCE); unset: local accounts"),
    ("INTEROP_OIDC_CLIENT_ID", "oidc_client_id", None, "the hub's client id at that provider"),
    ("INTEROP_OIDC_CLIENT_SECRET", "oidc_client_secret", None, "the hub's client secret there (unset: a public client)"),
    ("INTEROP_OIDC_ROLES_CLAIM", "oidc_roles_claim", "roles", "ID-token claim holding the person's hub roles"),
    ("INTEROP_OIDC_SITE_CLAIM", "oidc_site_claim", "site", "ID-token claim holding a clinician's site code"),
    ("INTEROP_SESSION_IDLE_MINUTES", "session_idle_minutes", "15", "a login unused this long is ended"),
    ("INTEROP_LOGIN_MAX_FAILURES", "login_max_failures", "5", "failed passwords in a row before an account is locked"),
    ("INTEROP_LOGIN_LOCK_MINUTES", "login_lock_minutes", "15", "how long a locked account stays locked"),
    ("INTEROP_TLS_CERT", "tls_cert", None, "PEM certificate (chain) of the hub: HTTPS and MLLP over TLS when set"),
    ("INTEROP_TLS_KEY", "tls_key", None, "PEM private key of INTEROP_TLS_CERT"),
    ("INTEROP_TLS_CLIENT_CA", "tls_client_ca", None,
     "CA file for MLLP client certificates: when set, senders must present one (mutual TLS)"),
    ("INTEROP_TLS_CA_FILE", "tls_ca_file", None,
     "CA bundle the hub verifies its peers (EMR, RIS, PACS, identity providers) with; unset: the system's"),
    ("INTEROP_TLS_CLIENT_CERT", "tls_client_cert", None, "PEM certificate the hub presents to peers that ask for one"),
    ("INTEROP_TLS_CLIENT_KEY", "tls_client_key", None, "PEM private key of INTEROP_TLS_CLIENT_CERT"),
    # -- DICOM in (C-STORE, STOW-RS) and out (SR to the PACS) -----------------------------------------
    ("INTEROP_DICOM_PORT", "dicom_port", "11112", "port of the DICOM Storage SCP (C-STORE, C-ECHO) `interop serve` starts"),
    ("INTEROP_DICOM_HOST", "dicom_host", "127.0.0.1", "address the DICOM Storage SCP binds to"),
    ("INTEROP_DICOM_AET", "dicom_aet", "AIHUB",
     "the hub's AE title (called AE of the Storage SCP, calling AE when it stores SRs)"),
    ("INTEROP_DICOM_ALLOW_UNKNOWN_AE", "dicom_allow_unknown_ae", "false",
     "true: accept associations from calling AE titles no site lists in `dicom_aets`"),
    ("INTEROP_DICOM_STABLE_SECONDS", "dicom_stable_seconds", "10",
     "a pushed study is analysed once no new instance arrived for this long (sliding window)"),
    ("INTEROP_DICOM_MAX_BYTES", "dicom_max_bytes", str(2 * 1024 * 1024 * 1024),
     "largest DICOM instance accepted by C-STORE or STOW-RS (failure status above)"),
    ("INTEROP_URL_ALLOW", "url_allow", None,
     "URL prefixes (comma-separated) the hub may call for Subscriptions and Endpoint addresses, beside "
     "the sites file's destinations and `allow_urls`"),
]


def _int(value: str, name: str) -> int:
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
    triton_shared_memory: str = "auto"
    heartbeat_file: Path | None = None
    dicomweb_url: str | None = None
    data_dir: Path = Path("var")
    mappings_dir: Path = Path("mappings")
    sites_file: Path = Path("mappings") / "sites.yaml"
    triton_repo: Path = Path("triton_repo")
    triton_models: str | None = None
    workers: int = 1
    http_workers: int = 2
    delivery_lanes: int = 32
    job_lease_seconds: int = 120
    job_max_attempts: int = 8
    retry_base_seconds: int = 5
    triton_timeout: int = 60
    dicomweb_timeout: int = 30
    pacs_wait_minutes: int = 60
    max_body_bytes: int = 10 * 1024 * 1024
    critical_escalate_minutes: int = 15
    analytics_refresh_minutes: int = 15
    pseudonym_key: str | None = field(default=None, repr=False)
    pseudonym_key_file: Path | None = None
    base_url: str | None = None
    cors_origins: str | None = None
    metrics_dir: Path | None = None
    token_seconds: int = 300
    signing_key_file: Path | None = None
    trusted_issuer: str | None = None
    trusted_jwks_url: str | None = None
    trusted_audience: str | None = None
    oidc_issuer: str | None = None
    oidc_client_id: str | None = None
    oidc_client_secret: str | None = field(default=None, repr=False)
    oidc_roles_claim: str = "roles"
    oidc_site_claim: str = "site"
    session_idle_minutes: int = 15
    login_max_failures: int = 5
    login_lock_minutes: int = 15
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    tls_ca_file: Path | None = None
    tls_client_cert: Path | None = None
    tls_client_key: Path | None = None
    url_allow: str | None = None
    dicom_port: int = 11112
    dicom_host: str = "127.0.0.1"
    dicom_aet: str = "AIHUB"
    dicom_allow_unknown_ae: str = "false"
    dicom_stable_seconds: int = 10
    dicom_max_bytes: int = 2 * 1024 * 1024 * 1024
    # The environment as read, for the secrets the sites file names (`secret()`); never printed.
    environ: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from `env` (default: os.environ); unknown variables are ignored."""
        env = dict(os.environ if env is None else env)
        types = {f.name: f.type for f in fields(cls)}
        values: dict[str, object] = {"environ": env}
        for name, attr, default, _help in ENVIRONMENT:
            raw = env.get(name) or default
            if raw is None:
                continue
            kind = str(types[attr])
            if attr == "workers" and raw == "auto":
                values[attr] = max(1, len(os.sched_getaffinity(0)))
            elif kind == "int":
                values[attr] = _int(raw, name)
            elif "Path" in kind:
                values[attr] = Path(raw).absolute()
            else:
                values[attr] = raw
        if "sites_file" not in values:
            values["sites_file"] = Path(str(values["mappings_dir"])) / "sites.yaml"
        if int(str(values.get("token_seconds", 300))) not in range(1, 301):
            raise ValueError("INTEROP_TOKEN_SECONDS must be between 1 and 300 (SMART: tokens live at most 5 minutes)")
        return cls(**values)  # type: ignore[arg-type]

    def public_base(self) -> str:
        """Base URL used in Location headers and Bundle links."""
        if self.base_url:
            return self.base_url.rstrip("/")
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.http_host}:{self.http_port}/fhir"

    def public_origin(self) -> str:
        """The hub's public origin: the FHIR base without /fhir (the issuer of its tokens)."""
        base = self.public_base()
        return base[: -len("/fhir")] if base.endswith("/fhir") else base

    def token_url(self) -> str:
        """Where SMART backend clients ask for tokens (the `aud` of their assertions)."""
        return f"{self.public_origin()}/auth/token"

    @property
    def tls(self) -> bool:
        """Whether the hub serves HTTPS and MLLP over TLS (a certificate and its key are set)."""
        return self.tls_cert is not None and self.tls_key is not None

    @property
    def dicom_unknown_ae_allowed(self) -> bool:
        return self.dicom_allow_unknown_ae.strip().lower() in ("1", "true", "yes", "on")

    def cors_allowed(self, origin: str) -> bool:
        """Whether a web page of `origin` may call the FHIR API (INTEROP_CORS_ORIGINS; * for any)."""
        listed = [o.strip().rstrip("/") for o in (self.cors_origins or "").split(",") if o.strip()]
        return "*" in listed or origin.rstrip("/") in listed

    def allowed_url_prefixes(self) -> tuple[str, ...]:
        """INTEROP_URL_ALLOW as a tuple of prefixes (the sites file adds its own)."""
        return tuple(p.strip() for p in (self.url_allow or "").split(",") if p.strip())

    def secret(self, name: str | None) -> str | None:
        """The value of an environment variable the sites file names (a token, a client secret)."""
        return self.environ.get(name) if name else None

    def as_env(self) -> dict[str, str]:
        """The settings as environment variables, to hand to child processes (with the rest of
        the environment this process was given, so that named secrets reach them too)."""
        out = dict(self.environ)
        for name, attr, _default, _help in ENVIRONMENT:
            value = getattr(self, attr)
            if value is not None:
                out[name] = str(value)
        return out
