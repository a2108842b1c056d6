"""A third-party backend in one file: it "races" deterministically from a table in its
vm_config (offset -> verdict). Registered through the ``testbed.backends`` entry point
of the distribution beside it (testbed_table-0.1.dist-info), exactly as a backend
installed with pip would be; nothing in testbed names it. Test support."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from testbed.backends.api import (
    BackendKind,
    Capabilities,
    Check,
    Facts,
    Finding,
    HostEntry,
    HostOptions,
    HostReport,
    RaceEvidence,
    RacePlan,
    TimelineEntry,
    Verdict,
    VmConfig,
    decide,
)

T0 = 5_000_000_000  # the table host's clock at the servicing request, in ns


class TableVmConfig(VmConfig):
    backend: Literal["table"] = "table"
    table: dict[float, str]  # planned offset (ms) -> the verdict this host gives there
    servicing_ms: float = 300.0


@dataclass
class TableVm:
    name: str
    cfg: TableVmConfig
    accel: str = "table"
    running: bool = False

    def record(self) -> dict[str, Any]:
        return {"vm": self.name, "host": "table", "paravisor": "table-pv", "accel": self.accel}


CAPABILITIES = Capabilities(
    shutdown_modes=("offset", "none"),
    reasons={
        "images": "a table has no builds to service into",
        "shutdown:after-ready": "a table has no IC to wait for",
        "shutdown:ic-ready": "a table has no IC to wait for",
    },
)


class TableBackend:
    kind = "table"
    capabilities = CAPABILITIES

    def __init__(self, entry: HostEntry) -> None:
        self.host = entry.uri
        self.starts = 0

    def preflight(self, cfg: Any = None, *, deep: bool = False) -> HostReport:
        return HostReport(self.host, [Check("table", True, "the table is always ready")])

    def provision(self, cfg: TableVmConfig, strategy: str = "none") -> TableVm:
        return TableVm(f"{cfg.name}-table", cfg)

    def start(self, vm: TableVm, reset: str = "cold") -> dict[str, Any]:
        vm.running, self.starts = True, self.starts + 1
        return {"wall_s": 0.001, "reset": reset}

    def race(self, vm: TableVm, plan: RacePlan, grace_ms: float) -> RaceEvidence:
        offset = plan.offset_ms or 0.0
        fire = T0 + int(offset * 1e6)
        done = T0 + int(vm.cfg.servicing_ms * 1e6)
        verdict = vm.cfg.table.get(offset, "preserved")
        return RaceEvidence(
            backend="table", zero_ns=T0, service_requested_ns=T0, service_started_ns=T0 + 1_000_000,
            service_done_ns=done, fire_planned_ns=fire, fire_ns=fire + 50_000, message_id="m1",
            ended=verdict != "lost", ended_ns=max(fire, done) + 20_000_000 if verdict != "lost" else None,
            timeline=[TimelineEntry(T0, "table", "servicing"), TimelineEntry(fire, "table", "shutdown")],
            raw={"verdict": verdict, "offset": offset},
        )  # fmt: skip

    def classify(self, ev: RaceEvidence) -> Verdict:
        """The table's word as facts; ``decide`` (shared by every backend) gives the verdict."""
        said, line = ev.raw["verdict"], f"table[{ev.raw['offset']}]"
        seen = Finding(f"the table says {said}", (line,))
        if said == "infra-error":
            return decide(Facts(infra_error=seen))
        acted = {"preserved": 1, "delivered-before": 1, "duplicated": 2}.get(said, 0)
        return decide(Facts(
            request="refused" if said == "rejected" else "accepted", request_seen=seen,
            servicing="failed" if said == "servicing-failed" else "done", servicing_seen=seen,
            servicing_proof="skipped" if said == "servicing-skipped" else "restarted",
            acted=acted, acted_seen=seen if acted else Finding(), before_servicing=said == "delivered-before",
            ended=acted > 0, fate=seen, crash=seen if said == "guest-crash" else None,
        ))  # fmt: skip

    def collect(self, vm: TableVm, dest: Path, *, everything: bool = False) -> list[Path]:
        (dest / "table.txt").write_text(f"{vm.name} everything={everything}\n")
        return [dest / "table.txt"]

    def destroy(self, vm: TableVm) -> None:
        vm.running = False

    def gc_host(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


def _open(entry: HostEntry, opts: HostOptions) -> TableBackend:
    return TableBackend(entry)


KIND = BackendKind(kind="table", description="a table host", vm_config=TableVmConfig, open=_open,
                   schemes=("local", "table"), claims=("table",), capabilities=CAPABILITIES)  # fmt: skip
