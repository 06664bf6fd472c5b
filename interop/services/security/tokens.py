"""The hub as a SMART Backend Services authorization server, and the check of every bearer token.

`/auth/token` takes a client_credentials grant authenticated with a signed JWT (`private_key_jwt`,
RFC 7523 and SMART App Launch 2): `iss` = `sub` = the client_id, `aud` = the token URL, `exp`
at most five minutes ahead, a `jti` never used before by that client, signed RS384 or ES384 with
the key named by `kid` in the client's registered JWKS (inline, or a URL fetched and cached).
The answer is an access token the hub signs itself (ES384), living at most 300 s, with the
granted scopes; there are no refresh tokens.

Checking a bearer token needs no database round trip: the signature is checked once against
the hub's public key (or the trusted provider's cached JWKS) and the result kept until the token
expires. Disabling a client takes effect within `DISABLED_REFRESH_SECONDS`.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import psycopg
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ...config import Settings
from ...domain import scopes
from ...store import security as store
from ...tls import ClientTls
from .jwks import JwksCache, JwksError, pick
from .principal import Principal

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
CLIENT_ALGORITHMS = ("RS384", "ES384")  # what SMART requires servers to support
TRUSTED_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "PS384")
HUB_ALGORITHM = "ES384"
MAX_ASSERTION_SECONDS = 300
LEEWAY_SECONDS = 30  # clock skew between the client and the hub
MAX_ASSERTION_BYTES = 16 * 1024
CACHE_TOKENS = 10_000
DISABLED_REFRESH_SECONDS = 10


class OAuthError(Exception):
    """An RFC 6749 error answer: `error` code, a description safe to show, the HTTP status."""

    def __init__(self, error: str, description: str, status: int = 400, client_id: str | None = None):
        super().__init__(description)
        self.error, self.description, self.status, self.client_id = error, description, status, client_id

    def body(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}


class InvalidToken(Exception):
    """A bearer token the hub does not accept (the message is safe to show)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def thumbprint(public_jwk: Mapping[str, Any]) -> str:
    """RFC 7638 key thumbprint (the hub's `kid`)."""
    members = {k: public_jwk[k] for k in ("crv", "e", "kty", "n", "x", "y") if k in public_jwk}
    return _b64(hashlib.sha256(json.dumps(members, separators=(",", ":"), sort_keys=True).encode()).digest())


def new_signing_key() -> tuple[str, str]:
    """(kid, PKCS#8 PEM) of a fresh P-384 key."""
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return _kid(key), pem


def _kid(key: Any) -> str:
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    return thumbprint(jwk)


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


@dataclass
class _Cached:
    principal: Principal
    expires: float


