"""`GET /fhir/Subscription/[id]/$status` (R4 Subscriptions Backport): where a Subscription stands,
as the same status Parameters its notifications carry, in a searchset Bundle.

Reading a Subscription's status is reading the Subscription: `system/Subscription.r` (or `.rs`).
"""
from __future__ import annotations

import orjson
from flask import Blueprint, Response

from .. import access
from ..domain import audit, subscriptions
from ..store import notifications, resources
from .api import FHIR_JSON, hub
from .errors import Forbidden, GoneError, NotFoundError

bp = Blueprint("subscription_status", __name__, url_prefix="/fhir")


@bp.get("/Subscription/<rid>/$status")
def status(rid: str) -> Response:
    caller = access.principal()
    if caller is None or not caller.grant.allows("Subscription", "r"):
        raise Forbidden("the token's scopes do not allow read on Subscription")
    with hub().pool.connection() as conn:
        try:
            sub = resources.read(conn, "Subscription", rid)
        except resources.Gone:
            raise GoneError(f"Subscription/{rid[:64]} was deleted") from None
        except resources.NotFound:
            raise NotFoundError(f"Subscription/{rid[:64]} is not known") from None
        events = notifications.events(conn, rid)
        access.audit_read(audit.operation("subscription-status"), "R", what=[f"Subscription/{rid}"], patients=[])
    body = subscriptions.status_bundle(sub, hub().settings.public_base(), events, error=sub.get("error"))
    return Response(orjson.dumps(body), status=200, content_type=FHIR_JSON)
