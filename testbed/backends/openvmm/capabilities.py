"""What the OpenVMM backend can do today, and why the rest is refused."""

from __future__ import annotations

from testbed.backends.openvmm.console import PHASES
from testbed.core.capabilities import Capabilities


def servicing_phases(strategy: str) -> list[str]:
    """The phases the host sees, in order, whatever the strategy (openvmm's own lines and
    OpenHCL's on COM3; console.PHASES says which and at what log level)."""
    return [name for name, _where, _what in PHASES]


CAPABILITIES = Capabilities(
    shutdown_modes=("offset", "after-ready", "ic-ready", "phase", "none"),
    phases=servicing_phases,
    images=(),  # service-vtl2 --igvm: a name from the vm_config's openvmm.images, or a path on the host
    parallel=True,  # each lane its own host driver, openvmm process, pty, COM files and work dir
    gc=True,
    reasons={
        "stream": "only the reference lab streams hb/TX messages beside the race",
        "snapshot-reset": "openvmm has no snapshot of a running VM: every iteration boots afresh",
    },
)
