"""FHIR R4 Subscriptions (rest-hook) as the hub accepts them. Pure.

HIS/EMR vendors that prefer to be told when a report is created or changes subscribe instead of
polling `DiagnosticReport?_lastUpdated=gt...`:

* only `channel.type = rest-hook` with an http(s) `channel.endpoint`;
* `criteria` is a FHIR search on DiagnosticReport, parsed with the hub's own search parser (an
  unknown parameter is refused, as in a search); a report matches when that search, run on the
  store, finds it (`interop.services.delivery.rest_hook`): one definition of matching;
* a client's `requested` becomes `active` at once (the hub does no handshake); `off` stays off;
  `error` stays error until the client sets `requested` or `active` again (which clears `error`).
"""
from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from ..store.resources import Query
from ..store.search_params import SearchParam
from . import search

REST_HOOK = "rest-hook"
TARGET = "DiagnosticReport"


class SubscriptionError(ValueError):
    """The Subscription is not acceptable; the message is safe to return to the client (422)."""


def parse_criteria(criteria: Any, params: dict[str, dict[str, SearchParam]]) -> Query:
    if not isinstance(criteria, str) or "?" not in criteria and criteria.strip() != TARGET:
        raise SubscriptionError(f"criteria must be a search on {TARGET}, e.g. {TARGET}?status=final")
    rtype, _, query = criteria.strip().partition("?")
    if rtype != TARGET:
        raise SubscriptionError(f"only {TARGET} can be subscribed to, not {rtype[:40] or 'nothing'}")
    args = parse_qsl(query, keep_blank_values=True)
    if any(k in search.RESULT_PARAMS or k == "_lastUpdated" for k, _ in args):
        raise SubscriptionError("criteria take search parameters only (no _count, _sort, _include, _lastUpdated)")
    try:
        return search.parse(TARGET, args, params.get(TARGET, {})).query
    except search.SearchError as exc:
        raise SubscriptionError(f"criteria: {exc}") from None


def check(resource: dict[str, Any], params: dict[str, dict[str, SearchParam]]) -> None:
    """Raise SubscriptionError unless `resource` is a Subscription the hub can serve."""
    channel = resource.get("channel") or {}
    if not isinstance(channel, dict) or channel.get("type") != REST_HOOK:
        kind = channel.get("type") if isinstance(channel, dict) else None
        raise SubscriptionError(f"channel.type {str(kind)[:40]!r} is not supported; only rest-hook is")
    endpoint = channel.get("endpoint")
    if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
        raise SubscriptionError("a rest-hook channel needs channel.endpoint, an http(s) URL")
    for header in channel.get("header") or []:
        if not isinstance(header, str) or ":" not in header or "\n" in header or "\r" in header:
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


def headers(subscription: dict[str, Any]) -> dict[str, str]:
    """The HTTP headers the client asked its notifications to carry (`channel.header`)."""
    out = {}
    for header in (subscription.get("channel") or {}).get("header") or []:
        name, _, value = str(header).partition(":")
        out[name.strip()] = value.strip()
    return out
