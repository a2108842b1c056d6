"""The public Python API: the same code path the CLI and the pytest plugin use.

    from testbed.api import open_host

    with open_host("local") as host:
        with host.vm("vm_configs/reference-linux.yaml", strategy="none") as vm:
            result = vm.race(offset_ms=150)
            print(result.verdict, result.reason)
            for line in result.evidence:
                print(line)

Each ``race`` gets a fresh VM (a snapshot restore, or a cold boot), fires the
servicing request and the shutdown IC request on the host, and reads the
verdict from evidence, exactly as ``testbed run`` does for one iteration.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.backends.base import Backend
from testbed.core.config import HostEntry, HostOptions, VmConfig
from testbed.core.evidence import RacePlan
from testbed.engine.grace import DEFAULT_GRACE_MS
from testbed.engine.iterate import iterate
from testbed.engine.options import RunOptions, RunResult
from testbed.engine.playbook import Playbook, load_playbook, load_vm_config
from testbed.engine.runner import Runner
from testbed.hosts import lookup_entry, open_backend
from testbed.report import finish_run

_ids = itertools.count(1)


@dataclass
class RaceResult:
    verdict: str
    reason: str
    evidence: list[str]
    offset_ms: float | None
    guest_offset_ms: float | None
    raw: dict[str, Any] = field(repr=False, default_factory=dict)


class Vm:
    """A provisioned reference VM: each ``race`` starts it fresh and destroys it after."""

    def __init__(self, host: Host, vm: Any, reset: str) -> None:
        self.host = host
        self.backend_vm = vm
        self.reset = reset

    @property
    def record(self) -> dict[str, Any]:
        return dict(self.backend_vm.record())

    def race(
        self,
        offset_ms: float | None = 150.0,
        *,
        image: str | None = None,
        servicing: bool = True,
        after_ready: bool = False,
        grace_ms: float = DEFAULT_GRACE_MS,
    ) -> RaceResult:
        """One iteration: servicing at t = 0, the shutdown IC request at ``offset_ms``."""
        plan = RacePlan(next(_ids), None if after_ready else offset_ms, servicing, True,
                        "after-ready" if after_ready else "offset", image)  # fmt: skip
        r = iterate(self.host.backend, self.backend_vm, plan, grace_ms, reset=self.reset)
        ev = r.evidence
        return RaceResult(r.verdict.kind, r.verdict.reason, r.verdict.evidence,
                          ev.offset_ms if servicing else None, ev.guest_offset_ms, ev.as_dict())  # fmt: skip


class Host:
    """A lab host (local, a Linux host over SSH, or a Hyper-V host) with its backend."""

    def __init__(self, entry: HostEntry, backend: Backend, options: HostOptions | None = None) -> None:
        self.entry = entry
        self.backend = backend
        self.options = options or HostOptions()  # how ``backend`` was opened: a parallel run opens more so

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def kind(self) -> str:
        return self.entry.kind

    @contextmanager
    def vm(
        self,
        vm_config: str | Path | VmConfig,
        strategy: str = "none",
        *,
        reset: str = "snapshot",
        lab: dict[str, int] | None = None,
        paravisor: str | None = None,
    ) -> Iterator[Vm]:
        cfg = vm_config if isinstance(vm_config, VmConfig) else load_vm_config(vm_config)
        if lab:
            cfg = cfg.with_lab(lab)
        if paravisor:
            cfg = cfg.with_paravisor(paravisor)
        qvm = self.backend.provision(cfg, strategy)
        try:
            yield Vm(self, qvm, reset)
        finally:
            self.backend.destroy(qvm)

    def run_playbook(self, playbook: str | Path | Playbook, out: Path, vm_config: VmConfig | None = None,
                     **overrides: Any) -> RunResult:  # fmt: skip
        """A whole playbook on this host; ``overrides`` are RunOptions fields (strategy, iterations...)."""
        if isinstance(playbook, Playbook):
            pb, cfg = playbook, vm_config
            assert cfg is not None, "pass vm_config with a Playbook object"
        else:
            pb, cfg = load_playbook(playbook)
            cfg = vm_config or cfg
        opts = RunOptions(out=out, backend=self.backend, host_spec=self.entry.name,
                          max_guests=self.entry.max_guests,
                          open_backend=lambda: open_backend(self.entry, opts=self.options),
                          **{"finish": finish_run, **overrides})  # fmt: skip
        return Runner(pb, cfg, opts).run()

    def close(self) -> None:
        self.backend.close()


@contextmanager
def open_host(host: str = "local", inventory: str | Path | None = None, *, kind: str | None = None,
              insecure_accept_new: bool = False, identity: str | None = None) -> Iterator[Host]:  # fmt: skip
    """A host by URI or inventory name; ``kind`` picks the backend of a bare URI that
    more than one kind accepts (``local``, ``ssh://``)."""
    entry = lookup_entry(host, Path(inventory) if inventory else None, kind=kind)
    options = HostOptions(insecure_accept_new, identity)
    h = Host(entry, open_backend(entry, opts=options), options)
    try:
        yield h
    finally:
        h.close()
