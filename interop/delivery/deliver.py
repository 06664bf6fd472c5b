"""One entry point for 'this report was created or changed': queue it for every destination.

Called in the transaction that stores the report version (the worker when a report is made, the
review when it is signed, edited, rejected or amended), so the version and its deliveries commit
together. Every version is delivered again: HL7 ORU^R01 and FHIR push to the report's site, and a
rest-hook notification to every active Subscription whose criteria select it.

A report that raised a critical alert also goes, every version of it, to the higher-level
hospital named as the site's `referral`: that hospital was told to expect the patient, so it
must also see the radiologist's sign-off or correction. Raise the alert before calling this.
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
    site = sites.get((site_code or "").upper())
    ids: list[int] = []
    for target in (site, referral_of(conn, report, sites, site)):
        if target is None:
            continue
        ids += queue_report_delivery(conn, report, sites, target.code)
        if target.fhir is not None:
            new = outbox.enqueue(conn, FHIR, destination(target.code, FHIR), "DiagnosticReport", report["id"], version,
                                 priority(report))
            if new is not None:
                ids.append(new)
    if params:
        ids += subscriptions.queue_notifications(conn, report, params, priority(report))
    return ids


def referral_of(conn: psycopg.Connection[Any], report: dict[str, Any], sites: dict[str, Site],
                site: Site | None) -> Site | None:
    """The site's higher-level hospital when this report raised a critical alert; else None."""
    if site is None:
        return None
    code = (site.referral or "").upper()
    if not code or code == site.code.upper() or code not in sites:
        return None
    alerted = conn.execute("SELECT 1 FROM critical_alert WHERE report_id = %s", (report["id"],)).fetchone()
    return sites[code] if alerted else None
