"""`interop worker`: the analysis runner. Claims the jobs of the `analysis` pool (mappings/queue.yaml)
and hands each to its service; turns the outcome into done, retry-later or failed.

Studies overlap: while one study is inferred and stored, the runner has already claimed the next
analyses (up to AHEAD) and prepares them on a second thread (retrieval from the PACS, decode), so
the PACS, the CPU and Triton work at the same time. The images of every study prepared by then go
to Triton in one request (batched across studies; each study still gets its own report, stored in
its own transaction), and several runners' requests meet in Triton's dynamic batcher.

Several runners (in one hub or in several replicas) share the queue in PostgreSQL. A handler
completes its job in the transaction that stores its result, while the runner still holds the
lease; a crash before that commit leaves the job to be retried. Results are delivered by the
delivery runner (`interop.workers.delivery`), so a hospital that does not answer never slows an
analysis.
"""
from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from threading import Event
from typing import Any

import psycopg

from inference_client.triton import ModelNotFound, TritonClient, TritonError, TritonUnavailable

from ..config import Settings
from ..dicom.errors import DicomError, NotAnImage
from ..services import bulk, critical, inbound, orders, tasks
from ..services.analysis import Analyser, Prepared, Timings, wait_seconds
from ..services.analytics import facts
from ..services.context import Context
from ..services.errors import NoModel, Permanent, Transient, Waiting
from ..services.intake import ANALYSE
from ..store import db, queue, resources
from . import signals

log = logging.getLogger("interop.worker")

AHEAD = 4  # analyses a runner claims and prepares ahead; their images can share one Triton request
Handler = Callable[[psycopg.Connection[Any], Context, queue.Job, Timings], Any]
Failed = Callable[[psycopg.Connection[Any], Context, queue.Job, str, BaseException | None], None]


def _reason(exc: BaseException) -> str:
    """The safe, short reason of our own exceptions (they never carry patient data)."""
    text = getattr(exc, "reason", None) or str(exc)
    return f"{type(exc).__name__}: {text}"[:500]


