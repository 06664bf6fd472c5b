"""Subscription event counters (the backport's event numbers): one row per Subscription."""
from __future__ import annotations

from typing import Any

import psycopg

from .db import scalar


def next_event(conn: psycopg.Connection[Any], subscription_id: str) -> int:
    """Count one more event for a Subscription and return its number (1, 2, ...), in the caller's
    transaction: the row lock keeps two concurrent reports from taking the same number."""
    return int(scalar(conn, "INSERT INTO subscription_event (subscription_id, events) VALUES (%s, 1)"
                            " ON CONFLICT (subscription_id) DO UPDATE SET events = subscription_event.events + 1"
                            " RETURNING events", (subscription_id,)))


def events(conn: psycopg.Connection[Any], subscription_id: str) -> int:
    """How many events a Subscription has had since it started."""
    return int(scalar(conn, "SELECT events FROM subscription_event WHERE subscription_id = %s",
                      (subscription_id,)) or 0)
