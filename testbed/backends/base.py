"""The contract between the engine and a backend: the Backend protocol, the typed
race evidence every backend returns, and the values passed around.

One deliberate change from the first design: the servicing request and the
shutdown request are fired by one call, ``race``, that runs on the host
itself (a host agent next to the hypervisor, or ``Testbed.psm1`` on Hyper-V).
Timing never crosses a transport, and a backend cannot be used in a way that
breaks that.

The engine reads only what is typed here.  What a backend alone understands
(QMP events, Hyper-V event IDs, OpenVMM console lines) goes into
``RaceEvidence.raw``, is kept in the run folder, and is read back only by that
backend's own ``classify``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from testbed.core.capabilities import Capabilities
from testbed.core.errors import HostGone, InfraError
from testbed.core.evidence import Check, HostReport, RaceEvidence, RacePlan, TimelineEntry
from testbed.core.verdicts import Verdict

if TYPE_CHECKING:
    from testbed.core.config import VmConfig

__all__ = [
    "Backend",
    "Check",
    "HostReport",
    "InfraError",
    "RaceEvidence",
    "RacePlan",
    "TimelineEntry",
    "VmHandle",
    "host_program_errors",
]


@contextlib.contextmanager
def host_program_errors() -> Iterator[None]:
    """A host program's and its route's failures as InfraError, named by type, so a lost
    channel reads differently from a refused op (backends on ``HostProgram`` use it)."""
    from testbed.hostprog.client import AgentFailure, AgentLost
    from testbed.transport.base import TransportError

    try:
        yield
    except AgentFailure as e:
        raise InfraError(f"AgentFailure: {e}") from None
    except AgentLost as e:
        raise HostGone(f"AgentLost: {e}") from None
    except TransportError as e:
        raise HostGone(f"TransportError: {e}") from None


class VmHandle(Protocol):
    """What the engine reads of a provisioned VM."""

    name: str
    accel: str

    def record(self) -> dict[str, Any]: ...


class Backend(Protocol):
    """What the engine needs from a host kind. Every method may raise InfraError."""

    kind: str
    host: str
    capabilities: Capabilities  # what it can be asked; the engine refuses the rest before booting

    def preflight(self, cfg: VmConfig | None = None, *, deep: bool = False) -> HostReport: ...
    def provision(self, cfg: Any, strategy: str = "none") -> Any: ...
    def start(self, vm: Any, reset: str = "cold") -> dict[str, Any]: ...
    def race(self, vm: Any, plan: RacePlan, grace_ms: float) -> RaceEvidence: ...
    def classify(self, ev: RaceEvidence) -> Verdict: ...
    def collect(self, vm: Any, dest: Path, *, everything: bool = False) -> list[Path]: ...
    def destroy(self, vm: Any) -> None: ...
    def gc_host(self) -> list[str]: ...
    def close(self) -> None: ...
