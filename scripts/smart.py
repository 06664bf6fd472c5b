"""A SMART Backend Services client, as a HIS/EMR vendor writes one: its own key pair, a signed
assertion (RFC 7523) for each token request, a fresh token whenever the last is about to expire.
Used by the demo, the benchmarks and the tests; the README shows the same few lines."""
from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
import requests
from cryptography.hazmat.primitives.asymmetric import ec, rsa

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@dataclass
class ClientKey:
    """A client's key pair: the private key signs assertions, `jwks` is what is registered."""

    private: Any
    kid: str
    alg: str

    @classmethod
    def new(cls, alg: str = "ES384") -> ClientKey:
        private = ec.generate_private_key(ec.SECP384R1()) if alg.startswith("ES") else \
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return cls(private, uuid.uuid4().hex[:12], alg)

    @property
    def jwk(self) -> dict[str, Any]:
        algorithm = jwt.algorithms.ECAlgorithm if self.alg.startswith("ES") else jwt.algorithms.RSAAlgorithm
        public = json.loads(algorithm.to_jwk(self.private.public_key()))
        return {**public, "kid": self.kid, "alg": self.alg, "use": "sig"}

    @property
    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.jwk]}

    def assertion(self, client_id: str, aud: str, *, lifetime: int = 240, **overrides: Any) -> str:
        now = int(time.time())
        claims = {"iss": client_id, "sub": client_id, "aud": aud, "exp": now + lifetime, "iat": now,
                  "jti": uuid.uuid4().hex}
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        return jwt.encode(claims, self.private, algorithm=self.alg, headers={"kid": self.kid})


def token_form(assertion: str, scope: str) -> dict[str, str]:
    return {"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion, "scope": scope}


class Smart(requests.auth.AuthBase):
    """requests auth for a SMART backend client: a fresh token whenever the last is about to expire."""

    def __init__(self, token_url: str, client_id: str, key: ClientKey, scopes: str, *, verify: bool | str = True):
        self.token_url, self.client_id, self.key, self.scopes, self.verify = token_url, client_id, key, scopes, verify
        self._token, self._until = "", 0.0
        self._lock = threading.Lock()

    def token(self) -> str:
        with self._lock:
            if time.monotonic() > self._until - 30:
                answer = requests.post(self.token_url, data=token_form(self.key.assertion(self.client_id, self.token_url),
                                                                       self.scopes), timeout=30, verify=self.verify)
                answer.raise_for_status()
                body = answer.json()
                self._token, self._until = body["access_token"], time.monotonic() + body["expires_in"]
            return self._token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self.token()}"
        return request


def session(auth: Smart) -> requests.Session:
    out = requests.Session()
    out.auth = auth
    return out
