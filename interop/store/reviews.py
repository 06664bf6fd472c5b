"""What people did with AI reports: each radiologist's verdict on each finding (`review_verdict`),
and the critical-result alerts waiting for someone to acknowledge them (`critical_alert`)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from .db import scalar


@dataclass(frozen=True)
class Verdict:
    report_id: str
    report_version: int
    observation_id: str | None
    code_system: str | None
    code: str | None
    finding: str
    ai_positive: bool | None
    radiologist_positive: bool | None
    verdict: str  # agree | disagree | added | rejected
    action: str
    reviewer: str


def add_verdicts(conn: psycopg.Connection[Any], verdicts: Sequence[Verdict]) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO review_verdict (report_id, report_version, observation_id, code_system, code, finding,"
            " ai_positive, radiologist_positive, verdict, action, reviewer) VALUES"
            " (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            [(v.report_id, v.report_version, v.observation_id, v.code_system, v.code, v.finding, v.ai_positive,
              v.radiologist_positive, v.verdict, v.action, v.reviewer) for v in verdicts])


def first_review(conn: psycopg.Connection[Any], report_id: str) -> dict[str, Any]:
    """When the report was first reviewed and which version that made (empty when never)."""
    row = conn.execute("SELECT min(reviewed_at) AS first_at, min(report_version) AS first_version"
                       " FROM review_verdict WHERE report_id = %s", (report_id,)).fetchone()
    return dict(row) if row else {}


def latest_verdicts(conn: psycopg.Connection[Any], report_id: str) -> dict[str, dict[str, Any]]:
    """observation id -> the latest verdict on it."""
    rows = conn.execute(
        "SELECT DISTINCT ON (observation_id) observation_id, verdict, radiologist_positive FROM review_verdict"
        " WHERE report_id = %s AND observation_id IS NOT NULL ORDER BY observation_id, id DESC", (report_id,)).fetchall()
    return {r["observation_id"]: dict(r) for r in rows}


# -- critical alerts ------------------------------------------------------------------------------
def has_alert(conn: psycopg.Connection[Any], report_id: str) -> bool:
    return scalar(conn, "SELECT 1 FROM critical_alert WHERE report_id = %s", (report_id,)) is not None


def add_alert(conn: psycopg.Connection[Any], report_id: str, site: str | None, task_id: str,
              referral_id: str) -> None:
    conn.execute("INSERT INTO critical_alert (report_id, site, task_id, referral_id) VALUES (%s, %s, %s, %s)",
                 (report_id, site, task_id, referral_id))


def lock_alert(conn: psycopg.Connection[Any], report_id: str) -> dict[str, Any] | None:
    """The report's alert, locked until the caller's transaction ends."""
    row = conn.execute("SELECT * FROM critical_alert WHERE report_id = %s FOR UPDATE", (report_id,)).fetchone()
    return None if row is None else dict(row)


def alert(conn: psycopg.Connection[Any], report_id: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT * FROM critical_alert WHERE report_id = %s", (report_id,)).fetchone()
    return None if row is None else dict(row)


def escalated(conn: psycopg.Connection[Any], alert_id: int, contact_index: int | None = None) -> None:
    conn.execute("UPDATE critical_alert SET escalated_at = now(), contact_index = coalesce(%s, contact_index)"
                 " WHERE id = %s", (contact_index, alert_id))


def acknowledged(conn: psycopg.Connection[Any], alert_id: int, by: str) -> None:
    conn.execute("UPDATE critical_alert SET acknowledged_at = now(), acknowledged_by = %s WHERE id = %s", (by, alert_id))


def decided(conn: psycopg.Connection[Any], alert_id: int, decision: str, by: str) -> None:
    conn.execute("UPDATE critical_alert SET transfer_decision = %s, decided_at = now(), decided_by = %s WHERE id = %s",
                 (decision, by, alert_id))


def open_alerts(conn: psycopg.Connection[Any]) -> dict[str, dict[str, Any]]:
    """report id -> alert row, for alerts nobody has acknowledged yet."""
    rows = conn.execute("SELECT * FROM critical_alert WHERE acknowledged_at IS NULL ORDER BY created_at").fetchall()
    return {r["report_id"]: dict(r) for r in rows}
