"""Results going out: queued here, in the transaction that stored them; sent by the delivery
runner (`interop.workers.delivery`) through one channel per kind of destination.

A delivery is a job of the one queue (`interop.store.queue`) in a lane, its destination:

| kind               | lane                 | what goes                                                  |
|--------------------|----------------------|------------------------------------------------------------|
| `deliver-hl7`      | `SITE:hl7`           | the report version as ORU^R01 over MLLP (`hl7`)             |
| `deliver-fhir`     | `SITE:fhir`          | the report version, or a critical notice, as a FHIR transaction (`fhir`) |
| `notify-rest-hook` | `Subscription/<id>`  | a rest-hook notification, handshake or heartbeat (`rest_hook`) |
| `hl7-app-ack`      | `SITE:hl7` (or `SITE:ack`) | an application acknowledgement of an HL7 message (`app_ack`) |
| `deliver-sr`       | `SITE:pacs`          | the report version as a DICOM SR, to the site's PACS (`pacs`) |

A report version is queued once per destination (the job key), versions of one report go in
order in a lane, and a critical result's go first (priority 0). A channel builds the message
(`prepare`, from the store), sends it (`send`, network only) and says what the answer means
(an `Outcome`); the runner applies the policy of `mappings/queue.yaml` to that outcome.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg

from ...domain import subscriptions
from ...domain.subscriptions import TARGET, SubscriptionError
from ...domain.vocabulary import CRITICAL_PRIORITY, priority, version_of
from ...sites import Site
from ...store import notifications, queue, resources, reviews
from ...store.resources import ANY_SYSTEM, Criterion, Query
from ..context import Context

HL7 = "deliver-hl7"
FHIR = "deliver-fhir"
REST_HOOK = "notify-rest-hook"
APP_ACK = "hl7-app-ack"
SR = "deliver-sr"
KINDS = (HL7, FHIR, REST_HOOK, APP_ACK, SR)
CHANNEL_OF = {HL7: "hl7", FHIR: "fhir", REST_HOOK: "rest-hook", APP_ACK: "hl7-ack", SR: "pacs"}  # as operators name them
KIND_OF = {v: k for k, v in CHANNEL_OF.items()}
MAX_SUBSCRIPTIONS = 10_000


class Unbuildable(Exception):
    """What a message is made of is no longer in the store: no retry helps (the delivery ends `dead`)."""


def report_version(conn: psycopg.Connection[Any], report_id: str, version: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The report as it was at `version` and its current Observations: what every channel sends."""
    try:
        report = resources.vread(conn, "DiagnosticReport", report_id, version)
    except resources.NotFound as exc:
        raise Unbuildable(f"DiagnosticReport/{report_id} has no version {version}") from exc
    observations = []
    for ref in report.get("result") or []:
        obs = resources.find(conn, ref.get("reference"))
        if obs is None:
            raise Unbuildable(f"a result of DiagnosticReport/{report_id} is missing")
        observations.append(obs)
    return report, observations


def lane(site_code: str, channel: str) -> str:
    """A destination's lane: `SITE:hl7`, `SITE:fhir`."""
    return f"{site_code.upper()}:{channel}"


def site_of_lane(ctx: Context, lane_name: str | None) -> Site | None:
    """The site whose destination a lane (`SITE:channel`) is."""
    return ctx.sites.get((lane_name or "").split(":", 1)[0])


# -- what a channel tells the runner ------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    """What came of one try. `state`: sent | retry (no usable answer: transient) | refused (the
    peer answered no; `final` when the same message would get the same answer) | dead (cannot
    be built or has nowhere to go). `error` holds no patient data; `answer` is as received."""

    state: str
    error: str | None = None
    answer: str | None = None
    final: bool = True

    @classmethod
    def sent(cls, answer: str) -> Outcome:
        return cls("sent", answer=answer)

    @classmethod
    def retry(cls, error: str, answer: str | None = None) -> Outcome:
        return cls("retry", error=error, answer=answer)

    @classmethod
    def refused(cls, error: str, answer: str | None, *, final: bool = True) -> Outcome:
        return cls("refused", error=error, answer=answer, final=final)

    @classmethod
    def dead(cls, error: str) -> Outcome:
        return cls("dead", error=error)


@dataclass(frozen=True)
class Message:
    """A message ready to go: its id (MSH-10, Bundle id) and its text (ER7, JSON)."""

    id: str
    text: str


class Channel(Protocol):
    def prepare(self, conn: psycopg.Connection[Any], job: queue.Job) -> Message | Outcome:
        """Build the message from the store (or say why it cannot go: Outcome.dead)."""

    def send(self, job: queue.Job, message: Message) -> Outcome:
        """Send it and say what the answer means. Network only: no transaction is held."""

    def ended(self, conn: psycopg.Connection[Any], job: queue.Job, outcome: Outcome, status: str) -> None:
        """In the transaction that ends the job (`status`: done, rejected, dead): the channel's follow-up."""


# -- queueing (in the caller's transaction) -----------------------------------------------------------
def _dedupe_key(lane_name: str, resource: dict[str, Any]) -> str:
    """A resource version's delivery in a lane: queued once."""
    return f"deliver:{lane_name}:{resource['resourceType']}/{resource['id']}/{version_of(resource)}"


def _enqueue(conn: psycopg.Connection[Any], ctx: Context, kind: str, lane_name: str, resource: dict[str, Any],
             prio: int, **extra: Any) -> int | None:
    rtype, rid, version = resource["resourceType"], resource["id"], version_of(resource)
    series = f"{rtype}/{rid}"
    policy = ctx.policies.kind(kind)
    return queue.enqueue(conn, kind, {"resource_type": rtype, "resource_id": rid, "version": version, **extra},
                         dedupe_key=_dedupe_key(lane_name, resource), max_attempts=policy.max_attempts,
                         priority=min(prio, policy.priority), lane=lane_name, series=series, seq=version)