class Runner:
    def __init__(self, ctx: Context, worker_id: str | None = None):
        settings = ctx.settings
        if not settings.database_url or not settings.triton_url:
            raise RuntimeError("the worker needs DATABASE_URL and TRITON_URL")
        self.ctx = ctx
        self.id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.kinds = ctx.policies.pool("analysis")
        self.conn = db.connect(settings.database_url, autocommit=True)
        self.analyser = Analyser(ctx, TritonClient(settings.triton_url, timeout_s=settings.triton_timeout,
                                                   shared_memory=settings.triton_shared_memory == "system"))
        # the next analyses, claimed and being prepared on their own thread and connection
        self.ahead: deque[tuple[queue.Job, Future[Prepared]]] = deque()
        self.pending: tuple[queue.Job, Future[Prepared]] | None = None  # the one taken from `ahead`, being processed
        # analyses whose images were inferred together with another's: stored when their turn comes
        self.inferred: dict[int, tuple[Prepared, list[Any], float]] = {}
        self.prefetch_conn = db.connect(settings.database_url, autocommit=True)
        self.prefetcher = ThreadPoolExecutor(1, thread_name_prefix="prepare")
        self.handlers: dict[str, Handler] = {
            ANALYSE: self._analyse,
            orders.PROCESS_HL7: orders.process_message, orders.FIND_STUDY: orders.find_study,
            critical.ESCALATE: critical.escalate, facts.REFRESH: facts.refresh,
            inbound.STUDY_STABLE: inbound.study_stable, bulk.EXPORT: bulk.run,
        }
        self.on_fail: dict[str, Failed] = {orders.PROCESS_HL7: orders.message_failed, bulk.EXPORT: bulk.export_failed}

    def close(self) -> None:
        self._give_back_ahead()
        self.prefetcher.shutdown(wait=True)
        self.prefetch_conn.close()
        self.conn.close()
        self.analyser.triton.close()  # its shared-memory region too

    def _give_back_ahead(self) -> None:
        """A runner that stops hands the analyses it claimed ahead back to the queue at once."""
        while self.ahead:
            job, future = self.ahead.popleft()
            future.cancel() or future.exception()  # let a started preparation end first
            try:
                with self.conn.transaction():
                    queue.retry_later(self.conn, job, "the worker stopped before this analysis", 0, refund=True)
            except queue.LeaseLost:
                pass
        self.inferred.clear()

    # -- the loop ---------------------------------------------------------------------------
    def run(self, stop: Event, idle_wait: float = 1.0, wake_fd: int | None = None) -> None:
        """Process jobs until `stop` is set; wakes on NOTIFY (or on `wake_fd`), polls every `idle_wait` seconds."""
        listener = signals.listen(self.ctx.settings.database_url or "")
        facts.schedule_refresh(self.conn, self.ctx)
        log.info("worker %s started", self.id)
        try:
            while not stop.is_set():
                signals.beat(self.ctx.settings.heartbeat_file)
                try:
                    if self.run_once():
                        continue
                    signals.sleep(listener, wake_fd, idle_wait)
                except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    listener.close()
                    back = self._reconnect(stop, exc)
                    if back is None:
                        break
                    listener = back
        finally:
            listener.close()
            log.info("worker %s stopped", self.id)

    def _reconnect(self, stop: Event, exc: BaseException) -> psycopg.Connection[Any] | None:
        """The database went away (a switchover, a restart): connect again, with a growing pause,
        until it answers (its LISTEN connection) or the runner is stopped (None). Jobs it held come
        back when their leases end."""
        log.warning("worker %s: database connection lost (%s); reconnecting", self.id, type(exc).__name__)
        while self.ahead:  # their leases end and they come back
            _, future = self.ahead.popleft()
            future.cancel() or future.exception()
        self.inferred.clear()
        url, pause = self.ctx.settings.database_url or "", 0.5
        while True:
            try:
                for old in (self.conn, self.prefetch_conn):
                    old.close()
                self.conn = db.connect(url, autocommit=True)
                self.prefetch_conn = db.connect(url, autocommit=True)
                listener = signals.listen(url)
                log.info("worker %s: database connection back", self.id)
                return listener
            except psycopg.OperationalError:
                if stop.wait(pause):
                    return None
                pause = min(pause * 2, 10.0)

    def run_once(self) -> bool:
        """Process one job (the one claimed ahead, or a new one); False when none is ready."""
        if self.ahead:
            self.pending = self.ahead.popleft()
            job: queue.Job | None = self.pending[0]
        else:
            job = queue.claim(self.conn, self.id, self.ctx.settings.job_lease_seconds, kinds=self.kinds)
        if job is None:
            return False
        try:
            self.process(job)
        finally:
            if self.pending is not None:  # refused before its handler ran: let the preparation end
                self.pending[1].cancel() or self.pending[1].exception()
                self.pending = None
            self.inferred.pop(job.id, None)
        return True

    def _analyse(self, conn: psycopg.Connection[Any], _ctx: Context, job: queue.Job, timings: Timings) -> None:
        """An analysis: its preparation (done ahead, or now), then, while the next studies are
        claimed and prepared on the other thread, inference (with those already prepared: one
        Triton request for all their images) and storing its report."""
        if job.id in self.inferred:  # its images went with an earlier study's
            ready, outputs, seconds = self.inferred.pop(job.id)
            timings.add("inference", seconds)
            self.analyser.store_results(conn, job, ready, outputs, timings)
            return
        if self.pending is not None and self.pending[0].id == job.id:
            prepared = self.pending[1]
            self.pending = None
            ready = prepared.result()  # its exceptions are this job's
        else:
            ready = self.analyser.prepare(conn, job)
        self._claim_ahead()
        companions = [(j, f.result()) for j, f in self.ahead if f.done() and not f.cancelled() and f.exception() is None]
        began = time.perf_counter()
        try:
            outputs = self.analyser.infer([ready, *(p for _, p in companions)])
        except Exception:
            if not companions:
                raise
            companions, outputs = [], self.analyser.infer([ready])  # another's input may be the cause: alone
        seconds = time.perf_counter() - began
        for (other, other_ready), other_outputs in zip(companions, outputs[1:]):
            self.inferred[other.id] = (other_ready, other_outputs, seconds)
        timings.add("inference", seconds)
        self.analyser.store_results(conn, job, ready, outputs[0], timings)

    def _claim_ahead(self) -> None:
        """Claim analyses up to AHEAD and start preparing them (on the prepare thread, in order)."""
        while len(self.ahead) < AHEAD:
            nxt = queue.claim(self.conn, self.id, self.ctx.settings.job_lease_seconds, kinds=[ANALYSE])
            if nxt is None:
                return
            self.ahead.append((nxt, self.prefetcher.submit(self.analyser.prepare, self.prefetch_conn, nxt)))

    # -- one job ----------------------------------------------------------------------------
    def process(self, job: queue.Job) -> None:
        """Run the job's handler; turn its outcome into done, retry-later or failed."""
        timings = Timings()
        handler = self.handlers.get(job.kind)
        try:
            if handler is None:
                raise Permanent(f"unknown job kind {job.kind}")
            if job.attempts > job.max_attempts:
                raise Permanent(f"gave up after {job.max_attempts} attempts")
            handler(self.conn, self.ctx, job, timings)
        except queue.LeaseLost:
            log.warning("job %s: lease lost, result dropped", job.id)
        except NoModel as exc:
            with self.conn.transaction():
                tasks.update(self.conn, self.ctx, job.payload["task"], "rejected", reason=str(exc))
                queue.complete(self.conn, job, timings.stages)
        except Waiting as exc:
            self._retry(job, exc.reason, timings, waiting=True)
        except (Permanent, NotAnImage, ModelNotFound) as exc:
            self._fail(job, _reason(exc), timings, exc)
        except Transient as exc:
            self._retry(job, exc.reason, timings)
        except (DicomError, TritonError) as exc:
            if getattr(exc, "is_transient", isinstance(exc, TritonUnavailable)):
                self._retry(job, _reason(exc), timings)
            else:
                self._fail(job, _reason(exc), timings, exc)
        except resources.NotFound:
            self._fail(job, "a resource the job needs is no longer in the store", timings)
        except psycopg.DataError as exc:  # a value PostgreSQL refuses: the same on every try
            self._fail(job, f"a value cannot be stored ({type(exc).__name__})", timings, exc)
        except Exception as exc:  # unknown: retry, and log the type only (text may hold patient data)
            log.error("job %s (%s): unexpected %s", job.id, job.kind, type(exc).__name__)
            log.debug("job failure", exc_info=exc)
            self._retry(job, f"internal error ({type(exc).__name__})", timings)

    def _retry(self, job: queue.Job, reason: str, timings: Timings, *, waiting: bool = False) -> None:
        if job.attempts >= job.max_attempts and not waiting:
            self._fail(job, reason, timings)
            return
        policy = self.ctx.policies.kind(job.kind)
        base = self.ctx.settings.retry_base_seconds
        delay = wait_seconds(base) if waiting else queue.backoff_seconds(job.attempts, base, policy.backoff_cap_seconds)
        try:
            with self.conn.transaction():
                queue.retry_later(self.conn, job, reason, delay, refund=waiting)
                if "task" in job.payload and not waiting:
                    tasks.update(self.conn, self.ctx, job.payload["task"], "in-progress",
                                 business=f"waiting to retry in {delay}s: {reason}")
            log.warning("job %s (%s): %s; retry in %ss", job.id, job.kind, reason, delay)
        except queue.LeaseLost:
            log.warning("job %s: lease lost while scheduling a retry", job.id)

    def _fail(self, job: queue.Job, reason: str, timings: Timings, exc: BaseException | None = None) -> None:
        try:
            with self.conn.transaction():
                queue.finish(self.conn, job, "failed", reason, timings=timings.stages)
                if "task" in job.payload:
                    tasks.update(self.conn, self.ctx, job.payload["task"], "failed", reason=reason, business="failed")
                if job.kind in self.on_fail:
                    self.on_fail[job.kind](self.conn, self.ctx, job, reason, exc)
            log.warning("job %s (%s) failed: %s", job.id, job.kind, reason)
        except queue.LeaseLost:
            log.warning("job %s: lease lost while failing it", job.id)


def main(settings: Settings) -> None:
    """`interop worker`: run one analysis worker until SIGTERM/SIGINT."""
    ctx = Context.from_settings(settings)
    stop, wake_fd = signals.install(ctx.sites.reload)
    runner = Runner(ctx)
    try:
        runner.run(stop, wake_fd=wake_fd)
    finally:
        runner.close()
