"""The mock declares everything: it is where the engine's features are tested."""

from __future__ import annotations

from testbed.core.capabilities import Capabilities

# The phases the mock reports, as fractions of its servicing time.
PHASES: tuple[tuple[str, float], ...] = (
    ("request-seen", 0.0),
    ("save-start", 0.02),
    ("save-end", 0.6),
    ("restore-start", 0.65),
    ("restore-end", 0.95),
    ("ic-reoffered", 1.0),
)


def servicing_phases(strategy: str) -> list[str]:
    return [name for name, _ in PHASES]


CAPABILITIES = Capabilities(
    shutdown_modes=("offset", "after-ready", "ic-ready", "phase", "none"),
    phases=servicing_phases,
    parallel=True,
    images=(),  # any build its vm_config lists
    snapshot_reset=True,
    gc=True,
    reasons={"stream": "the mock models one message, not traffic"},
)
