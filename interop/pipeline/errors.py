"""How a job ends when it does not succeed: retried later, failed for good, or not applicable.
Reasons are ours and safe to show on a Task or in a log (no patient data)."""
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


class NoModel(Exception):
    """No model is routed for this study: recorded as 'not analysed', not as a failure."""
