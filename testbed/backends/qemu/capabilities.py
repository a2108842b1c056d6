"""What the QEMU reference lab can do: every question testbed asks."""

from __future__ import annotations

from testbed.backends.qemu.config import PARAVISOR_IMAGES
from testbed.core.capabilities import Capabilities


def servicing_phases(strategy: str) -> list[str]:
    """The phases the lab paravisor announces (on ``get``, just before each step) and the
    host sees, in order, for a preservation strategy."""
    quiesce = {"none": [], "mask": ["quiesce", "quiesce-acked", "drained"],
               "mask-async": ["quiesce", "drained"], "pause-resume": ["quiesce", "quiesce-acked"]}[strategy]  # fmt: skip
    return ["request-seen", *quiesce, "save-start", "save-end", "port-close", "exec", "restore-start",
            "restore-end", "port-reopen", "ic-reoffered"]  # fmt: skip


CAPABILITIES = Capabilities(
    shutdown_modes=("offset", "after-ready", "ic-ready", "phase", "none"),
    phases=servicing_phases,
    parallel=True,  # each lane its own agent and guest slot
    stream=True,  # hb/TX traffic beside the race, accounted for message by message
    images=PARAVISOR_IMAGES,
    snapshot_reset=True,
    gc=True,
)
