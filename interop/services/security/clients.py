"""Registering SMART backend clients (`interop clients add|list|disable`).

A client is registered with its public keys, a JWKS file (kept in the database) or a JWKS URL
(fetched when needed), and the most it may ask for. Private keys are refused: the hub never
holds a client's secret. The client_id is random (128 bits), so it reveals nothing and cannot be guessed.
"""
from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
import psycopg

from ...domain import scopes
from ...store import security as store

PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "k")


class ClientError(ValueError):
    """The registration cannot be made as given (the message says why)."""


def check_jwks(jwks: Any) -> dict[str, Any]:
    """A public JWKS whose every key has a kid and is usable for RS384 or ES384."""
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list) or not jwks["keys"]:
        raise ClientError("the JWKS must be an object with a non-empty `keys` list")
    for key in jwks["keys"]:
        if not isinstance(key, dict) or not key.get("kid"):
            raise ClientError("every key of the JWKS needs a kid")
        if any(m in key for m in PRIVATE_MEMBERS):
            raise ClientError(f"key {key['kid']} holds private material: register the public keys only")
        alg = key.get("alg") or ("RS384" if key.get("kty") == "RSA" else "ES384")
        try:
            jwt.PyJWK(key, algorithm=alg)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as exc:
            raise ClientError(f"key {key['kid']} is not an RS384 or ES384 public key ({type(exc).__name__})") from None
    return jwks


def _jwks_url(url: str) -> str:
    split = urlsplit(url)
    loopback = split.hostname in ("127.0.0.1", "localhost", "::1")
    if split.scheme != "https" and not (split.scheme == "http" and loopback):
        raise ClientError("a JWKS URL must be https (http only on this machine's loopback, for tests)")
    return url


def register(conn: psycopg.Connection[Any], name: str, jwks_source: str, scope_text: str,
             site: str | None = None) -> str:
    """Register a client (acting for `site`, a facility code of the sites file, when given); its new client_id."""
    try:
        granted = scopes.check(scope_text)
    except scopes.ScopeError as exc:
        raise ClientError(str(exc)) from None
    if not granted:
        raise ClientError("--scopes names no scope")
    if not name.strip() or len(name) > 200:
        raise ClientError("the client's name must be 1 to 200 characters")
    jwks: dict[str, Any] | None = None
    url: str | None = None
    if jwks_source.startswith(("http://", "https://")):
        url = _jwks_url(jwks_source)
    else:
        try:
            jwks = check_jwks(json.loads(Path(jwks_source).read_text(encoding="utf-8")))
        except OSError as exc:
            raise ClientError(f"cannot read {jwks_source} ({exc.strerror})") from None
        except json.JSONDecodeError:
            raise ClientError(f"{jwks_source} is not JSON") from None
    client_id = secrets.token_hex(16)  # hex: never read as a command-line option
    store.add_client(conn, client_id, name.strip(), " ".join(granted), jwks=jwks, jwks_url=url,
                     site=site.strip().upper() if site else None)
    return client_id


def site_of(conn: psycopg.Connection[Any], client_id: str | None) -> str | None:
    """The facility a client acts for (`interop clients add --site`), if any."""
    found = store.client(conn, client_id) if client_id else None
    return str(found["site"]) if found and found.get("site") else None


def listing(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    return store.clients(conn)


def disable(conn: psycopg.Connection[Any], client_id: str) -> bool:
    return store.disable_client(conn, client_id)
