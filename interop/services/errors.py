"""How a service refuses or a job ends when it does not succeed. Reasons are ours and safe to
show on a Task, in an OperationOutcome or a log (no patient data)."""
from __future__ import annotations


class Permanent(Exception):
    """Retrying cannot help; `reason` is shown on the Task / message."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Transient(Exception):
    """Try again later (with back-off); `reason` is shown while waiting."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Waiting(Transient):
    """Not ready yet (the images are not in the PACS): try again soon, and it costs no attempt."""


class NoModel(Exception):
    """No model is routed for this study: recorded as 'not analysed', not as a failure."""


class ReviewError(Exception):
    """A person's action on a report refused; knows its HTTP status (the edges render it)."""

    def __init__(self, reason: str, status: int = 409):
        super().__init__(reason)
        self.reason = reason
        self.status = status


class IntakeError(Exception):
    """A study breaks a rule of the hub (HTTP 422 / HL7 AE); `reason` is safe to show."""

    def __init__(self, reason: str, expression: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.expression = expression
