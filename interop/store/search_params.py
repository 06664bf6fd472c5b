"""Search parameters as data: which values of a resource are indexed, and how a query matches them.

Pure functions: `index_rows` turns a resource into index rows at write time; the FHIR search
module turns query parameters into conditions on those rows.
"""
from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class SearchParam:
    name: str
    type: str  # token | reference | string
    path: tuple[str, ...]
    target: str | None = None


@lru_cache(maxsize=8)
def load(mappings_dir: Path) -> dict[str, dict[str, SearchParam]]:
    """resource type -> parameter name -> SearchParam, from mappings/search_parameters.yaml."""
    raw = yaml.safe_load((mappings_dir / "search_parameters.yaml").read_text(encoding="utf-8"))
    table: dict[str, dict[str, SearchParam]] = {}
    for rtype, params in raw.items():
        table[rtype] = {}
        for name, spec in params.items():
            if spec["type"] not in ("token", "reference", "string"):
                raise ValueError(f"search parameter {rtype}.{name}: unknown type {spec['type']!r}")
            table[rtype][name] = SearchParam(
                name, spec["type"], tuple(spec["path"].split(".")), spec.get("target")
            )
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
        for value in walk(resource, param.path):
            if param.type == "token":
                rows.extend((param.name, system, code) for system, code in _tokens(value))
            elif param.type == "reference":
                if isinstance(value, dict) and isinstance(value.get("reference"), str):
                    ref = normalise_reference(value["reference"])
                    if param.target is None or ref.startswith(param.target + "/"):
                        rows.append((param.name, None, ref))
            else:
                rows.extend((param.name, None, normalise(s)) for s in _strings(value))
    return sorted(set(rows), key=lambda r: (r[0], r[1] or "", r[2]))
