"""Bulk Data exports in PostgreSQL (migration 0020): the export's state, its NDJSON files, and
the keyset-paged reads an export is made of (resources, or the analytics facts).

Every function runs in the caller's transaction. Reads are in id order from the last id seen, so
an export of millions reads a page at a time, never an OFFSET.
"""
from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from .db import scalar

ACTIVE = ("accepted", "in-progress")


def create(conn: psycopg.Connection[Any], export_id: str, client_id: str, kind: str, site: str | None, request: str,
           types: Sequence[str], since: datetime | None) -> None:
    conn.execute("INSERT INTO bulk_export (id, client_id, kind, site, request, types, since)"
                 " VALUES (%s, %s, %s, %s, %s, %s, %s)", (export_id, client_id, kind, site, request, list(types), since))


def active(conn: psycopg.Connection[Any], client_id: str) -> int:
    """How many of a client's exports are waiting or running."""
    return int(scalar(conn, "SELECT count(*) FROM bulk_export WHERE client_id = %s AND status = ANY(%s)",
                      (client_id, list(ACTIVE))) or 0)


def get(conn: psycopg.Connection[Any], export_id: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT * FROM bulk_export WHERE id = %s", (export_id,)).fetchone()
    return None if row is None else dict(row)


def status(conn: psycopg.Connection[Any], export_id: str) -> str | None:
    found: str | None = scalar(conn, "SELECT status FROM bulk_export WHERE id = %s", (export_id,))
    return found


def begin(conn: psycopg.Connection[Any], export_id: str) -> datetime | None:
    """Start (or start again, after a crash) an export: in progress, its transaction time fixed at
    the first start, the files of an earlier try removed. None when it was cancelled meanwhile."""
    conn.execute("DELETE FROM bulk_export_file WHERE export_id = %s", (export_id,))
    found: datetime | None = scalar(
        conn, "UPDATE bulk_export SET status = 'in-progress', transaction_time = coalesce(transaction_time, now()),"
              " progress = NULL WHERE id = %s AND status = ANY(%s) RETURNING transaction_time",
        (export_id, list(ACTIVE)))
    return found


def set_progress(conn: psycopg.Connection[Any], export_id: str, text: str) -> None:
    conn.execute("UPDATE bulk_export SET progress = %s WHERE id = %s", (text[:200], export_id))


def add_file(conn: psycopg.Connection[Any], export_id: str, n: int, rtype: str, count: int, ndjson: str) -> None:
    conn.execute("INSERT INTO bulk_export_file (export_id, n, type, count, ndjson) VALUES (%s, %s, %s, %s, %s)",
                 (export_id, n, rtype, count, ndjson))


def complete(conn: psycopg.Connection[Any], export_id: str, keep_seconds: int) -> bool:
    cur = conn.execute("UPDATE bulk_export SET status = 'completed', progress = NULL, finished_at = now(),"
                       " expires_at = now() + make_interval(secs => %s) WHERE id = %s AND status = 'in-progress'",
                       (keep_seconds, export_id))
    return cur.rowcount == 1


def fail(conn: psycopg.Connection[Any], export_id: str, error: str) -> None:
    conn.execute("UPDATE bulk_export SET status = 'failed', error = %s, finished_at = now() WHERE id = %s"
                 " AND status = ANY(%s)", (error[:500], export_id, list(ACTIVE)))
    conn.execute("DELETE FROM bulk_export_file WHERE export_id = %s", (export_id,))


def cancel(conn: psycopg.Connection[Any], export_id: str) -> None:
    """Cancelled (asked with DELETE): its files are deleted; a running export stops at its next page."""
    conn.execute("UPDATE bulk_export SET status = 'cancelled', finished_at = now() WHERE id = %s", (export_id,))
    conn.execute("DELETE FROM bulk_export_file WHERE export_id = %s", (export_id,))


def forget_expired(conn: psycopg.Connection[Any]) -> int:
    """Exports past their expiry, and cancelled or failed ones a day old, with their files."""
    cur = conn.execute("DELETE FROM bulk_export WHERE expires_at < now()"
                       " OR (status IN ('cancelled', 'failed') AND finished_at < now() - interval '1 day')")
    return cur.rowcount


def files(conn: psycopg.Connection[Any], export_id: str) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT n, type, count FROM bulk_export_file WHERE export_id = %s ORDER BY n",
                        (export_id,)).fetchall()
    return [dict(r) for r in rows]


