"""The Hyper-V backend's vm_config: an OpenHCL VM (IGVM + VTL0 disk), optionally nested."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import Field, field_validator

from testbed.backends.hyperv.phases import COM3
from testbed.core.config import Artifact, Pattern, Strict, VmConfig


class NestedSpec(Strict):
    """Nested Hyper-V: an L1 Windows VM (virtualization extensions exposed) on the L0
    host; the L2 OpenHCL VM is driven inside it through PowerShell Direct."""

    l1_vhd: Artifact
    user: str = "Administrator"
    password_env: str = Field(description="env var on the controller holding the L1 password")
    memory_mb: int = Field(8192, ge=2048, le=12_582_912)
    processors: int = Field(4, ge=1, le=240)
    heartbeat_timeout_s: int = Field(600, ge=10, le=86_400)
    ps_direct_timeout_s: int = Field(
        300,
        ge=10,
        le=86_400,
        description="how long PowerShell Direct may refuse sessions after L1's heartbeat is OK",
    )
    host_dir: str = Field(r"C:\testbed", description="testbed's folder on the L0 host (the L1 VM, its disk)")


class HyperVSpec(Strict):
    """A Gen2 VM with OpenHCL on a Hyper-V host (facts in CONTEXT.md)."""

    igvm: Artifact
    vtl0_vhd: Artifact
    vtl0_image: str = Field(
        "Linux VHDX, kernel console=ttyS0 with hv_utils (logs the shutdown request on COM1)",
        description="what the VTL0 image must be for COM1 evidence to exist",
    )
    firmware_cmdline: str = ""
    increase_vtl2_memory: bool = Field(
        False,
        description="1 GiB of VTL2 address space with 512 MiB of it MMIO (petri's IncreaseVtl2Memory): debug "
        "IGVM builds need more VTL2 RAM than the host's default placement gives",
    )
    memory_mb: int = Field(2048, ge=256, le=12_582_912)
    processors: int = Field(2, ge=1, le=240)
    override_version_checks: bool = True
    disable_nvme_keepalive: bool = False
    timeout_hint_secs: int = Field(60, ge=1, le=3600)
    ic_ready_timeout_s: int = Field(300, ge=1, le=86_400)
    shutdown_grace_ms: float = Field(
        10_000.0,
        ge=0,
        le=600_000,
        description="at least this long after servicing for the VM to go off before a `lost` (a systemd "
        "poweroff takes seconds; the events that say how it went off follow)",
    )
    com1: bool = True
    com3: Literal["auto", "off"] = "auto"
    vtl0_shutdown_pattern: Pattern = Field(
        "Shutdown request received", description="regex of the VTL0 line on COM1 that shows delivery"
    )
    com3_restart_pattern: Pattern | None = Field(
        None,
        description="a COM3 line the new OpenHCL prints when it starts after servicing; seen after the request, "
        "it proves the restart (servicing_proof: restarted), else the record says unproven",
    )
    com3_servicing_start_pattern: Pattern | None = Field(
        None, description="regex of OpenHCL's COM3 line that marks the start of its save (guest anchor)"
    )
    images: dict[str, Artifact] = Field(
        default_factory=dict,
        description="OpenHCL builds by name (IGVM files, hash-checked artifacts): what a bisection, a matrix's "
        "paravisor dimension or image: services into; the VM's firmware file is overwritten with the build "
        "before ReloadManagementVtl, as petri does",
    )
    com3_phase_patterns: dict[str, Pattern] = Field(
        default_factory=dict,
        description="a COM3 phase's line as a regex, where an OpenHCL build words it differently from "
        "testbed.backends.hyperv.phases (keys: received, stopping, vtl2-restart, state-received, resuming)",
    )
    host_dir: str = Field(
        r"C:\testbed", description="testbed's folder on the Hyper-V host (inside L1 when nested)"
    )
    nested: NestedSpec | None = None

    @field_validator("com3_phase_patterns")
    @classmethod
    def _known_phases(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(v) - set(COM3))
        if unknown:
            raise ValueError(f"no COM3 phase {', '.join(unknown)}; the COM3 phases are {', '.join(COM3)}")
        python_only = [k for k, rx in v.items() if "(?P" in rx]
        if python_only:  # the host matches them with .NET's Regex
            raise ValueError(
                f"{', '.join(python_only)}: the host matches with .NET's Regex, which has no (?P...) groups: use a plain group (...)"
            )
        return v


class HyperVVmConfig(VmConfig):
    backend: Literal["hyperv"] = "hyperv"
    hyperv: HyperVSpec

    # ReloadManagementVtl's parameters a playbook's lab: section or a matrix's lab.<knob>
    # dimension may vary: Options bit 0x1 (override version checks) and 0x10 (disable NVMe
    # keepalive; petri has no MANA keepalive bit on Hyper-V), and TimeoutHintSecs (the
    # paravisor's save deadline).
    KNOBS: ClassVar[tuple[str, ...]] = (
        "override_version_checks",
        "disable_nvme_keepalive",
        "timeout_hint_secs",
    )

    @classmethod
    def knob_names(cls) -> tuple[str, ...]:
        return cls.KNOBS

    def with_lab(self, over: Mapping[str, Any]) -> Self:
        changes = {k: v for k, v in over.items() if v is not None and k in self.KNOBS}
        if not changes:
            return self
        spec = HyperVSpec.model_validate(
            {**self.hyperv.model_dump(), **changes}
        )  # ValueError names a bad one
        return self.model_copy(update={"hyperv": spec})

    def build_names(self) -> tuple[str, ...] | None:
        return tuple(self.hyperv.images) or None

    def with_paravisor(self, version: str) -> Self:
        """Boot the build ``version`` of ``images`` (a matrix's ``boot->into``)."""
        build = self.hyperv.images.get(version)
        if build is None:
            raise ValueError(
                f"no build {version!r} in hyperv.images (it has: {', '.join(self.hyperv.images) or 'none'})"
            )
        return self.model_copy(update={"hyperv": self.hyperv.model_copy(update={"igvm": build})})

    def anchored(self, base: Path) -> Self:
        """Artifact paths relative to the vm_config file (as a user writes them)."""
        hv = self.hyperv
        update: dict[str, object] = {"igvm": hv.igvm.anchored(base), "vtl0_vhd": hv.vtl0_vhd.anchored(base),
                                     "images": {k: a.anchored(base) for k, a in hv.images.items()}}  # fmt: skip
        if hv.nested is not None:
            update["nested"] = hv.nested.model_copy(update={"l1_vhd": hv.nested.l1_vhd.anchored(base)})
        return self.model_copy(update={"hyperv": hv.model_copy(update=update)})
