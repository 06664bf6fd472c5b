"""The inference worker: claim a job, retrieve the study, preprocess, infer, store the report.

Several workers (in one hub or in several replicas) share the queue in PostgreSQL. The report,
its observations, the Task's completion and the job's completion commit together, and only
while this worker still holds the job's lease: a crash anywhere before that commit leaves the
job to be retried, and never leaves two reports.
"""
from __future__ import annotations

import logging
import os
import select
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from threading import Event
from typing import Any, Iterator

import numpy as np
import psycopg

from inference_client import routing
from inference_client.models import ModelDescription, load_models
from inference_client.triton import ModelNotFound, TritonClient, TritonError, TritonUnavailable

from ..config import Settings
from ..analytics import facts
from ..delivery import outbox
from ..delivery.deliver import on_report_changed
from ..delivery.sender import OutboxSender
from ..review import critical
from ..dicom.dicomweb import DicomWebClient, InstanceRef
from ..dicom.errors import DicomError, NotAnImage
from ..store import db, jobs, resources
from ..store.search_params import SearchParam, load
from . import assembly, report
from .errors import NoModel, Permanent, Transient
from .intake import ANALYSE
from .orders import FIND_STUDY, PROCESS_HL7, OrderHandlers, site_of

REFRESH_ANALYTICS = "refresh-analytics"

log = logging.getLogger("interop.worker")


@dataclass
class Timings:
    stages: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = round(self.stages.get(name, 0.0) + time.perf_counter() - start, 6)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class TimedClient(DicomWebClient):
    """The DICOMweb client, counting the time spent waiting on the PACS into the 'retrieve' stage
    (also while a series streams), so decode time can be told apart from transfer time."""

    def __init__(self, base_url: str, timeout_s: float, timings: Timings):
        super().__init__(base_url, timeout_s=timeout_s)
        self.timings = timings

    def retrieve_instance(self, ref: InstanceRef) -> Any:
        with self.timings.stage("retrieve"):
            return super().retrieve_instance(ref)

    def retrieve_series(self, study_uid: str, series_uid: str, **kwargs: Any) -> Any:
        stream = super().retrieve_series(study_uid, series_uid, **kwargs)
        while True:
            with self.timings.stage("retrieve"):
                try:
                    ds = next(stream)
                except StopIteration:
                    return
            yield ds


