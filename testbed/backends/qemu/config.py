"""The QEMU backend's vm_config: the reference lab guest and its paravisor's timing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Self

from pydantic import Field, field_validator

from testbed.core.config import Strict, VmConfig

# v2-r1 .. v2-r8: a build series for `testbed bisect`; from v2-r6 on, a regression loses
# some of the messages held during servicing (guest/paravisor.c, REGRESSION_PCT).
BISECT_SERIES: tuple[str, ...] = tuple(f"v2-r{i}" for i in range(1, 9))
PARAVISOR_IMAGES: tuple[str, ...] = ("v1", "v2", "v2-replay", "v2-panic", "v2-hang", "v2-crash", "v2-skip",
                                     *BISECT_SERIES)  # fmt: skip


class KernelSpec(Strict):
    package: str = Field(
        "linux-image-cloud-amd64",
        description="Debian kernel package or metapackage, resolved with apt at build time",
    )
    version: str | None = Field(
        None, description="pin the package version; null = what the metapackage resolves to today"
    )


class LabKnobs(Strict):
    """Timing of the reference paravisor: they place the vulnerable window."""

    save_ms: int = Field(300, ge=0, le=60_000)
    restore_ms: int = Field(100, ge=0, le=60_000)
    blackout_ms: int = Field(0, ge=0, le=10_000)
    vtl0_shutdown_ms: int = Field(100, ge=0, le=10_000)
    vtl0_attach_ms: int = Field(
        0,
        ge=0,
        le=60_000,
        description="VTL0's driver attaches this long after the IC's re-offer: a request posted in the gap "
        "is accepted and never acted on (openvmm #1174); 0 = at once",
    )
    servicing_timeout_ms: int = Field(8000, ge=100, le=600_000)
    regression_pct: int = Field(
        15,
        ge=0,
        le=100,
        description="the bisection series' regression (builds v2-r6 and later): the share of the "
        "messages flushed in the half second after a restore that those builds drop; 100 makes "
        "every held message lost there, so a bisection decides in a few tries",
    )


class ParavisorSpec(Strict):
    version: str = "v2"

    @field_validator("version")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in PARAVISOR_IMAGES:
            raise ValueError(f"unknown paravisor image {v!r}; allowed: {', '.join(PARAVISOR_IMAGES)}")
        return v


class QemuVmConfig(VmConfig):
    """A reference-lab guest: a Debian kernel, a busybox initramfs, the lab paravisor."""

    backend: Literal["qemu"] = "qemu"
    kernel: KernelSpec = KernelSpec()
    busybox_package: str = "busybox-static"
    cmdline: str = "console=ttyS0 quiet loglevel=1 panic=-1"
    memory_mib: int = Field(256, ge=64, le=65536)
    cpus: int = Field(1, ge=1, le=64)
    machine: Literal["q35", "pc"] = "q35"
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    boot_timeout_s: float = Field(90.0, gt=0, le=3600)
    paravisor: ParavisorSpec = ParavisorSpec()
    lab: LabKnobs = LabKnobs()

    @property
    def shutdown_allowance_ms(self) -> float:
        return float(self.lab.vtl0_shutdown_ms)

    @classmethod
    def knob_names(cls) -> tuple[str, ...]:
        return tuple(LabKnobs.model_fields)

    def with_lab(self, over: Mapping[str, Any]) -> Self:
        changes = {k: v for k, v in over.items() if v is not None}
        if not changes:
            return self
        lab = LabKnobs.model_validate({**self.lab.model_dump(), **changes})  # ValueError names a bad knob
        return self.model_copy(update={"lab": lab})

    def build_names(self) -> tuple[str, ...] | None:
        return PARAVISOR_IMAGES

    def with_paravisor(self, version: str) -> Self:
        return self.model_copy(update={"paravisor": ParavisorSpec(version=version)})
