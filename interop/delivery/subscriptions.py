"""FHIR R4 Subscriptions (rest-hook): HIS/EMR vendors that prefer to be told when a report is
created or changes subscribe on the hub's API instead of polling `DiagnosticReport?_lastUpdated=gt...`.

* Intake (`prepare`, pure, called on create/update by the API): only `channel.type = rest-hook`
  with an http(s) `channel.endpoint`; `criteria` is a FHIR search on DiagnosticReport, parsed with
  the hub's own search parser (an unknown parameter is refused, as in a search). A client's
  `requested` becomes `active` at once (the hub does no handshake); `off` stays off; `error`
  stays error until the client sets `requested` or `active` again (which clears `error`).
* Matching (`matches`, pure): the criteria against the report's own index rows
  (`search_params.index_rows`), the same rows a search would use; no query per Subscription.
* Notification: one outbox row per (Subscription, report version), channel `rest-hook`,
  destination `Subscription/<id>`; the sender POSTs to the endpoint with the channel's headers:
  the report as JSON when `channel.payload` names a mime type, an empty body otherwise
  (R4 rest-hook semantics: the client then searches). Failures are retried with a short back-off;
  after `FAILURES_BEFORE_ERROR` attempts of one notification the row is `dead` and the
  Subscription is set to `error` with `error` saying why; nothing more is queued for it.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable
from urllib.parse import parse_qsl

import psycopg
import requests

from ..config import Settings
from ..fhir import search
from ..fhir.errors import FhirError
from ..store import resources
from ..store.resources import ANY_SYSTEM, Criterion, Query
from ..store.search_params import SearchParam, index_rows, load
from . import outbox

log = logging.getLogger("interop.delivery")

REST_HOOK = "rest-hook"
TARGET = "DiagnosticReport"
FAILURES_BEFORE_ERROR = 5
TIMEOUT_S = 10.0
MAX_SUBSCRIPTIONS = 10_000


class SubscriptionError(ValueError):
    """The Subscription is not acceptable; the message is safe to return to the client (422)."""


# -- intake (pure) ----------------------------------------------------------------------------
def parse_criteria(criteria: Any, params: dict[str, dict[str, SearchParam]]) -> Query:
    if not isinstance(criteria, str) or "?" not in criteria and criteria.strip() != TARGET:
        raise SubscriptionError(f"criteria must be a search on {TARGET}, e.g. {TARGET}?status=final")
    rtype, _, query = criteria.strip().partition("?")
    if rtype != TARGET:
        raise SubscriptionError(f"only {TARGET} can be subscribed to, not {rtype or 'nothing'}")
    args = parse_qsl(query, keep_blank_values=True)
    if any(k in search.RESULT_PARAMS or k == "_lastUpdated" for k, _ in args):
        raise SubscriptionError("criteria take search parameters only (no _count, _sort, _include, _lastUpdated)")
    try:
        return search.parse(TARGET, args, params.get(TARGET, {})).query
    except FhirError as exc:
        raise SubscriptionError(f"criteria: {exc.diagnostics}") from None


def check(resource: dict[str, Any], params: dict[str, dict[str, SearchParam]]) -> None:
    """Raise SubscriptionError unless `resource` is a Subscription the hub can serve."""
    channel = resource.get("channel") or {}
    if channel.get("type") != REST_HOOK:
        raise SubscriptionError(f"channel.type {channel.get('type')!r} is not supported; only rest-hook is")
    endpoint = channel.get("endpoint")
    if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
        raise SubscriptionError("a rest-hook channel needs channel.endpoint, an http(s) URL")
    for header in channel.get("header") or []:
        if ":" not in header or "\n" in header or "\r" in header:
            raise SubscriptionError("channel.header entries must be 'Name: value'")
    parse_criteria(resource.get("criteria"), params)


def prepare(body: dict[str, Any], params: dict[str, dict[str, SearchParam]]) -> dict[str, Any]:
    """What the API stores for a client's Subscription (create or update): checked, `requested`
    made `active`, `error` cleared when (re)activated. Raises SubscriptionError."""
    check(body, params)
    out = dict(body)
    if out.get("status") in ("requested", "active"):
        out["status"] = "active"
        out.pop("error", None)
    return out


# -- matching (pure) --------------------------------------------------------------------------
def _matches_criterion(crit: Criterion, rows: list[tuple[str, str | None, str]]) -> bool:
    mine = [(system, value) for name, system, value in rows if name == crit.param.name]
    hit = False
    for system, value in crit.values:
        for row_system, row_value in mine:
            if crit.param.type == "string":
                hit = row_value == value.lower() if crit.modifier == "exact" else row_value.startswith(value.lower())
            elif crit.param.type == "reference" and "/" not in value:
                hit = row_value.endswith("/" + value)
            elif system is ANY_SYSTEM:
                hit = row_value == value
            elif system is None:
                hit = row_value == value and row_system is None
            elif value == "":
                hit = row_system == system
            else:
                hit = row_value == value and row_system == system
            if hit:
                break
        if hit:
            break
    return not hit if crit.modifier == "not" else hit


def matches(query: Query, report: dict[str, Any], params: dict[str, SearchParam]) -> bool:
    """Whether `report` is in the result of the search `query` (DiagnosticReport params)."""
    if query.ids and report.get("id") not in query.ids:
        return False
    rows = index_rows(report, params)
    return all(_matches_criterion(crit, rows) for crit in query.criteria)


def matching(subscriptions: Iterable[dict[str, Any]], report: dict[str, Any],
             params: dict[str, dict[str, SearchParam]]) -> list[dict[str, Any]]:
    """The active Subscriptions among `subscriptions` whose criteria select `report`."""
    out = []
    for sub in subscriptions:
        if sub.get("status") != "active":
            continue
        try:
            query = parse_criteria(sub.get("criteria"), params)
        except SubscriptionError:
            continue  # stored before a search parameter was removed from the mappings: never matches
        if matches(query, report, params.get(TARGET, {})):
            out.append(sub)
    return out


# -- queueing (in the caller's transaction) ----------------------------------------------------
def active(conn: psycopg.Connection[Any], params: dict[str, dict[str, SearchParam]]) -> list[dict[str, Any]]:
    status = params.get("Subscription", {}).get("status")
    query = Query(count=MAX_SUBSCRIPTIONS)
    if status is not None:
        query.criteria.append(Criterion(status, [(ANY_SYSTEM, "active")]))
    return [s for s in resources.search(conn, "Subscription", query)[1] if s.get("status") == "active"]


def queue_notifications(conn: psycopg.Connection[Any], report: dict[str, Any],
                        params: dict[str, dict[str, SearchParam]], priority: int) -> list[int]:
    version = int((report.get("meta") or {}).get("versionId") or 0)
    ids = []
    for sub in matching(active(conn, params), report, params):
        new = outbox.enqueue(conn, REST_HOOK, f"Subscription/{sub['id']}", "DiagnosticReport", report["id"],
                             version, priority)
        if new is not None:
            ids.append(new)
    return ids


# -- sending ----------------------------------------------------------------------------------
class RestHookChannel:
    """Delivers one claimed `rest-hook` row (the dispatcher, `sender.OutboxSender`, claims it)."""

    def __init__(self, settings: Settings, *, failures_before_error: int = FAILURES_BEFORE_ERROR,
                 timeout_s: float = TIMEOUT_S, session: requests.Session | None = None):
        self.settings = settings
        self.failures_before_error = failures_before_error
        self.timeout_s = timeout_s
        self.session = session or requests.Session()

    def deliver(self, conn: psycopg.Connection[Any], item: outbox.OutboxItem) -> None:
        sub_id = item.destination.partition("/")[2]
        try:
            sub = resources.read(conn, "Subscription", sub_id)
        except (resources.NotFound, resources.Gone):
            sub = None
        if sub is None or sub.get("status") != "active":
            with conn.transaction():
                outbox.mark_dead(conn, item, f"{item.destination} is {'gone' if sub is None else sub.get('status')}")
            return
        channel = sub.get("channel") or {}
        headers = {}
        for header in channel.get("header") or []:
            name, _, value = header.partition(":")
            headers[name.strip()] = value.strip()
        body = b""
        if channel.get("payload"):
            try:
                report = resources.vread(conn, "DiagnosticReport", item.resource_id, item.version)
            except resources.NotFound:
                with conn.transaction():
                    outbox.mark_dead(conn, item, f"DiagnosticReport/{item.resource_id} has no version {item.version}")
                return
            body = _json(report)
            headers["Content-Type"] = channel["payload"]
        try:
            answer = self.session.post(channel["endpoint"], data=body, headers=headers, timeout=self.timeout_s,
                                       allow_redirects=False)
            error = None if 200 <= answer.status_code < 300 else f"HTTP {answer.status_code}"
            text = answer.text[:2000]
        except requests.RequestException as exc:
            error, text = f"{type(exc).__name__}: the endpoint did not answer", ""
        if error is None:
            with conn.transaction():
                outbox.mark_sent(conn, item, text, str(item.id))
            return
        if item.attempts < self.failures_before_error:
            delay = outbox.fail_transient(conn, item, error, self.settings.retry_base_seconds,
                                          self.failures_before_error + 1, text or None)
            log.warning("outbox %s: notification to %s failed (%s); retry in %ss", item.id, item.destination,
                        error, delay)
            return
        with conn.transaction():
            if text:
                outbox.keep_answer(conn, item, text)
            outbox.mark_dead(conn, item, f"notification failed {item.attempts} times: {error}"[:500])
            set_error(conn, sub_id, f"rest-hook notification failed {item.attempts} times; last: {error}",
                      load(self.settings.mappings_dir))
        log.warning("outbox %s: %s is now in error (%s)", item.id, item.destination, error)


def set_error(conn: psycopg.Connection[Any], sub_id: str, text: str,
              params: dict[str, dict[str, SearchParam]]) -> None:
    """Put a Subscription into `error` (a new version) and stop its pending notifications."""
    sub = dict(resources.read(conn, "Subscription", sub_id))
    sub["status"] = "error"
    sub["error"] = text
    resources.update(conn, sub, params.get("Subscription", {}))
    conn.execute("UPDATE outbox SET status = 'dead', last_error = %s, leased_until = NULL"
                 " WHERE channel = %s AND destination = %s AND status = 'pending'",
                 ("the Subscription is in error", REST_HOOK, f"Subscription/{sub_id}"))


def _json(resource: dict[str, Any]) -> bytes:
    import orjson

    if "resourceType" in resource:
        resource = {"resourceType": resource["resourceType"], **resource}
    return orjson.dumps(resource)
