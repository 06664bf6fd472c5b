"""The reports waiting for a radiologist, as the worklist shows them."""
from __future__ import annotations

from typing import Any

import psycopg

from .db import scalar

_WAITING = "type = 'DiagnosticReport' AND NOT deleted AND body->>'status' = 'preliminary'"


def waiting_reports(conn: psycopg.Connection[Any], limit: int) -> tuple[int, list[dict[str, Any]]]:
    """(how many wait, the first `limit`): critical first, then the oldest `issued` first."""
    total = int(scalar(conn, f"SELECT count(*) FROM resource WHERE {_WAITING}") or 0)
    rows = conn.execute(
        f"SELECT body FROM resource WHERE {_WAITING}"
        " ORDER BY coalesce(body->'conclusionCode' @> '[{\"coding\": [{\"code\": \"AA\"}]}]', false) DESC,"
        " (body->>'issued')::timestamptz NULLS LAST, id LIMIT %s", (limit,)).fetchall()
    return total, [r["body"] for r in rows]
