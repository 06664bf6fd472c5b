"""The rest-hook channel: tell a Subscription's endpoint that a report it asked about changed.

One notification per (Subscription, report version), lane `Subscription/<id>`; the POST carries
the channel's headers, and the report as JSON when `channel.payload` names a mime type, an empty
body otherwise (R4 rest-hook semantics: the client then searches). Failures are retried with a
short back-off; once the notification is given up (`max_attempts` of `notify-rest-hook` in
queue.yaml), the Subscription goes to `error` with `error` saying why and nothing more is queued
for it until the client sets it back to `requested` or `active`. The endpoint's certificate is
verified like every peer's (`interop.tls.ClientTls`: INTEROP_TLS_CA_FILE, else the system's).
"""
from __future__ import annotations

import logging
from typing import Any

import orjson
import psycopg
import requests

from ...domain import subscriptions
from ...domain.vocabulary import without_meta
from ...store import queue, resources
from ...tls import ClientTls
from ..context import Context
from . import Message, Outcome

log = logging.getLogger("interop.delivery")

TIMEOUT_S = 10.0


def _json(resource: dict[str, Any]) -> bytes:
    if "resourceType" in resource:
        resource = {"resourceType": resource["resourceType"], **resource}
    return orjson.dumps(resource)


class RestHookChannel:
    """`notify-rest-hook` jobs."""

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
        if sub.get("status") != "active":
            return Outcome.dead(f"{job.lane} is {sub.get('status')}")
        self._subscription[job.id] = sub
        body = b""
        if (sub.get("channel") or {}).get("payload"):
            try:
                report = resources.vread(conn, "DiagnosticReport", job.payload["resource_id"], int(job.payload["version"]))
            except resources.NotFound:
                return Outcome.dead(f"DiagnosticReport/{job.payload['resource_id']} has no version {job.payload['version']}")
            body = _json(report)
        return Message(str(job.id), body.decode("utf-8"))

    def send(self, job: queue.Job, message: Message) -> Outcome:
        sub = self._subscription.pop(job.id, None)
        if sub is None:
            return Outcome.retry("the Subscription was not read before sending")
        channel = sub.get("channel") or {}
        headers = subscriptions.headers(sub)
        if channel.get("payload"):
            headers["Content-Type"] = str(channel["payload"])
        try:
            answer = self.session.post(channel["endpoint"], data=message.text.encode("utf-8"), headers=headers,
                                       timeout=self.timeout_s, allow_redirects=False, **self.tls.requests_kwargs())
        except requests.RequestException as exc:
            return Outcome.retry(f"{type(exc).__name__}: the endpoint did not answer")
        if 200 <= answer.status_code < 300:
            return Outcome.sent(answer.text[:2000])
        return Outcome.retry(f"HTTP {answer.status_code}", answer.text[:2000] or None)

    def ended(self, conn: psycopg.Connection[Any], job: queue.Job, outcome: Outcome, status: str) -> None:
        if status != "dead" or outcome.state != "retry":
            return
        sub_id = (job.lane or "").partition("/")[2]
        set_error(conn, self.ctx, sub_id, f"rest-hook notification failed {job.attempts} times; last: {outcome.error}")
        log.warning("job %s: %s is now in error (%s)", job.id, job.lane, outcome.error)


def set_error(conn: psycopg.Connection[Any], ctx: Context, sub_id: str, text: str) -> None:
    """Put a Subscription into `error` (a new version) and stop its pending notifications."""
    sub = without_meta(resources.read(conn, "Subscription", sub_id))
    sub["status"] = "error"
    sub["error"] = text
    resources.update(conn, sub, ctx.params["Subscription"])
    queue.bury(conn, f"Subscription/{sub_id}", "", "the Subscription is in error")
