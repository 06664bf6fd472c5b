"""FHIR errors that know their wire form: an HTTP status and an OperationOutcome.

Messages are written for the client and never carry the submitted values, so an error cannot
echo patient data or SQL back (pydantic's own messages quote the input; we do not).
"""
from __future__ import annotations

from typing import Any


def outcome(issues: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": issues}


def issue(code: str, diagnostics: str, severity: str = "error", expression: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression:
        out["expression"] = [expression]
    return out


class FhirError(Exception):
    """Base: subclasses fix the HTTP status and the OperationOutcome issue type (FHIR IssueType)."""

    status = 400
    code = "processing"

    def __init__(self, diagnostics: str, *, issues: list[dict[str, Any]] | None = None):
        super().__init__(diagnostics)
        self.diagnostics = diagnostics
        self.issues = issues

    def operation_outcome(self) -> dict[str, Any]:
        return outcome(self.issues or [issue(self.code, self.diagnostics)])


class BadRequest(FhirError):
    status, code = 400, "invalid"


class InvalidResource(FhirError):
    status, code = 400, "structure"


class NotFoundError(FhirError):
    status, code = 404, "not-found"


class GoneError(FhirError):
    status, code = 410, "deleted"


class Forbidden(FhirError):
    """The token's scopes do not allow this (a Bundle entry; the request itself is refused in access)."""

    status, code = 403, "forbidden"


class MethodNotAllowed(FhirError):
    status, code = 405, "not-supported"


class NotAcceptable(FhirError):
    status, code = 406, "not-supported"


class Conflict(FhirError):
    status, code = 409, "conflict"


class PreconditionFailed(FhirError):
    status, code = 412, "conflict"


class TooLarge(FhirError):
    status, code = 413, "too-costly"


class UnsupportedMediaType(FhirError):
    status, code = 415, "not-supported"


class BusinessRule(FhirError):
    status, code = 422, "business-rule"


class Unavailable(FhirError):
    status, code = 503, "transient"


def validation_issues(exc: Any) -> list[dict[str, Any]]:
    """OperationOutcome issues from a pydantic ValidationError: path and reason, never the input."""
    issues = []
    for err in exc.errors(include_input=False, include_url=False)[:50]:
        path = ".".join(str(p) for p in err.get("loc", ()) if p != "__root__")
        issues.append(issue("structure", f"{path or 'resource'}: {err.get('msg', 'invalid')}", expression=path or None))
    return issues or [issue("structure", "the resource is not valid FHIR R4")]
