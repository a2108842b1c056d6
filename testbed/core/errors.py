"""The one failure type that is never a product verdict."""

from __future__ import annotations


class InfraError(Exception):
    """The testbed or the host failed; never a product verdict.

    Every backend turns the failures of its own machinery (agent, transport,
    WinRM, console) into this, so the engine catches one type."""
