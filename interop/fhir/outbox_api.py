"""Operators' view of the outbox over HTTP (the CLI's `interop outbox dead|replay`):

* `GET /outbox?status=dead,rejected[&channel=fhir]` -> JSON list of rows: ids, channel,
  destination, resource type/id/version, status, attempts, the peer's last answer (ACK or
  OperationOutcome) and the last error. Never the payload (it holds patient data).
* `POST /outbox/<id>/replay` -> 200 `{"id", "status": "pending"}`; 409 when the row is not dead
  or rejected, 404 when there is no such row.
"""
from __future__ import annotations

from typing import Any

import orjson
from flask import Blueprint, Response, current_app, request

from ..delivery import outbox
from .errors import BadRequest, Conflict, NotFoundError

bp = Blueprint("outbox", __name__, url_prefix="/outbox")


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status=status, content_type="application/json")


@bp.get("")
def listing() -> Response:
    wanted = tuple(s for s in request.args.get("status", "dead,rejected").split(",") if s)
    unknown = [s for s in wanted if s not in outbox.STATUSES]
    if unknown or not wanted:
        raise BadRequest(f"status must be among {', '.join(outbox.STATUSES)}")
    channel = request.args.get("channel")
    if channel is not None and channel not in outbox.CHANNELS:
        raise BadRequest(f"channel must be one of {', '.join(outbox.CHANNELS)}")
    with current_app.extensions["interop"].pool.connection() as conn:
        rows = outbox.listing(conn, wanted, channel=channel)
    return _json(rows)


@bp.post("/<int:item_id>/replay")
def replay(item_id: int) -> Response:
    with current_app.extensions["interop"].pool.connection() as conn, conn.transaction():
        if outbox.replay(conn, item_id):
            return _json({"id": item_id, "status": "pending"})
        found = conn.execute("SELECT status FROM outbox WHERE id = %s", (item_id,)).fetchone()
    if found is None:
        raise NotFoundError(f"outbox row {item_id} does not exist")
    raise Conflict(f"outbox row {item_id} is {found['status']}, not dead or rejected")
