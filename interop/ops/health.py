"""Liveness, readiness and Prometheus metrics. None of these need auth.

Queue depth, job latency by stage, HL7 messages, deliveries and the lanes' circuit breakers are
read from PostgreSQL at scrape time, so every replica reports the same shared truth; request
counters use prometheus_client's multiprocess mode under gunicorn (PROMETHEUS_MULTIPROC_DIR).
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import orjson
from flask import Blueprint, Request, Response, current_app, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

from inference_client.triton import TritonClient

from ..services.delivery import CHANNEL_OF
from ..services.delivery import KINDS as DELIVERY_KINDS
from ..store import hl7_messages, queue
from ..store import metrics as figures
from .admin import SHOWN_STATUS

bp = Blueprint("health", __name__)

REQUESTS = Counter("interop_http_requests_total", "FHIR API requests", ["method", "status"])
LATENCY = Histogram("interop_http_request_seconds", "FHIR API request latency", ["method"])


def observe_request(request: Request, response: Response) -> None:
    start = request.environ.get("interop.start")
    REQUESTS.labels(request.method, str(response.status_code)).inc()
    if start is not None:
        LATENCY.labels(request.method).observe(time.perf_counter() - start)


@bp.get("/healthz")
def healthz() -> Response:
    return Response('{"status":"alive"}', content_type="application/json")


def _checks() -> dict[str, str]:
    hub = current_app.extensions["interop"]
    checks: dict[str, str] = {}
    try:
        with hub.pool.connection(timeout=3) as conn:
            figures.check(conn)
        checks["database"] = "ok"
        checks["queue"] = "ok"
    except Exception as exc:  # readiness reports, it does not raise
        checks["database"] = f"unavailable ({type(exc).__name__})"
        checks["queue"] = "unknown"
    url = hub.settings.triton_url
    if not url:
        checks["triton"] = "not configured"
    else:
        with TritonClient(url, timeout_s=2) as triton:  # HTTP or gRPC, as TRITON_URL says
            checks["triton"] = "ok" if triton.is_ready() else "not ready or unavailable"
    return checks


@bp.get("/readyz")
def readyz() -> Response:
    """Ready when every check is ok; `?exclude=triton` (repeatable, as kube-apiserver's /readyz
    takes it) leaves a check out: an API pod accepts orders and studies while Triton is away."""
    excluded = set(request.args.getlist("exclude"))
    checks = {k: v for k, v in _checks().items() if k not in excluded}
    ready = all(v == "ok" for v in checks.values())
    return Response(orjson.dumps({"status": "ready" if ready else "not ready", "checks": checks}),
                    status=200 if ready else 503, content_type="application/json")


class QueueCollector(Collector):
    """The shared queue, HL7 messages, deliveries and lanes, from the database."""

    def __init__(self, hub: Any):
        self.hub = hub

    def collect(self) -> Iterator[Any]:
        depth = GaugeMetricFamily("interop_jobs", "analysis jobs in the queue by status", labels=["status"])
        stages = SummaryMetricFamily("interop_job_stage_seconds",
                                     "time per pipeline stage, jobs finished in the last hour", labels=["stage"])
        messages = GaugeMetricFamily("interop_hl7_messages", "HL7 v2 messages received, by status",
                                     labels=["status"])
        deliveries = GaugeMetricFamily("interop_outbox", "result deliveries by channel and status",
                                       labels=["channel", "status"])
        lane_open = GaugeMetricFamily("interop_lane_open", "1 while a destination's circuit breaker is open",
                                      labels=["lane"])
        lane_waiting = GaugeMetricFamily("interop_lane_waiting", "deliveries waiting per destination",
                                         labels=["lane"])
        with self.hub.pool.connection(timeout=3) as conn:
            for row in figures.jobs_by_status(conn, self.hub.ctx.policies.pool("analysis")):
                depth.add_metric([row["status"]], row["n"])
            for row in figures.stage_seconds(conn):
                stages.add_metric([row["stage"]], row["n"], row["total"])
            for status, n in sorted(hl7_messages.counts(conn).items()):
                messages.add_metric([status], n)
            for row in figures.deliveries(conn, DELIVERY_KINDS):
                deliveries.add_metric([CHANNEL_OF[row["kind"]], SHOWN_STATUS.get(row["status"], row["status"])], row["n"])
            for lane in queue.lanes(conn):
                lane_open.add_metric([lane["name"]], 1 if lane["open"] else 0)
                lane_waiting.add_metric([lane["name"]], lane["waiting"])
        yield from (depth, stages, messages, deliveries, lane_open, lane_waiting)


@bp.get("/metrics")
def metrics() -> Response:
    hub = current_app.extensions["interop"]
    registry = CollectorRegistry()
    if hub.settings.metrics_dir:
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry, path=str(hub.settings.metrics_dir))  # type: ignore[no-untyped-call]
    else:
        registry.register(REQUESTS)
        registry.register(LATENCY)
    try:
        registry.register(QueueCollector(hub))
        body = generate_latest(registry)
    except Exception:  # database down: still serve the process metrics
        registry = CollectorRegistry()
        registry.register(REQUESTS)
        body = generate_latest(registry)
    return Response(body, content_type=CONTENT_TYPE_LATEST)
