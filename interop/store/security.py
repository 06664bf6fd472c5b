"""Clients, assertion ids, signing keys, people and their logins (migration 0007).

Secrets are never stored in the clear: people's passwords as Argon2id hashes (made by the
caller), login tokens as their SHA-256. The signing key is the one exception the hub needs to
sign with; it is readable only by whoever can read the database, like the patient data itself.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from .db import scalar

Row = dict[str, Any]


# -- machine clients --------------------------------------------------------------------------
def add_client(conn: psycopg.Connection[Any], client_id: str, name: str, scopes: str, *,
               jwks: dict[str, Any] | None = None, jwks_url: str | None = None, site: str | None = None) -> None:
    conn.execute("INSERT INTO client (client_id, name, jwks, jwks_url, scopes, site) VALUES (%s, %s, %s, %s, %s, %s)",
                 (client_id, name, Jsonb(jwks) if jwks is not None else None, jwks_url, scopes, site))


def client(conn: psycopg.Connection[Any], client_id: str) -> Row | None:
    row = conn.execute("SELECT client_id, name, jwks, jwks_url, scopes, site, created_at, disabled_at FROM client"
                       " WHERE client_id = %s", (client_id,)).fetchone()
    return dict(row) if row is not None else None


def clients(conn: psycopg.Connection[Any]) -> list[Row]:
    rows = conn.execute("SELECT client_id, name, jwks_url, scopes, site, created_at, disabled_at FROM client"
                        " ORDER BY created_at, client_id").fetchall()
    return [dict(r) for r in rows]


def disable_client(conn: psycopg.Connection[Any], client_id: str) -> bool:
    cur = conn.execute("UPDATE client SET disabled_at = now() WHERE client_id = %s AND disabled_at IS NULL",
                       (client_id,))
    return cur.rowcount == 1


def disabled_clients(conn: psycopg.Connection[Any]) -> set[str]:
    return {r[0] if isinstance(r, tuple) else r["client_id"]
            for r in conn.execute("SELECT client_id FROM client WHERE disabled_at IS NOT NULL").fetchall()}


def use_assertion(conn: psycopg.Connection[Any], client_id: str, jti: str, expires_at: datetime) -> bool:
    """Record an assertion id; False when the client used it before (a replay). Expired ids
    are dropped on the way: they can no longer be replayed, their `exp` refuses them."""
    conn.execute("DELETE FROM client_assertion WHERE expires_at < now() - interval '1 minute'")
    cur = conn.execute("INSERT INTO client_assertion (client_id, jti, expires_at) VALUES (%s, %s, %s)"
                       " ON CONFLICT DO NOTHING", (client_id, jti, expires_at))
    return cur.rowcount == 1


# -- the hub's signing key --------------------------------------------------------------------
def signing_key(conn: psycopg.Connection[Any]) -> tuple[str, str] | None:
    row = conn.execute("SELECT kid, pem FROM signing_key ORDER BY created_at DESC, kid LIMIT 1").fetchone()
    if row is None:
        return None
    return (row["kid"], row["pem"]) if isinstance(row, dict) else (row[0], row[1])


def keep_signing_key(conn: psycopg.Connection[Any], kid: str, pem: str) -> tuple[str, str]:
    """Store a new key unless another replica stored one first; returns the key to use."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtext('interop.signing_key'))")
    found = signing_key(conn)
    if found is not None:
        return found
    conn.execute("INSERT INTO signing_key (kid, pem) VALUES (%s, %s)", (kid, pem))
    return kid, pem


# -- people -----------------------------------------------------------------------------------
def add_person(conn: psycopg.Connection[Any], name: str, role: str, site: str | None, password_hash: str) -> None:
    conn.execute("INSERT INTO person (name, role, site, password_hash) VALUES (%s, %s, %s, %s)",
                 (name, role, site, password_hash))


def person(conn: psycopg.Connection[Any], name: str) -> Row | None:
    row = conn.execute("SELECT name, role, site, password_hash, failures, locked_until, disabled_at,"
                       " locked_until > now() AS locked FROM person WHERE name = %s", (name,)).fetchone()
    return dict(row) if row is not None else None


def people(conn: psycopg.Connection[Any]) -> list[Row]:
    rows = conn.execute("SELECT name, role, site, failures, locked_until, created_at, disabled_at FROM person"
                        " ORDER BY name").fetchall()
    return [dict(r) for r in rows]


def failed_login(conn: psycopg.Connection[Any], name: str, max_failures: int, lock_minutes: int) -> int:
    """Count a wrong password; lock the account at `max_failures` in a row. Returns the count."""
    count = scalar(conn, "UPDATE person SET failures = failures + 1,"
                         " locked_until = CASE WHEN failures + 1 >= %s THEN now() + make_interval(mins => %s)"
                         " ELSE locked_until END WHERE name = %s RETURNING failures",
                   (max_failures, lock_minutes, name))
    return int(count or 0)


def good_login(conn: psycopg.Connection[Any], name: str, password_hash: str | None = None) -> None:
    """Reset the failure count (and store a re-hashed password when the parameters changed)."""
    conn.execute("UPDATE person SET failures = 0, locked_until = NULL,"
                 " password_hash = coalesce(%s, password_hash) WHERE name = %s", (password_hash, name))


def set_person(conn: psycopg.Connection[Any], name: str, *, password_hash: str | None = None,
               disabled: bool | None = None) -> bool:
    cur = conn.execute(
        "UPDATE person SET password_hash = coalesce(%s, password_hash), failures = 0, locked_until = NULL,"
        " disabled_at = CASE WHEN %s IS NULL THEN disabled_at WHEN %s THEN now() ELSE NULL END WHERE name = %s",
        (password_hash, disabled, disabled, name))
    if disabled:
        conn.execute("UPDATE login_session SET ended_at = now() WHERE person = %s AND ended_at IS NULL", (name,))
    return cur.rowcount == 1


# -- logins -----------------------------------------------------------------------------------
def start_session(conn: psycopg.Connection[Any], token_hash: bytes, person: str, role: str, site: str | None,
                  via: str, csrf: str) -> None:
    conn.execute("INSERT INTO login_session (token_hash, person, role, site, via, csrf) VALUES (%s, %s, %s, %s, %s, %s)",
                 (token_hash, person, role, site, via, csrf))


def touch_session(conn: psycopg.Connection[Any], token_hash: bytes, idle_minutes: int) -> Row | None:
    """The login, now seen again; None when it ended or sat idle too long (then it ends)."""
    row = conn.execute(
        "UPDATE login_session SET last_seen = now() WHERE token_hash = %s AND ended_at IS NULL"
        " AND last_seen > now() - make_interval(mins => %s) RETURNING person, role, site, via, csrf",
        (token_hash, idle_minutes)).fetchone()
    if row is None:
        conn.execute("UPDATE login_session SET ended_at = now() WHERE token_hash = %s AND ended_at IS NULL",
                     (token_hash,))
        return None
    return dict(row)


def end_session(conn: psycopg.Connection[Any], token_hash: bytes) -> str | None:
    """End a login; the person it was, or None when it had already ended."""
    found = scalar(conn, "UPDATE login_session SET ended_at = now() WHERE token_hash = %s AND ended_at IS NULL"
                         " RETURNING person", (token_hash,))
    return str(found) if found is not None else None
