"""What the OpenVMM backend can do today, and why the rest is refused."""

from __future__ import annotations

from testbed.core.capabilities import Capabilities

CAPABILITIES = Capabilities(
    shutdown_modes=("offset", "after-ready", "none"),
    images=(),  # service-vtl2 --igvm: a name from the vm_config's openvmm.images, or a path on the host
    gc=True,
    reasons={
        "shutdown:ic-ready": "the shutdown IC's re-negotiation after servicing is not stamped yet",
        "phases": "the host driver reads OpenVMM's console and OpenHCL's COM3 as they come, but fires only at "
        "offsets so far; a trigger on those lines is not built yet",
        "parallel": "one openvmm process per host so far",
        "stream": "only the reference lab streams hb/TX messages beside the race",
        "snapshot-reset": "openvmm has no snapshot of a running VM: every iteration boots afresh",
    },
)
