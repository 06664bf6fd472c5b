"""Provincial analytics with 1 million synthetic studies: seed (COPY), refresh, and p95 per view.

    DATABASE_URL=postgresql://... python bench/analytics_views.py [--studies 1000000] [--repeat 20]

Without DATABASE_URL it starts an embedded PostgreSQL in a temporary directory. It seeds the
studies (and 14 findings each) into a fresh database, refreshes the materialised views, then
times every dashboard endpoint through the Flask app (JSON serialisation included) with the
dashboard's default filter (the last 26 weeks) and with a district + finding filter, as a SMART
backend client with the `hub:analytics` scope (so each call also pays the token check and the
audit record of the read). Prints the figures and, with --write, appends them to docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import uuid
from pathlib import Path

from flask.testing import FlaskClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the checkout

from bench.common import append_to_benchmarks, migrated_database
from interop.app import create_app
from interop.config import Settings
from interop.services.analytics import facts
from interop.store import db
from interop.store import security as accounts
from scripts import smart
from scripts.synthetic import analytics as seed

ENDPOINTS = ["findings_weekly", "districts", "turnaround", "workload", "backlog", "agreement", "critical"]


def p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


def analytics_client(client: FlaskClient, url: str) -> FlaskClient:
    """The test client with the bearer token of a new SMART backend client allowed `hub:analytics`."""
    key, client_id, scope = smart.ClientKey.new(), uuid.uuid4().hex, "hub:analytics"
    with db.connect(url, autocommit=True) as conn:
        accounts.add_client(conn, client_id, "bench analytics", scope, jwks=key.jwks)
    answer = client.post("/auth/token", data=smart.token_form(
        key.assertion(client_id, "http://localhost/auth/token"), scope))
    assert answer.status_code == 200, answer.get_json()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {answer.get_json()['access_token']}"
    return client


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--studies", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--write", action="store_true", help="append the figures to docs/BENCHMARKS.md")
    args = parser.parse_args()
    lines: list[str] = []
    with migrated_database("bench_analytics") as url:
        settings = Settings.from_env({"DATABASE_URL": url})
        with db.connect(url, autocommit=True) as conn:
            start = time.perf_counter()
            seed.seed(conn, args.studies, sites_file=settings.sites_file, mappings_dir=settings.mappings_dir)
            seeded = time.perf_counter() - start
            conn.execute("VACUUM ANALYZE analytics.study_fact")
            conn.execute("VACUUM ANALYZE analytics.finding_fact")
            start = time.perf_counter()
            refreshed = facts.refresh(conn)
            first_refresh = time.perf_counter() - start
            start = time.perf_counter()
            facts.refresh(conn)  # CONCURRENTLY, as the timer runs it
            concurrent_refresh = time.perf_counter() - start
            sizes = conn.execute(
                "SELECT (SELECT count(*) FROM analytics.finding_fact) AS findings,"
                " pg_size_pretty(pg_total_relation_size('analytics.study_fact')) AS study_size,"
                " pg_size_pretty(pg_total_relation_size('analytics.finding_fact')) AS finding_size,"
                " (SELECT count(*) FROM analytics.mv_finding_weekly) AS mv_rows,"
                " (SELECT count(*) FROM analytics.turnaround_summary) AS summary_rows").fetchone()
            last = conn.execute("SELECT max(study_day) AS d FROM analytics.study_fact").fetchone()["d"]
            district = conn.execute("SELECT district FROM analytics.study_fact LIMIT 1").fetchone()["district"]
        per_view = ", ".join(f"{k.split('.')[1]} {v:.1f} s" for k, v in refreshed.items())
        lines += [f"- seeded {args.studies:,} studies and {sizes['findings']:,} findings with COPY in {seeded:.0f} s"
                  f" (study_fact {sizes['study_size']}, finding_fact {sizes['finding_size']});",
                  f"- first refresh (materialised views, turnaround summary of every week, kept forecasts)"
                  f" {first_refresh:.1f} s "
                  f"({per_view}), "
                  f"again (REFRESH CONCURRENTLY, nothing else changed) {concurrent_refresh:.1f} s;"
                  f" mv_finding_weekly has {sizes['mv_rows']:,} rows, turnaround_summary {sizes['summary_rows']:,}."]
        app = create_app(settings)
        client = analytics_client(app.test_client(), url)
        filters = {"default (last 26 weeks)": {"end": str(last)},
                   "district + finding, 52 weeks": {"end": str(last), "start": str(last.replace(year=last.year - 1)),
                                                    "district": district, "finding": "409609008"}}
        table = ["| endpoint | " + " | ".join(f"p95 ms, {name}" for name in filters) + " |",
                 "|---|" + "---|" * len(filters)]
        paths = [f"/analytics/api/{e}" for e in ENDPOINTS] + ["/analytics/api/forecast", "/analytics/api/options",
                                                             "/analytics/export/findings_weekly.csv"]

        def row(path: str, label: str) -> None:
            cells = []
            for query in filters.values():
                samples = []
                for _ in range(args.repeat):
                    start = time.perf_counter()
                    response = client.get(path, query_string=query)
                    samples.append((time.perf_counter() - start) * 1000)
                    assert response.status_code == 200, (path, response.status_code)
                cells.append(f"{p95(samples):.0f}")
            table.append(f"| {label} | " + " | ".join(cells) + " |")
            print(table[-1], flush=True)

        for path in paths:
            row(path, f"`{path}`")
        # Between two refreshes the current week has changed: the turnaround computes it live.
        with db.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE analytics.study_fact SET updated_at = now() WHERE report_id ="
                         " (SELECT report_id FROM analytics.study_fact WHERE study_day = %s LIMIT 1)", (last,))
            row("/analytics/api/turnaround", "`/analytics/api/turnaround`, its last week changed since the refresh")
            start = time.perf_counter()
            facts.refresh(conn)
            lines.append(f"- a refresh after that change (one week of the turnaround summary recomputed, the"
                         f" materialised views and the kept forecasts again): {time.perf_counter() - start:.1f} s.")
        app.extensions["interop"].close()
    head = (f"\n## Provincial analytics (issues 6 and 14)\n\n`python bench/analytics_views.py` on {os.cpu_count()} CPUs "
            f"({platform.processor() or platform.machine()}), PostgreSQL embedded, {args.repeat} calls per endpoint "
            f"through the Flask app, measured {time.strftime('%Y-%m-%d')}:\n\n")
    text = head + "\n".join(lines) + "\n\n" + "\n".join(table) + "\n"
    print(text)
    if args.write:
        append_to_benchmarks(text)


if __name__ == "__main__":
    main()
