"""Not-analysable studies in the provincial analytics (migration 0021): a report whose images the
quality gate refused is counted in the workload, the turnaround and the backlog, shown as a count of
its own, and kept out of every rate's numerator and denominator and out of AI-radiologist agreement,
even once a radiologist has read the study and added findings of their own."""
from __future__ import annotations

import os
import re
from typing import Any

from interop.services.analytics import export, facts
from interop.services.context import Context
from interop.store import analytics as queries
from interop.store.db import connect, migrations
from tests.test_analytics import CODE, ai_report, ctx, review, today_filters  # noqa: F401  (ctx: a fixture)

REASONS = ("image is empty (no contrast)",)


def _five(db_url: str, ctx: Context) -> dict[str, list[str]]:  # noqa: F811
    """Bien Hoa, one day: three studies the AI read (one atelectasis, two with nothing) and two whose
    images the quality gate refused."""
    read = [ai_report(db_url, ctx, 1, site="BVDKDN", positives={"Atelectasis": 0.9}),
            ai_report(db_url, ctx, 2, site="BVDKDN", positives={}),
            ai_report(db_url, ctx, 3, site="BVDKDN", positives={})]
    refused = [ai_report(db_url, ctx, n, site="BVDKDN", positives={}, refused=REASONS) for n in (4, 5)]
    with connect(db_url, autocommit=True) as conn:
        facts.refresh(conn)
    return {"read": read, "refused": refused}


def _district(conn: Any, **kw: str) -> dict[str, Any]:
    rows = queries.district_table(conn, today_filters(**kw))
    assert [r["district"] for r in rows] == ["Bien Hoa"]
    return rows[0]


def test_rates_leave_not_analysable_studies_out_and_workload_keeps_them(db_url: str, ctx: Context) -> None:  # noqa: F811
    studies = _five(db_url, ctx)
    with connect(db_url) as conn:
        marks = {r["report_id"]: r["analysable"] for r in conn.execute(
            "SELECT report_id, analysable, positives FROM analytics.study_fact")}
        assert marks == {**dict.fromkeys(studies["read"], True), **dict.fromkeys(studies["refused"], False)}
        row = _district(conn)
        # 1 positive over 3 AI-read studies: 333.3 per 1,000 (a negative read of all five would say 200)
        assert (row["studies"], row["not_analysable"], row["positive_findings"], row["positives_per_1000_studies"],
                row["critical"], row["critical_per_1000_studies"]) == (3, 2, 1, 333.3, 0, 0.0)
        one = _district(conn, finding=CODE["Atelectasis"])
        assert (one["positive_findings"], one["positives_per_1000_studies"], one["not_analysable"]) == (1, 333.3, 2)
        trend = {(r["level"], r["code"]): (r["studies"], r["positives"], r["rate_per_1000"])
                 for r in queries.findings_weekly(conn, today_filters())}
        assert trend[("district", CODE["Atelectasis"])] == trend[("province", CODE["Atelectasis"])] == (3, 1, 333.3)
        assert trend[("province", CODE["Pneumonia"])] == (3, 0, 0.0)
        # Workload, turnaround and the backlog count all five.
        assert sum(r["studies"] for r in queries.workload(conn, today_filters())) == 5
        assert conn.execute("SELECT sum(studies) AS n FROM analytics.workload_daily").fetchone()["n"] == 5
        assert [r["studies"] for r in queries.turnaround(conn, today_filters())] == [5]
        assert [r["waiting"] for r in queries.backlog(conn, today_filters())] == [5]
        # The export keeps small cells hidden, the new count included.
        fn, counts, stats = queries.VIEWS["districts"]
        text = export.to_csv(fn(conn, today_filters()), counts, stats)
    head, line = text.strip().splitlines()
    assert head.split(",") == ["province", "district", "studies", "not_analysable", "critical", "positive_findings",
                               "positives_per_1000_studies", "critical_per_1000_studies"]
    assert line.split(",")[2:] == ["<5", "<5", "0", "<5", "suppressed", "suppressed"]
    assert not re.search(r",[1-4](,|$)", text, re.M)


def test_a_district_with_only_not_analysable_studies_is_listed_without_rates(db_url: str, ctx: Context) -> None:  # noqa: F811
    ai_report(db_url, ctx, 7, site="TTYT_NHONTRACH", positives={}, address=False, refused=REASONS)
    with connect(db_url, autocommit=True) as conn:
        facts.refresh(conn)
        rows = queries.district_table(conn, today_filters())
        assert [(r["district"], r["studies"], r["not_analysable"], r["positives_per_1000_studies"],
                 r["critical_per_1000_studies"]) for r in rows] == [("Nhon Trach", 0, 1, None, None)]
        assert queries.findings_weekly(conn, today_filters()) == []
        assert [r["studies"] for r in queries.workload(conn, today_filters())] == [1]


