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
import yaml

from inference_client import routing
from inference_client.models import ModelDescription
from inference_client.triton import TritonClient

from ..dicom.dicomweb import DicomWebClient, ImageSource, InstanceRef
from ..dicom.errors import NotAnImage, StudyNotFound
from ..dicom.local import LOCAL
from ..domain import quality
from ..domain import report as builder
from ..store import queue, resources
from ..tls import ClientTls
from . import assembly, inbound, intake, reports, tasks
from .context import Context
from .errors import NoModel, Waiting

log = logging.getLogger("interop.analysis")
QUALITY_FILE = "quality.yaml"  # in the mappings folder: the image-quality gate's limits


def load_quality(mappings_dir: Any) -> dict[str, quality.Limits]:
    """The quality gate's limits per model (mappings/quality.yaml); the built-in defaults without it."""
    path = mappings_dir / QUALITY_FILE
    if not path.exists():
        return {"": quality.Limits()}
    return quality.parse_limits(yaml.safe_load(path.read_text(encoding="utf-8")))



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


@dataclass
class Prepared:
    """A study read and its models' inputs assembled: what inference needs, nothing more. Made
    ahead of time (`Analyser.prepare`, on another thread) while the previous study is inferred."""

    study: dict[str, Any]
    inputs: list[tuple[ModelDescription, list[InstanceRef], list[dict[str, np.ndarray[Any, Any]]], Any]]
    timings: Timings
    seconds: float
    refused: dict[str, quality.Verdicts] = field(default_factory=dict)  # model name -> what the gate refused


