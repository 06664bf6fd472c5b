"""Validation on write with fhir.resources' R4B models (they match R4 for the imaging resources;
the package's default models are R5 and reject an R4 ImagingStudy)."""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import pydantic
from fhir.resources.R4B import get_fhir_model_class

from .errors import InvalidResource, validation_issues


@lru_cache(maxsize=32)
def _model(rtype: str) -> Any:
    return get_fhir_model_class(rtype)


def validate(body: dict[str, Any]) -> None:
    """Raise InvalidResource (400) with one issue per problem; returns nothing on success."""
    try:
        _model(body["resourceType"]).model_validate(body)
    except pydantic.ValidationError as exc:
        raise InvalidResource("the resource is not valid FHIR R4", issues=validation_issues(exc)) from None
    except (ValueError, TypeError) as exc:
        raise InvalidResource(f"the resource is not valid FHIR R4 ({type(exc).__name__})") from None
