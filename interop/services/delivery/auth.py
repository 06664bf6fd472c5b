"""Credentials for a site's FHIR server: a bearer token from the environment, or an OAuth2
client-credentials token (RFC 6749 section 4.4) fetched from the site's token endpoint and cached
per (token_url, client_id, scope) until shortly before it expires. Thread-safe.

Secrets are the environment variables the sites file names, read through `Settings.secret`
when needed; errors name the variable, never its value. The token endpoint's certificate is
verified as every peer's is (`interop.tls.ClientTls`, handed in by the channel that asks)."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import requests

from ...sites import FhirAuth
from ...tls import ClientTls

EXPIRY_MARGIN_S = 30.0      # a token is renewed this long before it expires
DEFAULT_LIFETIME_S = 300.0  # when the token endpoint says nothing of expires_in


class AuthError(Exception):
    """No credentials could be had. `transient` says whether trying later may help."""

    def __init__(self, message: str, *, transient: bool):
        super().__init__(message)
        self.transient = transient


@dataclass
class _Token:
    value: str
    expires_at: float


class TokenCache:
    def __init__(self, secrets: Callable[[str | None], str | None], clock: Callable[[], float] = time.monotonic):
        self._secrets = secrets  # Settings.secret: the variables the sites file names
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, str, str], _Token] = {}

    def _secret(self, name: str | None) -> str:
        value = self._secrets(name)
        if not value:
            raise AuthError(f"environment variable {name} is not set", transient=False)
        return value

    def headers(self, auth: FhirAuth, timeout_s: float, *, refresh: bool = False,
                tls: ClientTls | None = None) -> dict[str, str]:
        """The Authorization header for `auth` ({} for none). `refresh` drops a cached token first;
        `tls`: how the token endpoint is verified (None: the system's trust store, no client certificate)."""
        if auth.type == "none":
            return {}
        if auth.type == "bearer":
            return {"Authorization": f"Bearer {self._secret(auth.token_env)}"}
        if auth.type == "client_credentials":
            return {"Authorization": f"Bearer {self.token(auth, timeout_s, refresh=refresh, tls=tls)}"}
        raise AuthError(f"unknown auth type {auth.type}", transient=False)

    def token(self, auth: FhirAuth, timeout_s: float, *, refresh: bool = False, tls: ClientTls | None = None) -> str:
        key = (auth.token_url or "", auth.client_id or "", auth.scope or "")
        with self._lock:  # one fetch at a time per process; others wait and reuse it
            cached = self._tokens.get(key)
            if refresh and cached is not None:
                del self._tokens[key]
                cached = None
            if cached is not None and cached.expires_at - EXPIRY_MARGIN_S > self._clock():
                return cached.value
            token = self._fetch(auth, timeout_s, tls or ClientTls())
            self._tokens[key] = token
            return token.value

    def _fetch(self, auth: FhirAuth, timeout_s: float, tls: ClientTls) -> _Token:
        form = {"grant_type": "client_credentials"}
        if auth.scope:
            form["scope"] = auth.scope
        try:
            answer = requests.post(auth.token_url or "", data=form, timeout=timeout_s,
                                   auth=(auth.client_id or "", self._secret(auth.client_secret_env)),
                                   headers={"Accept": "application/json"}, **tls.requests_kwargs())
        except requests.RequestException as exc:
            raise AuthError(f"token endpoint unreachable ({type(exc).__name__})", transient=True) from None
        if answer.status_code >= 500 or answer.status_code == 429:
            raise AuthError(f"token endpoint answered {answer.status_code}", transient=True)
        if answer.status_code != 200:
            raise AuthError(f"token endpoint refused the client credentials ({answer.status_code})", transient=False)
        try:
            body = answer.json()
            value = str(body["access_token"])
            lifetime = float(body.get("expires_in") or DEFAULT_LIFETIME_S)
        except (ValueError, KeyError, TypeError):
            raise AuthError("token endpoint answered without an access_token", transient=True) from None
        return _Token(value, self._clock() + lifetime)
