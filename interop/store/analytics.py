"""The provincial analytics schema: writing the de-identified facts, refreshing the summary
views, and the views as parameterised queries with the dashboard's filters.

Each query returns plain rows (dicts). The unfiltered form of each is a SQL view in schema
`analytics` (migration 0005, documented in docs/ANALYTICS.md); these run the same aggregation
with a WHERE clause built only from fixed column names and bound parameters.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import date, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row, tuple_row

from .db import scalar

DEFAULT_WEEKS = 26

COLUMNS = ("report_id", "patient_key", "key_id", "age_band", "sex", "district", "commune", "province", "facility",
           "facility_district", "modality", "body_part", "procedure_code", "model_name", "model_version",
           "report_status", "critical", "positives", "ordered_at", "images_at", "ai_result_at", "ai_delivered_at",
           "reviewed_at", "delivered_at", "acknowledged_at", "reviewer_group", "transfer_recommended",
           "transfer_done", "analysable")
FINDING_COLUMNS = ("report_id", "observation_id", "code_system", "code", "label", "probability", "ai_positive",
                   "verdict", "radiologist_positive", "final_positive", "critical")


def _names(columns: tuple[str, ...]) -> sql.Composed:
    return sql.SQL(", ").join(map(sql.Identifier, columns))


def _insert(table: sql.Identifier, columns: tuple[str, ...]) -> sql.Composed:
    return sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
        table, _names(columns), sql.SQL(", ").join(sql.Placeholder() * len(columns)))


_KEYS = ("patient_key", "key_id")  # kept on an existing row unless re-keyed (or not set yet)
# A real report's facts are never marked synthetic, even where an id happens to look synthetic.
_UPSERT = sql.SQL("{insert} ON CONFLICT (report_id) DO UPDATE SET {copied}, {keys}, synthetic = false,"
                  " updated_at = now()").format(
    insert=_insert(sql.Identifier("analytics", "study_fact"), COLUMNS),
    copied=sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c))
                              for c in COLUMNS[1:] if c not in _KEYS),
    keys=sql.SQL(", ").join(
        sql.SQL("{0} = CASE WHEN %s OR analytics.study_fact.patient_key IS NULL THEN EXCLUDED.{0}"
                " ELSE analytics.study_fact.{0} END").format(sql.Identifier(c)) for c in _KEYS))
_INSERT_FINDING = _insert(sql.Identifier("analytics", "finding_fact"), FINDING_COLUMNS)
MATERIALISED = ("analytics.mv_study_daily", "analytics.mv_finding_weekly")


# -- writing ----------------------------------------------------------------------------------------
def upsert_facts(conn: psycopg.Connection[Any], fact: dict[str, Any], findings: list[tuple[Any, ...]], *,
                 rekey: bool = False) -> None:
    """One report's study fact and finding facts, replacing what was there (a savepoint inside the
    caller's transaction). The patient key of an existing row is kept unless `rekey`."""
    with conn.transaction():
        conn.execute(_UPSERT, [*(fact[c] for c in COLUMNS), rekey, rekey])
        conn.execute("DELETE FROM analytics.finding_fact WHERE report_id = %s", (fact["report_id"],))
        if findings:
            with conn.cursor() as cur:
                cur.executemany(_INSERT_FINDING, [(fact["report_id"], *f) for f in findings])


def ai_report_ids(conn: psycopg.Connection[Any], device_extension: str) -> list[str]:
    """Every stored AI report (those naming their model's Device), oldest first."""
    rows = conn.execute("SELECT id FROM resource WHERE type = 'DiagnosticReport' AND NOT deleted"
                        " AND body->'extension' @> %s::jsonb ORDER BY last_updated, id",
                        (f'[{{"url": "{device_extension}"}}]',)).fetchall()
    return [r["id"] for r in rows]


def forget_deleted_reports(conn: psycopg.Connection[Any]) -> None:
    """Facts whose report is gone (deleted) are removed too (synthetic demo facts are kept)."""
    conn.execute("DELETE FROM analytics.study_fact s WHERE NOT EXISTS (SELECT 1 FROM resource r WHERE"
                 " r.type = 'DiagnosticReport' AND r.id = s.report_id AND NOT r.deleted) AND NOT s.synthetic")


# -- synthetic data (the demo's and the benchmark's): marked by `synthetic`, migration 0019 -----------
# What the synthetic writer COPYs (synthetic = true); `analysable` keeps its default (true): the
# synthetic studies are all read by the AI.
SYNTHETIC_COLUMNS = (*(c for c in COLUMNS if c != "analysable"), "synthetic")
_SYNTHETIC_LOCK = 0x73796E74  # one synthetic writer at a time


