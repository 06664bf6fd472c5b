"""Search parameters as data: which values of a resource are indexed, and how a query matches them.

Pure functions: `index_rows` turns a resource into index rows at write time; the FHIR search
module turns query parameters into conditions on those rows.
"""
from __future__ import annotations

import calendar
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

TYPES = ("token", "reference", "string", "uri", "date", "number", "quantity")


@dataclass(frozen=True)
class SearchParam:
    name: str
    type: str  # one of TYPES
    path: tuple[str, ...]
    target: str | None = None
    also: tuple[tuple[str, ...], ...] = ()  # further paths (a choice type: effectiveDateTime, effectivePeriod)
    targets: tuple[str, ...] = ()  # the types a reference may point to (R4's SearchParameter.target; none: any)

    @property
    def paths(self) -> tuple[tuple[str, ...], ...]:
        return (self.path, *self.also)

    def refers_to(self, rtype: str) -> bool:
        """Whether this reference parameter may point to a resource of `rtype`."""
        if self.target is not None:
            return self.target == rtype
        return not self.targets or rtype in self.targets


@lru_cache(maxsize=8)
def load(mappings_dir: Path) -> dict[str, dict[str, SearchParam]]:
    """resource type -> parameter name -> SearchParam, from mappings/search_parameters.yaml."""
    raw = yaml.safe_load((mappings_dir / "search_parameters.yaml").read_text(encoding="utf-8"))
    table: dict[str, dict[str, SearchParam]] = {}
    for rtype, params in raw.items():
        table[rtype] = {}
        for name, spec in params.items():
            if spec["type"] not in TYPES:
                raise ValueError(f"search parameter {rtype}.{name}: unknown type {spec['type']!r}")
            paths = [tuple(p.strip().split(".")) for p in spec["path"].split("|")]
            table[rtype][name] = SearchParam(name, spec["type"], paths[0], spec.get("target"), tuple(paths[1:]),
                                             tuple(spec.get("targets") or ()))
    return table


def walk(value: Any, path: tuple[str, ...]) -> Iterator[Any]:
    if isinstance(value, list):
        for item in value:
            yield from walk(item, path)
        return
    if not path:
        yield value
        return
    if isinstance(value, dict) and path[0] in value:
        yield from walk(value[path[0]], path[1:])


def _tokens(value: Any) -> Iterator[tuple[str | None, str]]:
    if isinstance(value, (str, bool, int)):
        yield None, str(value).lower() if isinstance(value, bool) else str(value)
    elif isinstance(value, dict):
        if "coding" in value:  # CodeableConcept
            for coding in value["coding"]:
                if coding.get("code"):
                    yield coding.get("system"), coding["code"]
        elif "code" in value:  # Coding
            yield value.get("system"), value["code"]
        elif "value" in value:  # Identifier
            yield value.get("system"), str(value["value"])


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):  # HumanName and friends: every string part
        for part in value.values():
            yield from _strings(part)
    elif isinstance(value, list):
        for part in value:
            yield from _strings(part)


# Letters that carry no combining mark under NFKD but are read as a plain letter: Vietnamese đ/Đ
# above all (Đức, Đặng), and a few Latin ones a name from elsewhere may hold.
_FOLD = str.maketrans({"đ": "d", "Đ": "d", "ø": "o", "Ø": "o", "ł": "l", "Ł": "l", "ħ": "h", "Ħ": "h"})


def normalise(text: str) -> str:
    """A string as string search compares it (FHIR R4 3.1.1.4.12: "normalized by case and accent"):
    lower case, compatibility-decomposed, combining marks dropped, đ read as d. "Trần" -> "tran",
    "Nguyễn" -> "nguyen", "ĐỨC" -> "duc"."""
    if text.isascii():
        return text.lower()
    decomposed = unicodedata.normalize("NFKD", text.translate(_FOLD))
    return "".join(c for c in decomposed if not unicodedata.combining(c)).lower()


def normalise_reference(ref: str) -> str:
    """'http://host/fhir/Patient/1' and 'Patient/1/_history/2' both index as 'Patient/1'."""
    parts = [p for p in ref.split("/") if p]
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return "/".join(parts[-2:]) if len(parts) >= 2 else ref