def file(conn: psycopg.Connection[Any], export_id: str, n: int) -> str | None:
    found: str | None = scalar(conn, "SELECT ndjson FROM bulk_export_file WHERE export_id = %s AND n = %s",
                               (export_id, n))
    return found


# -- what an export reads ----------------------------------------------------------------------------
_SITE_TAGGED = ("EXISTS (SELECT 1 FROM jsonb_array_elements(coalesce({alias}.body->'meta'->'tag', '[]'::jsonb)) t"
                " WHERE t->>'system' = %(tag_system)s AND upper(t->>'code') = upper(%(site)s))")


def resources_page(conn: psycopg.Connection[Any], rtype: str, *, until: datetime, since: datetime | None,
                   site: str | None, tag_system: str, after: str, limit: int) -> list[dict[str, Any]]:
    """Current, undeleted resources of a type changed in (since, until], in id order after `after`.
    With a site: those tagged with it, and for Observations those its DiagnosticReports hold."""
    where = [sql.SQL("r.type = %(type)s AND NOT r.deleted AND r.last_updated <= %(until)s AND r.id > %(after)s")]
    if since is not None:
        where.append(sql.SQL("r.last_updated > %(since)s"))
    if site is not None and rtype == "Observation":
        where.append(sql.SQL("r.id IN (SELECT split_part(ref->>'reference', '/', 2) FROM resource d,"
                             " jsonb_array_elements(coalesce(d.body->'result', '[]'::jsonb)) ref"
                             " WHERE d.type = 'DiagnosticReport' AND NOT d.deleted AND " + _SITE_TAGGED.format(alias="d")
                             + ")"))
    elif site is not None:
        where.append(sql.SQL(_SITE_TAGGED.format(alias="r")))
    query = sql.SQL("SELECT r.id, r.body FROM resource r WHERE {} ORDER BY r.id LIMIT %(limit)s").format(
        sql.SQL(" AND ").join(where))
    rows = conn.execute(query, {"type": rtype, "until": until, "since": since, "after": after, "limit": limit,
                                "site": site, "tag_system": tag_system}).fetchall()
    return [dict(r) for r in rows]


def facts_page(conn: psycopg.Connection[Any], *, until: datetime, since: datetime | None, after: str,
               limit: int) -> list[dict[str, Any]]:
    """Analytics study facts changed in (since, until], in report order after `after`, each with its
    findings (`findings`: a list of dicts)."""
    rows = conn.execute(
        "SELECT s.report_id, s.patient_key, s.age_band, s.sex, s.district, s.commune, s.province, s.facility,"
        " s.modality, s.body_part, s.model_name, s.model_version, s.report_status, s.study_day, s.analysable,"
        " coalesce((SELECT jsonb_agg(jsonb_build_object('observation_id', f.observation_id,"
        " 'code_system', f.code_system, 'code', f.code, 'label', f.label, 'probability', f.probability,"
        " 'final_positive', f.final_positive, 'critical', f.critical) ORDER BY f.observation_id)"
        " FROM analytics.finding_fact f WHERE f.report_id = s.report_id), '[]'::jsonb) AS findings"
        " FROM analytics.study_fact s WHERE s.updated_at <= %(until)s AND s.report_id > %(after)s"
        " AND (%(since)s::timestamptz IS NULL OR s.updated_at > %(since)s)"
        " ORDER BY s.report_id LIMIT %(limit)s",
        {"until": until, "since": since, "after": after, "limit": limit}).fetchall()
    return [dict(r) for r in rows]
