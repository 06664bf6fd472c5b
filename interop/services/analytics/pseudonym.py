"""Pseudonymous patient keys: HMAC-SHA256 of the patient's identifier (system|value) under a
secret held outside the database.

The secret comes from INTEROP_PSEUDONYM_KEY (the key itself), or INTEROP_PSEUDONYM_KEY_FILE (a
file holding it). With neither, the hub creates `pseudonym.key` under INTEROP_DATA_DIR on first
use (mode 0600) and logs a warning: back that file up, and keep it out of database dumps.

Rotation: a new secret gives new keys from then on, so the same patient is no longer linked
across the change; `interop analytics backfill --rekey` recomputes every stored key under the
current secret (the facts keep the fingerprint of the secret in `key_id`).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from ...config import Settings

log = logging.getLogger("interop.analytics")

DEFAULT_FILE = "pseudonym.key"


class PseudonymKeyError(RuntimeError):
    """The configured secret is missing or too short."""


@dataclass(frozen=True)
class Pseudonymizer:
    secret: bytes

    @property
    def key_id(self) -> str:
        """A fingerprint of the secret (not the secret): which secret made a key."""
        return hashlib.sha256(b"interop-pseudonym-key-id|" + self.secret).hexdigest()[:12]

    def patient_key(self, system: str | None, value: str) -> str:
        message = f"{(system or '').strip()}|{value.strip()}".encode()
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()


def _from_file(path: Path) -> bytes:
    raw = path.read_text(encoding="utf-8").strip()
    if len(raw) < 16:
        raise PseudonymKeyError(f"{path}: the pseudonym secret must be at least 16 characters")
    return raw.encode("utf-8")


def load(settings: Settings) -> Pseudonymizer:
    """The secret from INTEROP_PSEUDONYM_KEY, the key file, or a new key file under the data dir."""
    if settings.pseudonym_key:
        secret = settings.pseudonym_key.strip()
        if len(secret) < 16:
            raise PseudonymKeyError("INTEROP_PSEUDONYM_KEY must be at least 16 characters")
        return Pseudonymizer(secret.encode("utf-8"))
    if settings.pseudonym_key_file:
        return Pseudonymizer(_from_file(settings.pseudonym_key_file))
    path = Path(settings.data_dir) / DEFAULT_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process of this hub made it a moment ago
            return Pseudonymizer(_from_file(path))
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(secrets.token_hex(32) + "\n")
        log.warning("no INTEROP_PSEUDONYM_KEY or INTEROP_PSEUDONYM_KEY_FILE: created a pseudonym secret in %s;"
                    " back it up, keep it out of the database, and set INTEROP_PSEUDONYM_KEY_FILE on every hub"
                    " replica", path)
    return Pseudonymizer(_from_file(path))
