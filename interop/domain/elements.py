"""`_summary` and `_elements`: a resource cut to the elements the client asked for (R4
search.html#summary, #elements), as HAPI FHIR does it: id, meta and the type's mandatory elements
always stay (the subset is still a valid resource), and meta carries the SUBSETTED tag so that
nobody takes the subset for the whole. Which elements are summary and mandatory is data
(mappings/summary_elements.yaml, from HL7's StructureDefinitions)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED",
             "display": "subsetted"}
ALWAYS = ("resourceType", "id", "meta")


@dataclass(frozen=True)
class Shape:
    summary: tuple[str, ...]
    mandatory: tuple[str, ...]


@lru_cache(maxsize=4)
def load(mappings_dir: Path) -> dict[str, Shape]:
    raw = yaml.safe_load((Path(mappings_dir) / "summary_elements.yaml").read_text(encoding="utf-8"))
    return {rtype: Shape(tuple(spec.get("summary") or ()), tuple(spec.get("mandatory") or ()))
            for rtype, spec in raw.items()}


def _kept(key: str, names: tuple[str, ...] | list[str]) -> bool:
    """Whether an element's JSON key is one of `names` (a choice type name[x] matches valueQuantity)."""
    for name in names:
        if name.endswith("[x]"):
            stem = name[:-3]
            if key.startswith(stem) and key[len(stem):len(stem) + 1].isupper():
                return True
        elif key == name or key == f"_{name}":
            return True
    return False


def _tagged(resource: dict[str, Any], kept: dict[str, Any]) -> dict[str, Any]:
    meta = dict(resource.get("meta") or {})
    meta["tag"] = [*[t for t in meta.get("tag", []) if t.get("code") != "SUBSETTED"], SUBSETTED]
    kept["meta"] = meta
    return kept


def subset(resource: dict[str, Any], shapes: dict[str, Shape], summary: str | None,
           elements: list[str] | None) -> dict[str, Any]:
    """The resource as `_summary` (true | text | data; count and false leave it whole) and
    `_elements` ask; unchanged when neither applies."""
    shape = shapes.get(resource.get("resourceType", ""), Shape((), ()))
    if elements is not None and summary in (None, "data"):
        wanted = [*elements, *shape.mandatory]
        kept = {k: v for k, v in resource.items() if k in ALWAYS or _kept(k, wanted)}
    elif summary == "true":
        kept = {k: v for k, v in resource.items() if k in ALWAYS or _kept(k, shape.summary)}
    elif summary == "text":
        kept = {k: v for k, v in resource.items() if k in (*ALWAYS, "text") or _kept(k, shape.mandatory)}
    elif summary == "data":
        kept = {k: v for k, v in resource.items() if k != "text"}
    else:
        return resource
    return _tagged(resource, kept)
