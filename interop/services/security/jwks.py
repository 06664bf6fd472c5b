"""Public keys fetched from JWKS URLs (a client's registered `jwks_url`, a trusted identity
provider), cached as the server's Cache-Control allows, so that checking a token costs no
network round trip while its keys are fresh.

An unknown `kid` fetches the set again (keys rotate), at most once per `REFETCH_SECONDS` per URL,
so a stream of made-up key ids cannot make the hub hammer the key server.
"""
from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import jwt
import requests

DEFAULT_SECONDS = 300       # no Cache-Control: keep the set five minutes
MAX_SECONDS = 24 * 3600
REFETCH_SECONDS = 10
MAX_BYTES = 256 * 1024
_MAX_AGE = re.compile(r"max-age\s*=\s*(\d+)")


class JwksError(Exception):
    """No usable key (the message is safe to show: it names the URL's host at most)."""


def lifetime(cache_control: str | None) -> int:
    """Seconds a response may be reused, from its Cache-Control (no-store/no-cache: 0)."""
    value = (cache_control or "").lower()
    if "no-store" in value or "no-cache" in value:
        return 0
    match = _MAX_AGE.search(value)
    return min(int(match.group(1)), MAX_SECONDS) if match else DEFAULT_SECONDS


def pick(jwks: dict[str, Any], kid: str, alg: str) -> Any:
    """The key of `jwks` with this key id, usable with `alg` (a PyJWT key object)."""
    for raw in jwks.get("keys") or []:
        if isinstance(raw, dict) and raw.get("kid") == kid:
            if raw.get("alg") not in (None, alg):
                raise JwksError(f"key {kid} is registered for {raw.get('alg')}, not {alg}")
            try:
                return jwt.PyJWK(raw, algorithm=alg).key
            except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as exc:
                raise JwksError(f"key {kid} cannot be used with {alg}") from exc
    raise JwksError(f"no key with kid {kid}")


@dataclass
class _Entry:
    jwks: dict[str, Any]
    fresh_until: float
    fetched_at: float


class JwksCache:
    """JWKS per URL, thread-safe; `verify`/`cert` are passed to requests (the hub's TLS settings)."""

    def __init__(self, *, verify: bool | str = True, cert: str | tuple[str, str] | None = None, timeout: float = 5.0):
        self.verify, self.cert, self.timeout = verify, cert, timeout
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    def _fetch(self, url: str) -> _Entry:
        try:
            with requests.get(url, timeout=self.timeout, verify=self.verify, cert=self.cert, stream=True) as resp:
                body = resp.raw.read(MAX_BYTES + 1, decode_content=True)
                if resp.status_code != 200 or len(body) > MAX_BYTES:
                    raise JwksError(f"the JWKS URL answered {resp.status_code}")
                jwks = json.loads(body)
                age = lifetime(resp.headers.get("Cache-Control"))
        except (requests.RequestException, ValueError) as exc:
            raise JwksError(f"the JWKS URL could not be read ({type(exc).__name__})") from None
        if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
            raise JwksError("the JWKS URL did not return a key set")
        now = time.monotonic()
        return _Entry(jwks, now + age, now)

    def get(self, url: str, *, refresh: bool = False) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(url)
        stale = entry is None or now >= entry.fresh_until
        may_refetch = entry is None or now - entry.fetched_at >= REFETCH_SECONDS
        if stale or (refresh and may_refetch):
            entry = self._fetch(url)
            with self._lock:
                self._entries[url] = entry
        assert entry is not None
        return entry.jwks

    def key(self, url: str, kid: str, alg: str) -> Any:
        """The key for `kid`: from the cached set, or the set fetched again if it is not there."""
        try:
            return pick(self.get(url), kid, alg)
        except JwksError:
            return pick(self.get(url, refresh=True), kid, alg)
