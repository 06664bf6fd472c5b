"""FHIR R4 Subscriptions (rest-hook) as the hub accepts them, classic and topic-based. Pure.

HIS/EMR vendors that prefer to be told when a report is created or changes subscribe instead of
polling `DiagnosticReport?_lastUpdated=gt...`. Two kinds, both `channel.type = rest-hook` with an
http(s) `channel.endpoint`:

* **Classic R4** (`criteria` = a search on DiagnosticReport, e.g. `DiagnosticReport?status=final`):
  with `channel.payload` set, each notification is `PUT [endpoint]/DiagnosticReport/[id]` with the
  report as the body; without, an empty `POST [endpoint]` (the client then searches). A client's
  `requested` becomes `active` at once (R4 specifies no handshake for rest-hook).
* **Topic-based** (the R4 Subscriptions Backport IG, `criteria` = a topic's canonical URL, here
  `TOPIC`: a DiagnosticReport created or updated): filters in the `backport-filter-criteria`
  extension (searches on DiagnosticReport, all must match), `channel.payload` with the
  `backport-payload-content` extension (empty | id-only | full-resource), an optional
  `backport-heartbeat-period`. Notifications are `history` Bundles POSTed to the endpoint, their
  first entry a `Parameters` subscription status (`notification`). The Subscription stays
  `requested` until a `handshake` notification is accepted, then is `active`.

Criteria and filters are parsed with the hub's own search parser (an unknown parameter is
refused, as in a search); a report matches when that search, run on the store, finds it
(`interop.services.delivery`): one definition of matching. Whatever the kind, `error` stays until
the client sets `requested` or `active` again (which clears `error`).
"""
from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from ..store.resources import Query
from ..store.search_params import SearchParam
from . import search

REST_HOOK = "rest-hook"
TARGET = "DiagnosticReport"

BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
PROFILE = f"{BACKPORT}/backport-subscription"
STATUS_PROFILE = f"{BACKPORT}/backport-subscription-status-r4"
NOTIFICATION_PROFILE = f"{BACKPORT}/backport-subscription-notification-r4"
FILTER_CRITERIA = f"{BACKPORT}/backport-filter-criteria"
PAYLOAD_CONTENT = f"{BACKPORT}/backport-payload-content"
HEARTBEAT_PERIOD = f"{BACKPORT}/backport-heartbeat-period"
TIMEOUT = f"{BACKPORT}/backport-timeout"
CONTENTS = ("empty", "id-only", "full-resource")
# The hub's one topic: an AI or radiologist DiagnosticReport created or updated (any version).
TOPIC = "urn:interop-hub:SubscriptionTopic:diagnostic-report"
MAX_HEARTBEAT_SECONDS = 7 * 24 * 3600
MIN_HEARTBEAT_SECONDS = 10


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


def _extension(element: Any, url: str) -> list[dict[str, Any]]:
    return [e for e in ((element or {}).get("extension") or []) if isinstance(e, dict) and e.get("url") == url] \
        if isinstance(element, dict) else []


def is_topic_based(subscription: dict[str, Any]) -> bool:
    """Whether `criteria` names a topic (the backport) rather than a search."""
    criteria = subscription.get("criteria")
    return isinstance(criteria, str) and "?" not in criteria and criteria.strip() != TARGET


def filters(subscription: dict[str, Any]) -> list[str]:
    """A topic-based Subscription's filter criteria (`_criteria.extension`, as R4 JSON puts a
    primitive's extensions; `criteria.extension` is read too, for clients that write it so)."""
    holders = [subscription.get("_criteria"), subscription.get("criteria")]
    return [str(e.get("valueString")) for h in holders for e in _extension(h, FILTER_CRITERIA)]


def topic_query(subscription: dict[str, Any], params: dict[str, dict[str, SearchParam]]) -> Query:
    """One search with every filter's criteria ANDed (a topic without filters: every report)."""
    query = Query()
    for text in filters(subscription):
        criteria = text if "?" in text else f"{TARGET}?{text}"
        query.criteria.extend(parse_criteria(criteria, params).criteria)
    return query


