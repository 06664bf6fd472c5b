"""The reports the worklist lists: chosen, counted and ordered in SQL, so a filter sees every
report of the status, not only the first page of them."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from .db import scalar

_AA = '[{"coding": [{"code": "AA"}]}]'

# One row per report of the status, with what the worklist filters and orders by. The status,
# the issued instant and the site tag come from the search index, so that counting and ordering a
# long list of signed reports reads no report body. A report is critical when its conclusion or one
# of its Observations says AA; its study and order are the first it names (as the page shows them);
# an order's priority outside FHIR's four is routine.
_ROWS = f"""
SELECT r.id, i.value AS issued,
       coalesce(r.body->'conclusionCode' @> '{_AA}', false)
         OR EXISTS (SELECT 1 FROM jsonb_array_elements(coalesce(r.body->'result', '[]'::jsonb)) ref
                    JOIN resource o ON o.type = 'Observation' AND o.id = split_part(ref->>'reference', '/', 2)
                     AND ref->>'reference' = 'Observation/' || o.id AND NOT o.deleted
                    WHERE o.body->'interpretation' @> '{_AA}') AS critical,
       CASE WHEN q.body->>'priority' = ANY(%(priorities)s) THEN q.body->>'priority' ELSE %(usual)s END AS priority,
       split_part(r.body->'imagingStudy'->0->>'reference', '/', 2) AS study_id,
       coalesce(nullif(left(s.body->>'started', 10), ''), left(r.body->>'effectiveDateTime', 10), '') AS study_date
  FROM search_index c
  JOIN resource r ON r.type = 'DiagnosticReport' AND r.id = c.id AND NOT r.deleted
  LEFT JOIN search_index i ON i.type = 'DiagnosticReport' AND i.id = c.id AND i.param = 'issued'
  LEFT JOIN resource s ON s.type = 'ImagingStudy' AND NOT s.deleted
   AND s.id = split_part(r.body->'imagingStudy'->0->>'reference', '/', 2)
   AND r.body->'imagingStudy'->0->>'reference' = 'ImagingStudy/' || s.id
  LEFT JOIN resource q ON q.type = 'ServiceRequest' AND NOT q.deleted
   AND q.id = split_part(r.body->'basedOn'->0->>'reference', '/', 2)
   AND r.body->'basedOn'->0->>'reference' = 'ServiceRequest/' || q.id
 WHERE c.type = 'DiagnosticReport' AND c.param = 'status' AND c.value = %(status)s
"""

_INDEXED = "(SELECT id FROM search_index WHERE type = '{type}' AND param = '{param}'{more})"
_THIS_SITE = " AND system = %(tag_system)s AND value <> '' AND upper(value) = upper(%(site)s)"
# the report's site tag, or its study's when the report has none (as the page shows the site): the
# reports tagged with the site are one pass over the tag index; the study is looked up only for a
# report without a site tag of its own
_AT_SITE = ("(w.id IN {mine} OR (NOT EXISTS (SELECT 1 FROM search_index t WHERE t.type = 'DiagnosticReport'"
            " AND t.id = w.id AND t.param = '_tag' AND t.system = %(tag_system)s AND t.value <> '')"
            " AND w.study_id IN {study}))").format(
    mine=_INDEXED.format(type="DiagnosticReport", param="_tag", more=_THIS_SITE),
    study=_INDEXED.format(type="ImagingStudy", param="_tag", more=_THIS_SITE))
_MODALITY = "w.study_id IN " + _INDEXED.format(type="ImagingStudy", param="modality",
                                               more=" AND value = upper(%(modality)s)")


@dataclass(frozen=True)
class Filters:
    """The worklist's filters: empty means any."""

    site: str = ""
    modality: str = ""
    priority: str = ""
    status: str = "preliminary"  # preliminary (waiting), final, amended, corrected, cancelled
    date_from: str = ""          # the study date, YYYY-MM-DD, inclusive
    date_to: str = ""

    def args(self) -> dict[str, str]:
        """The set filters, as query parameters for the page's links."""
        default = Filters()
        return {k: v for k, v in self.__dict__.items() if v and v != getattr(default, k)}


def _chosen(filters: Filters, *, tag_system: str, priorities: Sequence[str]) -> tuple[sql.Composable, sql.Composable,
                                                                                    dict[str, Any]]:
    """(the filtered rows, their order, the parameters). Reports waiting for a radiologist: critical
    first, then the most urgent order, then the longest waiting. Reports already dealt with: the
    newest first, as a RIS lists done work."""
    where = [sql.SQL("TRUE")]
    if filters.site:
        where.append(sql.SQL(_AT_SITE))
    if filters.modality:
        where.append(sql.SQL(_MODALITY))
    if filters.priority:
        where.append(sql.SQL("priority = %(priority)s"))
    if filters.date_from:
        where.append(sql.SQL("study_date >= %(date_from)s"))
    if filters.date_to:
        where.append(sql.SQL("study_date <> '' AND study_date <= %(date_to)s"))
    rows = sql.SQL("SELECT * FROM ({}) w WHERE {}").format(sql.SQL(_ROWS), sql.SQL(" AND ").join(where))
    if filters.status == "preliminary":
        order = sql.SQL("critical DESC, array_position(%(priorities)s, priority), issued NULLS LAST, id")
    else:
        order = sql.SQL("issued DESC NULLS LAST, id")
    params = {**filters.__dict__, "tag_system": tag_system, "priorities": list(priorities), "usual": priorities[-1]}
    return rows, order, params


def waiting_reports(conn: psycopg.Connection[Any], limit: int, filters: Filters, *, tag_system: str,
                    priorities: Sequence[str]) -> tuple[int, list[dict[str, Any]]]:
    """(how many reports match, the first `limit` of them in the worklist's order). `priorities`:
    FHIR request-priority codes, most urgent first, the last being what an order without one is."""
    rows, order, params = _chosen(filters, tag_system=tag_system, priorities=priorities)
    total = int(scalar(conn, sql.SQL("SELECT count(*) FROM ({}) f").format(rows), params) or 0)
    found = conn.execute(sql.SQL("WITH page AS (SELECT id, row_number() OVER (ORDER BY {order}) AS n FROM ({rows}) f"
                                 " ORDER BY {order} LIMIT %(limit)s)"
                                 " SELECT r.body FROM page JOIN resource r ON r.type = 'DiagnosticReport' AND r.id = page.id"
                                 " ORDER BY page.n").format(order=order, rows=rows), {**params, "limit": limit}).fetchall()
    return total, [r["body"] for r in found]


def following(conn: psycopg.Connection[Any], report_id: str, filters: Filters, *, tag_system: str,
              priorities: Sequence[str]) -> str | None:
    """The report after `report_id` in the filtered worklist (the first one when it is not listed)."""
    rows, order, params = _chosen(filters, tag_system=tag_system, priorities=priorities)
    query = sql.SQL("WITH f AS (SELECT id, row_number() OVER (ORDER BY {}) AS n FROM ({}) w)"
                    " SELECT id FROM f WHERE id <> %(current)s"
                    " AND n > coalesce((SELECT n FROM f WHERE id = %(current)s), 0) ORDER BY n LIMIT 1").format(order, rows)
    found = conn.execute(query, {**params, "current": report_id}).fetchone()
    return str(found["id"]) if found else None
