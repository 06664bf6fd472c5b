"""Exports: CSV of any view with small cells suppressed, and the province's weekly counts as a
FHIR R4 MeasureReport (validated with fhir.resources' R4B models, which share R4's
MeasureReport).

Small cells: a count of 1 to 4 studies is written as "<5", and a statistic computed over fewer
than 5 studies (a rate, a percentile, an agreement) as "suppressed", so that no exported cell
describes fewer than five people.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg

from ...store.analytics import Filters, findings_weekly

SMALL = 5
SUPPRESSED_COUNT = "<5"
SUPPRESSED_STAT = "suppressed"
MEASURE = "urn:interop-hub:analytics:Measure/positive-findings-weekly"
POPULATION = "http://terminology.hl7.org/CodeSystem/measure-population"


def suppress(rows: list[dict[str, Any]], counts: Sequence[str], stats: Sequence[str]) -> list[dict[str, Any]]:
    """Rows with small counts replaced by "<5" and statistics over them by "suppressed".

    The first of `counts` is the row's denominator (the studies it describes)."""
    out = []
    for row in rows:
        row = dict(row)
        base = row.get(counts[0]) if counts else None
        for name in counts:
            value = row.get(name)
            if isinstance(value, (int, float)) and 0 < value < SMALL:
                row[name] = SUPPRESSED_COUNT
        if isinstance(base, (int, float)) and base < SMALL:
            for name in stats:
                if row.get(name) is not None:
                    row[name] = SUPPRESSED_STAT
        out.append(row)
    return out


def to_csv(rows: list[dict[str, Any]], counts: Sequence[str], stats: Sequence[str]) -> str:
    rows = suppress(rows, counts, stats)
    buffer = io.StringIO()
    if not rows:
        return ""
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (v.isoformat() if isinstance(v, (date, datetime)) else v) for k, v in row.items()})
    return buffer.getvalue()


def _population(code: str, count: int | None, small: bool) -> dict[str, Any]:
    pop: dict[str, Any] = {"code": {"coding": [{"system": POPULATION, "code": code}]}}
    if count is not None and not (small and 0 < count < SMALL):
        pop["count"] = int(count)
    return pop


def measure_report(conn: psycopg.Connection[Any], week: date, *, province: str | None = None,
                   suppress_small: bool = True) -> dict[str, Any]:
    """One week's positive findings for a province: a group per finding (initial population:
    studies read for it; numerator: positives; score: per 1,000), stratified by district."""
    week = week - timedelta(days=week.weekday())
    rows = findings_weekly(conn, Filters(start=week, end=week + timedelta(days=6)))
    if province:
        rows = [r for r in rows if r["province"] == province]
    provinces = sorted({r["province"] for r in rows})
    groups: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["level"] != "province":
            continue
        key = f"{r['code_system']}|{r['code']}"
        concept: dict[str, Any] = {"text": r["label"]}
        if r["code_system"]:
            concept["coding"] = [{"system": r["code_system"], "code": r["code"], "display": r["label"]}]
        group = groups.setdefault(key, {"code": concept, "population": [], "stratifier": [
            {"code": [{"text": "district"}], "stratum": []}], "_studies": 0, "_positives": 0})
        group["_studies"] += int(r["studies"])
        group["_positives"] += int(r["positives"])
    for r in rows:
        if r["level"] != "district":
            continue
        group = groups[f"{r['code_system']}|{r['code']}"]
        group["stratifier"][0]["stratum"].append({
            "value": {"text": r["district"]},
            "population": [_population("initial-population", r["studies"], suppress_small),
                           _population("numerator", r["positives"], suppress_small)],
        })
    out_groups = []
    for group in groups.values():
        studies, positives = group.pop("_studies"), group.pop("_positives")
        group["population"] = [_population("initial-population", studies, suppress_small),
                               _population("numerator", positives, suppress_small)]
        if studies >= SMALL or not suppress_small:
            group["measureScore"] = {"value": round(1000.0 * positives / studies, 2) if studies else 0,
                                     "unit": "per 1000 studies"}
        out_groups.append(group)
    report: dict[str, Any] = {
        "resourceType": "MeasureReport",
        "status": "complete",
        "type": "summary",
        "measure": MEASURE,
        "date": datetime.now(UTC).isoformat(),
        "period": {"start": week.isoformat(), "end": (week + timedelta(days=6)).isoformat()},
        "reporter": {"display": f"Imaging AI hub, {province or ', '.join(provinces) or 'all provinces'}"},
        "improvementNotation": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/measure-improvement-notation", "code": "decrease"}]},
        "group": out_groups,
    }
    validate(report)
    return report


def validate(report: dict[str, Any]) -> None:
    """Raise if the MeasureReport is not valid FHIR (R4B's MeasureReport is R4's)."""
    from fhir.resources.R4B.measurereport import MeasureReport

    MeasureReport.model_validate(report) if hasattr(MeasureReport, "model_validate") else MeasureReport.parse_obj(report)
