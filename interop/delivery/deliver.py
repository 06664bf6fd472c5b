"""One entry point for 'this report was created or changed': queue it for every destination.

Called in the transaction that stores the report version (the worker when a report is made, the
review when it is signed, edited, rejected or amended), so the version and its deliveries commit
together. Every version is delivered again: HL7 ORU^R01 and FHIR push to the report's site, and a
rest-hook notification to every active Subscription whose criteria select it.
"""
from __future__ import annotations

from typing import Any

import psycopg

from ..sites import Site
from ..store.search_params import SearchParam
from . import outbox, subscriptions
from .sender import FHIR, destination, priority, queue_report_delivery, report_version


def on_report_changed(conn: psycopg.Connection[Any], report: dict[str, Any], sites: dict[str, Site],
                      site_code: str | None, params: dict[str, dict[str, SearchParam]] | None = None) -> list[int]:
    """Queue the stored report version (its meta.versionId) for HL7, FHIR push and Subscriptions,
    in the caller's transaction; priority 0 for a critical finding. Returns the new outbox row
    ids (a version already queued for a destination is not queued again). `params` (the search
    parameter table) is needed for Subscriptions; without it none are notified."""
    version = report_version(report)
    ids = queue_report_delivery(conn, report, sites, site_code)
    site = sites.get((site_code or "").upper())
    if site is not None and site.fhir is not None:
        new = outbox.enqueue(conn, FHIR, destination(site.code, FHIR), "DiagnosticReport", report["id"], version,
                             priority(report))
        if new is not None:
            ids.append(new)
    if params:
        ids += subscriptions.queue_notifications(conn, report, params, priority(report))
    return ids
