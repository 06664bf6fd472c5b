"""Review errors that know their HTTP status (the FHIR layer turns them into OperationOutcomes)."""
from __future__ import annotations


class ReviewError(Exception):
    def __init__(self, reason: str, status: int = 409):
        super().__init__(reason)
        self.reason = reason
        self.status = status
