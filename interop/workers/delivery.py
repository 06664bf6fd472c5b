"""`interop deliver`: the delivery runner. Results leave the hub here, apart from analysis.

Each destination is a lane of the one queue. The runner keeps one thread per lane that has work
(at most INTEROP_DELIVERY_LANES at once): a thread claims only its lane's jobs, so a destination
that hangs holds its own thread until its timeouts pass, and never another destination's result
or a new analysis. A lane that keeps failing is closed by its circuit breaker for a while
(`lanes` in mappings/queue.yaml) and costs nothing meanwhile; across every hub replica a lane
runs at most `lanes.concurrency` deliveries at once, in version order.

For one job: the channel builds the message (committed on the job before the first send, so a
retry sends the same bytes with the same id), sends it with no transaction open, and says what
the answer means; the runner then applies the kind's policy (mappings/queue.yaml) in one
transaction: done, retried with back-off, rejected (the peer's answer kept) or dead.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from typing import Any

import psycopg

from ..config import Settings
from ..services.analytics import facts
from ..services.context import Context
from ..services.delivery import APP_ACK, FHIR, HL7, KINDS, REST_HOOK, SR, Channel, Message, Outcome
from ..services.delivery.app_ack import AppAckChannel
from ..services.delivery.auth import TokenCache
from ..services.delivery.fhir import FhirChannel
from ..services.delivery.hl7 import SENDING_FACILITY, Hl7Channel
from ..services.delivery.pacs import PacsChannel
from ..services.delivery.rest_hook import RestHookChannel
from ..store import db, queue
from . import signals

log = logging.getLogger("interop.delivery")


class Deliverer:
    """Claims and delivers jobs on one connection. `run_once()` is one job (tests and the lane
    threads use it); `lane` limits it to one destination."""

    def __init__(self, ctx: Context, worker_id: str | None = None, *, lane: str | None = None,
                 kinds: tuple[str, ...] = KINDS, tokens: TokenCache | None = None,
                 sending_facility: str = SENDING_FACILITY):
        if not ctx.settings.database_url:
            raise RuntimeError("the delivery runner needs DATABASE_URL")
        self.ctx = ctx
        self.id = worker_id or f"{socket.gethostname()}:{os.getpid()}:out:{secrets.token_hex(3)}"
        self.lane = lane
        self.kinds = kinds
        tokens = tokens or TokenCache(ctx.settings.secret)
        self.channels: dict[str, Channel] = {
            HL7: Hl7Channel(ctx, sending_facility=sending_facility), FHIR: FhirChannel(ctx, tokens=tokens),
            REST_HOOK: RestHookChannel(ctx), APP_ACK: AppAckChannel(ctx), SR: PacsChannel(ctx),
        }
        self._conn: psycopg.Connection[Any] | None = None

    @property
    def conn(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = db.connect(self.ctx.settings.database_url or "", autocommit=True)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def run_once(self) -> bool:
        """Claim and deliver one job (most urgent first); False when none is ready."""
        job = queue.claim(self.conn, self.id, self.ctx.settings.job_lease_seconds, kinds=self.kinds, lane=self.lane,
                          lane_limit=self.ctx.policies.lane_concurrency)
        if job is None:
            return False
        try:
            self.deliver(job)
        except queue.LeaseLost:
            log.warning("job %s: lease lost; another runner has it", job.id)
        return True

    def deliver(self, job: queue.Job) -> None:
        conn = self.conn
        channel = self.channels[job.kind]
        newer = queue.newer_done(conn, job)
        prepared = channel.prepare(conn, job) if newer is None else \
            Outcome.dead(f"superseded: version {newer} was already sent")
        if isinstance(prepared, Outcome):
            return self._end(channel, job, prepared)
        if job.attempts > job.max_attempts:  # runners that kept dying mid-send
            return self._end(channel, job, Outcome.dead(f"gave up after {job.attempts - 1} attempts"))
        if (job.message_id, job.message) != (prepared.id, prepared.text):
            with conn.transaction():
                queue.set_message(conn, job, prepared.id, prepared.text)
        self._end(channel, job, channel.send(job, prepared))

    def _end(self, channel: Channel, job: queue.Job, outcome: Outcome) -> None:
        """Apply the kind's policy to what came of the try, in one transaction."""
        conn = self.conn
        policy = self.ctx.policies.kind(job.kind)
        with conn.transaction():
            status = "queued"
            if outcome.state == "sent":
                queue.complete(conn, job, answer=outcome.answer)
                status = "done"
            elif outcome.state == "dead":
                queue.finish(conn, job, "dead", outcome.error or "dead", answer=outcome.answer)
                status = "dead"
            elif outcome.state == "refused" and (outcome.final or job.attempts >= policy.refused_attempts):
                queue.finish(conn, job, "rejected", outcome.error or "refused", answer=outcome.answer)
                status = "rejected"
            elif outcome.state == "retry" and job.attempts >= job.max_attempts:
                queue.finish(conn, job, "dead", f"gave up after {job.attempts} attempts: {outcome.error}"[:500],
                             answer=outcome.answer)
                status = "dead"
            else:
                delay = queue.backoff_seconds(job.attempts, self.ctx.settings.retry_base_seconds,
                                              policy.backoff_cap_seconds)
                queue.retry_later(conn, job, outcome.error or "retry", delay, answer=outcome.answer)
            if job.lane is not None and outcome.state in ("sent", "refused"):
                queue.lane_succeeded(conn, job.lane)  # the destination answered
            elif job.lane is not None and outcome.state == "retry":
                closed = queue.lane_failed(conn, job.lane, outcome.error or "retry", self.ctx.policies.breaker)
                if closed:
                    log.warning("lane %s closed for %ss after repeated failures (%s)", job.lane, closed, outcome.error)
            if status != "queued":
                channel.ended(conn, job, outcome, status)
            if status == "done" and job.payload.get("resource_type") == "DiagnosticReport":
                facts.record(conn, self.ctx, job.payload["resource_id"], event="delivered")
        level = logging.INFO if status in ("done", "queued") else logging.WARNING
        log.log(level, "job %s (%s, %s v%s): %s%s", job.id, job.kind, job.lane, job.seq, status,
                f" ({outcome.error})" if outcome.error else "")


