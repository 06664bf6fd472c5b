"""Operators' endpoints (the CLI's `interop outbox ...` and `interop hl7 ...` over HTTP):

* `GET /outbox?status=dead,rejected[&channel=fhir]` -> JSON list of deliveries: ids, channel,
  destination, resource type/id/version, status, attempts, the peer's last answer (ACK or
  OperationOutcome) and the last error. Never the message (it holds patient data).
* `POST /outbox/<id>/replay` -> 200 `{"id", "status": "pending"}`; 409 when the delivery is not
  dead or rejected, 404 when there is none.
* `GET /outbox/lanes` -> each destination's circuit breaker and waiting deliveries.
* `GET /hl7/messages?status=failed[,rejected]` -> HL7 v2 messages by status: type, sender, control
  id, what the hub answered and why it failed; never the content.
* `POST /hl7/messages/<id>/release` -> let the message's control id be used again (the sender
  resends a message it fixed); 409 when it holds none.

Delivery statuses keep the names operators know: pending, sending, sent, rejected, dead.
"""
from __future__ import annotations

from typing import Any

import orjson
from flask import Blueprint, Response, current_app, request

from ..fhir.errors import BadRequest, Conflict, NotFoundError
from ..services.delivery import CHANNEL_OF, KIND_OF, KINDS
from ..store import hl7_messages, queue

bp = Blueprint("admin", __name__, template_folder="templates")
# how operators name a delivery's state -> the queue's status
OUTBOX_STATUS = {"pending": "queued", "sending": "running", "sent": "done", "rejected": "rejected", "dead": "dead"}
SHOWN_STATUS = {v: k for k, v in OUTBOX_STATUS.items()}  # a queue status in the outbox's words
MESSAGE_STATUS = ("accepted", "rejected", "processed", "failed")


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status=status, content_type="application/json")


def delivery_row(row: dict[str, Any]) -> dict[str, Any]:
    """A delivery as operators see it (the queue's row in the outbox's words)."""
    payload = row.get("payload") or {}
    return {"id": row["id"], "channel": CHANNEL_OF.get(row["kind"], row["kind"]), "destination": row["lane"],
            "resource_type": payload.get("resource_type"), "resource_id": payload.get("resource_id", payload.get("message")),
            "version": row["seq"], "priority": row["priority"], "status": SHOWN_STATUS.get(row["status"], row["status"]),
            "attempts": row["attempts"], "control_id": row["message_id"], "last_answer": row["answer"],
            "last_error": row["last_error"], "created_at": row["created_at"], "sent_at": row["finished_at"],
            "run_after": row["run_after"]}


def deliveries(conn: Any, statuses: tuple[str, ...], channel: str | None = None) -> list[dict[str, Any]]:
    kinds = (KIND_OF[channel],) if channel else KINDS
    return [delivery_row(r) for r in queue.listing(conn, [OUTBOX_STATUS[s] for s in statuses], kinds)]


def _hub() -> Any:
    return current_app.extensions["interop"]


@bp.get("/outbox")
def listing() -> Response:
    wanted = tuple(s for s in request.args.get("status", "dead,rejected").split(",") if s)
    if not wanted or any(s not in OUTBOX_STATUS for s in wanted):
        raise BadRequest(f"status must be among {', '.join(OUTBOX_STATUS)}")
    channel = request.args.get("channel")
    if channel is not None and channel not in KIND_OF:
        raise BadRequest(f"channel must be one of {', '.join(KIND_OF)}")
    with _hub().pool.connection() as conn:
        return _json(deliveries(conn, wanted, channel))


@bp.post("/outbox/<int:item_id>/replay")
def replay(item_id: int) -> Response:
    with _hub().pool.connection() as conn, conn.transaction():
        if queue.replay(conn, item_id, KINDS):
            return _json({"id": item_id, "status": "pending"})
        status = queue.status_of(conn, item_id, KINDS)
    if status is None:
        raise NotFoundError(f"outbox row {item_id} does not exist")
    raise Conflict(f"outbox row {item_id} is {SHOWN_STATUS.get(status, status)}, not dead or rejected")


@bp.get("/outbox/lanes")
def lanes() -> Response:
    with _hub().pool.connection() as conn:
        return _json(queue.lanes(conn))


@bp.get("/hl7/messages")
def messages() -> Response:
    wanted = tuple(s for s in request.args.get("status", "failed").split(",") if s)
    if not wanted or any(s not in MESSAGE_STATUS for s in wanted):
        raise BadRequest(f"status must be among {', '.join(MESSAGE_STATUS)}")
    with _hub().pool.connection() as conn:
        return _json(hl7_messages.listing(conn, wanted))


@bp.post("/hl7/messages/<int:message_id>/release")
def release(message_id: int) -> Response:
    with _hub().pool.connection() as conn, conn.transaction():
        if hl7_messages.release(conn, message_id):
            return _json({"id": message_id, "released": True})
    raise Conflict(f"HL7 message {message_id} holds no control id (unknown, rejected, or already released)")
