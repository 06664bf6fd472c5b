"""Validation on write with fhir.resources' R4B models (they match R4 for the imaging resources;
the package's default models are R5 and reject an R4 ImagingStudy)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import pydantic
import yaml
from fhir.resources.R4B import get_fhir_model_class

from ..store.search_params import walk
from .errors import InvalidResource, issue, validation_issues


@lru_cache(maxsize=32)
def _model(rtype: str) -> Any:
    return get_fhir_model_class(rtype)


@lru_cache(maxsize=4)
def required_codes(mappings_dir: Path) -> dict[str, dict[tuple[str, ...], frozenset[str]]]:
    raw = yaml.safe_load((mappings_dir / "required_codes.yaml").read_text(encoding="utf-8"))
    return {rtype: {tuple(path.split(".")): frozenset(codes) for path, codes in paths.items()}
            for rtype, paths in raw.items()}


MAX_DEPTH = 64  # nesting of objects and arrays; FHIR resources need a dozen at most
MAX_STRING = 1024 * 1024  # FHIR R4: "strings SHALL NOT exceed 1MB (1024*1024 characters) in size"


def depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """How deeply `value` nests (stops counting past `limit`), without recursion; a string past
    FHIR's 1 MB limit counts as too deep (it is refused all the same)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, str) and len(item) > MAX_STRING:
            return limit + 1
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if deepest > limit:
                return deepest
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return deepest


def validate(body: dict[str, Any], mappings_dir: Path | None = None) -> None:
    """Raise InvalidResource (400) with one issue per problem; returns nothing on success."""
    if depth(body) > MAX_DEPTH:
        raise InvalidResource(f"the resource nests deeper than {MAX_DEPTH} levels, or holds a string longer than"
                              f" FHIR's limit of {MAX_STRING} characters")
    if mappings_dir is not None:
        problems = [
            issue("code-invalid", f"{'.'.join(path)}: not a code of its required value set",
                  expression=f"{body['resourceType']}.{'.'.join(path)}")
            for path, codes in required_codes(mappings_dir).get(body["resourceType"], {}).items()
            for value in walk(body, path) if not isinstance(value, str) or value not in codes
        ]
        if problems:
            raise InvalidResource("a coded element has a code outside its required value set", issues=problems)
    try:
        _model(body["resourceType"]).model_validate(body)
    except pydantic.ValidationError as exc:
        raise InvalidResource("the resource is not valid FHIR R4", issues=validation_issues(exc)) from None
    except (ValueError, TypeError, AttributeError, KeyError, RecursionError) as exc:
        raise InvalidResource(f"the resource is not valid FHIR R4 ({type(exc).__name__})") from None
