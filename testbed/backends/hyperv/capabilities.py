"""What the Hyper-V backend can do, and why the rest is refused."""

from __future__ import annotations

from testbed.backends.hyperv.phases import servicing_phases
from testbed.core.capabilities import Capabilities

CAPABILITIES = Capabilities(
    # offset: from ReloadManagementVtl's actual start, the shot on its own thread; phase:
    # a delay after a COM3 line (stamped on arrival) or the job's end; ic-ready: a delay
    # after the shutdown IC reads OK again (sampled back to back on the host).
    shutdown_modes=("offset", "after-ready", "ic-ready", "phase", "none"),
    phases=servicing_phases,
    images=(),  # the vm_config's hyperv.images: the VM's firmware file overwritten before servicing
    parallel=True,  # a VM per lane (own name, pipes, folder, checkpoint), capped by free memory
    snapshot_reset=True,  # a checkpoint at IC OK, restored per iteration
    gc=True,
    reasons={
        "stream": "only the reference lab streams hb/TX messages beside the race",
    },
)
