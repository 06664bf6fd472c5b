"""The analytics blueprint at /analytics: the dashboard page, JSON per view, CSV exports with
small cells suppressed, the province's weekly MeasureReport.

Reads go to ANALYTICS_DATABASE_URL when set (a read replica), else to the hub's own pool.
Every query is parameterised (queries.py); errors never echo their text to the client.
"""
from __future__ import annotations

import json
import logging
from datetime import date, timedelta
from typing import Any

from flask import Blueprint, Response, current_app, render_template, request
from psycopg_pool import ConnectionPool

from ..services.analytics import export, forecasting
from ..store import analytics as queries
from ..store import db
from .dashboard_labels import LABELS

log = logging.getLogger("interop.analytics")
bp = Blueprint("analytics", __name__, url_prefix="/analytics", template_folder="templates",
               static_folder="static/analytics", static_url_path="/static")


def _pool() -> ConnectionPool:
    hub = current_app.extensions["interop"]
    url = hub.settings.analytics_database_url
    if not url:
        return hub.pool  # type: ignore[no-any-return]
    pool = current_app.extensions.get("interop.analytics.pool")
    if pool is None:
        pool = db.pool(url, max_size=4)
        pool.open(wait=True, timeout=30)
        current_app.extensions["interop.analytics.pool"] = pool
    return pool


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body, default=str, ensure_ascii=False), status=status, mimetype="application/json")


def _error(message: str, status: int) -> Response:
    return _json({"error": message}, status)


@bp.errorhandler(queries.FilterError)
def _bad_filter(exc: queries.FilterError) -> Response:
    return _error(str(exc), 400)  # our own message, never patient data


@bp.get("/")
def dashboard() -> str:
    lang = request.args.get("lang", "vi")
    lang = lang if lang in LABELS else "vi"
    return render_template("analytics/dashboard.html", lang=lang, labels=LABELS[lang],
                           labels_json=json.dumps(LABELS[lang], ensure_ascii=False))


@bp.get("/api/options")
def options() -> Response:
    with _pool().connection() as conn:
        return _json(queries.options(conn))


@bp.get("/api/<name>")
def view(name: str) -> Response:
    if name not in queries.VIEWS:
        return _error(f"unknown view; one of {', '.join(queries.VIEWS)}", 404)
    f = queries.Filters.from_args(request.args)
    with _pool().connection() as conn:
        return _json({"filters": f.as_args(), "rows": queries.VIEWS[name][0](conn, f)})


@bp.get("/api/forecast")
def forecasts() -> Response:
    f = queries.Filters.from_args(request.args)
    try:
        horizon = max(4, min(8, int(request.args.get("horizon", "8"))))
    except ValueError:
        return _error("horizon must be an integer (4 to 8 weeks)", 400)
    with _pool().connection() as conn:
        return _json({"filters": f.as_args(), "forecasts": forecasting.forecasts(conn, f, horizon)})


@bp.get("/export/<name>.csv")
def export_csv(name: str) -> Response:
    if name not in queries.VIEWS:
        return _error(f"unknown view; one of {', '.join(queries.VIEWS)}", 404)
    fn, counts, stats = queries.VIEWS[name]
    f = queries.Filters.from_args(request.args)
    with _pool().connection() as conn:
        body = export.to_csv(fn(conn, f), counts, stats)
    return Response(body, mimetype="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="{name}.csv"'})


@bp.get("/measure-report")
def measure_report() -> Response:
    try:
        week = date.fromisoformat(request.args["week"]) if request.args.get("week") else \
            date.today() - timedelta(days=date.today().weekday() + 7)  # the last complete week
    except ValueError:
        return _error("week must be a date (YYYY-MM-DD)", 400)
    with _pool().connection() as conn:
        report = export.measure_report(conn, week, province=request.args.get("province") or None)
    return Response(json.dumps(report, ensure_ascii=False), mimetype="application/fhir+json")