def query_of(subscription: dict[str, Any], params: dict[str, dict[str, SearchParam]]) -> Query:
    """The search a report must match to be notified to this Subscription."""
    if is_topic_based(subscription):
        return topic_query(subscription, params)
    return parse_criteria(subscription.get("criteria"), params)


def content(subscription: dict[str, Any]) -> str:
    """A topic-based Subscription's payload content: empty | id-only | full-resource."""
    found = _payload_content(subscription.get("channel") or {})
    return str(found[0].get("valueCode")) if found else "empty"


def _payload_content(channel: dict[str, Any]) -> list[dict[str, Any]]:
    """The payload-content extensions (on `_payload`, as R4 JSON puts them, or on `payload`)."""
    return _extension(channel.get("_payload"), PAYLOAD_CONTENT) + _extension(channel.get("payload"), PAYLOAD_CONTENT)


def _seconds(channel: Any, url: str) -> int | None:
    """A channel extension's valueUnsignedInt when it is a whole number above 0 (JSON true is not)."""
    found = _extension(channel, url)
    value = found[0].get("valueUnsignedInt") if found else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def heartbeat_seconds(subscription: dict[str, Any]) -> int | None:
    """The heartbeat period a topic-based Subscription asked for (None: no heartbeats)."""
    return _seconds(subscription.get("channel"), HEARTBEAT_PERIOD)


def timeout_seconds(subscription: dict[str, Any], default: float) -> float:
    """How long one notification may take: the backport's timeout, at most `default`."""
    value = _seconds(subscription.get("channel"), TIMEOUT)
    return default if value is None else float(min(value, default))


def _check_topic(resource: dict[str, Any], params: dict[str, dict[str, SearchParam]]) -> None:
    criteria = str(resource.get("criteria")).strip()
    if criteria != TOPIC:
        raise SubscriptionError(f"unknown topic {criteria[:80]!r}; the hub's topic is {TOPIC}"
                                " (a DiagnosticReport created or updated)")
    for text in filters(resource):
        if not text.strip():
            raise SubscriptionError("a backport-filter-criteria needs a valueString such as DiagnosticReport?status=final")
    topic_query(resource, params)  # raises for an unknown parameter
    channel = resource.get("channel") or {}
    if not channel.get("payload"):
        raise SubscriptionError("a topic-based Subscription needs channel.payload (application/fhir+json)")
    if "json" not in str(channel["payload"]):
        raise SubscriptionError("channel.payload must be application/fhir+json (notifications are JSON Bundles)")
    found = _payload_content(channel)
    if found and found[0].get("valueCode") not in CONTENTS:
        raise SubscriptionError(f"backport-payload-content must be one of {', '.join(CONTENTS)}")
    if _extension(channel, HEARTBEAT_PERIOD):
        value = _seconds(channel, HEARTBEAT_PERIOD)
        if value is None or not MIN_HEARTBEAT_SECONDS <= value <= MAX_HEARTBEAT_SECONDS:
            raise SubscriptionError(f"backport-heartbeat-period must be {MIN_HEARTBEAT_SECONDS} to"
                                    f" {MAX_HEARTBEAT_SECONDS} seconds")


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
    if is_topic_based(resource):
        _check_topic(resource, params)
    else:
        parse_criteria(resource.get("criteria"), params)


def prepare(body: dict[str, Any], params: dict[str, dict[str, SearchParam]]) -> dict[str, Any]:
    """What the API stores for a client's Subscription (create or update): checked, `error`
    cleared when (re)activated; a classic one's `requested` made `active`, a topic-based one's
    `active` made `requested` (it becomes active once its handshake is accepted) and declared
    with the backport's profile. Raises SubscriptionError."""
    check(body, params)
    out = dict(body)
    if is_topic_based(out):
        meta = dict(out.get("meta") or {})
        meta["profile"] = list(dict.fromkeys([*(meta.get("profile") or []), PROFILE]))
        out["meta"] = meta
    if out.get("status") in ("requested", "active"):
        out["status"] = "requested" if is_topic_based(out) else "active"
        out.pop("error", None)
    return out