class Tokens:
    """One per process: the signing key, the JWKS cache and the checked-token cache."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.jwks = JwksCache(**ClientTls.from_settings(settings).requests_kwargs())
        self._key: tuple[str, Any] | None = None
        self._lock = threading.Lock()
        self._checked: OrderedDict[str, _Cached] = OrderedDict()
        self._disabled: set[str] = set()
        self._disabled_at = 0.0

    # -- the hub's key ------------------------------------------------------------------------
    def signing_key(self, connect: Callable[[], Any]) -> tuple[str, Any]:
        """(kid, private key): INTEROP_SIGNING_KEY_FILE, else the database's (made once)."""
        if self._key is None:
            if self.settings.signing_key_file is not None:
                pem = Path(self.settings.signing_key_file).read_bytes()
                key = serialization.load_pem_private_key(pem, password=None)
                self._key = (_kid(key), key)
            else:
                with connect() as conn:
                    found = store.signing_key(conn)
                    if found is None:
                        with conn.transaction():
                            found = store.keep_signing_key(conn, *new_signing_key())
                kid, pem_text = found
                self._key = (kid, serialization.load_pem_private_key(pem_text.encode(), password=None))
        return self._key

    def derive_secret(self, label: bytes, connect: Callable[[], Any]) -> bytes:
        """A secret for `label` derived from the signing key (the same in every replica)."""
        _kid_, key = self.signing_key(connect)
        der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        return hmac.new(der, b"interop-hub|" + label, hashlib.sha256).digest()

    # -- the token endpoint -------------------------------------------------------------------
    def issue(self, conn: psycopg.Connection[Any], form: Mapping[str, str], audiences: Iterable[str],
              connect: Callable[[], Any]) -> tuple[dict[str, Any], str]:
        """(the token response, the client it is for) for a client_credentials request, or OAuthError."""
        if form.get("grant_type") != "client_credentials":
            raise OAuthError("unsupported_grant_type", "grant_type must be client_credentials")
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise OAuthError("invalid_request", f"client_assertion_type must be {ASSERTION_TYPE}")
        assertion = form.get("client_assertion") or ""
        if not assertion or len(assertion) > MAX_ASSERTION_BYTES:
            raise OAuthError("invalid_request", "client_assertion is missing or too long")
        client = self._authenticate(conn, assertion, list(audiences))
        requested = form.get("scope") or ""
        if not requested.strip():
            raise OAuthError("invalid_scope", "scope is required", client_id=client["client_id"])
        try:
            granted = scopes.narrow(requested, client["scopes"])
        except scopes.ScopeError as exc:
            raise OAuthError("invalid_scope", str(exc), client_id=client["client_id"]) from None
        if not granted:
            raise OAuthError("invalid_scope", "none of the requested scopes is registered for this client",
                             client_id=client["client_id"])
        now = int(time.time())
        lifetime = self.settings.token_seconds
        kid, key = self.signing_key(connect)
        claims = {"iss": self.settings.public_origin(), "sub": client["client_id"], "client_id": client["client_id"],
                  "aud": self.settings.public_base(), "iat": now, "exp": now + lifetime,
                  "jti": secrets.token_urlsafe(16), "scope": " ".join(granted)}
        token = jwt.encode(claims, key, algorithm=HUB_ALGORITHM, headers={"kid": kid, "typ": "at+jwt"})
        return ({"access_token": token, "token_type": "bearer", "expires_in": lifetime, "scope": claims["scope"]},
                client["client_id"])

    def _authenticate(self, conn: psycopg.Connection[Any], assertion: str, audiences: list[str]) -> dict[str, Any]:
        def refuse(why: str, client_id: str | None = None) -> OAuthError:
            return OAuthError("invalid_client", why, 401, client_id)

        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise refuse("client_assertion is not a signed JWT") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in CLIENT_ALGORITHMS:
            raise refuse(f"client_assertion must be signed with {' or '.join(CLIENT_ALGORITHMS)}")
        if not isinstance(kid, str) or not kid:
            raise refuse("client_assertion's header needs the kid of the signing key")
        if header.get("typ") not in (None, "JWT", "jwt"):
            raise refuse("client_assertion's typ must be JWT")
        client_id = unverified.get("iss")
        if not isinstance(client_id, str) or not client_id or unverified.get("sub") != client_id:
            raise refuse("client_assertion needs iss and sub, both the client_id")
        client = store.client(conn, client_id)
        if client is None or client["disabled_at"] is not None:
            raise refuse("unknown or disabled client", client_id if client else None)
        try:
            key = pick(client["jwks"], kid, alg) if client["jwks"] is not None else \
                self.jwks.key(client["jwks_url"], kid, alg)
        except JwksError as exc:
            raise refuse(str(exc), client_id) from None
        try:
            claims = jwt.decode(assertion, key, algorithms=[alg], audience=audiences, issuer=client_id,
                                leeway=LEEWAY_SECONDS, options={"require": ["iss", "sub", "aud", "exp", "jti"]})
        except jwt.ExpiredSignatureError:
            raise refuse("client_assertion has expired", client_id) from None
        except jwt.InvalidAudienceError:
            raise refuse("client_assertion's aud must be the token URL", client_id) from None
        except jwt.InvalidSignatureError:
            raise refuse("client_assertion's signature does not verify with the registered key", client_id) from None
        except jwt.PyJWTError as exc:
            raise refuse(f"client_assertion refused ({type(exc).__name__})", client_id) from None
        exp = float(claims["exp"])
        if exp - time.time() > MAX_ASSERTION_SECONDS + LEEWAY_SECONDS:
            raise refuse("client_assertion's exp is more than five minutes ahead", client_id)
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti or len(jti) > 255:
            raise refuse("client_assertion needs a jti", client_id)
        if not store.use_assertion(conn, client_id, jti, _utc(exp)):
            raise refuse("client_assertion's jti was used before", client_id)
        return client

    # -- bearer tokens ------------------------------------------------------------------------
    def check(self, token: str, connect: Callable[[], Any]) -> Principal:
        """The caller a bearer token names, or InvalidToken. Cached until the token expires."""
        now = time.time()
        with self._lock:
            cached = self._checked.get(token)
        if cached is not None and cached.expires > now:
            principal = cached.principal
        else:
            principal, expires = self._verify(token, connect)
            with self._lock:
                self._checked[token] = _Cached(principal, expires)
                while len(self._checked) > CACHE_TOKENS:
                    self._checked.popitem(last=False)
        if principal.name in self._disabled_clients(connect):
            raise InvalidToken("the client is disabled")
        return principal

    def _disabled_clients(self, connect: Callable[[], Any]) -> set[str]:
        if time.monotonic() - self._disabled_at >= DISABLED_REFRESH_SECONDS:
            with connect() as conn:
                self._disabled = store.disabled_clients(conn)
            self._disabled_at = time.monotonic()
        return self._disabled

    def _verify(self, token: str, connect: Callable[[], Any]) -> tuple[Principal, float]:
        if len(token) > MAX_ASSERTION_BYTES:
            raise InvalidToken("the token is too long")
        try:
            header = jwt.get_unverified_header(token)
            issuer = jwt.decode(token, options={"verify_signature": False}).get("iss")
        except jwt.PyJWTError:
            raise InvalidToken("the token is not a signed JWT") from None
        settings = self.settings
        try:
            if issuer == settings.public_origin():
                kid, key = self.signing_key(connect)
                if header.get("kid") != kid:
                    raise InvalidToken("the token was signed with a key the hub does not hold")
                claims = jwt.decode(token, key.public_key(), algorithms=[HUB_ALGORITHM], audience=settings.public_base(),
                                    issuer=issuer, options={"require": ["exp", "iat", "sub", "scope"]})
            elif settings.trusted_issuer and issuer == settings.trusted_issuer and settings.trusted_jwks_url:
                alg = header.get("alg")
                if alg not in TRUSTED_ALGORITHMS or not isinstance(header.get("kid"), str):
                    raise InvalidToken("the token's algorithm or key id is not accepted")
                key = self.jwks.key(settings.trusted_jwks_url, header["kid"], alg)
                claims = jwt.decode(token, key, algorithms=[alg], issuer=issuer, leeway=LEEWAY_SECONDS,
                                    audience=settings.trusted_audience or settings.public_base(),
                                    options={"require": ["exp", "iss"]})
            else:
                raise InvalidToken("the token's issuer is not trusted here")
        except jwt.ExpiredSignatureError:
            raise InvalidToken("the token has expired") from None
        except (jwt.PyJWTError, JwksError) as exc:
            raise InvalidToken(f"the token is not valid here ({type(exc).__name__})") from None
        granted = claims.get("scope", claims.get("scp", ""))
        granted = " ".join(granted) if isinstance(granted, list) else str(granted)
        name = str(claims.get("client_id") or claims.get("azp") or claims.get("sub") or "")
        if not name:
            raise InvalidToken("the token names no client")
        return Principal("client", name, scopes.Grant.of(granted), issuer=str(issuer)), float(claims["exp"])
