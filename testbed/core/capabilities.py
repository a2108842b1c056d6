"""What a backend can do, declared once and read by everyone who must refuse a playbook
before anything boots: the engine, the matrix, the bisection, the CLI's dry run.

Nothing is granted by default: a backend that declares nothing can fire a shutdown at
no mode at all, so a new backend fails loudly with its own words instead of running
thirty tries "into v2-r1" on a host that has no such build. Every capability a backend
leaves out should carry a reason in ``reasons``, which the refusal quotes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

# The capabilities a playbook can ask for, with what each means in a refusal.
SHUTDOWN_MODES = ("offset", "after-ready", "ic-ready", "phase", "none")
CAPABILITIES: Mapping[str, str] = MappingProxyType(
    {
        "shutdown:offset": "fire the shutdown at an offset from the servicing request",
        "shutdown:after-ready": "fire the shutdown once the IC is back after servicing",
        "shutdown:ic-ready": "fire the shutdown a delay after the IC's re-offer (the IC-ready anchor)",
        "shutdown:none": "service without firing a shutdown",
        "phases": "fire on servicing phases the host observes (schedule kind phases, a search's phase arms)",
        "parallel": "race several guests of one run at once (parallel > 1)",
        "stream": "stream messages beside the race (stream:)",
        "images": "service into a named paravisor build (image:, bisect:, a matrix's paravisor dimension)",
        "snapshot-reset": "reset a guest from a snapshot instead of a cold boot (reset: snapshot)",
        "gc": "reap what a dead run left on the host (testbed gc)",
    }
)


@dataclass(frozen=True)
class Capabilities:
    """A backend's declared abilities (see ``CAPABILITIES`` for the names).

    ``phases(strategy)`` names, in order, the servicing phases the host observes for a
    preservation strategy (None: it observes none). ``images`` lists the builds it can
    service into when it knows them (an empty tuple with ``"images"`` granted: any name
    the vm_config accepts). ``reasons`` says why each missing capability is missing."""

    shutdown_modes: tuple[str, ...] = ()
    phases: Callable[[str], Sequence[str]] | None = None
    parallel: bool = False
    stream: bool = False
    images: tuple[str, ...] | None = None
    snapshot_reset: bool = False
    gc: bool = False
    reasons: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [m for m in self.shutdown_modes if m not in SHUTDOWN_MODES]
        if unknown:
            raise ValueError(f"unknown shutdown modes {unknown}; known: {', '.join(SHUTDOWN_MODES)}")
        bad = [k for k in self.reasons if k not in CAPABILITIES]
        if bad:
            raise ValueError(f"reasons for unknown capabilities {bad}; known: {', '.join(CAPABILITIES)}")

    def has(self, name: str) -> bool:
        """Whether the capability ``name`` (a key of ``CAPABILITIES``) is granted."""
        if name.startswith("shutdown:"):
            return name.removeprefix("shutdown:") in self.shutdown_modes
        return {
            "phases": self.phases is not None and "phase" in self.shutdown_modes,
            "parallel": self.parallel,
            "stream": self.stream,
            "images": self.images is not None,
            "snapshot-reset": self.snapshot_reset,
            "gc": self.gc,
        }[name]

    def granted(self) -> list[str]:
        return [name for name in CAPABILITIES if self.has(name)]

    def why_not(self, name: str) -> str:
        """The backend's own reason a capability is missing (or that it did not declare it)."""
        return self.reasons.get(name) or "the backend does not declare it"
