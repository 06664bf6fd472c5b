"""The FHIR Task that shows a client how a piece of work is going (analysis, finding the images,
acknowledging a critical result). One way to move it on, used by every service."""
from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg

from ..domain.vocabulary import without_meta
from ..store import resources
from .context import Context


def utc_now() -> datetime:
    return datetime.now(UTC)


def now() -> str:
    """The time now, as FHIR writes an instant."""
    return utc_now().isoformat()


def update(conn: psycopg.Connection[Any], ctx: Context, task: dict[str, Any] | str, status: str, *,
           business: str | None = None, reason: str | None = None, outputs: list[str] | None = None,
           output_type: str = "DiagnosticReport") -> dict[str, Any]:
    """A new version of the Task (given, or read by id) with its status, business status, reason
    and outputs (references); returns it as stored."""
    body = without_meta(resources.read(conn, "Task", task) if isinstance(task, str) else task)
    body["status"] = status
    body["lastModified"] = now()
    if business:
        body["businessStatus"] = {"text": business}
    if reason:
        body["statusReason"] = {"text": reason}
    if outputs:
        body["output"] = [{"type": {"text": output_type}, "valueReference": {"reference": ref}} for ref in outputs]
    return resources.update(conn, body, ctx.params["Task"])[0]
