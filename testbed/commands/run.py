"""``testbed run`` and ``testbed bisect``: from the command line's values to a run (or, with
``--dry-run``, to the printed plan of one), with a progress bar and the summary.

A dry run opens no backend: it loads and validates the playbook, checks it against the
capabilities the host's kind declares, and prints what the run would do and how long it
should take, from the rate a previous run on that host measured (kept in the cache,
keyed by host) or the kind's stated default.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from testbed.backends import registry
from testbed.backends.base import Backend
from testbed.backends.commands import console, exit_codes, fail, out
from testbed.core.config import STRATEGIES, ConfigError, HostEntry, HostOptions, VmConfig
from testbed.core.paths import cache_dir
from testbed.engine.fleet import FleetHost
from testbed.engine.options import RunOptions, RunResult
from testbed.engine.plan import RunPlan
from testbed.engine.playbook import Playbook, load_playbook, load_vm_config
from testbed.engine.schedule import parse_schedule
from testbed.hosts import DEFAULT_INVENTORY, load_inventory, lookup_entry, open_backend
from testbed.report import finish_run


@dataclass
class RunArgs:
    """The command line's values for ``run`` (``bisect`` fills the ones it has)."""

    playbook: Path
    host: str = ""
    inventory: Path | None = None
    insecure_accept_new: bool = False
    identity: str | None = None
    vm_config: Path | None = None
    strategy: str | None = None
    iterations: int | None = None
    offsets: str | None = None
    seed: int | None = None
    out_dir: Path | None = None
    stop_on_loss: bool = False
    keep_failed: bool = False
    reset: str | None = None
    max_duration: float | None = None
    resume: Path | None = None
    parallel: int | None = None
    builds: str | None = None
    dry_run: bool = False


def execute(a: RunArgs) -> None:
    """Validate everything before a host is reached, then run (or print the dry run)."""
    if a.strategy is not None and a.strategy not in STRATEGIES:
        fail(2, f"--strategy {a.strategy!r}: allowed: {', '.join(STRATEGIES)}")
    if a.reset is not None and a.reset not in ("cold", "snapshot"):
        fail(2, f"--reset {a.reset!r}: allowed: cold, snapshot")
    host_opts = HostOptions(a.insecure_accept_new, a.identity)
    with exit_codes():
        pb, cfg = load_playbook(a.playbook)
        if a.vm_config is not None:
            cfg = load_vm_config(a.vm_config)
        entries = host_entries(a.host or pb.host, a.inventory, cfg)
        entry = entries[0]
        opts = options(a, entry, a.host or pb.host)
        cfgs = fleet_configs(entries, cfg, pb) if len(entries) > 1 else {entry.name: cfg}
        if len(entries) > 1:
            opts.fleet = [FleetHost(e.name, e.kind, _opener(e, cfgs[e.name], host_opts), e.max_guests,
                                    cfg=cfgs[e.name]) for e in entries]  # fmt: skip
        for e in entries[::-1]:  # each kind's refusals, the first host's plan kept
            kind = registry.get(e.kind)
            plan = RunPlan(pb, cfgs[e.name], opts, kind.kind, kind.capabilities, a.playbook)
    if a.dry_run:
        print_plan(plan, pb, entries)
        raise typer.Exit(0)
    with exit_codes():
        if opts.fleet is None:
            opts.backend = open_backend(entry, cfg.backend, host_opts)
            opts.open_backend = _opener(entry, cfg, host_opts)
        runner = make_runner(pb, cfg, opts, a.playbook)
    where = ", ".join(e.name for e in entries)
    kinds = ", ".join(dict.fromkeys(e.kind for e in entries))
    console.print(f"{pb.name} on {where} ({kinds}): {runner.describe()}", highlight=False)
    result = with_progress(runner, pb.name)
    if len(entries) == 1:
        remember_rate(entry, result)
    print_summary(result.run_dir)
    if result.stopped:
        console.print(f"[bold red]stopped early:[/] {result.stopped}", highlight=False)
    raise typer.Exit(result.exit_code)


