"""The OpenVMM backend's vm_config: OpenHCL (an IGVM file) in VTL2 under openvmm on WHP.

Every path is a path on the host (the host playbook puts the binary and the IGVM
files into its cache); nothing here is uploaded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal, Self

from pydantic import Field, model_validator

from testbed.core.config import Pattern, Strict, VmConfig


class ServiceFlags(Strict):
    """Flags of the console's ``service-vtl2``."""

    user_mode_only: bool = False  # -u: restart OpenHCL's user mode only
    nvme_keepalive: bool = False  # -n
    mana_keepalive: bool = False  # --mana-keepalive


class OpenVmmSpec(Strict):
    binary: str = Field("openvmm", description="the openvmm executable on the host (PATH or a full path)")
    igvm: str = Field(description="the OpenHCL IGVM file on the host")
    images: dict[str, str] = Field(
        default_factory=dict,
        description="other IGVM builds by name, for cross-version servicing (a playbook's `image:`)",
    )
    vtl0_disk: str | None = Field(
        None, description="VTL0's disk image on the host, relayed through OpenHCL (SCSI)"
    )
    memory: str = Field("2GB", pattern=r"^\d+(\.\d+)?\s*[KMGT]?B?$", description="openvmm -m")
    memory_mb: int = Field(
        2048, ge=256, le=1_048_576, description="what preflight checks is free (keep it with memory)"
    )
    processors: int = Field(2, ge=1, le=64, description="openvmm -p")
    openhcl_cmdline: list[str] = Field(
        default_factory=list, description="each is one `-c` (OpenHCL's command line)"
    )
    log: str = Field(
        # The servicing phases ("waiting for guest to send saved state", ...): their crate
        # was hvlite_helpers before openvmm #2579 (2025-12), so both are named.
        "info,openvmm_helpers=debug,hvlite_helpers=debug",
        description="OPENVMM_LOG (setting it drops the implicit info, so keep it)",
    )
    extra_args: list[str] = Field(default_factory=list, description="more openvmm arguments, one per item")
    env: dict[str, str] = Field(default_factory=dict, description="more environment for openvmm")
    com3: bool = Field(True, description="OpenHCL's console on COM3 (the guest-side servicing anchor)")
    service: ServiceFlags = ServiceFlags()
    vtl0_ready_pattern: Pattern = Field("login:", description="regex of the COM1 line that shows VTL0 is up")
    vtl0_shutdown_pattern: Pattern = Field(
        "Shutdown request received", description="regex of VTL0's COM1 line that shows delivery (hv_utils)"
    )
    com3_servicing_start_pattern: Pattern = Field(
        "received servicing request from host",
        description="regex of OpenHCL's COM3 line that marks its start",
    )
    boot_timeout_s: float = Field(300.0, gt=0, le=86_400)
    servicing_timeout_s: float = Field(
        120.0,
        gt=0,
        le=86_400,
        description="openvmm has no host-side servicing deadline of its own: testbed's",
    )
    shutdown_grace_ms: float = Field(
        5000.0,
        ge=0,
        le=600_000,
        description="at least this long for VTL0 to act on a shutdown (a systemd poweroff)",
    )

    @model_validator(mode="after")
    def _log_keeps_info(self) -> OpenVmmSpec:
        if not re.search(r"(^|,)(info|debug|trace)(,|$)", self.log):
            raise ValueError(f"log {self.log!r} names no default level: add 'info' (OPENVMM_LOG replaces it)")
        return self


class OpenVmmVmConfig(VmConfig):
    backend: Literal["openvmm"] = "openvmm"
    openvmm: OpenVmmSpec

    @classmethod
    def knob_names(cls) -> tuple[str, ...]:
        """service-vtl2's flags, as a playbook's lab: knobs and a matrix's lab.<flag> (0/1):
        user_mode_only (-u), nvme_keepalive (-n), mana_keepalive (--mana-keepalive)."""
        return tuple(ServiceFlags.model_fields)

    def with_lab(self, over: Mapping[str, Any]) -> Self:
        changes = {k: v for k, v in over.items() if v is not None and k in ServiceFlags.model_fields}
        if not changes:
            return self
        flags = ServiceFlags.model_validate({**self.openvmm.service.model_dump(), **changes})
        return self.model_copy(update={"openvmm": self.openvmm.model_copy(update={"service": flags})})
