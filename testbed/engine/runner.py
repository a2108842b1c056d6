"""The core loop: plan -> fresh VM -> race -> verdict -> record, many times.

Every iteration gets a VM in a known state (a cold boot or a snapshot
restore) and destroys it afterwards, so no iteration inherits another's
state.  Each finished iteration is appended to results.jsonl before the next
starts, so Ctrl-C or a crash loses nothing that finished.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from testbed import __version__
from testbed.backends.base import Backend, InfraError, RacePlan
from testbed.config import Case, ConfigError, Playbook, ScheduleSpec, VmConfig, stable_hash
from testbed.engine import schedule as sched
from testbed.engine.iterate import IterationResult, iterate
from testbed.engine.policy import finish_run
from testbed.paths import cache_dir
from testbed.report.jsonl import ResultsWriter, read_results

log = logging.getLogger(__name__)

DEFAULT_GRACE_MS = 1500.0


@dataclass
class RunOptions:
    strategy: str | None = None
    iterations: int | None = None
    offsets: ScheduleSpec | None = None  # --offsets: its count sets the iterations unless given too
    seed: int | None = None
    out: Path | None = None
    stop_on_loss: bool | None = None
    keep_failed: bool = False
    max_duration_s: float | None = None
    resume: Path | None = None
    reset: str | None = None
    backend: Backend | None = None  # None: the vm_config's kind on this machine
    host_spec: str | None = None  # what the user named the host by (URI or inventory name)
    inventory: Path | None = None


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    exit_code: int
    records: list[dict[str, Any]] = field(default_factory=list)
    stopped: str | None = None


Progress = Callable[[dict[str, Any]], None]


def calibration_path(accel: str) -> Path:
    return cache_dir() / f"grace-calibration-{accel}.json"


def grace_for(pb: Playbook, cfg: VmConfig, accel: str) -> tuple[float, str]:
    """The grace after servicing ends before an undelivered message counts as lost.

    Calibrated by the baselines playbook (3x the slowest delivery it saw,
    plus the guest's shutdown time); a default otherwise.
    """
    if pb.grace_ms != "auto":
        return float(pb.grace_ms), "set in the playbook"
    p = calibration_path(accel)
    if p.exists():
        cal = json.loads(p.read_text())
        return max(300.0, 3 * cal["max_delivery_ms"] + cfg.shutdown_allowance_ms), f"calibrated {p}"
    return (
        DEFAULT_GRACE_MS + cfg.shutdown_allowance_ms,
        "default (run playbooks/baselines.yaml to calibrate)",
    )


IN_RUN_DELIVERIES = 5  # deliveries seen before the default grace is replaced
IN_RUN_FLOOR_MS = 500.0


def in_run_grace(
    records: list[dict[str, Any]], default: tuple[float, str], allowance_ms: float
) -> tuple[float, str]:
    """A default grace, calibrated from what this run has seen: once it has watched
    IN_RUN_DELIVERIES messages delivered, 3 x the slowest delivery plus the guest's
    shutdown allowance (the baselines playbook's rule), never above the default and
    never below IN_RUN_FLOOR_MS. A grace set in the playbook or calibrated by baselines.yaml is
    kept as it is."""
    if not default[1].startswith("default"):
        return default
    seen = [r["delivery_ms"] for r in records
            if r["verdict"] in ("preserved", "delivered-before") and r.get("delivery_ms") is not None]  # fmt: skip
    if len(seen) < IN_RUN_DELIVERIES:
        return default
    grace = min(default[0], max(IN_RUN_FLOOR_MS, 3 * max(seen) + allowance_ms))
    return (
        grace,
        f"in-run: 3 x the slowest of {len(seen)} deliveries ({max(seen):.0f} ms) + {allowance_ms:.0f} ms",
    )


class Runner:
    def __init__(
        self,
        pb: Playbook,
        cfg: VmConfig,
        opts: RunOptions,
        progress: Progress | None = None,
        playbook_path: Path | None = None,
    ) -> None:
        self.pb = pb
        self.cfg = cfg.with_lab(pb.lab)
        self.opts = opts
        self.progress = progress or (lambda _e: None)
        self.strategy = opts.strategy or pb.strategy
        self.seed = opts.seed if opts.seed is not None else pb.seed
        self.reset = opts.reset or pb.reset
        self.stop_on_loss = opts.stop_on_loss if opts.stop_on_loss is not None else pb.stop_on_loss
        self.playbook_path = playbook_path
        self.backend: Backend = opts.backend or _local_backend(cfg.backend)
        self.records: list[dict[str, Any]] = []
        self.interrupted = False
        self.stopped: str | None = None  # why the run ended early, when it did
        modes = getattr(self.backend, "shutdown_modes", ("offset", "after-ready", "none"))
        for c in self.cases():
            if (c.schedule or pb.schedule).kind == "phases":
                self.phases_of(c, modes, playbook_path)  # refuses what the backend cannot observe
            if c.shutdown not in modes:
                raise ConfigError(
                    playbook_path or Path(pb.name),
                    None,
                    f"case {c.name}: shutdown {c.shutdown!r} is not supported by the {self.backend.kind} backend "
                    f"(it supports {', '.join(modes)})",
                )

    # ---- planning --------------------------------------------------------------
    def cases(self) -> list[Case]:
        """The playbook's cases with the command line's overrides: ``--offsets`` replaces
        each case's schedule and, unless ``--iterations`` is given too, its count becomes
        the iterations (so ``random:-30:60:80`` runs 80, not the playbook's 16)."""
        cases = self.pb.resolved_cases()
        spec = self.opts.offsets
        n = self.opts.iterations or (spec.points if spec is not None else None)
        if n or spec:
            cases = [
                c.model_copy(update={k: v for k, v in (("iterations", n), ("schedule", spec)) if v})
                for c in cases
            ]
        return cases

    def describe(self) -> str:
        """What the run will do, said before it starts."""
        parts = []
        for c in self.cases():
            n = c.iterations or self.pb.iterations
            s = c.schedule or self.pb.schedule
            what = f"{c.name}: {n} iteration{'s' if n != 1 else ''}"
            if c.shutdown in ("offset", "ic-ready"):
                what += f", schedule {s.kind}" + (
                    " of delays after the IC's re-offer" if c.shutdown == "ic-ready" else ""
                )
                if s.points is not None and s.points != n:
                    what += (
                        f" of {s.points} offsets, {'cycled to' if s.points < n else 'cut to the first'} {n}"
                    )
            parts.append(what)
        return "; ".join(parts)

    def phases_of(self, case: Case, modes: tuple[str, ...], path: Path | None = None) -> list[str]:
        """The phases a ``kind: phases`` schedule fires on: the backend's, or the named
        ones, which must be among them."""
        where = path or self.playbook_path or Path(self.pb.name)
        observe = getattr(self.backend, "servicing_phases", None)
        if observe is None or "phase" not in modes:
            why = getattr(self.backend, "phases_unavailable", "it names no servicing phases it can observe")
            raise ConfigError(where, None, f"case {case.name}: schedule kind phases: the {self.backend.kind} backend "
                                           f"cannot fire on servicing phases: {why}")  # fmt: skip
        if case.shutdown != "offset":
            raise ConfigError(where, None, f"case {case.name}: schedule kind phases fires on phases; "
                                           f"leave shutdown at offset (it is {case.shutdown!r})")  # fmt: skip
        known: list[str] = list(observe(self.strategy))
        s = case.schedule or self.pb.schedule
        unknown = [p for p in (s.phases or []) if p not in known]
        if unknown:
            raise ConfigError(where, None, f"case {case.name}: phases {', '.join(unknown)} are not observable with "
                                           f"strategy {self.strategy} on {self.backend.kind}; it shows: "
                                           f"{', '.join(known)}")  # fmt: skip
        return [p for p in known if p in s.phases] if s.phases else known

    def iterations_of(self, case: Case) -> int:
        s = case.schedule or self.pb.schedule
        if s.kind == "phases":
            n = len(self.phases_of(case, getattr(self.backend, "shutdown_modes", ())))
            return sched.phase_sweep_size(n, len(s.delays_ms), s.midpoint, s.repeat)
        return case.iterations or self.pb.iterations

    def plans(self, case: Case, start_index: int) -> Iterator[RacePlan]:
        n = case.iterations or self.pb.iterations
        image = case.image
        mode = case.shutdown  # "offset", or "ic-ready": the schedule gives delays after the re-offer
        if mode not in ("offset", "ic-ready"):
            for i in range(n):
                yield RacePlan(
                    start_index + i,
                    None,
                    case.servicing,
                    case.shutdown != "none",
                    case.shutdown,
                    image,
                )
            return
        s = case.schedule or self.pb.schedule
        if s.kind == "phases":
            phases = self.phases_of(case, getattr(self.backend, "shutdown_modes", ()))
            cells = sched.phase_cells(phases, list(s.delays_ms), s.repeat, self.seed)
            i = 0
            for ph, d in cells:
                yield RacePlan(start_index + i, d, case.servicing, True, "phase", image, phase=ph)
                i += 1
            if s.midpoint:  # aimed at the middle of each gap, as measured by the cells above
                seen = [
                    r["phase_times_ms"]
                    for r in self.records
                    if r.get("case") == case.name and r.get("phase_times_ms")
                ]
                mids = sched.phase_midpoints(phases, seen)
                for ph, _ in sched.phase_cells(
                    [p for p in phases if p in mids], [0.0], s.repeat, self.seed + 1
                ):
                    yield RacePlan(start_index + i, mids[ph], case.servicing, True, "phase", image, phase=ph)
                    i += 1
            return
        if s.kind == "adaptive":
            outcomes: dict[float, str] = {}

            def outcome(x: float) -> str | None:
                for r in reversed(self.records):
                    if r.get("case") == case.name and r.get("planned_offset_ms") == x:
                        return str(r["verdict"])
                return outcomes.get(x)

            assert s.lo_ms is not None and s.hi_ms is not None
            gen = sched.adaptive(
                s.lo_ms, s.hi_ms, n, outcome, coarse=s.coarse, resolution_ms=s.resolution_ms, seed=self.seed
            )
            for i, x in enumerate(gen):
                yield RacePlan(start_index + i, x, case.servicing, True, mode, image)
            return
        if s.kind == "fixed":
            pts = list(s.offsets_ms or [])
        elif s.kind == "linear":
            assert s.start_ms is not None and s.stop_ms is not None
            pts = sched.linear(s.start_ms, s.stop_ms, s.count or n)
        else:
            assert s.lo_ms is not None and s.hi_ms is not None
            pts = sched.seeded_random(s.lo_ms, s.hi_ms, s.count or n, self.seed)
        for i, x in enumerate(sched.cycle_to(pts, n)):
            yield RacePlan(start_index + i, x, case.servicing, True, mode, image)

    # ---- running ---------------------------------------------------------------
    def run_dir(self) -> Path:
        if self.opts.resume:
            return self.opts.resume
        if self.opts.out:
            return self.opts.out
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        return Path("runs") / f"{stamp}-{self.pb.name}"

    def manifest(self, vm: Any, grace: tuple[float, str]) -> dict[str, Any]:
        return {
            "testbed_version": __version__,
            "playbook": self.pb.name,
            "playbook_path": str(self.playbook_path.resolve()) if self.playbook_path else None,
            "host": self.backend.host,
            "host_kind": self.backend.kind,
            "host_spec": self.opts.host_spec or ("local" if self.opts.backend is None else None),
            "inventory": str(self.opts.inventory.resolve()) if self.opts.inventory else None,
            "host_os": f"{platform.system()} {platform.release()} ({platform.version()})",
            **vm.record(),
            "seed": self.seed,
            "reset": self.reset,
            "config_hash": stable_hash(
                {"playbook": self.pb.model_dump(), "vm_config": self.cfg.model_dump()}
            ),
            "vm_settings": self.cfg.model_dump(mode="json"),
            "grace_ms": grace[0],
            "grace_source": grace[1],
            "expect": self.pb.expect,
            "expect_by_case": {c.name: c.expect for c in self.cases()},
            "max_infra_errors": self.pb.max_infra_errors,
            "started": time.time(),
        }

    def run(self) -> RunResult:
        run_dir = self.run_dir()
        (run_dir / "iterations").mkdir(parents=True, exist_ok=True)
        done = read_results(run_dir / "results.jsonl") if self.opts.resume else []
        self.records = list(done)
        done_ids = {r["iteration"] for r in done}
        writer = ResultsWriter(run_dir / "results.jsonl")
        started = time.monotonic()
        vm: Any = None
        write_failed = False
        try:
            vm = self.backend.provision(self.cfg, self.strategy)
            grace = grace_for(self.pb, self.cfg, vm.accel)
            run_json = run_dir / "run.json"
            manifest = self.manifest(vm, grace)
            if self.opts.resume and run_json.exists():
                manifest = {**json.loads(run_json.read_text()), "resumed": time.time()}
            run_json.write_text(json.dumps(manifest, indent=2, default=str))
            total = sum(self.iterations_of(c) for c in self.cases())
            self.progress(
                {
                    "event": "start",
                    "total": total,
                    "run_dir": str(run_dir),
                    "accel": vm.accel,
                    "grace_ms": grace[0],
                    "done": len(done),
                }
            )
            index = 0
            stop = False
            streak = 0  # infrastructure errors in a row
            for case in self.cases():
                for plan in self.plans(case, index):
                    if plan.iteration in done_ids:
                        continue
                    if self.opts.max_duration_s and time.monotonic() - started > self.opts.max_duration_s:
                        log.warning("--max-duration reached; stopping before iteration %d", plan.iteration)
                        stop = True
                        break
                    now = in_run_grace(self.records, grace, self.cfg.shutdown_allowance_ms)
                    rec = self.iteration(vm, case, plan, now[0], run_dir)
                    rec["grace_ms"], rec["grace_source"] = now
                    writer.write(rec)
                    self.records.append(rec)
                    self.progress({"event": "iteration", "record": rec})
                    if rec["verdict"] == "lost" and self.stop_on_loss:
                        stop = True
                    if rec["verdict"] == "infra-error" and self.pb.on_infra_error == "stop":
                        stop = True
                    streak = streak + 1 if rec["verdict"] == "infra-error" else 0
                    if streak >= self.pb.max_infra_errors_in_a_row:
                        self.stopped = (f"the host is broken: {streak} infrastructure errors in a row, "
                                        f"the last: {rec['reason']}")  # fmt: skip
                        log.error("stopping: %s", self.stopped)
                        stop = True
                    if stop:
                        break
                index += case.iterations or self.pb.iterations
                if stop:
                    break
            if self.pb.calibrate:
                self.write_calibration(vm.accel)
        except KeyboardInterrupt:
            self.interrupted = True
            log.warning("interrupted: cleaning up; finished iterations are kept")
        except OSError as e:  # the run folder cannot be written: full, gone, read-only
            self.stopped = f"cannot write the run folder {run_dir}: {e.strerror or e}"
            log.error("stopping: %s", self.stopped)
            write_failed = True
        finally:
            with contextlib.suppress(OSError):
                writer.close()
            if vm is not None:
                self.backend.destroy(vm)
            self.backend.close()
            with contextlib.suppress(OSError):  # a full disk must not hide the run's own error
                rj = run_dir / "run.json"
                if rj.exists():
                    manifest = json.loads(rj.read_text())
                    manifest.update({"interrupted": self.interrupted, "finished": time.time(),
                                     "run_dir": str(run_dir), "stopped": self.stopped})  # fmt: skip
                    rj.write_text(json.dumps(manifest, indent=2, default=str))
        try:
            summary, code = finish_run(run_dir)
        except OSError as e:
            write_failed = True
            self.stopped = self.stopped or f"cannot write the reports in {run_dir}: {e.strerror or e}"
        if write_failed:
            raise InfraError(f"{self.stopped}; results.jsonl keeps every iteration that finished before")
        return RunResult(run_dir, summary, 130 if self.interrupted else code, self.records, self.stopped)

    def iteration(
        self, vm: Any, case: Case, plan: RacePlan, grace_ms: float, run_dir: Path
    ) -> dict[str, Any]:
        it_dir = run_dir / "iterations" / f"{plan.iteration:04d}"
        r = iterate(self.backend, vm, plan, grace_ms, reset=self.reset, dest=it_dir,
                    keep_failed=self.opts.keep_failed)  # fmt: skip
        rec = record(r, case.name, self.strategy, vm, self.reset, it_dir)
        if "timeline" in self.pb.collect or r.verdict.kind != "preserved":
            rec["timeline"] = r.evidence.timeline_ms()
            (it_dir / "timeline.json").write_text(
                json.dumps({"record": rec, "evidence": r.evidence.as_dict()}, indent=2, default=str)
            )
        return rec

    def write_calibration(self, accel: str) -> None:
        delays = [
            r["delivery_ms"]
            for r in self.records
            if r.get("delivery_ms") is not None and r["verdict"] in ("preserved", "delivered-before")
        ]
        if delays:
            calibration_path(accel).write_text(
                json.dumps(
                    {
                        "max_delivery_ms": max(delays),
                        "n": len(delays),
                        "time": time.time(),
                        "pid": os.getpid(),
                    }
                )
            )


def record(r: IterationResult, case: str, strategy: str, vm: Any, reset: str, it_dir: Path) -> dict[str, Any]:
    """One line of results.jsonl: the plan, the numbers the evidence gives, the verdict."""
    ev, plan = r.evidence, r.plan
    return {
        "iteration": plan.iteration,
        "case": case,
        "planned_offset_ms": plan.offset_ms,  # with shutdown_mode ic-ready: the delay after the re-offer
        "shutdown_mode": plan.shutdown_mode,
        "offset_ms": ev.offset_ms if plan.service else None,
        "guest_offset_ms": ev.guest_offset_ms,
        "ic_ready_offset_ms": ev.ic_ready_offset_ms,
        "phase": plan.phase,
        "phase_to_fire_ms": ev.phase_to_fire_ms,
        "phase_times_ms": ev.phase_times_ms() or None,
        "skew_ms": ev.skew_ms(plan.offset_ms) if plan.service and plan.shutdown else None,
        "servicing_lag_ms": ev.servicing_lag_ms,
        "servicing_ms": ev.servicing_ms,
        "delivery_ms": ev.delivery_ms,
        "servicing_proof": ev.servicing_proof,
        **r.verdict.as_dict(),
        "decision": ev.decision,
        "ic_at_fire": ev.ic_at_fire,
        "strategy": strategy,
        "features": ev.features,
        "image": plan.image or vm.record()["paravisor"],
        "accel": vm.accel,
        "reset": r.boot.get("reset", reset),  # what the backend used, which may differ from the ask
        "reset_fallback": r.boot.get("reset_fallback"),  # why, when it differs
        "boot_s": r.boot.get("wall_s"),
        "slot_wait_s": r.boot.get("slot_wait_s"),  # waiting for another run's guest to end
        "started": r.started,
        "duration_s": r.duration_s,
        "phases_s": {k.removesuffix("_s"): round(v, 4) for k, v in r.phases.items()},
        "dir": str(it_dir),
    }


def _local_backend(kind: str) -> Backend:
    from testbed.hosts import lookup_entry, open_backend

    return open_backend(lookup_entry("local", kind=kind))
