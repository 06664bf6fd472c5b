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
from .resources import like
from .search_params import normalise

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
    agent_refs: list[tuple[str, str]]
    agent_names: list[tuple[str, str]]
    patients: list[str]
    entities: list[str]
    subtypes: list[str]
    actions: list[str]
    outcomes: list[str]
    addresses: list[tuple[str, str]]
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


def _fold_table() -> tuple[str, str]:
    """translate() strings that make lower(text) what search_params.normalise makes it, letter by
    letter, for Latin-1, Latin Extended-A/B and Latin Extended Additional (Vietnamese), combining
    marks dropped: as migration 0011 re-normalised the search index."""
    letters = [chr(c) for r in ((0xC0, 0x250), (0x1E00, 0x1F00)) for c in range(*r)]
    pairs = [(c, f) for c in letters if len(f := normalise(c)) == 1 and f.isascii() and f != c]
    marks = "".join(chr(c) for c in range(0x300, 0x370) if normalise(chr(c)) == "")
    return "".join(c for c, _ in pairs) + marks, "".join(f for _, f in pairs)


_FOLD_FROM, _FOLD_TO = _fold_table()


def _string_sql(column: sql.Composable, values: list[tuple[str, str]]) -> tuple[sql.Composable, list[Any]]:
    """R4 string search (search.html#string) of a text column: by default the text starts with the
    value, both normalised by case and accent as the FHIR store's strings are; :contains anywhere
    in it; :exact the text as written."""
    patterns = [("%" if modifier == "contains" else "") + like(normalise(text)) + "%"
                for modifier, text in values if modifier != "exact"]
    exact = [text for modifier, text in values if modifier == "exact"]
    return (sql.SQL("({c} = ANY(%s::text[]) OR translate(lower({c}), %s, %s) LIKE ANY(%s::text[]))").format(c=column),
            [exact, _FOLD_FROM, _FOLD_TO, patterns])


# R4's AuditEvent.agent.name: the client's and the person's, or "anonymous" when neither is known
# (interop.domain.audit.resource).
_AGENT_NAME = sql.SQL("n")
_AGENT_NAMES = "CASE WHEN cardinality(agents) = 0 THEN ARRAY['anonymous'] ELSE agents END"
# What an event touched, its patients included (migration 0022 indexes this expression).
_WHAT = "audit_what(entities, patients)"


def search(conn: psycopg.Connection[Any], q: Filters) -> tuple[int, list[dict[str, Any]]]:
    """(how many match, the page asked for), newest first unless told otherwise."""
    where: list[sql.Composable] = []
    args: list[Any] = []
    for column, values in (("agents", q.agents), ("patients", q.patients)):
        if values:
            where.append(sql.SQL("{} && %s::text[]").format(sql.Identifier(column)))
            args.append(values)
    if q.agent_refs:  # the index narrows by name, the column says which kind of agent it is
        clients = [name for kind, name in q.agent_refs if kind in ("client", "any")]
        persons = [name for kind, name in q.agent_refs if kind in ("person", "any")]
        where.append(sql.SQL("(agents && %s::text[] AND (client = ANY(%s::text[]) OR person = ANY(%s::text[])))"))
        args += [[*clients, *persons], clients, persons]
    if q.entities:  # Type/id matches every version of it, and a patient the event concerned
        where.append(sql.SQL(_WHAT + " && %s::text[]"))
        args.append(q.entities)
    if q.agent_names:
        test, more = _string_sql(_AGENT_NAME, q.agent_names)
        where.append(sql.SQL("EXISTS (SELECT 1 FROM unnest(" + _AGENT_NAMES + ") n WHERE {})").format(test))
        args += more
    if q.addresses:
        test, more = _string_sql(sql.Identifier("address"), q.addresses)
        where.append(test)
        args += more
    for column, values in (("subtype", q.subtypes), ("action", q.actions), ("outcome", q.outcomes)):
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
