"""Audit records are stored as FHIR AuditEvents, searchable at /fhir/AuditEvent by admins.

Callers record a change in the transaction that makes it (both or neither), and a read once it
has been served.
"""
from __future__ import annotations

from typing import Any

import psycopg

from ...domain.audit import Event, resource
from ...store import resources
from ..context import Context


def record(conn: psycopg.Connection[Any], ctx: Context, event: Event) -> str:
    """Store the AuditEvent for `event`; its id."""
    stored = resources.create(conn, resource(event), ctx.params["AuditEvent"])
    return str(stored["id"])
