"""The reports waiting for a radiologist, as the worklist shows them."""
from __future__ import annotations

from typing import Any

import psycopg

from .db import scalar

_WAITING = "type = 'DiagnosticReport' AND NOT deleted AND body->>'status' = %s"


def waiting_reports(conn: psycopg.Connection[Any], limit: int,
                    status: str = "preliminary") -> tuple[int, list[dict[str, Any]]]:
    """(how many have this status, the first `limit`): critical first, then the oldest `issued`
    first. Preliminary reports are the ones waiting for a radiologist."""
    total = int(scalar(conn, f"SELECT count(*) FROM resource WHERE {_WAITING}", (status,)) or 0)
    rows = conn.execute(
        f"SELECT body FROM resource WHERE {_WAITING}"
        " ORDER BY coalesce(body->'conclusionCode' @> '[{\"coding\": [{\"code\": \"AA\"}]}]', false) DESC,"
        " (body->>'issued')::timestamptz NULLS LAST, id LIMIT %s", (status, limit)).fetchall()
    return total, [r["body"] for r in rows]