def index_rows(
    resource: dict[str, Any], params: dict[str, SearchParam]
) -> list[tuple[str, str | None, str]]:
    """(param, system, value) rows for one resource."""
    rows: list[tuple[str, str | None, str]] = []
    for param in params.values():
        for value in (v for path in param.paths for v in walk(resource, path)):
            if param.type == "date":  # the range by its low end, and by its high end (interop.store.resources)
                found = date_range_of(value)
                if found is not None:
                    rows += [(param.name, found[1], found[0]), (param.name + ":end", found[0], found[1])]
            elif param.type in ("number", "quantity"):
                rows.extend((param.name, unit, number) for unit, number in _numbers(value))
            elif param.type == "token":
                rows.extend((param.name, system, code) for system, code in _tokens(value))
            elif param.type == "uri":  # matched exactly as written (R4 search.html#uri): not normalised
                if isinstance(value, str):
                    rows.append((param.name, None, value))
            elif param.type == "reference":
                if isinstance(value, dict) and isinstance(value.get("reference"), str):
                    ref = normalise_reference(value["reference"])
                    if param.target is None or ref.startswith(param.target + "/"):
                        rows.append((param.name, None, ref))
            else:
                rows.extend((param.name, None, normalise(s)) for s in _strings(value))
    return sorted(set(rows), key=lambda r: (r[0], r[1] or "", r[2]))


# -- dates: every value is a range [low, high), both as fixed-width UTC text --------------------------
# Byte order of this text is time order, so the search index (value text_pattern_ops) orders and
# ranges dates as it does strings. A date has two rows: its low end in `value` (high in `system`),
# and, as 'param:end', its high end in `value` (low in `system`).
DATE_MIN = "0001-01-01T00:00:00.000000Z"
DATE_MAX = "9999-12-31T23:59:59.999999Z"
_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?"
                   r"(Z|[+-]\d{2}:\d{2})?)?)?)?$")


def stamp(when: datetime) -> str:
    """A moment as the index holds it (UTC, microseconds, fixed width)."""
    u = when.astimezone(UTC)  # not strftime: its %Y does not pad years before 1000 on every platform
    return f"{u.year:04d}-{u.month:02d}-{u.day:02d}T{u.hour:02d}:{u.minute:02d}:{u.second:02d}.{u.microsecond:06d}Z"


def moment(stamped: str) -> datetime:
    """The moment that `stamp` wrote as `stamped`."""
    return datetime.strptime(stamped, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def date_range(text: str) -> tuple[str, str]:
    """A FHIR date, dateTime or instant as the range it stands for (R4 search.html#date): '2026' is
    the whole year, '2026-12' the month, '2026-12-01' the day, a time the second (or minute, or the
    fraction it is written to). No time zone: UTC. ValueError when it is none of these."""
    m = _DATE.match(text.strip())
    if m is None:
        raise ValueError(f"not a FHIR date: {text[:40]!r}")
    year, month, day, hour, minute, second, fraction, zone = m.groups()
    tz = UTC if zone in (None, "Z") else datetime.strptime(zone, "%z").tzinfo
    y, mo, d = int(year), int(month or 1), int(day or 1)
    low = datetime(y, mo, d, int(hour or 0), int(minute or 0), int(second or 0),
                   int((fraction or "0")[:6].ljust(6, "0")), tzinfo=tz)
    if month is None:
        high = low.replace(year=y + 1) if y < 9999 else None
    elif day is None:
        high = low + timedelta(days=calendar.monthrange(y, mo)[1])
    elif hour is None:
        high = low + timedelta(days=1)
    elif second is None:
        high = low + timedelta(minutes=1)
    elif fraction is None:
        high = low + timedelta(seconds=1)
    else:
        high = low + timedelta(microseconds=10 ** max(0, 6 - len(fraction)))
    return stamp(low), DATE_MAX if high is None else stamp(high)


def date_range_of(value: Any) -> tuple[str, str] | None:
    """The range of a date, dateTime, instant or Period element (an open end is unbounded); None
    for anything else (the resource was validated: a malformed date is not indexed, not refused)."""
    try:
        if isinstance(value, str):
            return date_range(value)
        if isinstance(value, dict) and ("start" in value or "end" in value):
            low = date_range(value["start"])[0] if isinstance(value.get("start"), str) else DATE_MIN
            high = date_range(value["end"])[1] if isinstance(value.get("end"), str) else DATE_MAX
            return low, high
    except (ValueError, OverflowError):
        return None
    return None


# -- numbers and quantities: the value as a plain decimal, the unit as system|code ------------------
def number_text(value: Decimal) -> str:
    """A decimal as the index holds it: plain notation, no exponent."""
    return format(value, "f")


def _numbers(value: Any) -> Iterator[tuple[str | None, str]]:
    """(unit, number) of a decimal, integer or Quantity; the unit 'system|code' (or '|unit' when
    the Quantity has no code)."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield None, number_text(Decimal(str(value)))
    elif isinstance(value, dict) and isinstance(value.get("value"), (int, float)) and not isinstance(value["value"], bool):
        try:
            number = number_text(Decimal(str(value["value"])))
        except InvalidOperation:
            return
        code = value.get("code") or value.get("unit")
        yield (f"{value.get('system') or ''}|{code}" if code else None), number
