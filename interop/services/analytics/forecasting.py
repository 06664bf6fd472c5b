"""The forecasts the dashboard shows: which series a selection forecasts, and the forecasts the
refresh keeps so that the dashboard does not refit them on every request.

A forecast (forecast.py) is a pure function of its series — district, finding, the weeks and their
counts — and of the horizon, the back-test's hold-out and the interval's level. The refresh
(`facts.refresh`: the refresh-analytics job and `interop analytics refresh`) forecasts every
district × finding series of the dashboard's default period (the 26 weeks up to the last day with
data) from the weekly rollup (mv_finding_weekly) and keeps each in `analytics.forecast_cache` under
a digest of exactly those inputs. A request whose series has the same digest is answered from
there, byte for byte what fitting it would give; any other (another period, a facility or modality
filter, another horizon) is fitted on request. A kept forecast cannot be stale: new data change the
series, so its digest, and the request fits the new series.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import psycopg

from ...store import analytics as store
from . import forecast

MAX_SERIES = 12        # series per request
MAIN_FINDINGS = 3      # without a finding filter: the findings with most positives in the selection
DEFAULT_HORIZON = 8
HOLDOUT = 8
LEVEL = 0.95
_DIGEST_VERSION = "ets-1"  # change when forecast.py's method changes, so kept forecasts are not reused


@dataclass(frozen=True)
class Series:
    district: str
    code: str
    label: str
    start: date
    end: date                    # the last complete week (its Monday)
    rows: tuple[tuple[date, int], ...]  # (week, positives)

    def points(self) -> list[dict[str, Any]]:
        return [{"week": w, "positives": p} for w, p in self.rows]

    def digest(self, horizon: int) -> str:
        weeks, values = forecast.weekly_series(self.points(), self.start, self.end)
        payload = json.dumps([_DIGEST_VERSION, self.district, self.code, self.label, weeks[0].isoformat(),
                              weeks[-1].isoformat(), values, horizon, HOLDOUT, LEVEL])
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def fit(self, horizon: int) -> dict[str, Any]:
        return forecast.forecast(self.points(), district=self.district, code=self.code, label=self.label,
                                 start=self.start, end=self.end, horizon=horizon, holdout=HOLDOUT,
                                 level=LEVEL).as_dict()


def last_complete_week(end: date) -> date:
    """The Monday of the last complete week up to `end`: a partial week would pull the forecast down."""
    return end - timedelta(days=end.weekday()) - (timedelta(0) if end.weekday() == 6 else timedelta(weeks=1))


def selection(conn: psycopg.Connection[Any], f: store.Filters, *, every_finding: bool = False) -> list[Series]:
    """The district × finding series a selection forecasts: the finding of the filter, else the
    MAIN_FINDINGS findings with most positives (every finding with `every_finding`)."""
    rows = store.findings_weekly(conn, f)
    if f.finding:
        codes = [f.finding]
    else:
        totals: dict[str, int] = {}
        for r in rows:
            if r["level"] == "province":
                totals[r["code"]] = totals.get(r["code"], 0) + int(r["positives"])
        ranked = [c for c, _ in sorted(totals.items(), key=lambda kv: -kv[1])]
        codes = ranked if every_finding else ranked[:MAIN_FINDINGS]
    points: dict[tuple[str, str], list[tuple[date, int]]] = {}
    labels: dict[str, str] = {}
    for r in rows:
        if r["code"] in codes and r["level"] == "district":
            points.setdefault((r["district"], r["code"]), []).append((r["week"], int(r["positives"])))
            labels[r["code"]] = r["label"]
    end = last_complete_week(f.end)
    return [Series(district, code, labels[code], f.start, end, tuple(p)) for (district, code), p in sorted(points.items())]


def forecasts(conn: psycopg.Connection[Any], f: store.Filters, horizon: int = DEFAULT_HORIZON) -> list[dict[str, Any]]:
    """The forecasts of a selection (at most MAX_SERIES), kept ones read, the others fitted now."""
    series = selection(conn, f)[:MAX_SERIES]
    digests = [s.digest(horizon) for s in series]
    kept = store.kept_forecasts(conn, digests)
    return [kept.get(d) or s.fit(horizon) for s, d in zip(series, digests)]


def precompute(conn: psycopg.Connection[Any]) -> int:
    """Fit and keep every district × finding forecast of the dashboard's default period (the 26
    weeks up to the last day with data, default horizon); returns how many."""
    last = store.last_day(conn)
    kept: dict[str, dict[str, Any]] = {}
    if last is not None:
        for s in selection(conn, store.Filters.from_args({"end": last.isoformat()}), every_finding=True):
            kept[s.digest(DEFAULT_HORIZON)] = s.fit(DEFAULT_HORIZON)
    store.keep_forecasts(conn, kept)
    return len(kept)
