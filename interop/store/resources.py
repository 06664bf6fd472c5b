"""FHIR resources in PostgreSQL: current version, full history, write-time search index.

Every function takes a connection and runs inside the caller's transaction, so a study, its
analysis Task and its queue entry (or a report, its observations and the job's completion)
are stored together or not at all. Reads return the stored JSON: it was validated on write.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, NamedTuple

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg.types.json import Jsonb

from .db import scalar
from .search_params import SearchParam, index_rows, normalise


class StoreError(Exception):
    """Base of the store's errors; the FHIR layer maps each to an HTTP status."""


class NotFound(StoreError):
    pass


class Gone(NotFound):
    """It was deleted (HTTP 410); a NotFound to callers that only ask whether it is there."""


class VersionConflict(StoreError):
    """If-Match named a version that is no longer current (HTTP 412)."""


class NotIndexable(StoreError):
    """A code, identifier or reference too long to search by (HTTP 422); the message is safe."""


STRING_INDEX_CHARS = 200  # a string is searchable by its first 200 characters (prefix search)
TOKEN_INDEX_CHARS = 512   # a longer code, identifier or reference is refused: it could not be found


class Comparison(NamedTuple):
    """One prefixed value of a date, number or quantity parameter: the range [low, high) it stands
    for (dates as the index holds them, numbers as plain decimals), the unit ('system|code',
    '*|code' for any system) and, for a number, the value itself."""

    prefix: str
    low: str
    high: str
    unit: str | None = None
    value: str | None = None


@dataclass
class Criterion:
    """One search parameter with its OR'd values: (system or None or ANY, value); or its OR'd
    comparisons (date, number, quantity); or a chain (the referenced type and the criterion its
    resource meets); or _has (the referring type, whose reference parameter is `param`, and the
    criterion the referring resource meets)."""

    param: SearchParam
    values: list[tuple[str | None | object, str]]
    modifier: str | None = None
    comparisons: list[Comparison] = field(default_factory=list)
    chain: tuple[str, Criterion] | None = None
    has: tuple[str, Criterion] | None = None


ANY_SYSTEM = object()


@dataclass
class Query:
    criteria: list[Criterion] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    last_updated: list[tuple[str, datetime]] = field(default_factory=list)
    count: int = 20
    offset: int = 0
    descending: bool = False
    total: str | None = None  # None: only when the first page holds every match | none | estimate | accurate
    sort_by: str | None = None  # a date parameter to order by (its low end) instead of _lastUpdated


def new_id() -> str:
    return str(uuid.uuid4())


