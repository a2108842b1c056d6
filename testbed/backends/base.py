"""The Backend interface every host kind implements, and the values it passes around.

One deliberate change from the first design: the servicing request and the
shutdown request are fired by one call, ``race``, that runs on the host
itself (the QEMU host agent, or ``Testbed.psm1`` on Hyper-V).  Timing never
crosses a transport, and a backend cannot be used in a way that breaks that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class InfraError(Exception):
    """The testbed or the host failed; never a product verdict."""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


@dataclass
class HostReport:
    """Preflight: every missing thing with the command that fixes it."""

    host: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


@dataclass
class RacePlan:
    """What one iteration fires. ``offset_ms`` is from the servicing request (t = 0)."""

    iteration: int
    offset_ms: float | None
    service: bool = True
    shutdown: bool = True
    shutdown_mode: str = "offset"  # or "after-ready": the seed test's order
    image: str | None = None  # paravisor image to service into (None = same)


class Backend(Protocol):
    """What the engine needs from a host kind (the QEMU backend is the first)."""

    host: str

    def preflight(self, cfg: Any = None) -> HostReport: ...
    def provision(self, cfg: Any, strategy: str = "none") -> Any: ...
    def start(self, vm: Any, reset: str = "cold") -> dict[str, Any]: ...
    def race(self, vm: Any, plan: RacePlan, grace_ms: float) -> dict[str, Any]: ...
    def collect(self, vm: Any, dest: Path) -> list[Path]: ...
    def destroy(self, vm: Any) -> None: ...
    def gc_host(self) -> list[str]: ...
    def close(self) -> None: ...
