"""Liveness, readiness and Prometheus metrics. None of these need auth.

Queue depth and job latency by stage are read from PostgreSQL at scrape time, so every
replica reports the same shared truth; request counters use prometheus_client's
multiprocess mode under gunicorn (PROMETHEUS_MULTIPROC_DIR).
"""
from __future__ import annotations

import os
import time
from typing import Any, Iterator

import requests
from flask import Blueprint, Request, Response, current_app
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

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
            conn.execute("SELECT 1 FROM job LIMIT 1")
        checks["database"] = "ok"
        checks["queue"] = "ok"
    except Exception as exc:  # readiness reports, it does not raise
        checks["database"] = f"unavailable ({type(exc).__name__})"
        checks["queue"] = "unknown"
    url = hub.settings.triton_url
    if not url:
        checks["triton"] = "not configured"
    else:
        try:
            base = url if url.startswith("http") else f"http://{url}"
            ok = requests.get(f"{base}/v2/health/ready", timeout=2).status_code == 200
            checks["triton"] = "ok" if ok else "not ready"
        except requests.RequestException as exc:
            checks["triton"] = f"unavailable ({type(exc).__name__})"
    return checks


@bp.get("/readyz")
def readyz() -> Response:
    import orjson

    checks = _checks()
    ready = all(v == "ok" for v in checks.values())
    return Response(orjson.dumps({"status": "ready" if ready else "not ready", "checks": checks}),
                    status=200 if ready else 503, content_type="application/json")


class QueueCollector(Collector):
    """Queue depth by status and job stage latency (last hour), from the shared database."""

    def __init__(self, pool: Any):
        self.pool = pool

    def collect(self) -> Iterator[Any]:
        depth = GaugeMetricFamily("interop_jobs", "jobs in the queue by status", labels=["status"])
        stages = SummaryMetricFamily("interop_job_stage_seconds",
                                     "time per pipeline stage, jobs finished in the last hour",
                                     labels=["stage"])
        messages = GaugeMetricFamily("interop_hl7_messages", "HL7 v2 messages received, by status",
                                     labels=["status"])
        deliveries = GaugeMetricFamily("interop_outbox", "result deliveries by channel and status",
                                       labels=["channel", "status"])
        with self.pool.connection(timeout=3) as conn:
            for row in conn.execute("SELECT status, count(*) AS n FROM job GROUP BY status"):
                depth.add_metric([row["status"]], row["n"])
            for row in conn.execute(
                "SELECT key AS stage, count(*) AS n, sum(value::float) AS total"
                " FROM job, jsonb_each_text(timings)"
                " WHERE finished_at > now() - interval '1 hour' GROUP BY key ORDER BY key"
            ):
                stages.add_metric([row["stage"]], row["n"], row["total"])
            for row in conn.execute("SELECT status, count(*) AS n FROM hl7_message GROUP BY status"):
                messages.add_metric([row["status"]], row["n"])
            for row in conn.execute("SELECT channel, status, count(*) AS n FROM outbox GROUP BY channel, status"):
                deliveries.add_metric([row["channel"], row["status"]], row["n"])
        yield depth
        yield stages
        yield messages
        yield deliveries


@bp.get("/metrics")
def metrics() -> Response:
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(REQUESTS)
        registry.register(LATENCY)
    try:
        registry.register(QueueCollector(current_app.extensions["interop"].pool))
        body = generate_latest(registry)
    except Exception:  # database down: still serve the process metrics
        registry = CollectorRegistry()
        registry.register(REQUESTS)
        body = generate_latest(registry)
    return Response(body, content_type=CONTENT_TYPE_LATEST)