class DeliveryPool:
    """One thread per lane with work, up to INTEROP_DELIVERY_LANES; woken by NOTIFY."""

    def __init__(self, ctx: Context, worker_id: str | None = None):
        self.ctx = ctx
        self.id = worker_id or f"{socket.gethostname()}:{os.getpid()}:out"
        self.tokens = TokenCache(ctx.settings.secret)
        self.threads: dict[str, threading.Thread] = {}
        self.stopping = threading.Event()

    def _lane(self, lane: str) -> None:
        deliverer = Deliverer(self.ctx, f"{self.id}:{lane}:{secrets.token_hex(2)}", lane=lane, tokens=self.tokens)
        try:
            while not self.stopping.is_set() and deliverer.run_once():
                pass
        except psycopg.Error as exc:  # the database went away: the lane is started again when it is back
            log.warning("lane %s: database error %s", lane, type(exc).__name__)
        except Exception as exc:  # a bug must cost one lane a pause, never the runner
            log.error("lane %s: unexpected %s", lane, type(exc).__name__)
            log.debug("lane failure", exc_info=exc)
            time.sleep(1)
        finally:
            deliverer.close()

    def start_ready_lanes(self, conn: psycopg.Connection[Any]) -> int:
        """Start a thread for every lane with work and none yet; returns how many run."""
        for name in [n for n, t in self.threads.items() if not t.is_alive()]:
            del self.threads[name]
        room = self.ctx.settings.delivery_lanes - len(self.threads)
        if room > 0:
            for lane in queue.ready_lanes(conn, KINDS, self.ctx.policies.lane_concurrency):
                if lane in self.threads:
                    continue
                thread = threading.Thread(target=self._lane, args=(lane,), name=f"lane {lane}", daemon=True)
                self.threads[lane] = thread
                thread.start()
                room -= 1
                if room == 0:
                    break
        return len(self.threads)

    def run(self, stop: threading.Event, idle_wait: float = 1.0, wake_fd: int | None = None) -> None:
        listener: psycopg.Connection[Any] | None = None
        log.info("delivery runner %s started (up to %d lanes)", self.id, self.ctx.settings.delivery_lanes)
        try:
            while not stop.is_set():
                signals.beat(self.ctx.settings.heartbeat_file)
                try:
                    if listener is None or listener.closed:
                        listener = signals.listen(self.ctx.settings.database_url or "")
                    self.start_ready_lanes(listener)
                    signals.sleep(listener, wake_fd, idle_wait)
                except psycopg.Error as exc:
                    log.warning("delivery runner: database error %s; retrying", type(exc).__name__)
                    if listener is not None:
                        listener.close()
                    listener = None
                    stop.wait(idle_wait)
        finally:
            self.stopping.set()
            for thread in list(self.threads.values()):
                thread.join(timeout=5)  # a lane stuck on a silent peer: its lease hands the job on
            if listener is not None:
                listener.close()
            log.info("delivery runner %s stopped", self.id)


def main(settings: Settings) -> None:
    """`interop deliver`: deliver results until SIGTERM/SIGINT."""
    ctx = Context.from_settings(settings)
    stop, wake_fd = signals.install(ctx.sites.reload)
    DeliveryPool(ctx).run(stop, wake_fd=wake_fd)


__all__ = ["Deliverer", "DeliveryPool", "Message", "Outcome", "main"]
