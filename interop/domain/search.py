"""FHIR search parameters in, a store Query out. Pure: no I/O.

An unknown parameter is refused (400) rather than ignored: a mistyped filter that silently
returns every report is the worse failure in a clinical system. `Prefer: handling=lenient`
restores FHIR's default of ignoring it.

Beyond plain parameters, as HAPI FHIR users write them: date, number and quantity values with
R4's prefixes (eq ne gt lt ge le sa eb ap; a date is the range its precision gives), one level of
chaining (`subject:Patient.identifier=`, `patient.family=`), `_has` (`_has:DiagnosticReport:subject:status=`),
`_include`, `_revinclude`, `_summary` and `_elements`.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation

from ..store.resources import ANY_SYSTEM, Comparison, Criterion, Query
from ..store.search_params import SearchParam, date_range, moment, normalise_reference, number_text, stamp

MAX_COUNT = 200
DEFAULT_COUNT = 20
RESULT_PARAMS = {"_count", "_offset", "_include", "_revinclude", "_sort", "_format", "_pretty", "_total", "_elements",
                 "_summary"}
MODIFIERS = {"exact", "not", "contains"}
TOTALS = ("none", "estimate", "accurate")
TOTAL_METHODS = {"count": "accurate", "estimate": "estimate", "none": "none"}
SUMMARIES = ("true", "false", "text", "data", "count")
PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
ORDERED = ("date", "number", "quantity")  # the types whose values take a prefix
MAX_VALUE = 1000  # characters of one search value; longer ones are refused, not silently cut
Table = dict[str, dict[str, SearchParam]]  # resource type -> its search parameters


class SearchError(ValueError):
    """The search cannot be run as asked (HTTP 400); the message is safe to return."""



@dataclass
class Search:
    query: Query
    includes: list[tuple[str, str]] = field(default_factory=list)  # (source type, param)
    revincludes: list[tuple[str, str]] = field(default_factory=list)  # (referring type, its reference param)
    ignored: list[str] = field(default_factory=list)
    summary: str | None = None  # _summary: true | text | data | count (false: None)
    elements: list[str] | None = None  # _elements
    notes: list[str] = field(default_factory=list)  # warnings for the searchset (an outcome entry)


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


def _last_updated_range(prefix: str, text: str) -> list[tuple[str, datetime]]:
    try:
        low, high = (moment(b) for b in date_range(text))
    except (ValueError, OverflowError):
        raise SearchError("_lastUpdated: not a FHIR date or instant") from None
    return {"eq": [("ge", low), ("lt", high)], "gt": [("ge", high)], "ge": [("ge", low)], "lt": [("lt", low)],
            "le": [("lt", high)]}[prefix]


def _int(name: str, raw: str, low: int, high: int) -> int:
    try:
        value = int(raw)
    except ValueError as exc:
        raise SearchError(f"{name} must be an integer") from exc
    if not low <= value <= high:
        raise SearchError(f"{name} must be between {low} and {high}")
    return value


def _prefixed(part: str) -> tuple[str, str]:
    if part[:2] in PREFIXES and len(part) > 2:
        return part[:2], part[2:]
    return "eq", part


def _date(param: SearchParam, part: str, now: datetime) -> Comparison:
    prefix, text = _prefixed(part.replace(" ", "+"))  # an unencoded '+' in a query string arrives as a space
    try:
        low, high = date_range(text)
    except (ValueError, OverflowError):
        raise SearchError(f"{param.name}: {text[:40]!r} is not a FHIR date (2026, 2026-12, 2026-12-01,"
                          " 2026-12-01T10:00:00Z)") from None
    if prefix == "ap":  # R4: within 10 % of the gap between the value and now (at least a day)
        start = moment(low)
        gap = max(abs(now - start) / 10, timedelta(days=1))
        try:
            low = stamp(start - gap)
            high = stamp(moment(high) + gap)
        except (ValueError, OverflowError):
            pass  # at the ends of the calendar: the value's own range
    return Comparison(prefix, low, high)


def _number(param: SearchParam, part: str) -> Comparison:
    """A number as R4 reads it: '100' stands for [99.5, 100.5), '100.0' for [99.95, 100.05); a
    quantity may name its unit (`5.4|http://unitsofmeasure.org|mg`, `5.4||mg`)."""
    prefix, text = _prefixed(part)
    unit = None
    if param.type == "quantity" and "|" in text:
        text, _, rest = text.partition("|")
        system, _, code = rest.partition("|")
        if not code:
            raise SearchError(f"{param.name}: a quantity is number, number|system|code or number||code")
        unit = f"{system}|{code}" if system else f"*|{code}"
    try:
        number = Decimal(text)
    except InvalidOperation:
        raise SearchError(f"{param.name}: {text[:40]!r} is not a number") from None
    if not number.is_finite():
        raise SearchError(f"{param.name}: {text[:40]!r} is not a number")
    half = Decimal(5).scaleb(number.as_tuple().exponent - 1)  # type: ignore[operator]
    if prefix == "ap":
        half = max(half, abs(number) / 10)
    return Comparison(prefix, number_text(number - half), number_text(number + half), unit, number_text(number))


def _comparisons(param: SearchParam, raw: str, now: datetime) -> list[Comparison]:
    out = []
    for part in raw.split(","):
        if part == "":
            raise SearchError(f"{param.name}: empty value")
        out.append(_date(param, part, now) if param.type == "date" else _number(param, part))
    return out


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


def _criterion(rtype: str, key: str, raw: str, params: dict[str, SearchParam], table: Table | None,
               now: datetime, depth: int = 0) -> Criterion | None:
    """The criterion of one parameter (None when the name is not a parameter of `rtype`)."""
    if key.startswith("_has:"):
        return _has(rtype, key, raw, table, now, depth)
    head, dot, tail = key.partition(".")
    if dot:
        return _chain(rtype, head, tail, raw, params, table, now, depth)
    name, _, modifier = key.partition(":")
    if name not in params:
        return None
    param = params[name]
    if param.type == "reference" and modifier[:1].isupper() and modifier.isalnum():  # subject:Patient=123
        if not param.refers_to(modifier):
            raise SearchError(f"{key[:40]}: {rtype}.{name} does not refer to {modifier[:40]}")
        typed = [f"{modifier}/{v}" if "/" not in v else v for v in raw.split(",")]
        return Criterion(param, _values(param, ",".join(typed)))
    if modifier == "missing":  # :missing=true: no value at all; false: some value
        if raw not in ("true", "false"):
            raise SearchError(f"{key[:40]}: :missing is true or false")
        return Criterion(param, [(ANY_SYSTEM, raw)], "missing")
    if modifier and modifier not in MODIFIERS:
        raise SearchError(f"{key[:40]}: modifier :{modifier[:20]} is not supported")
    if modifier in ("exact", "contains") and param.type != "string":
        raise SearchError(f"{key[:40]}: :{modifier} applies to string parameters only")
    if param.type in ORDERED:
        if modifier:
            raise SearchError(f"{key[:40]}: a {param.type} parameter takes a prefix (ge2026-12-01), not a modifier")
        return Criterion(param, [], None, _comparisons(param, raw, now))
    return Criterion(param, _values(param, raw), modifier or None)


def _inner(rtype: str, key: str, raw: str, table: Table | None, now: datetime, depth: int) -> Criterion:
    if table is None:
        raise SearchError("chained search and _has are for searches, not these criteria")
    if depth > 0:
        raise SearchError("chained search and _has go one level deep")
    found = _criterion(rtype, key, raw, table.get(rtype, {}), table, now, depth + 1)
    if found is None:
        known = ", ".join(sorted(table.get(rtype, {})))
        raise SearchError(f"unknown search parameter {key[:40]!r} for {rtype}; supported: {known}")
    return found


def _chain(rtype: str, head: str, tail: str, raw: str, params: dict[str, SearchParam], table: Table | None,
           now: datetime, depth: int) -> Criterion:
    """`subject:Patient.identifier=...`, `patient.family=...`: the resources whose reference names a
    resource of the target type that meets the inner criterion."""
    name, _, target = head.partition(":")
    param = params.get(name)
    if param is None or param.type != "reference":
        raise SearchError(f"{head[:40]}: chaining needs a reference parameter of {rtype}")
    target = target or param.target or (param.targets[0] if len(param.targets) == 1 else "")
    if table is not None and target not in table:
        raise SearchError(f"{head[:40]}.{tail[:40]}: name a searchable type the reference is to"
                          f" ({name}:Patient.{tail[:40]})")
    if not param.refers_to(target):
        raise SearchError(f"{head[:40]}: {rtype}.{name} does not refer to {target}")
    return Criterion(param, [], None, chain=(target, _inner(target, tail, raw, table, now, depth)))


def _has(rtype: str, key: str, raw: str, table: Table | None, now: datetime, depth: int) -> Criterion:
    """`_has:DiagnosticReport:subject:status=final`: the resources that a DiagnosticReport meeting
    status=final refers to by its subject."""
    parts = key.split(":", 3)
    if len(parts) != 4 or not all(parts[1:]):
        raise SearchError("_has is _has:Type:reference-parameter:parameter=value")
    _, source, ref_name, inner_key = parts
    if table is None or source not in table or table[source].get(ref_name) is None \
            or table[source][ref_name].type != "reference":
        raise SearchError(f"_has:{source[:40]}:{ref_name[:40]}: not a reference parameter of a searchable type")
    ref = table[source][ref_name]
    if not ref.refers_to(rtype):
        raise SearchError(f"_has:{source[:40]}:{ref_name[:40]} does not refer to {rtype}")
    inner = _inner(source, inner_key, raw, table, now, depth)
    if inner.modifier == "exact":
        raise SearchError("_has: :exact is not supported inside _has (search the referring type with it)")
    return Criterion(ref, [], None, has=(source, inner))


def _reverse(rtype: str, raw: str, table: Table | None) -> tuple[str, str]:
    source, _, pname = raw.partition(":")
    param = (table or {}).get(source, {}).get(pname)
    if param is None or param.type != "reference" or not param.refers_to(rtype):
        raise SearchError(f"_revinclude={raw[:80]} is not supported on {rtype}")
    return source, pname


def parse(
    rtype: str,
    args: Iterable[tuple[str, str]],
    params: dict[str, SearchParam],
    *,
    lenient: bool = False,
    table: Table | None = None,
    now: datetime | None = None,
) -> Search:
    """`table`: every type's parameters, for chains, _has and _revinclude (without it they are refused)."""
    search = Search(Query(count=DEFAULT_COUNT))
    when = now or datetime.now(UTC)
    for key, raw in args:
        if "\x00" in key or "\x00" in raw:
            raise SearchError("search parameters and values cannot hold NUL characters")
        if len(raw) > MAX_VALUE:
            raise SearchError(f"{key[:40]}: a search value is limited to {MAX_VALUE} characters")
        name = key.partition(":")[0]
        if name == "_id":
            search.query.ids.extend(v for v in raw.split(",") if v)
        elif name == "_lastUpdated":
            prefix = raw[:2] if raw[:2] in ("gt", "lt", "ge", "le", "eq") else "eq"
            value = raw[2:] if raw[:2] == prefix else raw
            if "T" in value:  # an instant: compared as written (a client paging by the last one it saw)
                search.query.last_updated.append((prefix, parse_instant(value)))
            else:  # 2026, 2026-12, 2026-12-01: the range it stands for, as any date parameter
                search.query.last_updated.extend(_last_updated_range(prefix, value))
        elif name == "_count":
            search.query.count = _int("_count", raw, 0, MAX_COUNT)
        elif name == "_offset":
            search.query.offset = _int("_offset", raw, 0, 10_000_000)
        elif name == "_sort":
            key = raw.removeprefix("-")
            if key != "_lastUpdated" and (key not in params or params[key].type != "date"):
                keys = ", ".join(["_lastUpdated", *(p for p in params if params[p].type == "date")])
                raise SearchError(f"_sort: one of {keys} (- for descending)")
            search.query.descending = raw.startswith("-")
            search.query.sort_by = None if key == "_lastUpdated" else key
        elif name == "_total":
            if raw not in TOTALS:
                raise SearchError("_total: one of none, estimate, accurate")
            search.query.total = raw
        elif name == "_totalMethod":  # Aidbox's name for _total, which fhirpy's .count() sends
            if raw not in TOTAL_METHODS:
                raise SearchError(f"_totalMethod: one of {', '.join(TOTAL_METHODS)}")
            search.query.total = TOTAL_METHODS[raw]
        elif name == "_include":
            source, _, pname = raw.partition(":")
            if source != rtype or pname not in params or params[pname].type != "reference":
                raise SearchError(f"_include={raw[:80]} is not supported on {rtype}")
            search.includes.append((source, pname))
        elif name == "_revinclude":
            search.revincludes.append(_reverse(rtype, raw, table))
        elif name == "_summary":
            if raw not in SUMMARIES:
                raise SearchError(f"_summary: one of {', '.join(SUMMARIES)}")
            search.summary = None if raw == "false" else raw
        elif name == "_elements":
            search.elements = [e.strip() for e in raw.split(",") if e.strip()]
        elif name in RESULT_PARAMS:
            if name == "_format" and "json" not in raw:
                raise SearchError("_format: only JSON is served")
        else:
            found = _criterion(rtype, key, raw, params, table, when)
            if found is not None:
                search.query.criteria.append(found)
            elif lenient:
                search.ignored.append(key)
            else:
                known = ", ".join(sorted(["_id", "_lastUpdated", *params]))
                raise SearchError(f"unknown search parameter {key[:40]!r} for {rtype}; supported: {known}")
    if search.summary == "count":  # how many, and no entries (fhirpy's .count())
        search.query.count = 0
        if search.query.total in (None, "none"):
            search.query.total = "accurate"
    if search.query.count == 0 and search.query.total is None:
        search.query.total = "accurate"  # _count=0 asks for nothing but how many
    return search