def test_a_radiologists_reading_stays_out_of_rates_and_agreement(db_url: str, ctx: Context) -> None:  # noqa: F811
    """The radiologist's verdict is kept in the facts (as for every reviewed report), but the study was
    not read by the AI: it stays out of the rates per AI-read study, and a finding the radiologist
    adds is not a false negative of the model."""
    studies = _five(db_url, ctx)
    review(db_url, ctx, studies["read"][0], "sign")  # atelectasis confirmed; every other finding agreed absent
    refused = studies["refused"][0]
    review(db_url, ctx, refused, "edit", added=[{"system": "http://snomed.info/sct", "code": CODE["Pneumonia"],
                                                 "text": "Viêm phổi"}])
    with connect(db_url, autocommit=True) as conn:
        facts.backfill(conn, ctx)  # recomputed from the store: the reviewed report lost its conclusionCode
        facts.refresh(conn)
        fact = conn.execute("SELECT analysable, report_status, positives FROM analytics.study_fact"
                            " WHERE report_id = %s", (refused,)).fetchone()
        assert (fact["analysable"], fact["report_status"], fact["positives"]) == (False, "final", 1)
        added = conn.execute("SELECT code, verdict, ai_positive, final_positive FROM analytics.finding_fact"
                             " WHERE report_id = %s", (refused,)).fetchall()
        assert [tuple(r.values()) for r in added] == [(CODE["Pneumonia"], "added", None, True)]
        row = _district(conn)
        assert (row["studies"], row["not_analysable"], row["positive_findings"], row["positives_per_1000_studies"]) == (
            3, 2, 1, 333.3)
        agreement = {r["code"]: r for r in queries.agreement(conn, today_filters())}
        pneumonia = agreement[CODE["Pneumonia"]]
        assert (pneumonia["reviewed"], pneumonia["added"], pneumonia["fn"], pneumonia["tn"]) == (1, 0, 0, 1)
        assert agreement[CODE["Atelectasis"]]["tp"] == 1
        assert {r["code"]: r["positives"] for r in queries.findings_weekly(conn, today_filters())
                if r["level"] == "province"}[CODE["Pneumonia"]] == 0
        assert sum(r["studies"] for r in queries.workload(conn, today_filters())) == 5


def test_migration_marks_stored_reports_and_keeps_grants(db_url: str, ctx: Context) -> None:  # noqa: F811
    """0021 marks the facts of reports stored before it from their first version, and the privileges
    granted on the recreated views survive it."""
    studies = _five(db_url, ctx)
    role = f"analyst_0021_{os.getpid()}"
    sql = next(text for number, _name, text in migrations() if number == 21)
    with connect(db_url, autocommit=True) as conn:
        with conn.transaction(force_rollback=True):
            conn.execute(f'CREATE ROLE "{role}" NOLOGIN')
            conn.execute(f'GRANT USAGE ON SCHEMA analytics TO "{role}"')
            conn.execute(f'GRANT SELECT ON analytics.findings_weekly, analytics.mv_study_daily TO "{role}"')
            conn.execute("UPDATE analytics.study_fact SET analysable = true")  # as before the migration
            conn.execute(sql)
            refused = {r["report_id"] for r in conn.execute(
                "SELECT report_id FROM analytics.study_fact WHERE NOT analysable")}
            assert refused == set(studies["refused"])
            privileges = conn.execute(
                "SELECT has_table_privilege(%(r)s, 'analytics.findings_weekly', 'SELECT') AS weekly,"
                " has_table_privilege(%(r)s, 'analytics.mv_study_daily', 'SELECT') AS daily,"
                " has_table_privilege(%(r)s, 'analytics.ai_agreement', 'SELECT') AS agreement", {"r": role}).fetchone()
            assert privileges == {"weekly": True, "daily": True, "agreement": False}
            assert conn.execute("SELECT sum(ai_read) AS r, sum(not_analysable) AS n FROM analytics.mv_study_daily"
                                ).fetchone() == {"r": 3, "n": 2}


def test_a_critical_finding_a_radiologist_adds_to_a_not_analysable_study_is_critical(db_url: str,
                                                                                     ctx: Context) -> None:  # noqa: F811
    """The AI read nothing, the radiologist sees a pneumothorax: the signed report is critical (AA)
    and the critical alert is raised, as for any report a radiologist makes critical."""
    from interop.store import resources, reviews

    refused = ai_report(db_url, ctx, 9, site="BVDKDN", positives={}, refused=REASONS)
    review(db_url, ctx, refused, "edit", added=[{"system": "http://snomed.info/sct", "code": CODE["Pneumothorax"],
                                                 "text": "Tràn khí màng phổi"}])
    with connect(db_url) as conn:
        signed = resources.read(conn, "DiagnosticReport", refused)
        codes = [c.get("code") for cc in signed.get("conclusionCode", []) for c in cc.get("coding", [])]
        assert codes == ["AA"], signed.get("conclusionCode")
        assert reviews.alert(conn, refused) is not None