def queue_report(conn: psycopg.Connection[Any], ctx: Context, report: dict[str, Any], site: Site | None) -> list[int]:
    """Queue a stored report version for every destination of its site (its PACS too, as an SR,
    when it takes results) and, when the report raised a critical alert, of the site's
    higher-level hospital; and for every active rest-hook
    Subscription it matches. Priority 0 for a critical version. Returns the new job ids (a version
    already queued for a destination is not queued again)."""
    prio = priority(report)
    ids: list[int | None] = []
    targets = [site]
    if site is not None and reviews.has_alert(conn, report["id"]):
        targets.append(ctx.sites.referral(site))
    for target in targets:
        if target is None:
            continue
        if target.hl7 is not None:
            ids.append(_enqueue(conn, ctx, HL7, lane(target.code, "hl7"), report, prio))
        if target.fhir is not None:
            ids.append(_enqueue(conn, ctx, FHIR, lane(target.code, "fhir"), report, prio))
    if site is not None and site.results_to_pacs and (site.dicom_store is not None or site.dicomweb is not None):
        ids.append(_enqueue(conn, ctx, SR, lane(site.code, "pacs"), report, prio))  # the images are in its PACS only
    for sub in matching_subscriptions(conn, ctx, report):
        ids.append(_notify(conn, ctx, sub, report, prio))
    return [i for i in ids if i is not None]


def _notify(conn: psycopg.Connection[Any], ctx: Context, sub: dict[str, Any], report: dict[str, Any],
            prio: int) -> int | None:
    """Queue a report version's notification to a Subscription; a topic-based one's carries its
    event number (counted only when the notification is queued, once per report version)."""
    lane_name = f"Subscription/{sub['id']}"
    if not subscriptions.is_topic_based(sub):
        return _enqueue(conn, ctx, REST_HOOK, lane_name, report, prio)
    if queue.exists(conn, _dedupe_key(lane_name, report)):
        return None
    return _enqueue(conn, ctx, REST_HOOK, lane_name, report, prio, type="event-notification",
                    event=notifications.next_event(conn, sub["id"]))


def queue_heartbeat(conn: psycopg.Connection[Any], ctx: Context, sub: dict[str, Any], *, after: int = 0,
                    now: float | None = None) -> int | None:
    """Queue an active topic-based Subscription's next heartbeat, due at the end of the current
    period (once per period: the key is the period's slot; `after`: the slot of the heartbeat just
    sent, so the next is a later one even when that one went early)."""
    period = subscriptions.heartbeat_seconds(sub)
    if period is None or not subscriptions.is_topic_based(sub) or sub.get("status") != "active":
        return None
    now = time.time() if now is None else now
    slot = max(int(now // period) + 1, after + 1)
    return _signal(conn, ctx, sub, "heartbeat", f"{version_of(sub)}/{slot}", delay=max(0.0, slot * period - now),
                   slot=slot)


def _signal(conn: psycopg.Connection[Any], ctx: Context, sub: dict[str, Any], kind: str, key: str, *,
            delay: float = 0, **extra: Any) -> int | None:
    policy = ctx.policies.kind(REST_HOOK)
    lane_name = f"Subscription/{sub['id']}"
    return queue.enqueue(conn, REST_HOOK, {"type": kind, "subscription_version": version_of(sub), **extra},
                         dedupe_key=f"deliver:{lane_name}:{kind}/{key}", max_attempts=policy.max_attempts,
                         priority=policy.priority, lane=lane_name, delay_seconds=delay)


def subscription_stored(conn: psycopg.Connection[Any], ctx: Context, stored: dict[str, Any]) -> int | None:
    """After a client stored a Subscription (in its transaction): a topic-based one waiting for
    its handshake gets it queued (once per version)."""
    if not subscriptions.needs_handshake(stored):
        return None
    return _signal(conn, ctx, stored, "handshake", str(version_of(stored)))


def queue_notice(conn: psycopg.Connection[Any], ctx: Context, resource: dict[str, Any], to: Site | None) -> int | None:
    """Queue a critical notice (a stored Communication) for the FHIR server of the hospital it is
    for, first in line. None when that hospital has no FHIR destination."""
    if to is None or to.fhir is None:
        return None
    return _enqueue(conn, ctx, FHIR, lane(to.code, "fhir"), resource, CRITICAL_PRIORITY)


def active_subscriptions(conn: psycopg.Connection[Any], ctx: Context) -> list[dict[str, Any]]:
    status = ctx.params.get("Subscription", {}).get("status")
    query = Query(count=MAX_SUBSCRIPTIONS)
    if status is not None:
        query.criteria.append(Criterion(status, [(ANY_SYSTEM, "active")]))
    return [s for s in resources.search(conn, "Subscription", query)[1] if s.get("status") == "active"]


def matching_subscriptions(conn: psycopg.Connection[Any], ctx: Context, report: dict[str, Any]) -> list[dict[str, Any]]:
    """The active Subscriptions whose criteria (or a topic's filters), run as a search on the
    store, find this report."""
    out = []
    for sub in active_subscriptions(conn, ctx):
        try:
            query = subscriptions.query_of(sub, ctx.params)
        except SubscriptionError:
            continue  # stored before a search parameter was removed from the mappings: never matches
        if resources.matches(conn, TARGET, report["id"], query):
            out.append(sub)
    return out
