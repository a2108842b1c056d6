"""The mock backend's vm_config: where its simulated window lies and how a race ends."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, model_validator

from testbed.core.config import Strict, VmConfig


class MockWindow(Strict):
    """A shutdown fired in [lo_ms, hi_ms) from the servicing request is lost with
    probability ``rate`` (seeded by the iteration, so a run is reproducible)."""

    lo_ms: float = Field(5.0, ge=-60_000, le=60_000)
    hi_ms: float = Field(200.0, ge=-60_000, le=60_000)
    rate: float = Field(1.0, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.hi_ms <= self.lo_ms:
            raise ValueError(f"hi_ms ({self.hi_ms:g}) must be above lo_ms ({self.lo_ms:g})")
        return self


class MockVmConfig(VmConfig):
    """A simulated guest: servicing takes ``servicing_ms`` (its phases at fixed fractions
    of it), the IC is not ready from ``window.hi_ms`` until the re-offer, and the window
    loses only under ``lossy_strategies``. ``builds`` gives a loss rate per build (for
    bisections and matrices); ``race_ms`` is the wall time a race takes (for benches of
    the controller), 0 by default so the unit suite stays fast."""

    backend: Literal["mock"] = "mock"
    servicing_ms: float = Field(300.0, gt=0, le=600_000)
    window: MockWindow = MockWindow()
    refuse_until_reoffer: bool = True
    lossy_strategies: list[str] = ["none", "mask-async"]
    builds: dict[str, float] = Field(
        default_factory=dict, description="build name -> loss rate in the window"
    )
    paravisor: str = "mock-v1"
    race_ms: float = Field(0.0, ge=0, le=60_000)
    # Faults, for tests of a fleet, by host URI: races that fail (an operation refused)
    # after this many, a host that stops answering (its connection lost) after this many,
    # and hosts that cannot be reached at all.
    breaks_after: dict[str, int] = Field(default_factory=dict)
    gone_after: dict[str, int] = Field(default_factory=dict)
    unreachable: list[str] = []
    delivery_ms: float = Field(20.0, ge=0, le=60_000)

    @property
    def shutdown_allowance_ms(self) -> float:
        return self.delivery_ms

    def build_names(self) -> tuple[str, ...] | None:
        return tuple(self.builds) or None

    def with_paravisor(self, version: str) -> Self:
        if self.builds and version not in self.builds:
            raise ValueError(f"unknown build {version!r}; this mock has: {', '.join(self.builds)}")
        return self.model_copy(update={"paravisor": version})