def needs_handshake(subscription: dict[str, Any]) -> bool:
    """A topic-based Subscription waiting for its handshake."""
    return is_topic_based(subscription) and subscription.get("status") == "requested"


def headers(subscription: dict[str, Any]) -> dict[str, str]:
    """The HTTP headers the client asked its notifications to carry (`channel.header`)."""
    out = {}
    for header in (subscription.get("channel") or {}).get("header") or []:
        name, _, value = str(header).partition(":")
        out[name.strip()] = value.strip()
    return out


# -- topic-based notifications (R4 backport shapes) ------------------------------------------------
def status_parameters(subscription: dict[str, Any], base: str, kind: str, events: int, *,
                      event: dict[str, Any] | None = None, status: str | None = None,
                      error: str | None = None) -> dict[str, Any]:
    """The backport's R4 SubscriptionStatus (a Parameters). `event`: {number, timestamp, focus}."""
    sub_url = f"{base}/Subscription/{subscription['id']}"
    parameter: list[dict[str, Any]] = [{"name": "subscription", "valueReference": {"reference": sub_url}}]
    if is_topic_based(subscription) and (content(subscription) != "empty" or kind != "event-notification"):
        parameter.append({"name": "topic", "valueCanonical": str(subscription.get("criteria"))})
    parameter += [{"name": "status", "valueCode": status or str(subscription.get("status"))},
                  {"name": "type", "valueCode": kind},
                  {"name": "events-since-subscription-start", "valueString": str(events)}]
    if event is not None:
        part: list[dict[str, Any]] = [{"name": "event-number", "valueString": str(event["number"])},
                                      {"name": "timestamp", "valueInstant": event["timestamp"]}]
        if content(subscription) != "empty" and event.get("focus"):
            part.append({"name": "focus", "valueReference": {"reference": f"{base}/{event['focus']}"}})
        parameter.append({"name": "notification-event", "part": part})
    if error:
        parameter.append({"name": "error", "valueCodeableConcept": {"text": error[:500]}})
    return {"resourceType": "Parameters", "meta": {"profile": [STATUS_PROFILE]}, "parameter": parameter}


def notification(subscription: dict[str, Any], base: str, kind: str, events: int, *, bundle_id: str,
                 timestamp: str, event: dict[str, Any] | None = None,
                 resource: dict[str, Any] | None = None) -> dict[str, Any]:
    """A notification Bundle (type history): the status first, then the report when the
    Subscription asked for full-resource content."""
    status_id = f"{bundle_id}-status"
    entries: list[dict[str, Any]] = [{
        "fullUrl": f"urn:uuid:{status_id}",
        "resource": {**status_parameters(subscription, base, kind, events, event=event), "id": status_id},
        "request": {"method": "GET", "url": f"{base}/Subscription/{subscription['id']}/$status"},
        "response": {"status": "200"},
    }]
    if resource is not None and content(subscription) == "full-resource":
        first = str((resource.get("meta") or {}).get("versionId")) == "1"
        rtype, rid = resource["resourceType"], resource["id"]
        entries.append({"fullUrl": f"{base}/{rtype}/{rid}", "resource": resource,
                        "request": {"method": "POST" if first else "PUT", "url": rtype if first else f"{rtype}/{rid}"},
                        "response": {"status": "201" if first else "200"}})
    return {"resourceType": "Bundle", "id": bundle_id, "meta": {"profile": [NOTIFICATION_PROFILE]},
            "type": "history", "timestamp": timestamp, "entry": entries}


def status_bundle(subscription: dict[str, Any], base: str, events: int, error: str | None = None) -> dict[str, Any]:
    """What `Subscription/[id]/$status` answers: a searchset holding the status."""
    status = status_parameters(subscription, base, "query-status", events, error=error)
    return {"resourceType": "Bundle", "type": "searchset", "total": 1,
            "entry": [{"fullUrl": f"{base}/Subscription/{subscription['id']}/$status", "resource": status,
                       "search": {"mode": "match"}}]}
