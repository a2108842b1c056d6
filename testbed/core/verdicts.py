"""The verdict vocabulary: the bottom layer that the engine, the reports, the
config loader and every backend import (and that imports nothing of theirs).

Each backend turns its own evidence into one of these (``Backend.classify``);
the engine counts them and never looks inside a backend's evidence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

VERDICTS = (
    "preserved",
    "delivered-before",
    "lost",
    "duplicated",
    "rejected",
    "servicing-failed",
    "servicing-skipped",
    "guest-crash",
    "infra-error",
)
# servicing-skipped: the host was told servicing succeeded and it did not happen (openvmm
# #2698), so whatever the message did proves nothing; a product failure, never a pass.
PRODUCT_FAILURES = ("lost", "duplicated", "servicing-skipped")


@dataclass
class Verdict:
    """One iteration's outcome, with the evidence lines it was read from."""

    kind: str
    reason: str
    evidence: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"verdict": self.kind, "reason": self.reason, "evidence": self.evidence}

    @classmethod
    def infra(cls, message: str) -> Verdict:
        return cls("infra-error", message, [message])
