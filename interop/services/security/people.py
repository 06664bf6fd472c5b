"""People: local accounts (Argon2id passwords, lockout) and logins (server-side sessions).

A login is a random token in an HttpOnly cookie; the database keeps its SHA-256, the person,
the role, and a CSRF token the pages put in every form. A login unused for
INTEROP_SESSION_IDLE_MINUTES ends; logout ends it at once.
"""
from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from ...config import Settings
from ...store import security as store
from .principal import ROLES, Principal

HASHER = PasswordHasher()  # Argon2id with the library's current RFC 9106 "low memory" profile
# Checked when the account does not exist, so that an unknown name costs the same time as a known one.
_DUMMY_HASH = HASHER.hash(secrets.token_urlsafe(16))
MIN_PASSWORD = 12
SLOW_SECONDS_PER_FAILURE = 0.25
MAX_SLOW_SECONDS = 2.0


class AccountError(ValueError):
    """An account that cannot be made as asked (the message says why)."""


class LoginRefused(Exception):
    """Wrong name or password, or a locked or disabled account. `reason` is for the audit log;
    people are told only that the login failed (or that the account is locked)."""

    def __init__(self, reason: str, locked: bool = False):
        super().__init__(reason)
        self.reason, self.locked = reason, locked


def add(conn: psycopg.Connection[Any], name: str, role: str, password: str, site: str | None = None) -> None:
    if role not in ROLES:
        raise AccountError(f"role must be one of {', '.join(ROLES)}")
    if not name or len(name) > 128 or not name.isprintable():
        raise AccountError("the name must be 1 to 128 printable characters")
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"the password must have at least {MIN_PASSWORD} characters")
    if role == "clinician" and not site:
        raise AccountError("a clinician needs --site (the facility whose reports they read)")
    if store.person(conn, name) is not None:
        raise AccountError(f"{name} already has an account")
    store.add_person(conn, name, role, site.upper() if site else None, HASHER.hash(password))


def set_password(conn: psycopg.Connection[Any], name: str, password: str) -> bool:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"the password must have at least {MIN_PASSWORD} characters")
    return store.set_person(conn, name, password_hash=HASHER.hash(password))


def check_password(conn: psycopg.Connection[Any], settings: Settings, name: str, password: str) -> Principal:
    """The person, when the password is right and the account usable; else LoginRefused (after
    counting the failure, locking the account at the limit, and a delay that grows with it)."""
    found = store.person(conn, name)
    try:
        HASHER.verify(found["password_hash"] if found else _DUMMY_HASH, password)
        right = found is not None
    except (VerificationError, InvalidHashError):
        right = False
    if found is None:
        time.sleep(SLOW_SECONDS_PER_FAILURE)
        raise LoginRefused("unknown account")
    if found["disabled_at"] is not None:
        raise LoginRefused("account disabled")
    if found["locked"]:
        raise LoginRefused("account locked", locked=True)
    if not right:
        failures = store.failed_login(conn, name, settings.login_max_failures, settings.login_lock_minutes)
        time.sleep(min(MAX_SLOW_SECONDS, SLOW_SECONDS_PER_FAILURE * failures))
        locked = failures >= settings.login_max_failures
        raise LoginRefused("wrong password" + (" (account now locked)" if locked else ""), locked=locked)
    rehash = HASHER.hash(password) if HASHER.check_needs_rehash(found["password_hash"]) else None
    store.good_login(conn, name, rehash)
    return Principal("person", name, role=found["role"], site=found["site"], via="local")


@dataclass(frozen=True)
class Login:
    token: str          # for the cookie, never stored
    principal: Principal


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def start(conn: psycopg.Connection[Any], person: Principal) -> Login:
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    store.start_session(conn, _hash(token), person.name, person.role or "", person.site, person.via or "local", csrf)
    return Login(token, Principal("person", person.name, role=person.role, site=person.site, via=person.via, csrf=csrf))


def resume(conn: psycopg.Connection[Any], settings: Settings, token: str) -> Principal | None:
    """The person a login cookie belongs to, or None (unknown, ended, idle too long)."""
    if not token or len(token) > 128:
        return None
    row = store.touch_session(conn, _hash(token), settings.session_idle_minutes)
    if row is None:
        return None
    return Principal("person", row["person"], role=row["role"], site=row["site"], via=row["via"], csrf=row["csrf"])


def end(conn: psycopg.Connection[Any], token: str) -> str | None:
    return store.end_session(conn, _hash(token)) if token else None
