"""The Flask app factory: gunicorn calls `create_app()` in each worker process.

Nothing connects at import time or in the factory: the connection pool opens on the first
request in each process (after gunicorn forks), and closes with the process.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from flask import Flask, Response, request
from psycopg_pool import ConnectionPool
from werkzeug.exceptions import HTTPException

from ..config import Settings
from ..store import db
from ..store.search_params import SearchParam, load
from ..analytics import api as analytics_api
from ..web import worklist
from . import api, errors, health, outbox_api, review_api

log = logging.getLogger("interop.fhir")

HTTP_STATUS_ERRORS: dict[int, type[errors.FhirError]] = {
    400: errors.BadRequest, 404: errors.NotFoundError, 405: errors.MethodNotAllowed,
    406: errors.NotAcceptable, 413: errors.TooLarge, 415: errors.UnsupportedMediaType,
}


@dataclass
class Hub:
    """Per-process state of the API: settings, search parameters, and a lazily opened pool."""

    settings: Settings
    params: dict[str, dict[str, SearchParam]]
    started: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    _pool: ConnectionPool | None = None

    @property
    def pool(self) -> ConnectionPool:
        if self._pool is None:
            if not self.settings.database_url:
                raise errors.Unavailable("DATABASE_URL is not set")
            self._pool = db.pool(self.settings.database_url)
            self._pool.open(wait=True, timeout=30)
        return self._pool


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    app = Flask("interop")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["interop"] = Hub(settings, load(settings.mappings_dir))
    app.register_blueprint(api.bp)
    app.register_blueprint(review_api.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(outbox_api.bp)  # delivery: GET /outbox?status=dead,rejected, POST /outbox/<id>/replay
    app.register_blueprint(analytics_api.bp)  # provincial analytics dashboard, JSON, CSV, MeasureReport at /analytics
    app.register_blueprint(worklist.bp)  # radiologists' reading worklist (HTML): /worklist, review and acknowledge forms

    @app.errorhandler(errors.FhirError)
    def fhir_error(exc: errors.FhirError) -> Response:
        return api.error_response(exc)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        kind = HTTP_STATUS_ERRORS.get(exc.code or 500, errors.FhirError)
        wrapped = kind(exc.description or exc.name)
        wrapped.status = exc.code or 500
        return api.error_response(wrapped)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        # The exception text may quote patient data or SQL: log its type and where, not its text.
        log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url_rule)
        log.debug("unhandled error", exc_info=exc)
        wrapped = errors.FhirError("internal error; the request was not applied")
        wrapped.status, wrapped.code = 500, "exception"
        return api.error_response(wrapped)

    @app.before_request
    def _start_timer() -> None:
        request.environ["interop.start"] = time.perf_counter()

    @app.after_request
    def _count(response: Response) -> Response:
        health.observe_request(request, response)
        return response

    return app