class Worker:
    def __init__(self, settings: Settings, worker_id: str | None = None):
        if not settings.database_url or not settings.triton_url:
            raise RuntimeError("the worker needs DATABASE_URL and TRITON_URL")
        self.settings = settings
        self.id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.params: dict[str, dict[str, SearchParam]] = load(settings.mappings_dir)
        self.models: dict[str, ModelDescription] = load_models(settings.mappings_dir)
        self.rules = routing.load_rules(settings.mappings_dir)
        self.triton = TritonClient(settings.triton_url, timeout_s=settings.triton_timeout)
        self.conn = db.connect(settings.database_url, autocommit=True)
        self.orders = OrderHandlers(settings, self.conn, self.params)
        self.handlers = {ANALYSE: self.analyse, PROCESS_HL7: self.orders.process_message,
                         FIND_STUDY: self.orders.find_study, critical.ESCALATE: self.escalate,
                         REFRESH_ANALYTICS: self.refresh_analytics}
        self.on_fail = {PROCESS_HL7: self.orders.message_failed}
        self.sender = OutboxSender(settings, self.id)

    def close(self) -> None:
        self.sender.close()
        self.conn.close()

    # -- the loop ---------------------------------------------------------------------------
    def run(self, stop: Event, idle_wait: float = 1.0) -> None:
        """Process jobs until `stop` is set; wakes on NOTIFY, polls every `idle_wait` seconds."""
        listener = db.connect(self.settings.database_url or "", autocommit=True)
        listener.execute(f"LISTEN {jobs.CHANNEL}")
        listener.execute(f"LISTEN {outbox.CHANNEL}")
        self.schedule_refresh()
        log.info("worker %s started", self.id)
        try:
            while not stop.is_set():
                if self.run_once() | self.sender.run_once():  # both, every round
                    continue
                select.select([listener.fileno()], [], [], idle_wait)
                for _ in listener.notifies(timeout=0):
                    pass
        finally:
            listener.close()
            log.info("worker %s stopped", self.id)

    def run_once(self) -> bool:
        """Claim and process one job; False when none is ready."""
        job = jobs.claim(self.conn, self.id, self.settings.job_lease_seconds)
        if job is None:
            return False
        self.process(job)
        return True

    # -- one job ----------------------------------------------------------------------------
    def process(self, job: jobs.Job) -> None:
        """Run the job's handler; turn its outcome into done, retry-later or failed."""
        timings = Timings()
        handler = self.handlers.get(job.kind)
        try:
            if handler is None:
                raise Permanent(f"unknown job kind {job.kind}")
            if job.attempts > job.max_attempts:
                raise Permanent(f"gave up after {job.max_attempts} attempts")
            handler(job, timings)
        except jobs.LeaseLost:
            log.warning("job %s: lease lost, result dropped", job.id)
        except NoModel as exc:
            with self.conn.transaction():
                self._task(job.payload["task"], "rejected", reason=str(exc))
                jobs.complete(self.conn, job, timings.stages)
        except (Permanent, NotAnImage, ModelNotFound) as exc:
            self._fail(job, _reason(exc), timings)
        except Transient as exc:
            self._retry(job, exc.reason, timings)
        except (DicomError, TritonError) as exc:
            if getattr(exc, "is_transient", isinstance(exc, TritonUnavailable)):
                self._retry(job, _reason(exc), timings)
            else:
                self._fail(job, _reason(exc), timings)
        except resources.NotFound:
            self._fail(job, "a resource the job needs is no longer in the store", timings)
        except Exception as exc:  # unknown: retry, and log the type only (text may hold patient data)
            log.error("job %s (%s): unexpected %s", job.id, job.kind, type(exc).__name__)
            log.debug("job failure", exc_info=exc)
            self._retry(job, f"internal error ({type(exc).__name__})", timings)

    def analyse(self, job: jobs.Job, timings: Timings) -> None:
        """`analyse-study`: retrieve, preprocess, infer, and store the report (one transaction)."""
        total = time.perf_counter()
        study = resources.read(self.conn, "ImagingStudy", job.payload["study"])
        self._task(job.payload["task"], "in-progress", business="retrieving images")
        result = self._analyse(job, study, timings)
        timings.stages["total"] = round(time.perf_counter() - total, 6)
        with self.conn.transaction():
            self._store(job, study, result, timings)
        log.info("job %s done in %.2fs", job.id, timings.stages["total"])

    def schedule_refresh(self, delay_minutes: int = 0) -> None:
        """One analytics refresh per period across every worker and replica (dedupe on the slot)."""
        period = max(1, self.settings.analytics_refresh_minutes) * 60
        slot = int(time.time() // period) + (1 if delay_minutes else 0)
        job = jobs.enqueue(self.conn, REFRESH_ANALYTICS, {}, dedupe_key=f"{REFRESH_ANALYTICS}:{slot}", max_attempts=2)
        if job is not None and delay_minutes:
            self.conn.execute("UPDATE job SET run_after = to_timestamp(%s) WHERE id = %s", (slot * period, job))

    def refresh_analytics(self, job: jobs.Job, _timings: Timings) -> None:
        """`refresh-analytics`: the dashboard's summary views, then the next period's job."""
        facts.refresh(self.conn)
        with self.conn.transaction():
            jobs.complete(self.conn, job, {})
            self.schedule_refresh(delay_minutes=self.settings.analytics_refresh_minutes)

    def escalate(self, job: jobs.Job, _timings: Timings) -> None:
        """`escalate-critical`: hand an unacknowledged critical result to the site's next contact."""
        critical.escalate(self.conn, self.params, job, self.orders.sites, self.settings.critical_escalate_minutes)

    def _analyse(self, job: jobs.Job, study: dict[str, Any], timings: Timings) -> list[dict[str, Any]]:
        client = TimedClient(job.payload["dicomweb"], self.settings.dicomweb_timeout, timings)
        try:
            with timings.stage("retrieve"):
                refs = client.search_instances(job.payload["study_uid"])
            chosen = self._route(study, refs)
            results = []
            for name, model_refs in chosen.items():
                model = self.models[name]
                jobs.renew(self.conn, job, self.settings.job_lease_seconds)
                self._task(job.payload["task"], "in-progress", business=f"inference: {name}")
                probabilities = self._run_model(client, model, model_refs, timings)
                with timings.stage("inference"):
                    version = self.triton.model_version_label(model.triton_model) or model.version
                results.append({"model": model, "version": version, "probabilities": probabilities})
            return results
        finally:
            client.close()

    def _route(self, study: dict[str, Any], refs: list[InstanceRef]) -> dict[str, list[InstanceRef]]:
        procedure = [c.get("code") for pc in study.get("procedureCode", []) for c in pc.get("coding", [])]
        chosen: dict[str, list[InstanceRef]] = {}
        for ref in refs:
            facts = routing.StudyFacts(
                modality=ref.modality, body_part=ref.body_part, view_position=ref.view_position,
                laterality=ref.breast_laterality, procedure_codes=tuple(c for c in procedure if c),
                series_description=ref.series_description,
            )
            for name in routing.route(facts, self.rules):
                if name in self.models:
                    chosen.setdefault(name, []).append(ref)
        if not chosen:
            kinds = sorted({f"{r.modality or '?'} {r.body_part or '?'}" for r in refs})
            raise NoModel(f"not analysed: no model for {', '.join(kinds) or 'this study'}")
        return chosen

    def _run_model(self, client: "TimedClient", model: ModelDescription, refs: list[InstanceRef],
                   timings: Timings) -> list[float | None]:
        """Assemble the model's input from the PACS (streamed), infer, and reduce to one value per label."""
        kind = assembly.kind(model)
        start, fetched = time.perf_counter(), timings.stages.get("retrieve", 0.0)
        outputs: list[np.ndarray] = []
        present: np.ndarray | None = None
        inference = 0.0
        if kind == "image":
            for inputs in assembly.image_batches(client, model, refs):
                t = time.perf_counter()
                outputs.append(self._infer(model, inputs))
                inference += time.perf_counter() - t
            if not outputs:
                raise NotAnImage(f"none of the {len(refs)} instances routed to {model.name} holds an image")
        else:
            inputs = (assembly.views_input if kind == "views" else assembly.volume_input)(client, model, refs)
            t = time.perf_counter()
            outputs.append(self._infer(model, inputs))
            inference += time.perf_counter() - t
            if kind == "views" and model.assembly and model.assembly.present:
                present = inputs[model.assembly.present][0]
        total = time.perf_counter() - start
        timings.stages["inference"] = round(timings.stages.get("inference", 0.0) + inference, 6)
        decode = total - inference - (timings.stages.get("retrieve", 0.0) - fetched)
        timings.stages["decode"] = round(timings.stages.get("decode", 0.0) + decode, 6)
        values: list[float | None] = [float(p) for p in np.concatenate(outputs).max(axis=0)]
        if present is not None and len(values) == 2 and len(present) == 4:
            # one score per breast (right, left); a breast with neither view was not assessed
            for side, (cc, mlo) in enumerate(((0, 2), (1, 3))):
                if not (present[cc] or present[mlo]):
                    values[side] = None
        return values

    def _infer(self, model: ModelDescription, inputs: dict[str, np.ndarray]) -> np.ndarray:
        result = self.triton.infer(model.triton_model, inputs, [model.output])
        out = np.asarray(result[model.output], dtype=np.float32)
        return out.reshape(out.shape[0], -1)

    # -- writing ----------------------------------------------------------------------------
    def _store(self, job: jobs.Job, study: dict[str, Any], results: list[dict[str, Any]], timings: Timings) -> None:
        start = time.perf_counter()
        issued = _now()
        reports = []
        for result in results:
            model: ModelDescription = result["model"]
            built = report.build(
                study=study, study_uid=job.payload["study_uid"], model=model, version=result["version"],
                probabilities=result["probabilities"], report_id=resources.new_id(),
                observation_ids=[resources.new_id() for _ in range(len(model.labels) + 1)], issued=issued,
            )
            try:
                resources.read(self.conn, "Device", built["device"]["id"])
            except resources.NotFound:
                resources.create(self.conn, built["device"], self.params["Device"], rid=built["device"]["id"])
            for obs in built["observations"]:
                resources.create(self.conn, obs, self.params["Observation"], rid=obs["id"])
            if site_of(study):
                built["report"]["meta"] = {"tag": study["meta"]["tag"]}
            stored = resources.create(self.conn, built["report"], self.params["DiagnosticReport"], rid=built["report"]["id"])
            reports.append(stored["id"])
            critical.raise_alert(self.conn, self.params, stored, self.orders.sites, site_of(study),
                                 self.settings.critical_escalate_minutes)  # first: delivery reads the alert
            on_report_changed(self.conn, stored, self.orders.sites, site_of(study), self.params)
            facts.record(self.conn, stored["id"], event="ai_result", sites=self.orders.sites)
        timings.stages["store"] = round(time.perf_counter() - start, 6)
        self._task(job.payload["task"], "completed", business="report available",
                   outputs=[f"DiagnosticReport/{rid}" for rid in reports])
        jobs.complete(self.conn, job, timings.stages)

    def _task(self, task_id: str, status: str, *, business: str | None = None, reason: str | None = None,
              outputs: list[str] | None = None) -> None:
        task = dict(resources.read(self.conn, "Task", task_id))
        task["status"] = status
        task["lastModified"] = _now()
        if business:
            task["businessStatus"] = {"text": business}
        if reason:
            task["statusReason"] = {"text": reason}
        if outputs:
            task["output"] = [{"type": {"text": "DiagnosticReport"}, "valueReference": {"reference": ref}}
                              for ref in outputs]
        resources.update(self.conn, task, self.params["Task"])

    def _retry(self, job: jobs.Job, reason: str, timings: Timings) -> None:
        if job.attempts >= job.max_attempts:
            self._fail(job, reason, timings)
            return
        try:
            with self.conn.transaction():
                delay = jobs.retry_later(self.conn, job, reason, self.settings.retry_base_seconds)
                if "task" in job.payload:
                    self._task(job.payload["task"], "in-progress",
                               business=f"waiting to retry in {delay}s: {reason}")
            log.warning("job %s (%s): %s; retry in %ss", job.id, job.kind, reason, delay)
        except jobs.LeaseLost:
            log.warning("job %s: lease lost while scheduling a retry", job.id)

    def _fail(self, job: jobs.Job, reason: str, timings: Timings) -> None:
        try:
            with self.conn.transaction():
                jobs.fail(self.conn, job, reason, timings.stages)
                if "task" in job.payload:
                    self._task(job.payload["task"], "failed", reason=reason, business="failed")
                if job.kind in self.on_fail:
                    self.on_fail[job.kind](job, reason)
            log.warning("job %s (%s) failed: %s", job.id, job.kind, reason)
        except jobs.LeaseLost:
            log.warning("job %s: lease lost while failing it", job.id)


def _reason(exc: BaseException) -> str:
    """The safe, short reason of our own exceptions (they never carry patient data)."""
    text = getattr(exc, "reason", None) or str(exc)
    return f"{type(exc).__name__}: {text}"[:500]


def main(settings: Settings | None = None) -> None:
    """`interop worker`: run one worker until SIGTERM/SIGINT."""
    import signal

    settings = settings or Settings.from_env()
    stop = Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    worker = Worker(settings)
    try:
        worker.run(stop)
    finally:
        worker.close()