class Analyser:
    """`analyse-study` jobs for one runner (it owns the Triton client and the connection).

    In two steps, so that a runner can overlap them across studies: `prepare` (read, route,
    retrieve, decode: the PACS and the CPU) and `finish` (infer on Triton, store the report)."""

    def __init__(self, ctx: Context, triton: TritonClient):
        self.ctx = ctx
        self.triton = triton
        self.rules = routing.load_rules(ctx.settings.mappings_dir)
        self.quality = load_quality(ctx.settings.mappings_dir)

    def __call__(self, conn: psycopg.Connection[Any], job: queue.Job, timings: Timings) -> None:
        self.finish(conn, job, self.prepare(conn, job), timings)

    def prepare(self, conn: psycopg.Connection[Any], job: queue.Job) -> Prepared:
        began, timings = time.perf_counter(), Timings()
        study = resources.read(conn, "ImagingStudy", job.payload["study"])
        if job.payload.get("supersedes") and not inbound.previous_over(conn, job.payload["supersedes"]):
            raise Waiting("the previous analysis of this study is not over")  # its report is the one to supersede
        tasks.update(conn, self.ctx, job.payload["task"], "in-progress", business="retrieving images")
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
            inputs, refused = [], {}
            for name, model_refs in self._route(study, refs).items():
                model = self.ctx.models[name]
                queue.renew(conn, job, self.ctx.settings.job_lease_seconds)
                start, fetched = time.perf_counter(), timings.stages.get("retrieve", 0.0)
                verdicts = quality.Verdicts()
                batches, present = self._assemble(client, model, model_refs, verdicts)
                timings.add("decode", time.perf_counter() - start - (timings.stages.get("retrieve", 0.0) - fetched))
                inputs.append((model, model_refs, batches, present))
                if verdicts.refused:
                    refused[name] = verdicts
        finally:
            client.close()
        return Prepared(study, inputs, timings, time.perf_counter() - began, refused)

    def _gate(self, model: ModelDescription, verdicts: quality.Verdicts) -> assembly.Gate:
        """The quality gate for one model's images: records each refusal (never its pixels)."""
        limits = quality.limits_for(self.quality, model.name)

        def gate(uid: str, modality: object, body_part: object, image: np.ndarray[Any, Any] | None) -> bool:
            reason = quality.check(limits, modality, body_part, image)
            if reason is not None:
                verdicts.refused.setdefault(uid, reason)
                log.info("quality gate: an image for %s refused (%s)", model.name, reason.split(":")[0])
            return reason is None
        return gate

    def finish(self, conn: psycopg.Connection[Any], job: queue.Job, prepared: Prepared, timings: Timings) -> None:
        """Infer the prepared study alone, then store its reports (with the job's completion)."""
        began = time.perf_counter()
        outputs = self.infer([prepared])[0]
        timings.add("inference", time.perf_counter() - began)
        self.store_results(conn, job, prepared, outputs, timings)

    def infer(self, studies: list[Prepared]) -> list[list[list[np.ndarray[Any, Any]]]]:
        """Infer several prepared studies together: each model's rows from every study in as few
        Triton requests as its max_batch_size allows. Per study, per model, the output batches."""
        out: list[list[list[np.ndarray[Any, Any]]]] = [[[] for _ in p.inputs] for p in studies]
        by_model: dict[str, list[tuple[int, int, dict[str, np.ndarray[Any, Any]]]]] = {}
        models: dict[str, ModelDescription] = {}
        for si, prepared in enumerate(studies):
            for mi, (model, _refs, batches, _present) in enumerate(prepared.inputs):
                models[model.name] = model
                by_model.setdefault(model.name, []).extend((si, mi, b) for b in batches)
        for name, parts in by_model.items():
            model = models[name]
            limit = self.triton.max_batch_size(model.triton_model)
            chunk: list[tuple[int, int, dict[str, np.ndarray[Any, Any]]]] = []
            for part in [*parts, None]:
                rows = sum(len(next(iter(b.values()))) for _, _, b in chunk)
                if chunk and (part is None or rows + len(next(iter(part[2].values()))) > limit):
                    inputs = {k: np.concatenate([b[k] for _, _, b in chunk]) for k in chunk[0][2]}
                    result, start = self._infer(model, inputs), 0
                    for si, mi, b in chunk:
                        n = len(next(iter(b.values())))
                        out[si][mi].append(result[start:start + n])
                        start += n
                    chunk = []
                if part is not None:
                    chunk.append(part)
        return out

    def store_results(self, conn: psycopg.Connection[Any], job: queue.Job, prepared: Prepared,
                      outputs: list[list[np.ndarray[Any, Any]]], timings: Timings) -> None:
        """The reports of a study from its models' outputs, stored with the job's completion."""
        began = time.perf_counter()
        for name, value in prepared.timings.stages.items():
            timings.add(name, value)
        results = []
        for (model, refs, _batches, present), model_outputs in zip(prepared.inputs, outputs):
            version = self.triton.model_version_label(model.triton_model) or model.version
            verdicts = prepared.refused.get(model.name)
            if verdicts is not None and not model_outputs:  # the gate refused every image: nothing was read
                results.append({"model": model, "version": version, "reasons": verdicts.reasons(),
                                "sources": list(verdicts.refused)})
                continue
            read = [r.instance_uid for r in refs if verdicts is None or r.instance_uid not in verdicts.refused]
            results.append({"model": model, "version": version, "probabilities": self._values(model_outputs, present),
                            "sources": read, "skipped": verdicts})
        with conn.transaction():
            timings.stages["total"] = round(prepared.seconds + timings.stages.get("inference", 0.0)
                                            + time.perf_counter() - began, 6)
            self._store(conn, job, prepared.study, results, timings)
        log.info("job %s done in %.2fs", job.id, timings.stages["total"])

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

    def _assemble(self, client: ImageSource, model: ModelDescription, refs: list[InstanceRef],
                  verdicts: quality.Verdicts) -> tuple[list[dict[str, np.ndarray[Any, Any]]], np.ndarray[Any, Any] | None]:
        """The model's input batches from the PACS (streamed), and which views were present
        (mammography). The quality gate records in `verdicts` what it refused; no batch when it
        refused the images (every image; for a mammography exam or a volume, any of its views or
        its series)."""
        kind = assembly.kind(model)
        gate = self._gate(model, verdicts)
        if kind == "image":
            batches = list(assembly.image_batches(client, model, refs, gate))
            if not batches and not verdicts.refused:
                raise NotAnImage(f"none of the {len(refs)} instances routed to {model.name} holds an image")
            return batches, None
        inputs = (assembly.views_input if kind == "views" else assembly.volume_input)(client, model, refs, gate)
        if verdicts.refused:
            return [], None
        present = inputs[model.assembly.present][0] if kind == "views" and model.assembly and model.assembly.present \
            else None
        return [inputs], present

    @staticmethod
    def _values(outputs: list[np.ndarray[Any, Any]], present: np.ndarray[Any, Any] | None) -> list[float | None]:
        """One value per label: the highest over the images."""
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
            if "reasons" in result:
                built = builder.not_analysable(
                    study=study, study_uid=job.payload["study_uid"], model=model, version=result["version"],
                    reasons=result["reasons"], report_id=resources.new_id(), issued=issued, sources=result["sources"])
            else:
                built = builder.build(
                    study=study, study_uid=job.payload["study_uid"], model=model, version=result["version"],
                    probabilities=result["probabilities"], report_id=resources.new_id(), sources=result["sources"],
                    observation_ids=[resources.new_id() for _ in range(len(model.labels) + 1)], issued=issued,
                )
                skipped: quality.Verdicts | None = result.get("skipped")
                if skipped is not None:  # some images read, others refused: the report says which were not
                    built["report"]["conclusion"] += (f"\n{len(skipped.refused)} image(s) not read by the AI: "
                                                      f"{quality.summary(skipped.refused.values())}.")
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

