"""Everything a backend needs from testbed, in one public module.

A backend written outside this tree imports from here and nowhere else
(``from testbed.backends.api import BackendKind, Capabilities, RaceEvidence, ...``):
what is listed in ``__all__`` is the contract, kept stable; every other module of
testbed is internal and may move. ``docs/writing-a-backend.md`` says how the pieces
fit: the order the engine calls a backend's methods, what each returns, which record
keys the reports read, and what the capabilities promise.
"""

from __future__ import annotations

from testbed.backends.base import Backend, VmHandle, host_program_errors
from testbed.backends.memory import MemoryHold
from testbed.backends.registry import BackendKind
from testbed.core.capabilities import CAPABILITIES, SHUTDOWN_MODES, Capabilities
from testbed.core.config import Artifact, ConfigError, HostEntry, HostOptions, Pattern, Strict, VmConfig
from testbed.core.errors import HostFull, HostGone, InfraError
from testbed.core.evidence import Check, HostReport, RaceEvidence, RacePlan, TimelineEntry
from testbed.core.verdicts import VERDICTS, Facts, Finding, Request, Servicing, Verdict, decide
from testbed.hostprog.client import HostProgram
from testbed.transport import Transport, TransportError, transport_for

__all__ = [
    "CAPABILITIES",
    "SHUTDOWN_MODES",
    "VERDICTS",
    "Artifact",
    "Backend",
    "BackendKind",
    "Capabilities",
    "Check",
    "Facts",
    "Finding",
    "ConfigError",
    "HostEntry",
    "HostFull",
    "HostGone",
    "HostOptions",
    "HostProgram",
    "HostReport",
    "InfraError",
    "MemoryHold",
    "Pattern",
    "RaceEvidence",
    "RacePlan",
    "Request",
    "Servicing",
    "Strict",
    "TimelineEntry",
    "Transport",
    "TransportError",
    "Verdict",
    "VmConfig",
    "VmHandle",
    "decide",
    "host_program_errors",
    "transport_for",
]
