"""The servicing phases a Hyper-V host shows, in the order they happen, and what marks
each: a line of OpenHCL's console on COM3, stamped on arrival by the race's pipe reader
on the host (``Com3``), or the servicing job seen over (``job-done``, sampled back to
back). The shot is fired a delay after its phase's mark, on the host, while
ReloadManagementVtl runs on its own runspace.

OpenHCL's lines (all INFO, printed at OpenHCL's default level; read from openvmm's
``openhcl/underhill_core`` dispatch and worker sources): the old instance prints
"received servicing request from host" and "stopping VM" before it saves; the new one
"VTL2 restart, getting servicing state from the host", "received servicing state from
host" and, once the VM runs again, "resuming VM". A vm_config can override a pattern
(``com3_phase_patterns``) for an OpenHCL build that words a line differently.

The IC-ready anchor is not a phase: the shutdown IC read OK again after the request
(``Wait-TestbedAnchor -Kind ic-ready``), which fires ``shutdown: ic-ready``.
"""

from __future__ import annotations

from collections.abc import Mapping

from testbed.backends.hyperv.module import Anchor
from testbed.core.errors import InfraError
from testbed.core.evidence import RacePlan

JOB_DONE = "job-done"
# (name, where its mark is seen, OpenHCL's text: a .NET regex as written, plain text here)
PHASES: tuple[tuple[str, str, str], ...] = (
    ("received", "Com3", "received servicing request from host"),
    ("stopping", "Com3", "stopping VM"),
    ("vtl2-restart", "Com3", "VTL2 restart, getting servicing state from the host"),
    ("state-received", "Com3", "received servicing state from host"),
    ("resuming", "Com3", "resuming VM"),
    (JOB_DONE, "host", ""),
)
NAMES = tuple(name for name, _where, _text in PHASES)
COM3 = {name: text for name, where, text in PHASES if where == "Com3"}  # the phases a COM3 line marks


def servicing_phases(strategy: str) -> list[str]:
    """The phases a Hyper-V host shows, whatever the strategy (Hyper-V's own preservation
    is what runs there)."""
    return list(NAMES)


def patterns(overrides: Mapping[str, str]) -> dict[str, str]:
    """Each COM3 phase's pattern: OpenHCL's text unless the vm_config overrides it."""
    return {name: overrides.get(name, text) for name, text in COM3.items()}


def anchor_for(
    plan: RacePlan, overrides: Mapping[str, str], com3_pipe: str, com3_note: str, vm_name: str
) -> Anchor | None:
    """What the shot follows, for a phase or the IC-ready anchor (None: the servicing
    call's start, or the seed test's order). A COM3 phase on a VM without COM3 cannot be
    fired: the iteration is an infra-error that says why, never a shot at a guess."""
    if not plan.shutdown or not plan.service:
        return None
    if plan.shutdown_mode == "ic-ready":
        return Anchor("ic-ready")
    if plan.shutdown_mode != "phase":
        return None
    if plan.phase == JOB_DONE:
        return Anchor("job-done")
    pattern = patterns(overrides).get(plan.phase or "")
    if pattern is None:
        raise InfraError(f"Hyper-V shows no servicing phase {plan.phase!r} (it shows {', '.join(NAMES)})")
    if not com3_pipe:
        why = com3_note or "com3 is off in the vm_config, or this host offers no COM3"
        raise InfraError(f"phase {plan.phase!r} is OpenHCL's COM3 line, and {vm_name} has no COM3: {why}")
    return Anchor("line", "Com3", pattern)
