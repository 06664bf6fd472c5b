"""The worklist with a year of signed reports: time to list, count and find "next" per filter.

    DATABASE_URL=postgresql://... python bench/worklist.py [--final 100000] [--waiting 2000] [--repeat 3]

Without DATABASE_URL it starts an embedded PostgreSQL in a temporary directory. One report is
made the way the hub makes it (patient, order, study, Observations, report); it is then copied
in SQL as `--final` signed and `--waiting` preliminary reports, each with the search-index rows
the worklist reads (status, issued, site tag), issued a minute apart. Each filter is timed as the
page runs it (count, page of 500 with its Observations, studies and patients, "next"), best of
`--repeat`. The reference is the same page for the waiting list, the one radiologists keep open.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the checkout

from bench.common import append_to_benchmarks, migrated_database
from interop.store import db
from interop.web import waiting
from tests.test_worklist_order import MODEL, ordered_report

FILTERS = [("waiting (reference)", waiting.Filters()),
           ("waiting, one site", waiting.Filters(site="BVDKDN")),
           ("signed", waiting.Filters(status="final")),
           ("signed, one site", waiting.Filters(status="final", site="BVDKDN")),
           ("signed, modality", waiting.Filters(status="final", modality="DX")),
           ("signed, dates", waiting.Filters(status="final", date_from="2026-01-01", date_to="2026-12-31"))]


def copy_reports(conn: Any, report_id: str, status: str, n: int) -> None:
    """`n` copies of the report with this status, issued a minute apart, with their index rows."""
    conn.execute("""INSERT INTO resource (type, id, version, last_updated, deleted, body)
        SELECT type, id || %(tag)s || g, version, last_updated, deleted,
               jsonb_set(jsonb_set(jsonb_set(body, '{id}', to_jsonb(id || %(tag)s || g)), '{status}', to_jsonb(%(status)s::text)),
                         '{issued}', to_jsonb(to_char((now() - g * interval '1 minute') AT TIME ZONE 'UTC',
                                                      'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')))
          FROM resource, generate_series(1, %(n)s) g WHERE type = 'DiagnosticReport' AND id = %(id)s""",
                 {"tag": f"-{status}-", "status": status, "n": n, "id": report_id})
    conn.execute("""INSERT INTO search_index (type, id, param, system, value, last_updated)
        SELECT r.type, r.id, x.param, x.system,
               CASE x.param WHEN 'status' THEN r.body->>'status' WHEN 'issued' THEN r.body->>'issued' ELSE x.value END,
               r.last_updated
          FROM (SELECT * FROM resource WHERE type = 'DiagnosticReport' AND id LIKE %(like)s OFFSET 0) r
         CROSS JOIN (SELECT * FROM search_index WHERE type = 'DiagnosticReport' AND id = %(id)s
                        AND param IN ('status', 'issued', '_tag') OFFSET 0) x""",
                 {"like": f"%-{status}-%", "id": report_id})


def best(fn: Any, repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--final", type=int, default=100_000)
    parser.add_argument("--waiting", type=int, default=2_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="append the figures to docs/BENCHMARKS.md")
    args = parser.parse_args()
    lines: list[str] = []
    with migrated_database("bench_worklist") as url:
        made = ordered_report(url, mrn="BENCH-1", name="Tran Van Bench", birth="1970-01-01", sex="male",
                              priority="urgent", reason="Cough", note="", site="BVDKDN", study_date="20261120")
        lookups: dict[str, Any] = {"models": {MODEL.name: MODEL}, "sites": {}, "alerts": {}}
        with db.connect(url, autocommit=True) as conn:
            copy_reports(conn, made["id"], "final", args.final)
            copy_reports(conn, made["id"], "preliminary", args.waiting)
            conn.execute("VACUUM ANALYZE")
            reference = None
            for label, filters in FILTERS:
                listed, (total, page) = best(lambda f=filters: waiting.waiting(conn, filters=f, **lookups), args.repeat)
                following, _ = best(lambda f=filters, p=page: waiting.following(conn, p[len(p) // 2].id, f), args.repeat)
                reference = reference or listed
                lines.append(f"| {label} | {total:,} | {listed * 1000:.0f} ms ({listed / reference:.1f}×) |"
                             f" {following * 1000:.0f} ms |")
    text = (f"\n### Worklist with {args.final:,} signed and {args.waiting:,} waiting reports\n\n"
            f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} vCPU ({platform.machine()}), PostgreSQL embedded,"
            f" best of {args.repeat}; a page is 500 rows with everything they show.\n\n"
            "| list | reports | page (× the waiting list) | next |\n|---|---|---|---|\n" + "\n".join(lines) + "\n")
    print(text)
    if args.write:
        append_to_benchmarks(text)


if __name__ == "__main__":
    main()
