"""One entry point for 'this report was created or changed': queue it for every destination."""
from __future__ import annotations

from typing import Any

import psycopg

from ..sites import Site
from .sender import queue_report_delivery


def on_report_changed(conn: psycopg.Connection[Any], report: dict[str, Any], sites: dict[str, Site],
                      site_code: str | None, params: Any = None) -> list[int]:
    """Queue the stored report version (HL7 ORU now), in the caller's transaction."""
    return queue_report_delivery(conn, report, sites, site_code)