def lock(conn: psycopg.Connection[Any], key: str) -> None:
    """Serialise writers of the same key (a conditional create's criteria) until the caller's
    transaction ends."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (key,))


@contextmanager
def pipelined_transaction(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """A transaction whose statements go out in pipeline mode: BEGIN travels with the first
    statement, COMMIT with whatever follows the last result read, and the block ends only once the
    COMMIT is acknowledged (as durable as any commit). A plain create so costs two round trips
    (BEGIN + write, audit record + COMMIT) where it took five. Inside, nothing may open
    `conn.transaction()` (psycopg syncs around it); an error raised inside, or by a statement,
    rolls the whole block back.

    psycopg itself would sync after its own BEGIN, so the connection is switched to autocommit and
    the block's BEGIN and COMMIT are sent as statements; autocommit is switched back before the
    connection returns to its pool."""
    conn.set_autocommit(True)
    try:
        with conn.pipeline():
            conn.execute("BEGIN")
            yield
            conn.execute("COMMIT")
    except BaseException:
        if not conn.broken and conn.info.transaction_status != TransactionStatus.IDLE:
            conn.rollback()
        raise
    finally:
        if not conn.broken:
            conn.set_autocommit(False)


def _with_meta(body: dict[str, Any], rid: str, version: int) -> dict[str, Any]:
    """The body as stored, meta.lastUpdated left for the write statement to fill (the database's clock)."""
    out = dict(body)
    out["id"] = rid
    meta = dict(out.get("meta") or {})
    meta["versionId"] = str(version)
    meta["lastUpdated"] = ""
    out["meta"] = meta
    return out


# meta.lastUpdated: the database's clock as Python's datetime.isoformat() writes it in the session's
# time zone (microseconds only when not zero, offset as +HH:MM), which is what it was when the hub
# read the clock in a round trip of its own and formatted it here.
LAST_UPDATED_TEXT = ("""to_char(ts, 'YYYY-MM-DD"T"HH24:MI:SS')"""
                     " || CASE WHEN date_trunc('second', ts) = ts THEN '' ELSE to_char(ts, '.US') END"
                     " || to_char(ts, 'TZH:TZM')")

# One statement for a version (atomic by itself, on an autocommit connection too, and one round
# trip): the clock read once, the current row, its history copy, and the index rows replaced.
# Sub-statements of one statement see the same snapshot, so the DELETE removes the old index rows,
# not the new ones.
_WRITE = """
WITH clock AS MATERIALIZED (
    SELECT ts, {text} AS stamp FROM (SELECT clock_timestamp() AS ts) now
), current AS (
    INSERT INTO resource (type, id, version, last_updated, body)
    SELECT %(type)s, %(id)s, %(version)s, ts, jsonb_set(%(body)s, '{meta,lastUpdated}', to_jsonb(stamp)) FROM clock
    ON CONFLICT (type, id) DO UPDATE SET version = EXCLUDED.version, last_updated = EXCLUDED.last_updated,
        deleted = false, body = EXCLUDED.body
    RETURNING type, id, version, last_updated, body
), history AS (
    INSERT INTO resource_history (type, id, version, last_updated, body)
    SELECT type, id, version, last_updated, body FROM current
), old_index AS (
    DELETE FROM search_index WHERE type = %(type)s AND id = %(id)s
), new_index AS (
    INSERT INTO search_index (type, id, param, system, value, last_updated)
    SELECT %(type)s, %(id)s, p, s, v, ts FROM clock, unnest(%(params)s::text[], %(systems)s::text[], %(values)s::text[])
        AS i(p, s, v)
)
SELECT stamp FROM clock
""".replace("{text}", LAST_UPDATED_TEXT)  # a plain string: nothing to compose per write


def _write(conn: psycopg.Connection[Any], rtype: str, rid: str, version: int, body: dict[str, Any],
           params: dict[str, SearchParam]) -> dict[str, Any]:
    stored = _with_meta(body, rid, version)
    rows = index_entries(stored, params)
    stored["meta"]["lastUpdated"] = scalar(conn, _WRITE, {
        "type": rtype, "id": rid, "version": version, "body": Jsonb(stored), "params": [r[0] for r in rows],
        "systems": [r[1] for r in rows], "values": [r[2] for r in rows]})
    return stored


def index_entries(stored: dict[str, Any], params: dict[str, SearchParam]) -> list[tuple[str, str | None, str]]:
    """The (param, system, value) rows a stored resource has in the search index (bulk loads use it too)."""
    return _indexable(stored["resourceType"], index_rows(stored, params), params)


def _indexable(rtype: str, rows: list[tuple[str, str | None, str]],
               params: dict[str, SearchParam]) -> list[tuple[str, str | None, str]]:
    """Index rows within what PostgreSQL's index takes: strings cut to their searchable prefix,
    tokens and references refused past TOKEN_INDEX_CHARS."""
    out = []
    for name, system, value in rows:
        if name in params and params[name].type == "string":  # (a date's end row is named 'param:end')
            value = value[:STRING_INDEX_CHARS]
        elif len(value) > TOKEN_INDEX_CHARS or len(system or "") > TOKEN_INDEX_CHARS:
            raise NotIndexable(f"{rtype}: a value of search parameter {name} is longer than {TOKEN_INDEX_CHARS}"
                               " characters")
        out.append((name, system, value))
    return sorted(set(out), key=lambda r: (r[0], r[1] or "", r[2]))


def create(
    conn: psycopg.Connection[Any],
    body: dict[str, Any],
    params: dict[str, SearchParam],
    rid: str | None = None,
) -> dict[str, Any]:
    """Store a new resource (version 1) under a server-assigned id unless one is given."""
    return _write(conn, body["resourceType"], rid or new_id(), 1, body, params)


def update(
    conn: psycopg.Connection[Any],
    body: dict[str, Any],
    params: dict[str, SearchParam],
    if_match: int | None = None,
) -> tuple[dict[str, Any], bool]:
    """Store a new version; creates when the id is new (or was deleted: it comes back with the next
    version number). Returns (stored, created)."""
    rtype, rid = body["resourceType"], body["id"]
    with conn.transaction():
        row = conn.execute("SELECT version, deleted FROM resource WHERE type = %s AND id = %s FOR UPDATE",
                           (rtype, rid)).fetchone()
        current = row["version"] if row is not None else None
        if if_match is not None and current != if_match:
            raise VersionConflict(f"{rtype}/{rid} is at version {current}, not {if_match}")
        return _write(conn, rtype, rid, (current or 0) + 1, body, params), row is None or bool(row["deleted"])


def read(conn: psycopg.Connection[Any], rtype: str, rid: str) -> dict[str, Any]:
    row = conn.execute(
        "SELECT body, deleted FROM resource WHERE type = %s AND id = %s", (rtype, rid)
    ).fetchone()
    if row is None:
        raise NotFound(f"{rtype}/{rid} is not known")
    if row["deleted"]:
        raise Gone(f"{rtype}/{rid} was deleted")
    return row["body"]  # type: ignore[no-any-return]


def find(conn: psycopg.Connection[Any], reference: str | None) -> dict[str, Any] | None:
    """The resource a reference names ('Type/id', also absolute or with _history), or None when
    the reference names none or it is not (or no longer) stored."""
    parts = [p for p in (reference or "").split("/_history/")[0].split("/") if p]
    if len(parts) < 2:
        return None
    try:
        return read(conn, parts[-2], parts[-1])
    except (NotFound, Gone):
        return None


def vread(conn: psycopg.Connection[Any], rtype: str, rid: str, version: int) -> dict[str, Any]:
    """One version; Gone for the version that deleted it (that version has no content)."""
    row = conn.execute(
        "SELECT body, deleted FROM resource_history WHERE type = %s AND id = %s AND version = %s",
        (rtype, rid, version),
    ).fetchone()
    if row is None:
        raise NotFound(f"{rtype}/{rid} has no version {version}")
    if row["deleted"]:
        raise Gone(f"{rtype}/{rid} was deleted in version {version}")
    return row["body"]  # type: ignore[no-any-return]


def first_stored(conn: psycopg.Connection[Any], rtype: str, rid: str) -> datetime | None:
    """When the resource's first version was stored (None when unknown)."""
    first: datetime | None = scalar(conn, "SELECT min(last_updated) FROM resource_history WHERE type = %s AND id = %s",
                                    (rtype, rid))
    return first


class Version(NamedTuple):
    """One version as history shows it: the body (a stub for a deletion) and whether it deleted."""

    body: dict[str, Any]
    deleted: bool


def versions(conn: psycopg.Connection[Any], rtype: str, rid: str) -> list[Version]:
    """Every version of one resource, newest first (a deletion as its stub: resourceType, id, meta)."""
    rows = conn.execute(
        "SELECT body, deleted FROM resource_history WHERE type = %s AND id = %s ORDER BY version DESC",
        (rtype, rid),
    ).fetchall()
    if not rows:
        raise NotFound(f"{rtype}/{rid} is not known")
    return [Version(r["body"], r["deleted"]) for r in rows]


def changes(conn: psycopg.Connection[Any], types: list[str], count: int, offset: int = 0,
            since: datetime | None = None) -> list[Version]:
    """The versions of every resource of `types`, newest first (type- and system-level history): one
    walk of (type, last_updated) per type, merged, so that a page reads about its own rows whatever
    the number of versions."""
    if not types:
        return []
    branch = sql.SQL("(SELECT body, deleted, last_updated, type, id, version FROM resource_history WHERE type = %s{since}"
                     " ORDER BY last_updated DESC, id DESC, version DESC LIMIT %s)").format(
        since=sql.SQL("" if since is None else " AND last_updated >= %s"))
    args: list[Any] = []
    for rtype in types:
        args += [rtype, *([] if since is None else [since]), count + offset]
    statement = sql.SQL("SELECT body, deleted FROM ({}) h ORDER BY last_updated DESC, type, id DESC, version DESC"
                        " LIMIT %s OFFSET %s").format(
        sql.SQL(" UNION ALL ").join([branch] * len(types)))
    rows = conn.execute(statement, [*args, count, offset]).fetchall()
    return [Version(r["body"], r["deleted"]) for r in rows]


# A deletion is a version of its own: the current row marked deleted with a stub body (resourceType,
# id, meta), the same stub in history flagged deleted, and the index rows removed (a search no longer
# finds it; a reference to it no longer keeps anything else from being deleted).
_DELETE = """
WITH clock AS MATERIALIZED (
    SELECT ts, {text} AS stamp FROM (SELECT clock_timestamp() AS ts) now
), current AS (
    UPDATE resource SET version = %(version)s, last_updated = ts, deleted = true,
        body = jsonb_set(%(body)s, '{meta,lastUpdated}', to_jsonb(stamp))
      FROM clock WHERE type = %(type)s AND id = %(id)s
    RETURNING type, id, version, last_updated, body
), history AS (
    INSERT INTO resource_history (type, id, version, last_updated, deleted, body)
    SELECT type, id, version, last_updated, true, body FROM current
), old_index AS (
    DELETE FROM search_index WHERE type = %(type)s AND id = %(id)s
)
SELECT stamp FROM clock
""".replace("{text}", LAST_UPDATED_TEXT)


def delete(conn: psycopg.Connection[Any], rtype: str, rid: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Delete a resource: (the deletion's stub, the body it deleted; None when it was deleted
    already, and the stub is then the earlier deletion's). NotFound when it never existed."""
    with conn.transaction():
        row = conn.execute("SELECT version, deleted, body FROM resource WHERE type = %s AND id = %s FOR UPDATE",
                           (rtype, rid)).fetchone()
        if row is None:
            raise NotFound(f"{rtype}/{rid} is not known")
        if row["deleted"]:
            return row["body"], None
        stub = _with_meta({"resourceType": rtype}, rid, row["version"] + 1)
        stub["meta"]["lastUpdated"] = scalar(conn, _DELETE, {"type": rtype, "id": rid, "version": row["version"] + 1,
                                                             "body": Jsonb(stub)})
        return stub, row["body"]


def referrers(conn: psycopg.Connection[Any], reference: str, params: dict[str, dict[str, SearchParam]],
              most: int = 3) -> list[str]:
    """Up to `most` current resources ('Type/id') whose reference search parameters point at
    `reference` ('Type/id'), other than itself: what a deletion would leave dangling."""
    pairs = [(rtype, p.name) for rtype, named in params.items() for p in named.values() if p.type == "reference"]
    rtype, _, rid = reference.partition("/")
    rows = conn.execute(
        "SELECT DISTINCT s.type, s.id FROM search_index s"
        " JOIN unnest(%s::text[], %s::text[]) AS p(type, param) ON s.type = p.type AND s.param = p.param"
        " WHERE s.value = %s AND NOT (s.type = %s AND s.id = %s) LIMIT %s",
        ([t for t, _ in pairs], [n for _, n in pairs], reference, rtype, rid, most)).fetchall()
    return [f"{r['type']}/{r['id']}" for r in rows]


def like(text: str) -> str:
    """`text` with LIKE's wildcards and escape character escaped, to match as written."""
    return text.replace("\\", "\\\\").replace("%", r"\%").replace("_", r"\_")


def _exact_path(param: SearchParam) -> str:
    """A JSON path to every string under the parameter's elements, for :exact (the index holds
    the normalised text; the body the text as written)."""
    return "$" + "".join(f'."{step}"' for step in param.path) + ".**"


def _index_exists(alias: str, test: sql.Composable | None = None, negated: bool = False) -> sql.Composed:
    """[NOT] EXISTS an index row of one parameter (the first argument) of the resource whose row is
    `alias`, meeting `test` when given. In a walk (`d`) it is kept a per-row subplan (OFFSET 0):
    the walk stops at the page's end only if it is not joined."""
    return sql.SQL("{negated}EXISTS (SELECT 1 FROM search_index s WHERE s.type = {a}.type AND s.id = {a}.id"
                   " AND s.last_updated = {a}.last_updated AND s.param = %s{test}{per_row})").format(
        negated=sql.SQL("NOT " if negated else ""), a=sql.Identifier(alias),
        test=sql.SQL("") if test is None else sql.SQL(" AND ({})").format(test),
        per_row=sql.SQL(" OFFSET 0" if alias == "d" else ""))


def _criterion_sql(crit: Criterion, alias: str = "r",
                   expanded: list[str] | None = None) -> tuple[sql.Composed, list[Any]]:
    """EXISTS over the search index for one parameter, its values ORed (NOT EXISTS for :not), of
    the resource whose row (resource `r`, or index row `d` of a page's walk) is `alias`.

    A string matches as FHIR R4 says (search.html#string): by default when the field's text
    starts with the value, both normalised by case and accent (`normalise`); :contains anywhere in
    it; :exact when the text equals the value as written (the index narrows by the normalised
    text, the body's own text decides). `expanded`: the stored values a prefix search matches
    (`_expand`), tested for equality. The index row's last_updated is its resource's, so an
    equality is one probe of (type, param, value, last_updated, id). In a walk (`d`) the test is
    kept a per-row subplan (OFFSET 0): the walk stops at the page's end only if it is not joined."""
    if crit.modifier == "missing":  # whether the resource has any index row of the parameter
        return _index_exists(alias, negated=crit.values[0][1] == "true"), [crit.param.name]
    if crit.comparisons or crit.chain is not None or crit.has is not None:
        return _linked_sql(crit, alias)
    ors: list[str] = []
    args: list[Any] = [crit.param.name]
    exact: list[str] = []
    if expanded is not None:
        ors.append("s.value = ANY(%s)")
        args.append(expanded)
    for system, value in crit.values if expanded is None else []:
        if crit.param.type == "string":
            text = normalise(value)[:STRING_INDEX_CHARS]
            if crit.modifier == "exact":
                ors.append("s.value = %s")
                args.append(text)
                exact.append(value)
            elif crit.modifier == "contains":
                ors.append("s.value LIKE %s")
                args.append("%" + like(text) + "%")
            else:
                ors.append("s.value LIKE %s")
                args.append(like(text) + "%")
        elif crit.param.type == "reference" and "/" not in value:
            ors.append("s.value LIKE %s")
            args.append("%/" + like(value))
        elif system is ANY_SYSTEM:
            ors.append("s.value = %s")
            args.append(value)
        elif system is None:
            ors.append("(s.value = %s AND s.system IS NULL)")
            args.append(value)
        elif value == "":
            ors.append("s.system = %s")
            args.append(system)
        else:
            ors.append("(s.value = %s AND s.system = %s)")
            args.extend([value, system])
    values = sql.SQL(" OR ").join(map(sql.SQL, ors or ["false"]))  # no value (a chain that found none): nothing
    exists = _index_exists(alias, values, negated=crit.modifier == "not")
    if exact:
        body = sql.SQL("jsonb_path_exists(c.body, %s::jsonpath, %s)") if alias == "c" else _EXACT  # a chain's resource
        exists = sql.SQL("({} AND {})").format(exists, body)
        args.extend(_exact_args(crit.param, exact))
    return exists, args


# A date is indexed twice, as text whose byte order is time order: a row named as the parameter
# with its range's low end in `value` (high in `system`), and a row 'param:end' with the high end in
# `value` (low in `system`), so that a bound on either end is an index range. Each prefix as HAPI
# FHIR compares the ranges (R4 search.html#prefix): (which row, test, its arguments). ap's range is
# the value's, widened by the search module.
DATE_END = ":end"
_DATE_SQL = {
    "eq": ("", "(s.value ~>=~ %s AND s.value ~<~ %s AND s.system ~<=~ %s)", ("low", "high", "high")),  # low < high
    "ne": ("", "(s.value ~<~ %s OR s.system ~>~ %s)", ("low", "high")),
    "gt": (DATE_END, "s.value ~>~ %s", ("high",)),
    "lt": ("", "s.value ~<~ %s", ("low",)),
    "ge": (DATE_END, "s.value ~>~ %s", ("low",)),
    "le": ("", "s.value ~<~ %s", ("high",)),
    "sa": ("", "s.value ~>=~ %s", ("high",)),
    "eb": (DATE_END, "s.value ~<=~ %s", ("low",)),
    "ap": ("", "(s.value ~<~ %s AND s.system ~>~ %s)", ("high", "low")),
}
# A number row holds a plain decimal in `value` (cast only on this parameter's rows: other rows are
# text) and a quantity's unit as system|code in `system`.
_NUMBER = "(CASE WHEN s.param = %s THEN s.value::numeric END)"
_NUMBER_SQL = {
    "eq": ("({n} >= %s AND {n} < %s)", ("low", "high")),
    "ne": ("NOT ({n} >= %s AND {n} < %s)", ("low", "high")),
    "gt": ("{n} > %s", ("value",)),
    "lt": ("{n} < %s", ("value",)),
    "ge": ("{n} >= %s", ("value",)),
    "le": ("{n} <= %s", ("value",)),
    "sa": ("{n} > %s", ("value",)),
    "eb": ("{n} < %s", ("value",)),
    "ap": ("({n} >= %s AND {n} < %s)", ("low", "high")),
}


def _number_sql(crit: Criterion) -> tuple[list[str], list[Any]]:
    ors: list[str] = []
    args: list[Any] = []
    for c in crit.comparisons:
        text, fields = _NUMBER_SQL[c.prefix]
        test = text.replace("{n}", _NUMBER)
        for f in fields:
            args += [crit.param.name, getattr(c, f)]
        if c.unit is not None and c.unit.startswith("*|"):
            test = f"({test} AND s.system LIKE %s)"
            args.append("%|" + like(c.unit[2:]))
        elif c.unit is not None:
            test = f"({test} AND s.system = %s)"
            args.append(c.unit)
        ors.append(test)
    return ors, args


def _linked_sql(crit: Criterion, alias: str) -> tuple[sql.Composed, list[Any]]:
    """EXISTS for a date, number or quantity parameter, a chain or _has, of the row `alias` (as
    `_criterion_sql`). A chain tests the referenced resource by its primary key; _has finds the
    referring resources' index rows by (type, param, value) and tests each as its own criterion says."""
    a = sql.Identifier(alias)
    per_row = sql.SQL(" OFFSET 0" if alias == "d" else "")
    if crit.has is not None:
        source, inner = crit.has
        inner_sql, inner_args = _criterion_sql(inner, "h")
        return sql.SQL("EXISTS (SELECT 1 FROM search_index h WHERE h.type = %s AND h.param = %s"
                       " AND h.value = {a}.type || '/' || {a}.id AND {inner}{per_row})").format(
            a=a, inner=inner_sql, per_row=per_row), [source, crit.param.name, *inner_args]
    if crit.chain is not None:
        target, inner = crit.chain
        inner_sql, inner_args = _criterion_sql(inner, "c")
        return _index_exists(alias, sql.SQL("s.value LIKE %s AND EXISTS (SELECT 1 FROM resource c WHERE c.type = %s"
                                            " AND c.id = substr(s.value, %s) AND NOT c.deleted AND {inner})").format(
            inner=inner_sql)), [crit.param.name, like(target) + "/%", target, len(target) + 2, *inner_args]
    if crit.param.type != "date":
        ors, args = _number_sql(crit)
        return _index_exists(alias, sql.SQL(" OR ").join(map(sql.SQL, ors or ["false"]))), [crit.param.name, *args]
    tests: list[sql.Composable] = []  # one EXISTS per kind of row the comparisons test, ORed
    date_args: list[Any] = []
    for row in ("", DATE_END):
        chosen = [(text, fields, c) for c in crit.comparisons for kind, text, fields in [_DATE_SQL[c.prefix]]
                  if kind == row]
        if chosen:
            tests.append(_index_exists(alias, sql.SQL(" OR ").join([sql.SQL(text) for text, _, _ in chosen])))
            date_args += [crit.param.name + row, *(getattr(c, f) for _, fields, c in chosen for f in fields)]
    return sql.SQL("({})").format(sql.SQL(" OR ").join(tests or [sql.SQL("false")])), date_args


_EXACT = sql.SQL("jsonb_path_exists(r.body, %s::jsonpath, %s)")  # the text as written, in the body


def _exact_args(param: SearchParam, texts: list[str]) -> list[Any]:
    test = " || ".join(f"@ == $v{n}" for n in range(len(texts)))
    return [f"{_exact_path(param)} ? ({test})", Jsonb({f"v{n}": v for n, v in enumerate(texts)})]


_OPS = {"gt": sql.SQL(">"), "lt": sql.SQL("<"), "ge": sql.SQL(">="), "le": sql.SQL("<="), "eq": sql.SQL("=")}


class Page(NamedTuple):
    """One page of a search: the total when known, the bodies, whether more follow."""

    total: int | None
    found: list[dict[str, Any]]
    more: bool


def _where(rtype: str, query: Query) -> tuple[sql.Composable, list[Any]]:
    where: list[sql.Composable] = [sql.SQL("r.type = %s AND NOT r.deleted")]
    args: list[Any] = [rtype]
    if query.ids:
        where.append(sql.SQL("r.id = ANY(%s)"))
        args.append(query.ids)
    for op, when in query.last_updated:
        where.append(sql.SQL("r.last_updated {} %s").format(_OPS[op]))
        args.append(when)
    for crit in query.criteria:
        exists, crit_args = _criterion_sql(crit)
        where.append(exists)
        args.extend(crit_args)
    return sql.SQL(" AND ").join(where), args


# -- choosing a page from the index alone ---------------------------------------------------------
EXPAND_MOST = 32  # a prefix matching more stored values than this is not walked value by value

# The stored values of each (param, prefix), in byte order, one index descent each: the next value
# is the first one above the last, and the walk ends at the first that does not start with the
# prefix, or past `most` values (then the prefix is too common to walk value by value).
_EXPAND = """
WITH RECURSIVE walk(n, param, prefix, value, k) AS (
    SELECT p.n, p.param, p.prefix,
           (SELECT s.value FROM search_index s WHERE s.type = %(type)s AND s.param = p.param
               AND s.value ~>=~ p.prefix ORDER BY s.value USING ~<~ LIMIT 1), 1
      FROM unnest(%(params)s::text[], %(prefixes)s::text[]) WITH ORDINALITY AS p(param, prefix, n)
    UNION ALL
    SELECT w.n, w.param, w.prefix,
           (SELECT s.value FROM search_index s WHERE s.type = %(type)s AND s.param = w.param
               AND s.value ~>~ w.value ORDER BY s.value USING ~<~ LIMIT 1), w.k + 1
      FROM walk w WHERE starts_with(w.value, w.prefix) AND w.k <= %(most)s
)
SELECT n, value FROM walk WHERE starts_with(value, prefix)
"""


def _prefix_search(crit: Criterion) -> bool:
    return crit.param.type == "string" and crit.modifier is None


def _expand(conn: psycopg.Connection[Any], rtype: str,
            criteria: list[Criterion]) -> dict[int, list[str] | None]:
    """criterion number -> the stored values its prefixes match (None: more than EXPAND_MOST),
    for the prefix string searches among `criteria`; one round trip."""
    pairs = [(n, crit.param.name, normalise(value)[:STRING_INDEX_CHARS])
             for n, crit in enumerate(criteria) if _prefix_search(crit) for _, value in crit.values]
    if not pairs:
        return {}
    rows = conn.execute(_EXPAND, {"type": rtype, "params": [p for _, p, _ in pairs],
                                  "prefixes": [v for _, _, v in pairs], "most": EXPAND_MOST},
                        prepare=False).fetchall()
    found: dict[int, list[str]] = {}
    for row in rows:
        found.setdefault(row["n"] - 1, []).append(row["value"])
    out: dict[int, list[str] | None] = {}
    for k, (n, _, _) in enumerate(pairs):
        values = found.get(k, [])
        if len(values) > EXPAND_MOST or out.get(n, []) is None:
            out[n] = None
        else:
            out[n] = sorted({*(out.get(n) or []), *values})
    return out


Keys = list[tuple[str, str | None, bool]]  # (value, system, any system) of one index equality each


def _candidates(criteria: list[Criterion], expanded: dict[int, list[str] | None]) -> dict[int, Keys]:
    """The criteria a page can be walked by, with their index keys: those whose every value is
    an index equality (a token or reference, an :exact string, a prefix with few stored values)."""
    out: dict[int, Keys] = {}
    for n, crit in enumerate(criteria):
        if crit.modifier in ("not", "contains", "missing") or crit.comparisons or crit.chain is not None \
                or crit.has is not None:
            continue
        if _prefix_search(crit):
            values = expanded.get(n)
            if values is not None:
                out[n] = [(v, None, True) for v in values]
        elif crit.param.type == "string":  # :exact
            out[n] = [(normalise(v)[:STRING_INDEX_CHARS], None, True) for _, v in crit.values]
        elif not any((crit.param.type == "reference" and "/" not in value) or (value == "" and system is not None)
                     for system, value in crit.values):  # not a reference by id alone or a system alone
            out[n] = [(value, None if system is None or system is ANY_SYSTEM else str(system), system is ANY_SYSTEM)
                      for system, value in crit.values]
    return out


COUNT_UP_TO = 1000  # index rows counted per candidate to choose the rarest: a bounded, index-only read


def _driver(conn: psycopg.Connection[Any], rtype: str, criteria: list[Criterion],
            candidates: dict[int, Keys]) -> int:
    """The candidate with the fewest index rows (counted up to COUNT_UP_TO; one round trip), so that
    the walk reads at most that many rows whatever the other conditions match. The planner cannot
    be left to choose: it takes conditions on one resource's index rows as independent and expects
    almost no resource to meet two of them."""
    if len(candidates) == 1:
        return next(iter(candidates))
    counts = _counts(conn, rtype, criteria, candidates, {})
    return min(candidates, key=lambda n: counts[n])


def _other_conditions(query: Query, driver: int, expanded: dict[int, list[str] | None]
                      ) -> tuple[list[sql.Composable], list[Any], bool]:
    """What an index row `d` of the driving criterion must also meet (_lastUpdated, _id, every
    other criterion) as " AND …" clauses and their arguments, and whether a string :exact criterion
    needs the resource's body joined."""
    where: list[sql.Composable] = []
    args: list[Any] = []
    for op, when in query.last_updated:
        where.append(sql.SQL(" AND d.last_updated {} %s").format(_OPS[op]))
        args.append(when)
    if query.ids:
        where.append(sql.SQL(" AND d.id = ANY(%s)"))
        args.append(query.ids)
    for n, other in enumerate(query.criteria):
        if n != driver:
            exists, crit_args = _criterion_sql(other, "d", expanded.get(n))
            where.append(sql.SQL(" AND ") + exists)
            args.extend(crit_args)
    return where, args, any(c.param.type == "string" and c.modifier == "exact" for c in query.criteria)


def _walk_statement(rtype: str, query: Query, driver: int, keys: Keys,
                    expanded: dict[int, list[str] | None]) -> tuple[sql.Composed, list[Any]]:
    """For each index key of the driving criterion, its rows in (last_updated, id) order, each
    checked against the other conditions, up to the end of the page (offset + count + 1): an index
    walk that stops there however common the value. The page is the first of their union; only its
    resources are read. Each key is a branch of its own with its value written out, so that the
    planner sees how common it is (and may rather start from a rarer condition and sort)."""
    direction = sql.SQL("DESC" if query.descending else "ASC")
    crit = query.criteria[driver]
    where, args, exact = _other_conditions(query, driver, expanded)
    if crit.modifier == "exact":
        where.append(sql.SQL(" AND ") + _EXACT)
        args.extend(_exact_args(crit.param, [v for _, v in crit.values]))
    end = query.offset + query.count + 1
    branch = sql.SQL("(SELECT d.last_updated, d.id FROM search_index d{join}"
                     " WHERE d.type = %s AND d.param = %s AND d.value = %s{system}{where}"
                     " ORDER BY d.last_updated {dir}, d.id {dir} LIMIT %s)")
    branches: list[sql.Composable] = []
    branch_args: list[Any] = []
    for value, system, any_system in keys:
        branches.append(branch.format(
            join=sql.SQL(" JOIN resource r ON r.type = d.type AND r.id = d.id" if exact else ""),
            system=sql.SQL("" if any_system else " AND d.system IS NULL" if system is None else " AND d.system = %s"),
            where=sql.Composed(where), dir=direction))
        branch_args += [rtype, crit.param.name, value, *([] if any_system or system is None else [system]), *args, end]
    statement = sql.SQL("""
SELECT r.body FROM (
    SELECT DISTINCT c.last_updated, c.id FROM ({branches}) c
     ORDER BY c.last_updated {dir}, c.id {dir} LIMIT %s OFFSET %s) p
  JOIN resource r ON r.type = %s AND r.id = p.id
 WHERE NOT r.deleted
 ORDER BY p.last_updated {dir}, p.id {dir}""").format(branches=sql.SQL(" UNION ALL ").join(branches), dir=direction)
    return statement, [*branch_args, query.count + 1, query.offset, rtype]


Range = tuple[str, str, list[str]]  # (index row name, test on the row `d`, its arguments)


def _date_range_keys(crit: Criterion) -> Range | None:
    """A date criterion of one comparison bounds a range of its index rows (of the row by its low
    end or by its high end, `_DATE_SQL`): the rows a page could be read from."""
    if crit.param.type != "date" or len(crit.comparisons) != 1 or crit.comparisons[0].prefix == "ne":
        return None
    c = crit.comparisons[0]
    row, test, fields = _DATE_SQL[c.prefix]
    return crit.param.name + row, test.replace("s.", "d."), [getattr(c, f) for f in fields]


def _counts(conn: psycopg.Connection[Any], rtype: str, criteria: list[Criterion], candidates: dict[int, Keys],
            ranges: dict[int, Range]) -> dict[int, int]:
    """Index rows of each candidate and each date range, counted up to COUNT_UP_TO (one round trip)."""
    counts: list[sql.Composable] = []
    args: list[Any] = []
    order = [*candidates, *ranges]
    for n in candidates:
        counts.append(sql.SQL("(SELECT count(*) FROM (SELECT 1 FROM search_index s WHERE s.type = %s AND s.param = %s"
                              " AND s.value = ANY(%s) LIMIT %s) x)"))
        args += [rtype, criteria[n].param.name, [k[0] for k in candidates[n]], COUNT_UP_TO]
    for n in ranges:
        name, test, test_args = ranges[n]
        counts.append(sql.SQL("(SELECT count(*) FROM (SELECT 1 FROM search_index d WHERE d.type = %s AND d.param = %s"
                              " AND {} LIMIT %s) x)").format(sql.SQL(test)))
        args += [rtype, name, *test_args, COUNT_UP_TO]
    row = conn.execute(sql.SQL("SELECT ARRAY[{}] AS counts").format(sql.SQL(", ").join(counts)), args,
                       prepare=False).fetchone()
    assert row is not None
    return dict(zip(order, row["counts"], strict=True))


def _range_statement(rtype: str, query: Query, driver: int, keys: Range,
                     expanded: dict[int, list[str] | None]) -> tuple[sql.Composed, list[Any]]:
    """A page read from the index rows of a rare date range (fewer than COUNT_UP_TO): those rows,
    each checked against the other conditions, sorted by (last_updated, id); only the page's
    resources are read. A common range is not read this way: resources are walked in order."""
    direction = sql.SQL("DESC" if query.descending else "ASC")
    name, test, test_args = keys
    where, args, exact = _other_conditions(query, driver, expanded)
    statement = sql.SQL("""
SELECT r.body FROM (
    SELECT DISTINCT d.last_updated, d.id FROM search_index d{join}
     WHERE d.type = %s AND d.param = %s AND {test}{where}
     ORDER BY d.last_updated {dir}, d.id {dir} LIMIT %s OFFSET %s) p
  JOIN resource r ON r.type = %s AND r.id = p.id
 WHERE NOT r.deleted
 ORDER BY p.last_updated {dir}, p.id {dir}""").format(
        join=sql.SQL(" JOIN resource r ON r.type = d.type AND r.id = d.id" if exact else ""), test=sql.SQL(test),
        where=sql.Composed(where), dir=direction)
    return statement, [rtype, name, *test_args, *args, query.count + 1, query.offset, rtype]


def _sorted_statement(rtype: str, query: Query) -> tuple[sql.Composed, list[Any]]:
    """A page ordered by a date parameter (`_sort=-issued`), by the low end of its earliest value as
    HAPI FHIR orders, resources without one last: every match is read and sorted, so its cost is the
    number of matches (narrow the search; the _lastUpdated order is the one walked from the index)."""
    clause, args = _where(rtype, query)
    direction = sql.SQL("DESC" if query.descending else "ASC")
    statement = sql.SQL("SELECT r.body FROM resource r LEFT JOIN LATERAL (SELECT min(s.value) AS k FROM search_index s"
                        " WHERE s.type = r.type AND s.id = r.id AND s.param = %s) o ON true WHERE {}"
                        " ORDER BY o.k {dir} NULLS LAST, r.last_updated {dir}, r.id {dir} LIMIT %s OFFSET %s")
    return statement.format(clause, dir=direction), [query.sort_by, *args, query.count + 1, query.offset]


def page_statement(conn: psycopg.Connection[Any], rtype: str, query: Query) -> tuple[sql.Composed, list[Any]]:
    """The statement that reads one page, and one row more to tell whether more follow.

    When a criterion's values are index equalities (`_driver`) the page is walked from the index
    (`_walk_statement`): its cost is the page's, not the number of matches. A date range with fewer
    index rows than that (or than COUNT_UP_TO, alone) is read instead (`_range_statement`). Otherwise (no
    criteria, or only :not, :contains, a prefix of many stored values, a reference by id alone)
    resources are read in last_updated order, each tested through the index."""
    expanded = _expand(conn, rtype, query.criteria)
    candidates = _candidates(query.criteria, expanded)
    if any(not keys for keys in candidates.values()):  # a prefix no stored value starts with
        return sql.Composed([sql.SQL("SELECT NULL::jsonb AS body WHERE false")]), []
    if query.sort_by is not None:
        return _sorted_statement(rtype, query)
    ranges = {n: r for n, crit in enumerate(query.criteria) if (r := _date_range_keys(crit)) is not None}
    if ranges:  # a date criterion may be the rarest: counted with the others (one round trip)
        counts = _counts(conn, rtype, query.criteria, candidates, ranges)
        rarest = min(counts, key=lambda n: counts[n])
        if rarest in ranges and counts[rarest] < COUNT_UP_TO:
            return _range_statement(rtype, query, rarest, ranges[rarest], expanded)
        if candidates:
            driver = min(candidates, key=lambda n: counts[n])
            return _walk_statement(rtype, query, driver, candidates[driver], expanded)
    elif candidates:
        driver = _driver(conn, rtype, query.criteria, candidates)
        return _walk_statement(rtype, query, driver, candidates[driver], expanded)
    clause, args = _where(rtype, query)
    direction = sql.SQL("DESC" if query.descending else "ASC")
    statement = sql.SQL("SELECT body FROM resource r WHERE {} ORDER BY r.last_updated {dir}, r.id {dir}"
                        " LIMIT %s OFFSET %s")
    return statement.format(clause, dir=direction), [*args, query.count + 1, query.offset]


def search(conn: psycopg.Connection[Any], rtype: str, query: Query) -> Page:
    """One page of a type-level search, newest last (or first when `descending`).

    The total is counted only when asked (`Query.total` "accurate"; "estimate" is the planner's
    row estimate): counting every match of a common name on every page cost more than finding the
    page. Without it the total is still given when the first page holds every match. Statements
    are planned with their values (never as prepared generic plans), so the planner sees how
    common each value is."""
    query = resolve_chains(conn, query, rtype)
    statement, args = page_statement(conn, rtype, query)
    rows = conn.execute(statement, args, prepare=False).fetchall()
    found, more = [r["body"] for r in rows[:query.count]], len(rows) > query.count
    total: int | None = None
    if query.total == "accurate" or (query.total == "estimate" and (more or query.offset)):
        total = _count(conn, rtype, query)
    elif query.total != "none" and query.offset == 0 and not more:
        total = len(found)
    return Page(total, found, more)


CHAIN_MOST = 1000  # a chain's referenced resources looked up first, up to this many


NO_ID = "!"  # not a FHIR id: an id filter that nothing passes


def _first_ids(conn: psycopg.Connection[Any], rtype: str, inner: Criterion) -> list[str] | None:
    """The ids of the `rtype` resources that meet `inner`, when CHAIN_MOST or fewer (a page search)."""
    statement, args = page_statement(conn, rtype, Query(criteria=[inner], count=CHAIN_MOST))
    rows = conn.execute(sql.SQL("SELECT p.body->>'id' AS id FROM ({}) p").format(statement), args,
                        prepare=False).fetchall()
    return [r["id"] for r in rows] if len(rows) <= CHAIN_MOST else None


def resolve_chains(conn: psycopg.Connection[Any], query: Query, rtype: str | None = None) -> Query:
    """Each chain (`subject:Patient.identifier=`) replaced by the references it stands for, when the
    referenced resources that meet it are found first and few (up to CHAIN_MOST; one search of the
    referenced type each): the criterion is then an index equality a page can be walked by. Each
    _has (of a search of `rtype`) likewise by the ids its few referring resources refer to. Otherwise
    the criterion stays, tested row by row (`_linked_sql`)."""
    if not any(c.chain is not None or (c.has is not None and rtype is not None) for c in query.criteria):
        return query
    criteria = []
    ids = list(query.ids)
    for crit in query.criteria:
        if crit.chain is not None:
            target, inner = crit.chain
            found = _first_ids(conn, target, inner)
            if found is not None:
                crit = Criterion(crit.param, [(ANY_SYSTEM, f"{target}/{i}") for i in found])
        elif crit.has is not None and rtype is not None:
            source, inner = crit.has
            found = _first_ids(conn, source, inner)
            if found is not None:
                rows = conn.execute("SELECT DISTINCT substr(value, %s) AS id FROM search_index WHERE type = %s"
                                    " AND param = %s AND id = ANY(%s) AND value LIKE %s",
                                    (len(rtype) + 2, source, crit.param.name, found, like(rtype) + "/%")).fetchall()
                referred = [r["id"] for r in rows]
                ids = [i for i in ids if i in referred] if ids else referred
                ids = ids or [NO_ID]
                continue
        criteria.append(crit)
    return replace(query, criteria=criteria, ids=ids)


def _count(conn: psycopg.Connection[Any], rtype: str, query: Query) -> int:
    clause, args = _where(rtype, query)
    if query.total == "estimate":
        explain = sql.SQL("EXPLAIN (FORMAT JSON) SELECT 1 FROM resource r WHERE {}").format(clause)
        plan = conn.execute(explain, args, prepare=False).fetchone()
        return int(next(iter(plan.values()))[0]["Plan"]["Plan Rows"]) if plan else 0
    row = conn.execute(sql.SQL("SELECT count(*) AS n FROM resource r WHERE {}").format(clause), args,
                       prepare=False).fetchone()
    return int(row["n"]) if row else 0


def matches(conn: psycopg.Connection[Any], rtype: str, rid: str, query: Query) -> bool:
    """Whether the stored resource is in the result of the search `query` (as a search would find it)."""
    clause, args = _where(rtype, Query(criteria=query.criteria, ids=[rid], last_updated=query.last_updated))
    return bool(scalar(conn, sql.SQL("SELECT EXISTS (SELECT 1 FROM resource r WHERE {})").format(clause), args))


def read_many(
    conn: psycopg.Connection[Any], refs: Iterable[str]
) -> list[dict[str, Any]]:
    """Current bodies for 'Type/id' references (for _include); unknown ones are skipped."""
    pairs = [tuple(ref.split("/", 1)) for ref in dict.fromkeys(refs) if "/" in ref]
    if not pairs:
        return []
    rows = conn.execute(
        "SELECT body FROM resource WHERE NOT deleted AND (type, id) IN"
        " (SELECT * FROM unnest(%s::text[], %s::text[]))",
        ([p[0] for p in pairs], [p[1] for p in pairs]),
    ).fetchall()
    return [r["body"] for r in rows]


REVINCLUDE_MOST = 1000  # resources one _revinclude adds to a page, at most


def read_referring(conn: psycopg.Connection[Any], source: str, param: str, refs: Iterable[str]) -> list[dict[str, Any]]:
    """Current `source` resources whose reference parameter `param` names one of `refs` ('Type/id'),
    for _revinclude: one probe of the search index per reference."""
    wanted = list(dict.fromkeys(refs))
    if not wanted:
        return []
    rows = conn.execute(
        "SELECT r.body FROM resource r WHERE r.type = %s AND NOT r.deleted AND r.id IN"
        " (SELECT s.id FROM search_index s WHERE s.type = %s AND s.param = %s AND s.value = ANY(%s) LIMIT %s)"
        " ORDER BY r.last_updated, r.id",
        (source, source, param, wanted, REVINCLUDE_MOST)).fetchall()
    return [r["body"] for r in rows]
