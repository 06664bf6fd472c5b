"""The audit trail (migration 0008): append-only rows, one per AuditEvent, searched by column.

Never updated or deleted by the hub. Rows come and go as dicts of COLUMNS (interop.domain.audit
turns an event into one and back). `search` builds its SQL from fixed column names with
psycopg.sql; values are always parameters.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

import psycopg
from psycopg import sql

from .db import scalar

COLUMNS = ("type", "subtype_system", "subtype", "action", "outcome", "client", "person", "role", "address",
           "entities", "patients", "query", "description")
_SELECT = sql.SQL("SELECT id, recorded, {} FROM audit_event").format(sql.SQL(", ").join(map(sql.Identifier, COLUMNS)))
# Rendered once (fixed column names): a change's record is written with every change.
_INSERT = sql.SQL(sql.SQL("INSERT INTO audit_event ({}) VALUES ({})").format(
    sql.SQL(", ").join(map(sql.Identifier, COLUMNS)), sql.SQL(", ").join(sql.Placeholder() * len(COLUMNS))).as_string())
_COPY = sql.SQL("COPY audit_event ({}) FROM STDIN").format(sql.SQL(", ").join(map(sql.Identifier, COLUMNS)))


class Filters(Protocol):
    """What a search asks for (interop.domain.audit.AuditQuery)."""

    ids: list[int]
    agents: list[str]
    patients: list[str]
    entities: list[str]
    subtypes: list[str]
    actions: list[str]
    outcomes: list[str]
    addresses: list[str]
    recorded: list[tuple[str, datetime]]
    count: int
    offset: int
    newest_first: bool


def insert(conn: psycopg.Connection[Any], row: dict[str, Any]) -> None:
    """One record, in the caller's transaction (a change and its record stand or fall together).
    Nothing is read back, so in pipeline mode the insert travels with the COMMIT that follows it."""
    conn.execute(_INSERT, [row[c] for c in COLUMNS])


def copy(conn: psycopg.Connection[Any], rows: list[dict[str, Any]]) -> None:
    """Many records in one COPY (the records of reads, written in batches)."""
    with conn.cursor() as cur, cur.copy(_COPY) as out:
        for row in rows:
            out.write_row([row[c] for c in COLUMNS])


def read(conn: psycopg.Connection[Any], event_id: int) -> dict[str, Any] | None:
    row = conn.execute(sql.SQL("{} WHERE id = %s").format(_SELECT), (event_id,)).fetchone()
    return dict(row) if row is not None else None


_OPS = {"eq": "=", "gt": ">", "lt": "<", "ge": ">=", "le": "<="}


def search(conn: psycopg.Connection[Any], q: Filters) -> tuple[int, list[dict[str, Any]]]:
    """(how many match, the page asked for), newest first unless told otherwise."""
    where: list[sql.Composable] = []
    args: list[Any] = []
    for column, values in (("agents", q.agents), ("patients", q.patients)):
        if values:
            where.append(sql.SQL("{} && %s::text[]").format(sql.Identifier(column)))
            args.append(values)
    if q.entities:  # Type/id matches every version of it (rare for admins: no index)
        where.append(sql.SQL("EXISTS (SELECT 1 FROM unnest(entities) e, unnest(%s::text[]) w"
                             " WHERE e = w OR e LIKE w || '/_history/%%')"))
        args.append(q.entities)
    for column, values in (("subtype", q.subtypes), ("action", q.actions), ("outcome", q.outcomes),
                           ("address", q.addresses)):
        if values:
            where.append(sql.SQL("{} = ANY(%s)").format(sql.Identifier(column)))
            args.append(values)
    if q.ids:
        where.append(sql.SQL("id = ANY(%s)"))
        args.append(q.ids)
    for prefix, when in q.recorded:
        where.append(sql.SQL("recorded {} %s").format(sql.SQL(_OPS[prefix])))
        args.append(when)
    condition = sql.SQL(" AND ").join(where) if where else sql.SQL("true")
    total = int(scalar(conn, sql.SQL("SELECT count(*) FROM audit_event WHERE {}").format(condition), args) or 0)
    order = sql.SQL("DESC") if q.newest_first else sql.SQL("ASC")
    rows = conn.execute(sql.SQL("{} WHERE {} ORDER BY recorded {}, id {} LIMIT %s OFFSET %s").format(
        _SELECT, condition, order, order), [*args, q.count, q.offset]).fetchall()
    return total, [dict(r) for r in rows]
