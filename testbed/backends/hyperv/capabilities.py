"""What the Hyper-V backend can do today, and why the rest is refused."""

from __future__ import annotations

from testbed.core.capabilities import Capabilities

CAPABILITIES = Capabilities(
    shutdown_modes=("offset", "after-ready", "none"),
    snapshot_reset=True,  # a checkpoint at IC OK, restored per iteration
    gc=True,
    reasons={
        "shutdown:ic-ready": "the IC's return to OK is not stamped on the host clock inside the race yet",
        "phases": "Hyper-V shows servicing as a WMI job, and COM3's lines are read by the race script only after "
        "the timed section; the host-side trigger is not built",
        "parallel": "one owned VM per host so far",
        "stream": "only the reference lab streams hb/TX messages beside the race",
        "images": "servicing into another IGVM build is not wired to the race yet (one IGVM per vm_config)",
    },
)
