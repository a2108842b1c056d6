"""The one failure type that is never a product verdict."""

from __future__ import annotations


class InfraError(Exception):
    """The testbed or the host failed; never a product verdict.

    Every backend turns the failures of its own machinery (agent, transport,
    WinRM, console) into this, so the engine catches one type."""


class HostFull(InfraError):
    """The host has no room for one more guest of this run (its free memory, a licence):
    a lane beyond the first that meets it is not started, and the run goes on with the
    lanes it has, saying why."""


class HostGone(InfraError):
    """The host stopped answering: its connection was lost, or its host program died.

    Distinct from a refused operation because a fleet run drains such a host at once
    (it is not used again in the run), where an operation's failure counts toward the
    host's streak of infrastructure errors."""
