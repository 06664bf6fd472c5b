"""The rest-hook channel: tell a Subscription's endpoint that a report it asked about changed.

One notification per (Subscription, report version), lane `Subscription/<id>`, each carrying the
channel's headers (`channel.header`):

* classic R4: with `channel.payload` set, `PUT [endpoint]/DiagnosticReport/[id]` with the report
  version as the body (the endpoint is the client's FHIR base, as R4 specifies); without, an empty
  `POST [endpoint]` (the client then searches);
* topic-based (the R4 Subscriptions Backport): a `history` Bundle POSTed to the endpoint, its first
  entry the subscription status (`interop.domain.subscriptions.notification`). Besides events,
  the lane carries the Subscription's `handshake` (accepted: the Subscription becomes `active`, and
  its first heartbeat is queued) and `heartbeat`s (each queues the next).

Failures are retried with a short back-off; once a notification is given up (`max_attempts` of
`notify-rest-hook` in queue.yaml), the Subscription goes to `error` with `error` saying why and
nothing more is queued for it until the client sets it back to `requested` or `active`. The
endpoint's certificate is verified like every peer's (`interop.tls.ClientTls`: INTEROP_TLS_CA_FILE,
else the system's).
"""
from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
import requests

from ...domain import subscriptions
from ...domain.vocabulary import without_meta
from ...store import notifications, queue, resources
from ...tls import ClientTls
from ..context import Context
from . import Message, Outcome, queue_heartbeat

log = logging.getLogger("interop.delivery")

TIMEOUT_S = 10.0
EVENT = "event-notification"


def _json(resource: dict[str, Any]) -> bytes:
    if "resourceType" in resource:
        resource = {"resourceType": resource["resourceType"], **resource}
    return orjson.dumps(resource)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class RestHookChannel:
    """`notify-rest-hook` jobs: events, and a topic-based Subscription's handshake and heartbeats."""

    def __init__(self, ctx: Context, *, timeout_s: float = TIMEOUT_S, session: requests.Session | None = None):
        self.ctx = ctx
        self.timeout_s = timeout_s
        self.session = session or requests.Session()
        self.tls = ClientTls.from_settings(ctx.settings)
        self._subscription: dict[int, dict[str, Any]] = {}

    def prepare(self, conn: psycopg.Connection[Any], job: queue.Job) -> Message | Outcome:
        sub_id = (job.lane or "").partition("/")[2]
        try:
            sub = resources.read(conn, "Subscription", sub_id)
        except (resources.NotFound, resources.Gone):
            return Outcome.dead(f"{job.lane} is gone")
        kind = str(job.payload.get("type") or EVENT)
        wanted = "requested" if kind == "handshake" else "active"
        if sub.get("status") != wanted:
            return Outcome.dead(f"{job.lane} is {sub.get('status')}")
        if kind != EVENT and str(job.payload.get("subscription_version")) != sub["meta"]["versionId"]:
            return Outcome.dead(f"{job.lane} changed since this {kind} was queued")
        self._subscription[job.id] = sub
        if subscriptions.is_topic_based(sub):
            return self._bundle(conn, job, sub, kind)
        body = b""
        if (sub.get("channel") or {}).get("payload"):
            found = self._report(conn, job)
            if isinstance(found, Outcome):
                return found
            body = _json(found)
        return Message(str(job.id), body.decode("utf-8"))

    def _report(self, conn: psycopg.Connection[Any], job: queue.Job) -> dict[str, Any] | Outcome:
        rid, version = job.payload["resource_id"], int(job.payload["version"])
        try:
            return resources.vread(conn, "DiagnosticReport", rid, version)
        except resources.NotFound:
            return Outcome.dead(f"DiagnosticReport/{rid} has no version {version}")

    def _bundle(self, conn: psycopg.Connection[Any], job: queue.Job, sub: dict[str, Any], kind: str) -> Message | Outcome:
        """The notification Bundle, built once (a retry sends the same bytes, with the same id)."""
        if job.message is not None and job.message_id is not None:
            return Message(job.message_id, job.message)
        base = self.ctx.settings.public_base()
        event, report = None, None
        if kind == EVENT:
            found = self._report(conn, job)
            if isinstance(found, Outcome):
                return found
            report = found
            event = {"number": job.payload.get("event"), "timestamp": found["meta"]["lastUpdated"],
                     "focus": f"DiagnosticReport/{found['id']}"}
        bundle_id = str(uuid.uuid4())
        bundle = subscriptions.notification(sub, base, kind, notifications.events(conn, sub["id"]),
                                            bundle_id=bundle_id, timestamp=_now(), event=event, resource=report)
        return Message(bundle_id, _json(bundle).decode("utf-8"))

    def send(self, job: queue.Job, message: Message) -> Outcome:
        sub = self._subscription.pop(job.id, None)
        if sub is None:
            return Outcome.retry("the Subscription was not read before sending")
        channel = sub.get("channel") or {}
        headers = subscriptions.headers(sub)
        endpoint = str(channel["endpoint"])
        method = "POST"
        if channel.get("payload"):
            headers["Content-Type"] = str(channel["payload"])
            if not subscriptions.is_topic_based(sub):  # R4: the endpoint is a FHIR base, the report is PUT there
                method = "PUT"
                endpoint = f"{endpoint.rstrip('/')}/DiagnosticReport/{job.payload['resource_id']}"
        try:
            answer = self.session.request(method, endpoint, data=message.text.encode("utf-8"), headers=headers,
                                          timeout=subscriptions.timeout_seconds(sub, self.timeout_s),
                                          allow_redirects=False, **self.tls.requests_kwargs())
        except requests.RequestException as exc:
            return Outcome.retry(f"{type(exc).__name__}: the endpoint did not answer")
        if 200 <= answer.status_code < 300:
            return Outcome.sent(answer.text[:2000])
        return Outcome.retry(f"HTTP {answer.status_code}", answer.text[:2000] or None)

    def ended(self, conn: psycopg.Connection[Any], job: queue.Job, outcome: Outcome, status: str) -> None:
        sub_id = (job.lane or "").partition("/")[2]
        kind = str(job.payload.get("type") or EVENT)
        if status == "done" and kind in ("handshake", "heartbeat"):
            sub = resources.read(conn, "Subscription", sub_id)
            if kind == "handshake" and sub.get("status") == "requested":
                sub = activate(conn, self.ctx, sub)
            queue_heartbeat(conn, self.ctx, sub, after=int(job.payload.get("slot") or 0))
            return
        if status != "dead" or outcome.state != "retry":
            return
        what = "handshake" if kind == "handshake" else f"rest-hook {kind}"
        set_error(conn, self.ctx, sub_id, f"{what} failed {job.attempts} times; last: {outcome.error}")
        log.warning("job %s: %s is now in error (%s)", job.id, job.lane, outcome.error)


def activate(conn: psycopg.Connection[Any], ctx: Context, sub: dict[str, Any]) -> dict[str, Any]:
    """The handshake was accepted: the Subscription is `active` (a new version)."""
    body = without_meta(sub)
    body["status"] = "active"
    body.pop("error", None)
    return resources.update(conn, body, ctx.params["Subscription"])[0]


def set_error(conn: psycopg.Connection[Any], ctx: Context, sub_id: str, text: str) -> None:
    """Put a Subscription into `error` (a new version) and stop its pending notifications."""
    sub = without_meta(resources.read(conn, "Subscription", sub_id))
    sub["status"] = "error"
    sub["error"] = text
    resources.update(conn, sub, ctx.params["Subscription"])
    queue.bury(conn, f"Subscription/{sub_id}", "", "the Subscription is in error")
