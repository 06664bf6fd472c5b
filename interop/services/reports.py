"""What follows "a version of a report was stored": one function, called by every path that
stores one (the analysis, `$review`, the worklist, amend, correct, reject), in the transaction
that stored it, so the version and all it sets off commit together or not at all:

1. a critical alert, the first time a version is critical (an AI finding, or one a radiologist
   added or confirmed): notices to the ordering site and its higher-level hospital, a transfer
   recommendation, an acknowledgement Task and its escalation (`critical.raise_alert`);
2. its deliveries: every destination of its site, and of the higher-level hospital when the report
   raised an alert (HL7 ORU, FHIR push), and every rest-hook Subscription it matches, critical
   ones first (`delivery.queue_report`);
3. the provincial analytics facts (`facts.record`);
4. its FHIR Provenance: the model and the images it read for an AI result, the radiologist for a
   review (`provenance.record`).
"""
from __future__ import annotations

from typing import Any

import psycopg

from ..domain.vocabulary import site_of
from ..store import resources
from . import critical, delivery, provenance
from .analytics import facts
from .context import Context


def stored(conn: psycopg.Connection[Any], ctx: Context, report: dict[str, Any], *, event: str) -> list[int]:
    """Everything a stored report version sets off, in the caller's transaction. `event` says why
    (ai_result, reviewed) for the analytics. Returns the deliveries queued."""
    site = ctx.sites.get(site_of(report) or site_of(_study(conn, report)))
    critical.raise_alert(conn, ctx, report, site)  # first: the deliveries go to the referral hospital too
    queued = delivery.queue_report(conn, ctx, report, site)
    facts.record(conn, ctx, report["id"], event=event)
    provenance.record(conn, ctx, report, event=event)
    return queued


def _study(conn: psycopg.Connection[Any], report: dict[str, Any]) -> dict[str, Any] | None:
    """The report's ImagingStudy (a report made before site tags were kept takes its study's)."""
    return next((s for s in (resources.find(conn, r.get("reference")) for r in report.get("imagingStudy") or [])
                 if s), None)