def synthetic_start(conn: psycopg.Connection[Any]) -> int:
    """Inside the caller's transaction: wait for any other synthetic writer (a lock held until the
    transaction ends), then the first free index of the report ids `synthetic-N` (real facts with
    such an id included), so that what is written now adds to what is there."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SYNTHETIC_LOCK,))
    value = scalar(conn, "SELECT coalesce(max(substring(report_id FROM '^synthetic-([0-9]{1,15})$')::bigint) + 1, 0)"
                         " FROM analytics.study_fact WHERE report_id LIKE 'synthetic-%'")
    return int(str(value))


def synthetic_count(conn: psycopg.Connection[Any]) -> int:
    """How many synthetic studies the facts hold."""
    return int(str(scalar(conn, "SELECT count(*) FROM analytics.study_fact WHERE synthetic")))


def clear_synthetic(conn: psycopg.Connection[Any]) -> int:
    """Delete every synthetic study (and, by cascade, its findings); real facts are not touched.
    Returns how many."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SYNTHETIC_LOCK,))
        return conn.execute("DELETE FROM analytics.study_fact WHERE synthetic").rowcount


def delivered(conn: psycopg.Connection[Any], series: str, site: str, reviewed_version: int | None) -> dict[str, Any]:
    """When the site first accepted the AI's version (`ai_at`) and the reviewed one (`reviewed_at`)."""
    row = conn.execute(
        "SELECT min(finished_at) FILTER (WHERE %(v)s::int IS NULL OR seq < %(v)s::int) AS ai_at,"
        " min(finished_at) FILTER (WHERE seq >= %(v)s::int) AS reviewed_at FROM job"
        " WHERE series = %(series)s AND status = 'done' AND kind IN ('deliver-hl7', 'deliver-fhir')"
        " AND split_part(lane, ':', 1) = %(site)s",
        {"v": reviewed_version, "series": series, "site": site}).fetchone()
    return dict(row) if row else {}


def refresh(conn: psycopg.Connection[Any]) -> dict[str, float]:
    """Refresh the materialised views (CONCURRENTLY once populated), then the turnaround summary
    of the weeks that changed; seconds per relation.

    Needs an autocommit connection or runs in the caller's transaction (then not concurrently).
    """
    out: dict[str, float] = {}
    for name in MATERIALISED:
        start = time.perf_counter()
        schema, view = name.split(".")
        populated = scalar(conn, "SELECT ispopulated FROM pg_matviews WHERE schemaname = %s AND matviewname = %s",
                           (schema, view))
        conn.execute(sql.SQL("REFRESH MATERIALIZED VIEW {}{}").format(
            sql.SQL("CONCURRENTLY ") if populated else sql.SQL(""), sql.Identifier(schema, view)))
        out[name] = round(time.perf_counter() - start, 3)
        _log_refresh(conn, name, out[name])
    start = time.perf_counter()
    refresh_turnaround(conn)
    out[TURNAROUND_SUMMARY] = round(time.perf_counter() - start, 3)
    _log_refresh(conn, TURNAROUND_SUMMARY, out[TURNAROUND_SUMMARY])
    return out


def _log_refresh(conn: psycopg.Connection[Any], name: str, seconds: float) -> None:
    conn.execute("INSERT INTO analytics.refresh_log (name, refreshed_at, seconds) VALUES (%s, now(), %s)"
                 " ON CONFLICT (name) DO UPDATE SET refreshed_at = EXCLUDED.refreshed_at,"
                 " seconds = EXCLUDED.seconds", (name, seconds))


TURNAROUND_SUMMARY = "analytics.turnaround_summary"
_REFRESH_LOCK = 0x7475726E  # one turnaround refresh at a time, across processes


