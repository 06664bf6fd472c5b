"""The Flask app factory: gunicorn calls `create_app()` in each worker process.

It mounts the edges that speak HTTP: the FHIR API (`fhir`), the pages for people (`web`: the
radiologists' worklist and the provincial dashboard) and the operators' endpoints (`ops`:
health, metrics, dead letters, HL7 messages). Nothing connects at import time or in the
factory: the connection pool opens on the first request in each process (after gunicorn
forks), and closes with the process.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psycopg
from flask import Flask, Response, request
from psycopg_pool import ConnectionPool, PoolTimeout
from werkzeug.exceptions import HTTPException

from . import access
from .auth import routes as auth
from .config import Settings
from .fhir import api, bulk, errors, operations, subscription_status
from .ops import admin, dicom_in, health
from .services.context import Context
from .services.security.audit import AuditWriter
from .services.security.tokens import Tokens
from .store import db
from .store.search_params import SearchParam
from .web import dashboard, worklist

log = logging.getLogger("interop.http")

HTTP_STATUS_ERRORS: dict[int, type[errors.FhirError]] = {
    400: errors.BadRequest, 404: errors.NotFoundError, 405: errors.MethodNotAllowed,
    406: errors.NotAcceptable, 413: errors.TooLarge, 415: errors.UnsupportedMediaType,
}


@dataclass
class Hub:
    """Per-process state of the HTTP edges: the services' context and a lazily opened pool."""

    ctx: Context
    started: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    _pool: ConnectionPool | None = None
    _tokens: Tokens | None = None
    _audit: AuditWriter | None = None

    @property
    def settings(self) -> Settings:
        return self.ctx.settings

    @property
    def params(self) -> dict[str, dict[str, SearchParam]]:
        return self.ctx.params

    @property
    def pool(self) -> ConnectionPool:
        if self._pool is None:
            if not self.settings.database_url:
                raise errors.Unavailable("DATABASE_URL is not set")
            self._pool = db.pool(self.settings.database_url)
            self._pool.open(wait=True, timeout=30)
        return self._pool

    @property
    def tokens(self) -> Tokens:
        """The token service of this process (its caches live as long as the process)."""
        if self._tokens is None:
            self._tokens = Tokens(self.settings)
        return self._tokens

    @property
    def audit(self) -> AuditWriter:
        """The writer of this process's read records (its thread starts with the first record)."""
        if self._audit is None:
            self._audit = AuditWriter(lambda: self.pool.connection())
        return self._audit

    def close(self) -> None:
        if self._audit is not None:
            self._audit.close()
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    app = Flask("interop")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["interop"] = Hub(Context.from_settings(settings))
    app.register_blueprint(auth.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(operations.bp)
    app.register_blueprint(subscription_status.bp)  # Subscription/$status (R4 Subscriptions Backport)
    app.register_blueprint(bulk.bp)  # $export (FHIR Bulk Data)
    app.register_blueprint(health.bp)
    app.register_blueprint(admin.bp)  # with the unmatched-studies queue (interop.ops.dicom_in)
    app.register_blueprint(dicom_in.stow)
    app.register_blueprint(dashboard.bp)
    app.register_blueprint(worklist.bp)

    @app.errorhandler(errors.FhirError)
    def fhir_error(exc: errors.FhirError) -> Response:
        return api.error_response(exc)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        kind = HTTP_STATUS_ERRORS.get(exc.code or 500, errors.FhirError)
        wrapped = kind(exc.description or exc.name)
        wrapped.status = exc.code or 500
        return api.error_response(wrapped)

    @app.errorhandler(psycopg.DataError)
    def bad_value(exc: psycopg.DataError) -> Response:
        # PostgreSQL refused a value (a NUL character, an encoding, a number out of range): the
        # request's fault, not the hub's. Nothing was stored: the transaction rolled back.
        log.info("refused value (%s) on %s %s", type(exc).__name__, request.method, request.url_rule)
        return api.error_response(errors.BadRequest("a value in the request cannot be stored or searched"))

    @app.errorhandler(psycopg.OperationalError)
    @app.errorhandler(psycopg.InterfaceError)
    @app.errorhandler(PoolTimeout)
    def database_unavailable(exc: Exception) -> Response:
        # The database went away (a failover or switchover) mid-request: nothing was applied, and
        # the client may retry (the pool checks connections, so the next request gets a live one).
        log.warning("database unavailable (%s) on %s %s", type(exc).__name__, request.method, request.url_rule)
        response = api.error_response(errors.Unavailable("the database is unavailable; the request was not applied,"
                                                         " retry shortly"))
        response.headers["Retry-After"] = "2"
        return response

    @app.errorhandler(RecursionError)
    def too_deep(exc: RecursionError) -> Response:
        return api.error_response(errors.BadRequest("the request nests too deeply"))

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

    access.install(app)  # after the timer: refusals are timed and counted too

    @app.after_request
    def _count(response: Response) -> Response:
        health.observe_request(request, response)
        return response

    return app