def host_entries(spec: str, inventory: Path | None, cfg: VmConfig) -> list[HostEntry]:
    """``--host``: one host (a URI or an inventory name), several (``a,b,c``), every host
    of the inventory (``all``) or those with a label (``@label``). A fleet's hosts are
    of the vm_config's kind."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if spec == "all" or spec.startswith("@"):
        inv_path = inventory or (
            Path(os.environ[DEFAULT_INVENTORY]) if os.environ.get(DEFAULT_INVENTORY) else None
        )
        if inv_path is None:
            raise ConfigError(Path("--host"), None, f"--host {spec} names inventory hosts: give --inventory")
        inv = load_inventory(inv_path)
        names = [h.name for h in inv.hosts if spec == "all" or spec[1:] in h.labels]
        if not names:
            raise ConfigError(inv_path, None, f"--host {spec}: no host in the inventory matches")
    entries = [lookup_entry(n, inventory, kind=cfg.backend) for n in names or [spec]]
    if len(entries) > 1:
        other = [e for e in entries if e.kind != cfg.backend and e.vm_config is None]
        if other:
            raise ConfigError(Path("--host"), None, f"host {other[0].name} is of kind {other[0].kind}, the vm_config "
                              f"of backend {cfg.backend}: name its own vm_config in the inventory (vm_config:) "
                              "for a fleet of mixed kinds")  # fmt: skip
        seen = [e.name for e in entries]
        dup = sorted({n for n in seen if seen.count(n) > 1})
        if dup:
            raise ConfigError(Path("--host"), None, f"host {dup[0]} is named twice")
    return entries


def fleet_configs(entries: list[HostEntry], cfg: VmConfig, pb: Playbook) -> dict[str, VmConfig]:
    """Each fleet host's vm_config: its inventory's own (of its kind), else the playbook's.
    A fleet of mixed kinds runs one playbook; a matrix varies one vm_config, so it is
    refused there."""
    out: dict[str, VmConfig] = {}
    for e in entries:
        own = load_vm_config(Path(e.vm_config)) if e.vm_config is not None else cfg
        if own.backend != e.kind:
            raise ConfigError(Path(e.vm_config or "--host"), None, f"host {e.name} is of kind {e.kind}; its "
                              f"vm_config is for backend {own.backend}")  # fmt: skip
        try:  # the playbook's lab: knobs that this kind has
            out[e.name] = own.with_lab({k: v for k, v in pb.lab.items() if k in own.knob_names()})
        except ValueError as err:
            raise ConfigError(Path(e.vm_config or "--host"), None, f"host {e.name}: lab: {err}") from None
    if pb.matrix is not None and len({c.backend for c in out.values()}) > 1:
        raise ConfigError(
            Path("--host"), None, "a matrix runs on hosts of one kind: its cells vary one vm_config"
        )
    return out


def _opener(entry: HostEntry, cfg: VmConfig, host_opts: HostOptions) -> Callable[[], Backend]:
    """How one more backend of this host is opened (a lane's own agent and connection)."""
    return lambda: open_backend(entry, cfg.backend, host_opts)


def options(a: RunArgs, entry: HostEntry, host_spec: str) -> RunOptions:
    """The run's options from the command line (the backend is opened later)."""
    return RunOptions(
        host_spec=host_spec,
        inventory=a.inventory,
        vm_config=a.vm_config.resolve() if a.vm_config else None,
        strategy=a.strategy,
        iterations=a.iterations,
        offsets=parse_schedule(a.offsets) if a.offsets else None,
        seed=a.seed,
        out=a.out_dir,
        stop_on_loss=a.stop_on_loss or None,
        keep_failed=a.keep_failed,
        max_duration_s=a.max_duration,
        resume=a.resume,
        reset=a.reset,
        parallel=a.parallel,
        builds=[b.strip() for b in a.builds.split(",") if b.strip()] if a.builds else None,
        max_guests=entry.max_guests,
        finish=finish_run,
    )


def make_runner(pb: Playbook, cfg: VmConfig, opts: RunOptions, path: Path) -> Any:
    """A matrix runner for a playbook with a matrix, else the runner."""
    if pb.matrix is not None:
        from testbed.engine.matrix import MatrixRunner

        return MatrixRunner(pb, cfg, opts, playbook_path=path)
    from testbed.engine.runner import Runner

    return Runner(pb, cfg, opts, playbook_path=path)


def with_progress(runner: Any, name: str) -> RunResult:
    """Run with a progress bar: verdict counts as they come, one bar per matrix cell."""
    counts: Counter[str] = Counter()
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("{task.fields[counts]}"), console=console)  # fmt: skip
    task = progress.add_task(name, total=None, counts="booting / building the image...")

    def on_event(ev: dict[str, Any]) -> None:
        if ev["event"] == "start":
            progress.update(task, total=ev["total"], completed=ev["done"],
                            counts=f"accel {ev['accel']}, grace {ev['grace_ms']:.0f} ms")  # fmt: skip
        elif ev["event"] == "cell":  # a matrix: one bar per cell, in turn
            counts.clear()
            progress.update(task, description=f"cell {ev['index'] + 1}/{ev['cells']}: {ev['cell']}", completed=0,
                            total=None, counts="")  # fmt: skip
        elif ev["event"] == "iteration":
            counts[ev["record"]["verdict"]] += 1
            progress.update(task, advance=1, counts=" ".join(f"{k}={v}" for k, v in sorted(counts.items())))

    runner.progress = on_event
    with exit_codes(usage=False), progress:
        result: RunResult = runner.run()
    return result


def print_summary(run_dir: Path) -> None:
    print((run_dir / "summary.md").read_text())
    print(f"reports: {run_dir}/report.html, junit.xml, summary.json")


# ---- the measured rate of a host, for dry runs ---------------------------------------


def _rates_path() -> Path:
    return cache_dir() / "host-rates.json"


def _host_key(entry: HostEntry) -> str:
    return f"{entry.kind} {entry.uri}"


