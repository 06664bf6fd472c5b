"""FHIR search parameters in, a store Query out. Pure: no I/O.

An unknown parameter is refused (400) rather than ignored: a mistyped filter that silently
returns every report is the worse failure in a clinical system. `Prefer: handling=lenient`
restores FHIR's default of ignoring it.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from ..store.resources import ANY_SYSTEM, Criterion, Query
from ..store.search_params import SearchParam, normalise_reference

MAX_COUNT = 200
DEFAULT_COUNT = 20
RESULT_PARAMS = {"_count", "_offset", "_include", "_sort", "_format", "_pretty", "_total", "_elements", "_summary"}
MODIFIERS = {"exact", "not", "contains"}
TOTALS = ("none", "estimate", "accurate")
MAX_VALUE = 1000  # characters of one search value; longer ones are refused, not silently cut


class SearchError(ValueError):
    """The search cannot be run as asked (HTTP 400); the message is safe to return."""



@dataclass
class Search:
    query: Query
    includes: list[tuple[str, str]] = field(default_factory=list)  # (source type, param)
    ignored: list[str] = field(default_factory=list)


def parse_instant(value: str) -> datetime:
    """A FHIR dateTime/instant (date-only means the start of that day in UTC)."""
    text = value.strip().replace(" ", "+")  # an unencoded '+' in a query string arrives as a space
    if len(text) == 10:
        text += "T00:00:00+00:00"
    text = text.replace("Z", "+00:00")
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise SearchError("_lastUpdated: not a FHIR dateTime") from exc
    if when.tzinfo is None:
        raise SearchError("_lastUpdated: a time zone is required")
    return when


def _int(name: str, raw: str, low: int, high: int) -> int:
    try:
        value = int(raw)
    except ValueError as exc:
        raise SearchError(f"{name} must be an integer") from exc
    if not low <= value <= high:
        raise SearchError(f"{name} must be between {low} and {high}")
    return value


def _values(param: SearchParam, raw: str) -> list[tuple[str | None | object, str]]:
    out: list[tuple[str | None | object, str]] = []
    for part in raw.split(","):
        if part == "":
            raise SearchError(f"{param.name}: empty value")
        if param.type == "token" and "|" in part:
            system, _, code = part.partition("|")
            out.append((system or None, code))
        elif param.type == "reference":
            ref = normalise_reference(part)
            if "/" not in ref and param.target:
                ref = f"{param.target}/{ref}"
            out.append((ANY_SYSTEM, ref))
        else:
            out.append((ANY_SYSTEM, part))
    return out


def parse(
    rtype: str,
    args: Iterable[tuple[str, str]],
    params: dict[str, SearchParam],
    *,
    lenient: bool = False,
) -> Search:
    search = Search(Query(count=DEFAULT_COUNT))
    for key, raw in args:
        if "\x00" in key or "\x00" in raw:
            raise SearchError("search parameters and values cannot hold NUL characters")
        if len(raw) > MAX_VALUE:
            raise SearchError(f"{key[:40]}: a search value is limited to {MAX_VALUE} characters")
        name, _, modifier = key.partition(":")
        if name == "_id":
            search.query.ids.extend(v for v in raw.split(",") if v)
        elif name == "_lastUpdated":
            prefix = raw[:2] if raw[:2] in ("gt", "lt", "ge", "le", "eq") else "eq"
            value = raw[2:] if raw[:2] == prefix else raw
            search.query.last_updated.append((prefix, parse_instant(value)))
        elif name == "_count":
            search.query.count = _int("_count", raw, 0, MAX_COUNT)
        elif name == "_offset":
            search.query.offset = _int("_offset", raw, 0, 10_000_000)
        elif name == "_sort":
            if raw not in ("_lastUpdated", "-_lastUpdated"):
                raise SearchError("_sort: only _lastUpdated and -_lastUpdated are supported")
            search.query.descending = raw.startswith("-")
        elif name == "_total":
            if raw not in TOTALS:
                raise SearchError("_total: one of none, estimate, accurate")
            search.query.total = raw
        elif name == "_include":
            source, _, pname = raw.partition(":")
            if source != rtype or pname not in params or params[pname].type != "reference":
                raise SearchError(f"_include={raw[:80]} is not supported on {rtype}")
            search.includes.append((source, pname))
        elif name in RESULT_PARAMS:
            if name == "_format" and "json" not in raw:
                raise SearchError("_format: only JSON is served")
        elif name in params:
            if modifier and modifier not in MODIFIERS:
                raise SearchError(f"{key[:40]}: modifier :{modifier[:20]} is not supported")
            if modifier in ("exact", "contains") and params[name].type != "string":
                raise SearchError(f"{key[:40]}: :{modifier} applies to string parameters only")
            search.query.criteria.append(Criterion(params[name], _values(params[name], raw), modifier or None))
        elif lenient:
            search.ignored.append(key)
        else:
            known = ", ".join(sorted(["_id", "_lastUpdated", *params]))
            raise SearchError(f"unknown search parameter {key[:40]!r} for {rtype}; supported: {known}")
    if search.query.count == 0 and search.query.total is None:
        search.query.total = "accurate"  # _count=0 asks for nothing but how many
    return search
