"""Analysing a study: retrieve it from the PACS, assemble each routed model's input, infer on
Triton, build the report and store it (`analyse-study` jobs).

The report, its observations, the Task's completion and the job's completion commit together,
and only while the runner still holds the job's lease: a crash anywhere before that commit
leaves the job to be retried, and never leaves two reports. What a stored report sets off
(critical alert, deliveries, analytics) is `reports.stored`, in the same transaction.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import psycopg

from inference_client import routing
from inference_client.models import ModelDescription
from inference_client.triton import TritonClient

from ..dicom.dicomweb import DicomWebClient, ImageSource, InstanceRef
from ..dicom.errors import NotAnImage, StudyNotFound
from ..dicom.local import LOCAL
from ..domain import report as builder
from ..store import queue, resources
from ..tls import ClientTls
from . import assembly, inbound, intake, reports, tasks
from .context import Context
from .errors import NoModel, Waiting

log = logging.getLogger("interop.analysis")



def wait_seconds(retry_base_seconds: int) -> int:
    """How often a study not yet in the PACS is looked for: three retry bases, at most 30 s."""
    return max(1, min(30, 3 * retry_base_seconds))


@dataclass
class Timings:
    stages: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.stages[name] = round(self.stages.get(name, 0.0) + seconds, 6)


class TimedClient(DicomWebClient):
    """The DICOMweb client, counting the time spent waiting on the PACS into the 'retrieve' stage
    (also while a series streams), so decode time can be told apart from transfer time."""

    def __init__(self, base_url: str, timeout_s: float, timings: Timings, tls: ClientTls | None = None):
        super().__init__(base_url, timeout_s=timeout_s, tls=tls)
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


class Analyser:
    """`analyse-study` jobs for one runner (it owns the Triton client and the connection)."""

    def __init__(self, ctx: Context, triton: TritonClient):
        self.ctx = ctx
        self.triton = triton
        self.rules = routing.load_rules(ctx.settings.mappings_dir)

    def __call__(self, conn: psycopg.Connection[Any], job: queue.Job, timings: Timings) -> None:
        total = time.perf_counter()
        study = resources.read(conn, "ImagingStudy", job.payload["study"])
        if job.payload.get("supersedes") and not inbound.previous_over(conn, job.payload["supersedes"]):
            raise Waiting("the previous analysis of this study is not over")  # its report is the one to supersede
        tasks.update(conn, self.ctx, job.payload["task"], "in-progress", business="retrieving images")
        results = self._analyse(conn, job, study, timings)
        timings.stages["total"] = round(time.perf_counter() - total, 6)
        with conn.transaction():
            self._store(conn, job, study, results, timings)
        log.info("job %s done in %.2fs", job.id, timings.stages["total"])

    def _analyse(self, conn: psycopg.Connection[Any], job: queue.Job, study: dict[str, Any],
                 timings: Timings) -> list[dict[str, Any]]:
        client: ImageSource = inbound.local_archive(conn, job.payload["study_uid"]) \
            if job.payload["dicomweb"] == LOCAL else \
            TimedClient(job.payload["dicomweb"], self.ctx.settings.dicomweb_timeout, timings,
                        ClientTls.from_settings(self.ctx.settings))
        try:
            try:
                with timings.stage("retrieve"):
                    refs = client.search_instances(job.payload["study_uid"])
            except StudyNotFound:
                if intake.still_waiting(job.payload.get("deadline")):
                    intake.wait_for_images(conn, self.ctx, job.payload["task"])
                raise
            chosen = self._route(study, refs)
            results = []
            for name, model_refs in chosen.items():
                model = self.ctx.models[name]
                queue.renew(conn, job, self.ctx.settings.job_lease_seconds)
                tasks.update(conn, self.ctx, job.payload["task"], "in-progress", business=f"inference: {name}")
                probabilities = self._run_model(client, model, model_refs, timings)
                with timings.stage("inference"):
                    version = self.triton.model_version_label(model.triton_model) or model.version
                results.append({"model": model, "version": version, "probabilities": probabilities,
                                "sources": [r.instance_uid for r in model_refs]})
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
                if name in self.ctx.models:
                    chosen.setdefault(name, []).append(ref)
        if not chosen:
            kinds = sorted({f"{r.modality or '?'} {r.body_part or '?'}" for r in refs})
            raise NoModel(f"not analysed: no model for {', '.join(kinds) or 'this study'}")
        return chosen

    def _run_model(self, client: ImageSource, model: ModelDescription, refs: list[InstanceRef],
                   timings: Timings) -> list[float | None]:
        """Assemble the model's input from the PACS (streamed), infer, and reduce to one value per label."""
        kind = assembly.kind(model)
        start, fetched = time.perf_counter(), timings.stages.get("retrieve", 0.0)
        outputs: list[np.ndarray[Any, Any]] = []
        present: np.ndarray[Any, Any] | None = None
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
        timings.add("inference", inference)
        timings.add("decode", total - inference - (timings.stages.get("retrieve", 0.0) - fetched))
        values: list[float | None] = [float(p) for p in np.concatenate(outputs).max(axis=0)]
        if present is not None and len(values) == 2 and len(present) == 4:
            # one score per breast (right, left); a breast with neither view was not assessed
            for side, (cc, mlo) in enumerate(((0, 2), (1, 3))):
                if not (present[cc] or present[mlo]):
                    values[side] = None
        return values

    def _infer(self, model: ModelDescription, inputs: dict[str, np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
        result = self.triton.infer(model.triton_model, inputs, [model.output])
        out = np.asarray(result[model.output], dtype=np.float32)
        return out.reshape(out.shape[0], -1)

    def _store(self, conn: psycopg.Connection[Any], job: queue.Job, study: dict[str, Any],
               results: list[dict[str, Any]], timings: Timings) -> None:
        start = time.perf_counter()
        issued = datetime.now(UTC).isoformat()
        params = self.ctx.params
        stored_reports = []
        for result in results:
            model: ModelDescription = result["model"]
            built = builder.build(
                study=study, study_uid=job.payload["study_uid"], model=model, version=result["version"],
                probabilities=result["probabilities"], report_id=resources.new_id(), sources=result["sources"],
                observation_ids=[resources.new_id() for _ in range(len(model.labels) + 1)], issued=issued,
            )
            try:
                resources.read(conn, "Device", built["device"]["id"])
            except resources.NotFound:
                resources.create(conn, built["device"], params["Device"], rid=built["device"]["id"])
            for obs in built["observations"]:
                resources.create(conn, obs, params["Observation"], rid=obs["id"])
            tags = (study.get("meta") or {}).get("tag")
            if tags:  # the facility the study is for: its report is for it too
                built["report"]["meta"] = {"tag": tags}
            previous = inbound.report_to_supersede(conn, self.ctx, built["report"]) if job.payload.get("supersedes") else None
            if previous is not None:  # a re-analysis of a grown study: the next version of its report
                stored = resources.update(conn, {**built["report"], "id": previous["id"]}, params["DiagnosticReport"])[0]
            else:
                stored = resources.create(conn, built["report"], params["DiagnosticReport"], rid=built["report"]["id"])
            reports.stored(conn, self.ctx, stored, event="ai_result")
            stored_reports.append(stored["id"])
        timings.stages["store"] = round(time.perf_counter() - start, 6)
        tasks.update(conn, self.ctx, job.payload["task"], "completed", business="report available",
                     outputs=[f"DiagnosticReport/{rid}" for rid in stored_reports])
        queue.complete(conn, job, timings.stages)