def remember_rate(entry: HostEntry, result: RunResult) -> None:
    """Keep the iterations per minute this run measured on its host (a dry run's estimate)."""
    per_min = (result.summary or {}).get("iterations_per_min")
    if not per_min:
        return
    p = _rates_path()
    try:
        rates = json.loads(p.read_text()) if p.exists() else {}
        rates[_host_key(entry)] = {"per_min": per_min, "run_dir": str(result.run_dir), "time": time.time()}
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(rates, indent=2))
    except (OSError, ValueError):
        pass  # an estimate for later is not worth failing a finished run for


def rate_for(entry: HostEntry) -> tuple[float, str]:
    """Iterations per minute on this host, and where the number came from."""
    try:
        known = json.loads(_rates_path().read_text()).get(_host_key(entry))
    except (OSError, ValueError):
        known = None
    if known:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(known["time"]))
        return float(known["per_min"]), f"measured by the run in {known['run_dir']} ({when})"
    kind = registry.get(entry.kind)
    return 60.0 / kind.typical_iteration_s, (
        f"the {entry.kind} kind's stated default ({kind.typical_iteration_s:g} s an iteration); "
        "a run on this host measures its own"
    )


def print_plan(plan: RunPlan, pb: Playbook, entries: list[HostEntry]) -> None:
    """The dry run: what would run, refused nothing, and how long it should take."""
    entry = entries[0]
    where = entry.uri if len(entries) == 1 else ", ".join(e.name for e in entries)
    kinds = ", ".join(dict.fromkeys(e.kind for e in entries))
    out.print(f"dry run: {pb.name} on {where} ({kinds}); nothing was started", highlight=False)
    for c in plan.cases():
        s = plan.schedule_of(c)
        out.print(f"  case {c.name}: {plan.iterations_of(c)} tries at most, strategy {plan.strategy}, "
                  f"shutdown {c.shutdown}; {describe_schedule(s)}", highlight=False)  # fmt: skip
    if plan.lanes > 1:
        out.print(
            f"  lanes: {plan.lanes}" + (f" ({plan.lanes_note})" if plan.lanes_note else ""), highlight=False
        )
    if pb.matrix is not None:
        dims = ", ".join(f"{k} ({len(v)})" for k, v in pb.matrix.dimensions.items())
        out.print(f"  matrix: {dims}: every cell runs the plan above", highlight=False)
    per_min, source = rate_for(entry)
    total = plan.total() * (math.prod(len(v) for v in pb.matrix.dimensions.values()) if pb.matrix else 1)
    minutes = total / per_min / max(1, plan.lanes)
    out.print(f"  estimate: {total} tries in about {_duration(minutes)} at {per_min:.1f} tries/min ({source})",
              highlight=False)  # fmt: skip


def describe_schedule(s: Any) -> str:
    """One line per schedule object: its offsets, phases and delays, arms, or builds."""
    from testbed.engine import schedule as sched

    if isinstance(s, sched.Static):
        pts = s.points
        shown = ", ".join(f"{x:g}" for x in pts[:8]) + (f", ... ({len(pts)} offsets)" if len(pts) > 8 else "")
        return f"offsets [{shown}] ms" + (f", cycled to {s.size} tries" if s.size > len(pts) else "")
    if isinstance(s, sched.Adaptive):
        return (f"an adaptive window search over [{s.lo_ms:g}, {s.hi_ms:g}] ms: {s.coarse} coarse tries, then "
                f"bisection of each edge to {s.resolution_ms:g} ms")  # fmt: skip
    if isinstance(s, sched.PhaseSweep):
        return (f"a phase sweep: {', '.join(s.phases)} at delays {', '.join(f'{d:g}' for d in s.delays_ms)} ms"
                + (" and each gap's midpoint" if s.midpoint else "") + f", {s.repeat} times each")  # fmt: skip
    if isinstance(s, sched.FlakySearch):
        arms = len(sched.flaky_arms(s.lo_ms, s.hi_ms, s.buckets, s.phases))
        return (f"a flaky-window search of {arms} arms ({s.buckets} buckets of [{s.lo_ms:g}, {s.hi_ms:g}] ms, {len(s.phases)} phases), "
                f"until every loss rate is below {s.target_rate:.0%} or a window is confirmed in {s.confirm} tries")  # fmt: skip
    if isinstance(s, sched.Bisection):
        b = s.spec.builds
        return (f"a bisection of builds {b[0]} (good) .. {b[-1]} (bad), {len(b)} in all, an SPRT per build "
                f"(p0 {s.spec.p0:g}, p1 {s.spec.p1:g}, at most {s.spec.max_per_build} tries each)")  # fmt: skip
    return f"{s.size} tries, fired {getattr(s, 'mode', '')} (no offset)"


def _duration(minutes: float) -> str:
    return (
        f"{minutes * 60:.0f} s"
        if minutes < 2
        else f"{minutes:.0f} min"
        if minutes < 120
        else f"{minutes / 60:.1f} h"
    )