def refresh_turnaround(conn: psycopg.Connection[Any]) -> list[date]:
    """Recompute the turnaround summary of the weeks whose facts changed (the stale weeks that the
    triggers of migration 0012 recorded); returns those weeks.

    Read committed, one transaction: the stale marks are taken (deleted) first, then the weeks are
    recomputed by a later statement, whose snapshot sees every fact whose mark was taken. A fact
    committed meanwhile leaves its mark for the next refresh, and readers compute it live until then.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_REFRESH_LOCK,))
        with conn.cursor(row_factory=tuple_row) as cur:
            weeks = sorted({r[0] for r in cur.execute("DELETE FROM analytics.stale_week RETURNING study_week")})
        if weeks:
            conn.execute("DELETE FROM analytics.turnaround_summary WHERE study_week = ANY(%s)", (weeks,))
            conn.execute("INSERT INTO analytics.turnaround_summary SELECT * FROM analytics.turnaround_rollup(%s)",
                         (weeks,))
    return weeks


def last_day(conn: psycopg.Connection[Any]) -> date | None:
    """The last day with studies in the rollup (the dashboard's default period ends there)."""
    value = scalar(conn, "SELECT max(study_day) FROM analytics.mv_study_daily")
    return value if isinstance(value, date) else None


_FORECAST_LOCK = 0x66637374  # one replacement of the kept forecasts at a time, across processes


def keep_forecasts(conn: psycopg.Connection[Any], bodies: Mapping[str, Any]) -> None:
    """Replace the kept forecasts with `bodies` (digest of the inputs -> the forecast as JSON).
    Two refreshes at once (two workers, each with a due refresh job) replace them one after the
    other: without the lock both deleted what they saw and the second's copy broke the key."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_FORECAST_LOCK,))
        conn.execute("DELETE FROM analytics.forecast_cache")
        with conn.cursor() as cur, cur.copy("COPY analytics.forecast_cache (key, body) FROM STDIN") as copy:
            for key, body in bodies.items():
                copy.write_row((key, json.dumps(body)))


def kept_forecasts(conn: psycopg.Connection[Any], keys: list[str]) -> dict[str, dict[str, Any]]:
    """The kept forecasts among `keys`."""
    if not keys:
        return {}
    with conn.cursor(row_factory=tuple_row) as cur:
        return {k: b for k, b in cur.execute("SELECT key, body FROM analytics.forecast_cache WHERE key = ANY(%s)",
                                             (keys,))}


# -- reading: the dashboard's views ---------------------------------------------------------------


class FilterError(ValueError):
    """A filter value the dashboard cannot use (HTTP 400)."""


@dataclass(frozen=True)
class Filters:
    start: date
    end: date
    district: str | None = None
    facility: str | None = None
    modality: str | None = None
    finding: str | None = None  # a finding code

    @classmethod
    def from_args(cls, args: Mapping[str, str], today: date | None = None) -> Filters:
        today = today or date.today()
        try:
            end = date.fromisoformat(args["end"]) if args.get("end") else today
            start = date.fromisoformat(args["start"]) if args.get("start") else end - timedelta(weeks=DEFAULT_WEEKS)
        except ValueError:
            raise FilterError("start and end must be dates (YYYY-MM-DD)") from None
        if start > end:
            raise FilterError("start is after end")
        if (end - start).days > 3 * 366:
            raise FilterError("the period is limited to three years")

        def text(name: str) -> str | None:
            value = (args.get(name) or "").strip()
            if len(value) > 100:
                raise FilterError(f"{name} is too long")
            return value or None

        return cls(start, end, text("district"), text("facility"), text("modality"), text("finding"))

    def as_args(self) -> dict[str, str]:
        out = {"start": self.start.isoformat(), "end": self.end.isoformat()}
        for name in ("district", "facility", "modality", "finding"):
            if getattr(self, name):
                out[name] = str(getattr(self, name))
        return out


def _week_start(day: date) -> date:
    return day - timedelta(days=day.weekday())


def _where(f: Filters, time_col: str, available: tuple[str, ...], weekly: bool) -> tuple[sql.Composed, dict[str, Any]]:
    """WHERE clause over fixed column names; values are bound parameters."""
    when = sql.Identifier(time_col)
    clauses = [sql.SQL("{} >= %(start)s").format(when), sql.SQL("{} <= %(end)s").format(when)]
    args: dict[str, Any] = {"start": _week_start(f.start) if weekly else f.start, "end": f.end}
    for name, column in (("district", "district"), ("facility", "facility"), ("modality", "modality"),
                         ("finding", "code")):
        value = getattr(f, name)
        if value is not None and column in available:
            clauses.append(sql.SQL("{} = {}").format(sql.Identifier(column), sql.Placeholder(name)))
            args[name] = value
    return sql.SQL(" AND ").join(clauses), args


def _rows(conn: psycopg.Connection[Any], query: str | sql.Composed, args: dict[str, Any]) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return [dict(r) for r in cur.execute(query, args).fetchall()]


FINDING_MV = ("district", "facility", "modality", "code")
STUDY_FACT = ("district", "facility", "modality")


def findings_weekly(conn: psycopg.Connection[Any], f: Filters) -> list[dict[str, Any]]:
    """Positive findings per week, district and finding (counts, rate per 1,000 studies read for
    that finding), then the province total per week and finding (level = 'province'; it ignores
    the district filter so a district can be read against its province)."""
    where, args = _where(f, "study_week", FINDING_MV, weekly=True)
    district_rows = _rows(conn, sql.SQL("""
        SELECT study_week AS week, 'district' AS level, province, district, code_system, code, label,
               sum(assessed)::bigint AS studies, sum(positive)::bigint AS positives,
               round(1000.0 * sum(positive) / nullif(sum(assessed), 0), 1)::float AS rate_per_1000
        FROM analytics.mv_finding_weekly WHERE {where}
        GROUP BY study_week, province, district, code_system, code, label
        ORDER BY study_week, province, district, code""").format(where=where), args)
    where, args = _where(replace(f, district=None), "study_week", FINDING_MV, weekly=True)
    province_rows = _rows(conn, sql.SQL("""
        SELECT study_week AS week, 'province' AS level, province, NULL::text AS district, code_system, code, label,
               sum(assessed)::bigint AS studies, sum(positive)::bigint AS positives,
               round(1000.0 * sum(positive) / nullif(sum(assessed), 0), 1)::float AS rate_per_1000
        FROM analytics.mv_finding_weekly WHERE {where}
        GROUP BY study_week, province, code_system, code, label
        ORDER BY study_week, province, code""").format(where=where), args)
    return district_rows + province_rows


def _per_1000(count: int, base: int) -> float | None:
    return round(1000.0 * count / base, 1) if base else None


def district_table(conn: psycopg.Connection[Any], f: Filters) -> list[dict[str, Any]]:
    """Per district over the period: AI-read studies, not-analysable studies, critical studies,
    positive findings, and two rates with a stated denominator: positive findings per 1,000 AI-read
    studies (with a finding chosen: that finding per 1,000 studies the AI read for it) and critical
    studies per 1,000 AI-read studies. Positives are counted per week (the rollup's grain), so their
    rate divides by the studies of the same weeks.

    A not-analysable study (the quality gate refused its images, migration 0021) is in neither a
    numerator nor a denominator: it is counted in `not_analysable` only (and in the workload)."""
    def studies_by(time_col: str, weekly: bool) -> dict[tuple[str, str], dict[str, Any]]:
        where, args = _where(f, time_col, STUDY_FACT, weekly=weekly)
        return {(r["province"], r["district"]): r for r in _rows(conn, sql.SQL("""
            SELECT province, district, sum(ai_read)::bigint AS studies, sum(ai_read_critical)::bigint AS critical,
                   sum(not_analysable)::bigint AS not_analysable
            FROM analytics.mv_study_daily WHERE {where} GROUP BY province, district""").format(where=where), args)}

    studies, of_weeks = studies_by("study_day", False), studies_by("study_week", True)
    where, args = _where(f, "study_week", FINDING_MV, weekly=True)
    found = {(r["province"], r["district"]): r for r in _rows(conn, sql.SQL("""
        SELECT province, district, sum(positive)::bigint AS positives, sum(assessed)::bigint AS assessed
        FROM analytics.mv_finding_weekly WHERE {where} GROUP BY province, district""").format(where=where), args)}
    # A district whose studies of the period were all not analysable has no finding: still listed.
    none = {"studies": 0, "critical": 0, "not_analysable": 0, "positives": 0, "assessed": 0}
    out = []
    for key in sorted(found.keys() | {k for k, r in studies.items() if r["studies"] or r["not_analysable"]}):
        base, r = studies.get(key, none), found.get(key, none)
        read = int(r["assessed"]) if f.finding else int(of_weeks.get(key, none)["studies"])
        out.append({"province": key[0], "district": key[1], "studies": int(base["studies"]),
                    "not_analysable": int(base["not_analysable"]),
                    "critical": int(base["critical"]), "positive_findings": int(r["positives"]),
                    "positives_per_1000_studies": _per_1000(int(r["positives"]), read),
                    "critical_per_1000_studies": _per_1000(int(base["critical"]), int(base["studies"]))})
    return out


def _pct(q: float, a: str, b: str, name: str) -> sql.Composed:
    """The q-quantile of minutes from column a to column b, rounded, named."""
    return sql.SQL("round((percentile_cont({q}) WITHIN GROUP (ORDER BY extract(epoch FROM {b} - {a}) / 60))"
                   "::numeric, 1)::float AS {name}").format(
        q=sql.Literal(q), a=sql.Identifier(a), b=sql.Identifier(b), name=sql.Identifier(name))


_STEPS = (("ordered_at", "ai_result_at", "order_to_ai"), ("ai_result_at", "reviewed_at", "ai_to_reviewed"),
          ("reviewed_at", "delivered_at", "reviewed_to_delivered"), ("ordered_at", "delivered_at", "order_to_delivered"))
_TURNAROUND_COLUMNS = tuple(f"{n}_p{q}" for _, _, n in _STEPS for q in (50, 90))


def turnaround(conn: psycopg.Connection[Any], f: Filters) -> list[dict[str, Any]]:
    """p50/p90 minutes per facility and week: order -> AI result -> reviewed -> delivered.

    Weeks the summary covers (analytics.turnaround_summary, the row of the filter's grain) are read
    from it; weeks whose facts changed since the last refresh (analytics.stale_week) are computed
    from study_fact here, as they always were. One statement, so one snapshot: both parts agree."""
    where, args = _where(f, "study_week", STUDY_FACT, weekly=True)
    args.update({"s_district": f.district, "s_facility": f.facility, "s_modality": f.modality})
    stored = sql.SQL(", ").join(
        sql.SQL("round({0}::numeric, 1)::float AS {0}").format(sql.Identifier(c)) for c in _TURNAROUND_COLUMNS)
    live = sql.SQL(", ").join(_pct(q, a, b, f"{n}_p{int(q * 100)}") for a, b, n in _STEPS for q in (0.5, 0.9))
    return _rows(conn, sql.SQL("""
        WITH stale AS (SELECT DISTINCT study_week FROM analytics.stale_week
                       WHERE study_week >= %(start)s AND study_week <= %(end)s)
        SELECT study_week AS week, province, facility, studies, {stored}
        FROM analytics.turnaround_summary
        WHERE study_week >= %(start)s AND study_week <= %(end)s
          AND district IS NOT DISTINCT FROM %(s_district)s::text AND modality IS NOT DISTINCT FROM %(s_modality)s::text
          AND (%(s_facility)s::text IS NULL OR facility = %(s_facility)s::text)
          AND study_week NOT IN (SELECT study_week FROM stale)
        UNION ALL
        SELECT study_week AS week, province, facility, count(*) AS studies, {live}
        FROM analytics.study_fact WHERE {where} AND report_status <> 'cancelled'
          AND study_week = ANY (ARRAY(SELECT study_week FROM stale))  -- an index condition
        GROUP BY study_week, province, facility
        ORDER BY week, facility""").format(stored=stored, live=live, where=where), args)


def workload(conn: psycopg.Connection[Any], f: Filters) -> list[dict[str, Any]]:
    """Studies per facility per day, by modality."""
    where, args = _where(f, "study_day", STUDY_FACT, weekly=False)
    return _rows(conn, sql.SQL("""
        SELECT study_day AS day, province, facility, modality, sum(studies)::bigint AS studies
        FROM analytics.mv_study_daily WHERE {where}
        GROUP BY study_day, province, facility, modality ORDER BY study_day, facility, modality""").format(where=where), args)


def backlog(conn: psycopg.Connection[Any], f: Filters) -> list[dict[str, Any]]:
    """Reports waiting for a radiologist now, per reviewing group (the period does not apply)."""
    clauses: list[sql.Composable] = [sql.SQL("report_status = 'preliminary'")]
    args: dict[str, Any] = {}
    for name in ("district", "facility", "modality"):
        if getattr(f, name):
            clauses.append(sql.SQL("{} = {}").format(sql.Identifier(name), sql.Placeholder(name)))
            args[name] = getattr(f, name)
    return _rows(conn, sql.SQL("""
        SELECT reviewer_group, count(*) AS waiting,
               round((extract(epoch FROM now() - min(ai_result_at)) / 3600)::numeric, 1)::float AS oldest_hours,
               round((percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM now() - ai_result_at))
                      / 3600)::numeric, 1)::float AS median_wait_hours,
               count(*) FILTER (WHERE ai_result_at < now() - interval '24 hours') AS over_24h,
               count(*) FILTER (WHERE critical) AS critical
        FROM analytics.study_fact WHERE {where}
        GROUP BY reviewer_group ORDER BY reviewer_group""").format(where=sql.SQL(" AND ").join(clauses)), args)


def agreement(conn: psycopg.Connection[Any], f: Filters) -> list[dict[str, Any]]:
    """AI versus the radiologist's verdict per model version and finding, with counts."""
    where, args = _where(f, "study_week", FINDING_MV, weekly=True)
    return _rows(conn, sql.SQL("""
        SELECT model_name, model_version, code_system, code, label,
               sum(reviewed)::bigint AS reviewed, sum(agree)::bigint AS agree, sum(disagree)::bigint AS disagree,
               sum(added)::bigint AS added, sum(tp)::bigint AS tp, sum(fp)::bigint AS fp,
               sum(fn)::bigint AS fn, sum(tn)::bigint AS tn,
               round(sum(agree)::numeric / nullif(sum(agree) + sum(disagree), 0), 3)::float AS agreement,
               round(sum(tp)::numeric / nullif(sum(tp) + sum(fn), 0), 3)::float AS sensitivity,
               round(sum(tp)::numeric / nullif(sum(tp) + sum(fp), 0), 3)::float AS ppv
        FROM analytics.mv_finding_weekly WHERE {where}
        GROUP BY model_name, model_version, code_system, code, label
        HAVING sum(reviewed) > 0
        ORDER BY model_name, code, model_version""").format(where=where), args)


def critical(conn: psycopg.Connection[Any], f: Filters) -> list[dict[str, Any]]:
    """Critical findings per facility and week: counts, minutes to acknowledgement, transfers."""
    where, args = _where(f, "study_week", STUDY_FACT, weekly=True)
    return _rows(conn, sql.SQL("""
        SELECT study_week AS week, province, facility, count(*) AS critical_studies,
               count(acknowledged_at) AS acknowledged,
               {p50}, {p90},
               count(*) FILTER (WHERE transfer_recommended) AS transfers_recommended,
               count(*) FILTER (WHERE transfer_done) AS transfers_done
        FROM analytics.study_fact WHERE critical AND {where}
        GROUP BY study_week, province, facility ORDER BY study_week, facility""").format(
        where=where, p50=_pct(0.5, "ai_result_at", "acknowledged_at", "ack_minutes_p50"),
        p90=_pct(0.9, "ai_result_at", "acknowledged_at", "ack_minutes_p90")), args)


def options(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """What the filters can choose from (and the date range of the data)."""
    out: dict[str, Any] = {}
    for name, query in (
        ("districts", "SELECT DISTINCT district AS v FROM analytics.mv_study_daily ORDER BY 1"),
        ("facilities", "SELECT DISTINCT facility AS v FROM analytics.mv_study_daily ORDER BY 1"),
        ("modalities", "SELECT DISTINCT modality AS v FROM analytics.mv_study_daily ORDER BY 1"),
    ):
        out[name] = [r["v"] for r in _rows(conn, query, {})]
    out["findings"] = _rows(conn, "SELECT code, min(label) AS label, sum(positive)::bigint AS positives"
                                  " FROM analytics.mv_finding_weekly GROUP BY code ORDER BY 3 DESC, 1", {})
    span = _rows(conn, "SELECT min(study_day) AS first, max(study_day) AS last FROM analytics.mv_study_daily", {})[0]
    out["first_day"], out["last_day"] = span["first"], span["last"]
    refreshed = _rows(conn, "SELECT min(refreshed_at) AS t FROM analytics.refresh_log", {})[0]
    out["refreshed_at"] = refreshed["t"]
    return out


# name -> (function, count columns that are numbers of studies, statistics over those studies)
VIEWS: dict[str, tuple[Callable[[psycopg.Connection[Any], Filters], list[dict[str, Any]]], tuple[str, ...], tuple[str, ...]]] = {
    "findings_weekly": (findings_weekly, ("studies", "positives"), ("rate_per_1000",)),
    "districts": (district_table, ("studies", "not_analysable", "critical", "positive_findings"),
                  ("positives_per_1000_studies", "critical_per_1000_studies")),
    "turnaround": (turnaround, ("studies",), _TURNAROUND_COLUMNS),
    "workload": (workload, ("studies",), ()),
    "backlog": (backlog, ("waiting", "over_24h", "critical"), ("oldest_hours", "median_wait_hours")),
    "agreement": (agreement, ("reviewed", "agree", "disagree", "added", "tp", "fp", "fn", "tn"),
                  ("agreement", "sensitivity", "ppv")),
    "critical": (critical, ("critical_studies", "acknowledged", "transfers_recommended", "transfers_done"),
                 ("ack_minutes_p50", "ack_minutes_p90")),
}
