"""The core loop: plan -> fresh VM -> race -> verdict -> record, many times.

Every iteration gets a VM in a known state (a cold boot or a snapshot
restore) and destroys it afterwards, so no iteration inherits another's
state.  Each finished iteration is appended to results.jsonl before the next
starts, so Ctrl-C or a crash loses nothing that finished.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from testbed import __version__
from testbed.backends import registry
from testbed.backends.base import Backend
from testbed.core.capabilities import Capabilities
from testbed.core.config import ConfigError, HostOptions, VmConfig, stable_hash
from testbed.core.errors import InfraError
from testbed.core.evidence import RacePlan
from testbed.core.paths import cache_dir
from testbed.core.runfolder import ResultsWriter, read_results
from testbed.engine import bisect as bisection
from testbed.engine import requirements
from testbed.engine import schedule as sched
from testbed.engine.iterate import IterationResult, iterate
from testbed.engine.playbook import BisectSpec, Case, Playbook, ScheduleSpec
from testbed.engine.policy import conclude
from testbed.engine.stats import spread
from testbed.hostprog import slots

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
    parallel: int | None = None  # --parallel: lanes (guests racing at once); None: the playbook's
    max_guests: int | None = None  # the host's inventory limit; None: the machine-wide slot limit
    # Opens one more backend on the same host (a lane's own agent and connection); None:
    # this machine's, when ``backend`` is None too.
    open_backend: Callable[[], Backend] | None = None
    builds: list[str] | None = None  # testbed bisect --builds: replaces the playbook's bisect builds
    # What the run's end writes: the summary and exit code (None: summary.json alone,
    # ``policy.conclude``); the application passes ``testbed.report.finish_run``.
    finish: Callable[[Path], tuple[dict[str, Any], int]] | None = None


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    exit_code: int
    stopped: str | None = None

    @functools.cached_property
    def records(self) -> list[dict[str, Any]]:
        """Every finished iteration, whole, read from results.jsonl when first asked for:
        during the run only a slim copy of each is kept (``SLIM``), so memory stays flat."""
        return read_results(self.run_dir / "results.jsonl")


# What the runner itself reads back from earlier iterations (the in-run grace, the
# adaptive, flaky and bisect searches, phase midpoints, the infra streak, calibration).
SLIM = ("iteration", "case", "planned_offset_ms", "verdict", "delivery_ms", "phase_times_ms", "arm",
        "servicing_lag_ms", "skew_ms")  # fmt: skip


def slim(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: rec.get(k) for k in SLIM}


Progress = Callable[[dict[str, Any]], None]


@dataclass
class Lane:
    """One guest slot of a run: its own backend (agent and connection) and VM, so a
    lane's race never waits on another's RPC."""

    number: int
    backend: Backend
    vm: Any = None


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


def one_guest_reference(accel: str) -> dict[str, Any] | None:
    """The one-guest spread baselines.yaml recorded on this machine, if it did."""
    p = calibration_path(accel)
    try:
        ref = json.loads(p.read_text()).get("one_guest")
    except (OSError, ValueError):
        return None
    return {**ref, "source": str(p)} if ref else None


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
        # Shared by the lanes: records, the writer and the plans in flight are touched
        # only under this condition; ``_halt`` asks every lane to stop after its iteration.
        self._cond = threading.Condition()
        self._halt = threading.Event()
        self._in_flight: Counter[tuple[str, float | str | None]] = Counter()  # see _flight
        self._abandoned = False  # a second Ctrl-C: in-flight iterations are not recorded
        self._search_of: dict[str, dict[str, Any]] = {}  # a search arm's label -> what the record says of it
        self.bisect = pb.bisect
        if opts.builds:
            self.bisect = (pb.bisect or BisectSpec(builds=opts.builds)).model_copy(
                update={"builds": opts.builds}
            )
        self.lanes, self.lanes_note = self.lanes_wanted(playbook_path)
        self.caps: Capabilities = self.backend.capabilities
        self.check_capabilities(playbook_path)

    def check_capabilities(self, path: Path | None) -> None:
        """Refuse, before anything boots, what the backend has not declared it can do, at the
        playbook's file:line of the key that asked (``testbed.engine.requirements``)."""
        asked = self.opts.parallel or self.pb.parallel
        need = requirements.asks(self.pb, self.cases(), parallel=asked, builds=self.bisect is not None)
        where = path or Path(self.pb.name)
        requirements.refuse_missing(need, self.caps, self.backend.kind, where)
        if self.bisect is not None:
            requirements.check_images(self.bisect.builds, self.caps, self.backend.kind, where)
        for c in self.cases():
            kind = (c.schedule or self.pb.schedule).kind
            if kind == "phases":
                self.phases_of(c, path)  # refuses phases the backend does not observe
            if kind == "flaky":
                self.flaky_phases(c, path)
            if self.bisect is not None:
                self.static_points(c.schedule or self.pb.schedule, 1)  # refuses a schedule with no offsets

    # ---- planning --------------------------------------------------------------
    def lanes_wanted(self, path: Path | None) -> tuple[int, str]:
        """How many guests race at once: ``--parallel`` or the playbook's ``parallel``,
        capped by the host's ``max_guests`` (else the machine-wide slot limit), and
        refused on a backend that has not declared it can run lanes."""
        asked = self.opts.parallel or self.pb.parallel
        if asked == 1:
            return 1, ""
        if self.opts.backend is not None and self.opts.open_backend is None:
            raise ConfigError(path or Path(self.pb.name), None,
                              f"parallel {asked}: this caller gave one backend and no way to open more")  # fmt: skip
        limit = self.opts.max_guests or slots.max_guests()
        if asked > limit:
            return limit, f"parallel {asked} capped to {limit}, the host's max_guests"
        return asked, ""

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
            if self.bisect is not None:
                b = self.bisect.builds
                what = (f"{c.name}: bisect over {len(b)} builds ({b[0]} good .. {b[-1]} bad), an SPRT per build "
                        f"(p0 {self.bisect.p0:g} vs p1 {self.bisect.p1:g}, alpha {self.bisect.alpha:g}, beta "
                        f"{self.bisect.beta:g}, at most {self.bisect.max_per_build} tries), budget {n}, "
                        f"schedule {s.kind}")  # fmt: skip
            elif s.kind == "flaky":
                ph = self.flaky_phases(c)
                what = (f"{c.name}: a flaky-window search of at most {n} iterations over [{s.lo_ms:g}, {s.hi_ms:g}] ms "
                        f"in {s.buckets} buckets" + (f" and {len(ph)} servicing phases" if ph else "")
                        + f", until every loss rate is below {s.target_rate:.0%} at 95% or a window is found")  # fmt: skip
            elif c.shutdown in ("offset", "ic-ready"):
                what += f", schedule {s.kind}" + (
                    " of delays after the IC's re-offer" if c.shutdown == "ic-ready" else ""
                )
                if s.points is not None and s.points != n:
                    what += (
                        f" of {s.points} offsets, {'cycled to' if s.points < n else 'cut to the first'} {n}"
                    )
            parts.append(what)
        if self.lanes > 1:
            parts.append(
                f"{self.lanes} guests at once" + (f" ({self.lanes_note})" if self.lanes_note else "")
            )
        return "; ".join(parts)

    def phases_of(self, case: Case, path: Path | None = None) -> list[str]:
        """The phases a ``kind: phases`` schedule fires on: the backend's, or the named
        ones, which must be among them."""
        where = path or self.playbook_path or Path(self.pb.name)
        observe = self.caps.phases
        if observe is None or not self.caps.has("phases"):
            raise ConfigError(where, None, f"case {case.name}: schedule kind phases: the {self.backend.kind} backend "
                                           f"cannot fire on servicing phases: {self.caps.why_not('phases')}")  # fmt: skip
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

    def flaky_phases(self, case: Case, path: Path | None = None) -> list[str]:
        """The phases a flaky-window search probes besides its buckets: the backend's
        (or the named ones), or none where the backend observes no phases."""
        s = case.schedule or self.pb.schedule
        if not self.caps.has("phases"):
            if s.phases:
                self.phases_of(case, path)  # says why the named phases cannot be used
            return []
        return self.phases_of(case, path)

    def iterations_of(self, case: Case) -> int:
        s = case.schedule or self.pb.schedule
        if s.kind == "phases":
            n = len(self.phases_of(case))
            return sched.phase_sweep_size(n, len(s.delays_ms), s.midpoint, s.repeat)
        return case.iterations or self.pb.iterations

    def bisect_plans(self, case: Case, start_index: int) -> Iterator[RacePlan]:
        """The bisection's tries: each on the build the bisection asks for (serviced into
        it), at the case's schedule offsets in turn, within the budget of iterations."""
        spec = self.bisect
        assert spec is not None
        n = case.iterations or self.pb.iterations
        s = case.schedule or self.pb.schedule
        pts = sched.cycle_to(self.static_points(s, n), n)
        info = {"kind": "bisect", **spec.model_dump()}

        def tally(build: str, settle: bool) -> tuple[list[bool], int]:
            key = (case.name, f"build {build}")
            with self._cond:
                while settle and self._in_flight[key] and not self._halt.is_set():
                    self._cond.wait(0.2)
                mine = sorted((r for r in self.records if r.get("case") == case.name and r.get("arm") == key[1]
                               and r["verdict"] != "infra-error"), key=lambda r: r["iteration"])  # fmt: skip
                return [r["verdict"] == "lost" for r in mine], self._in_flight[key]

        test = bisection.Sprt(spec.p0, spec.p1, spec.alpha, spec.beta)
        for i, build in enumerate(bisection.bisect(spec.builds, tally, test, spec.max_per_build)):
            if i >= n:
                log.warning("bisect: the budget of %d iterations is spent", n)
                return
            self._search_of[f"build {build}"] = info
            yield RacePlan(start_index + i, pts[i % len(pts)], case.servicing, case.shutdown != "none",
                           case.shutdown, build, arm=f"build {build}")  # fmt: skip

    def static_points(self, s: ScheduleSpec, n: int) -> list[float]:
        """A fixed, linear or random schedule's offsets."""
        if s.kind == "fixed":
            return list(s.offsets_ms or [])
        if s.kind == "linear":
            assert s.start_ms is not None and s.stop_ms is not None
            return sched.linear(s.start_ms, s.stop_ms, s.count or n)
        if s.kind == "random":
            assert s.lo_ms is not None and s.hi_ms is not None
            return sched.seeded_random(s.lo_ms, s.hi_ms, s.count or n, self.seed)
        raise ConfigError(self.playbook_path or Path(self.pb.name), None,
                          f"schedule kind {s.kind} names no offsets of its own: use fixed, linear or random here")  # fmt: skip

    def plans(self, case: Case, start_index: int) -> Iterator[RacePlan]:
        if self.bisect is not None:
            yield from self.bisect_plans(case, start_index)
            return
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
            phases = self.phases_of(case)
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
        if s.kind == "flaky":
            assert s.lo_ms is not None and s.hi_ms is not None
            arms = sched.flaky_arms(s.lo_ms, s.hi_ms, s.buckets,
                                    self.flaky_phases(case))  # fmt: skip
            index = {a.label: i for i, a in enumerate(arms)}

            def tally(settle: bool) -> dict[str, tuple[int, int, int]]:
                """Per arm: finished tries (infra errors are none), losses, tries in flight;
                ``settle`` waits until none of this search is in flight."""
                with self._cond:
                    while settle and any(self._in_flight[(case.name, a.label)] for a in arms):
                        if self._halt.is_set():
                            break
                        self._cond.wait(0.2)
                    out = {a.label: (0, 0, self._in_flight[(case.name, a.label)]) for a in arms}
                    for r in self.records:
                        label = r.get("arm")
                        if r.get("case") == case.name and label in out and r["verdict"] != "infra-error":
                            n, k, p = out[label]
                            out[label] = (n + 1, k + (r["verdict"] == "lost"), p)
                    return out

            search = sched.flaky(arms, n, tally, target_rate=s.target_rate, confirm=s.confirm, seed=self.seed)
            for i, (arm, x) in enumerate(search):
                self._search_of[arm.label] = {"kind": "flaky", "lo_ms": s.lo_ms, "hi_ms": s.hi_ms,
                                              "target_rate": s.target_rate, "budget": n, "arms": len(arms),
                                              "arm_index": index[arm.label]}  # fmt: skip
                yield RacePlan(start_index + i, x, case.servicing, True, "phase" if arm.phase else "offset", image,
                               phase=arm.phase, arm=arm.label)  # fmt: skip
            return
        if s.kind == "adaptive":
            outcomes: dict[float, str] = {}

            def outcome(x: float) -> str | None:
                """The verdict of the latest iteration at ``x``; one still racing in
                another lane is waited for, so a round of probes runs in parallel and
                the next round sees all of it."""
                with self._cond:
                    while True:
                        for r in reversed(self.records):
                            if r.get("case") == case.name and r.get("planned_offset_ms") == x:
                                return str(r["verdict"])
                        if not self._in_flight[(case.name, x)] or self._halt.is_set():
                            return outcomes.get(x)
                        self._cond.wait(0.2)

            assert s.lo_ms is not None and s.hi_ms is not None
            gen = sched.adaptive(
                s.lo_ms, s.hi_ms, n, outcome, coarse=s.coarse, resolution_ms=s.resolution_ms, seed=self.seed
            )
            for i, x in enumerate(gen):
                yield RacePlan(start_index + i, x, case.servicing, True, mode, image)
            return
        pts = self.static_points(s, n)
        for i, x in enumerate(sched.cycle_to(pts, n)):
            yield RacePlan(start_index + i, x, case.servicing, True, mode, image)

    # ---- running ---------------------------------------------------------------
    def run_dir(self) -> Path:
        if self.opts.resume:
            return self.opts.resume
        return self.opts.out or default_run_dir(self.pb.name)

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
            "backend_record": vm.record(),  # the backend's own fields, which reports print as they are
            "strategy": self.strategy,
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
            "parallel": self.lanes,
            "parallel_note": self.lanes_note or None,
            "one_guest_reference": one_guest_reference(vm.accel) if self.lanes > 1 else None,
            "started": time.time(),
        }

    def work(self, done_ids: set[int]) -> Iterator[tuple[Case, RacePlan]]:
        """Every plan of the run in schedule order, minus those a resumed run has: the
        one sequence every lane draws from, so the schedule and its seed decide which
        offsets run, whichever lane runs them. A plan is in flight from here on."""
        index = 0
        for case in self.cases():
            for plan in self.plans(case, index):
                if plan.iteration in done_ids:
                    continue
                spec = case.stream or self.pb.stream
                if spec is not None and plan.service:
                    plan.stream = spec.model_dump()
                with self._cond:
                    self._in_flight[_flight(case, plan)] += 1
                yield case, plan
            index += case.iterations or self.pb.iterations

    def run(self) -> RunResult:
        run_dir = self.run_dir()
        (run_dir / "iterations").mkdir(parents=True, exist_ok=True)
        done = read_results(run_dir / "results.jsonl") if self.opts.resume else []
        self.records = [slim(r) for r in done]
        done_ids = {r["iteration"] for r in done}
        writer = ResultsWriter(run_dir / "results.jsonl")
        started = time.monotonic()
        lanes: list[Lane] = [Lane(0, self.backend)]
        errors: list[BaseException] = []
        write_failed = False
        try:
            for i in range(1, self.lanes):
                lanes.append(Lane(i, self.opts.open_backend() if self.opts.open_backend else
                                  _local_backend(self.cfg.backend)))  # fmt: skip
            for lane in lanes:
                lane.vm = lane.backend.provision(self.cfg, self.strategy)
            vm = lanes[0].vm
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
                    "lanes": self.lanes,
                }
            )
            deal = _Dealer(self.work(done_ids))
            if self.lanes == 1:  # in this thread: Ctrl-C ends the iteration at once, as ever
                self.lane_loop(lanes[0], deal, grace, run_dir, writer, started)
            else:
                self.run_lanes(lanes, deal, grace, run_dir, writer, started, errors)
            if errors:
                raise errors[0]
            if self.pb.calibrate:
                self.write_calibration(vm.accel)
        except KeyboardInterrupt:
            self.interrupted = True
            self._halt.set()
            log.warning("interrupted: cleaning up; finished iterations are kept")
        except OSError as e:  # the run folder cannot be written: full, gone, read-only
            self.stopped = f"cannot write the run folder {run_dir}: {e.strerror or e}"
            log.error("stopping: %s", self.stopped)
            write_failed = True
        finally:
            self._halt.set()
            with contextlib.suppress(OSError):
                writer.close()
            for lane in lanes:
                if lane.vm is not None:
                    lane.backend.destroy(lane.vm)
                lane.backend.close()
            with contextlib.suppress(OSError):  # a full disk must not hide the run's own error
                _sort_results(run_dir / "results.jsonl")
                rj = run_dir / "run.json"
                if rj.exists():
                    manifest = json.loads(rj.read_text())
                    manifest.update({"interrupted": self.interrupted, "finished": time.time(),
                                     "run_dir": str(run_dir), "stopped": self.stopped})  # fmt: skip
                    rj.write_text(json.dumps(manifest, indent=2, default=str))
        try:
            summary, code = (self.opts.finish or conclude)(run_dir)
        except OSError as e:
            write_failed = True
            self.stopped = self.stopped or f"cannot write the reports in {run_dir}: {e.strerror or e}"
        if write_failed:
            raise InfraError(f"{self.stopped}; results.jsonl keeps every iteration that finished before")
        return RunResult(run_dir, summary, 130 if self.interrupted else code, self.stopped)

    def run_lanes(
        self,
        lanes: list[Lane],
        deal: _Dealer,
        grace: tuple[float, str],
        run_dir: Path,
        writer: ResultsWriter,
        started: float,
        errors: list[BaseException],
    ) -> None:
        """One thread per lane. Ctrl-C lets the iterations in flight finish and be
        recorded (seconds); a second Ctrl-C abandons them: closing each lane's backend
        makes its agent destroy its guest, and nothing half-done is recorded."""

        def lane_main(lane: Lane) -> None:
            try:
                self.lane_loop(lane, deal, grace, run_dir, writer, started)
            except BaseException as e:  # re-raised in the main thread
                errors.append(e)
                self._halt.set()

        threads = [threading.Thread(target=lane_main, args=(lane,), name=f"lane-{lane.number}", daemon=True)
                   for lane in lanes]  # fmt: skip
        for t in threads:
            t.start()
        try:
            _join(threads)
        except KeyboardInterrupt:
            self.interrupted = True
            self._halt.set()
            log.warning("interrupted: letting the iterations in flight finish (Ctrl-C again abandons them)")
            try:
                _join(threads)
            except KeyboardInterrupt:
                self._abandoned = True
                log.warning("abandoning the iterations in flight; their guests are destroyed")
                for lane in lanes:
                    lane.backend.close()
                _join(threads)

    def lane_loop(
        self,
        lane: Lane,
        deal: _Dealer,
        grace: tuple[float, str],
        run_dir: Path,
        writer: ResultsWriter,
        started: float,
    ) -> None:
        """Draw the next plan, race it on this lane's guest, record it; until the plans
        run out or the run is halted (a stop condition, Ctrl-C, another lane's error)."""
        while not self._halt.is_set():
            if self.opts.max_duration_s and time.monotonic() - started > self.opts.max_duration_s:
                log.warning("--max-duration reached; no new iterations start")
                self._halt.set()
                break
            item = deal.next()
            if item is None:
                break
            case, plan = item
            try:
                with self._cond:
                    now = in_run_grace(self.records, grace, self.cfg.shutdown_allowance_ms)
                rec = self.iteration(lane, case, plan, now[0], run_dir)
                rec["grace_ms"], rec["grace_source"] = now
                if self.lanes > 1:
                    rec["lane"] = lane.number
                with self._cond:
                    if self._abandoned:
                        return
                    writer.write(rec)
                    self.records.append(slim(rec))  # the whole record is in results.jsonl
                    self.progress({"event": "iteration", "record": rec})
                    self.check_stop(rec)
            finally:
                with self._cond:
                    self._in_flight[_flight(case, plan)] -= 1
                    self._cond.notify_all()

    def check_stop(self, rec: dict[str, Any]) -> None:
        """The playbook's stop conditions, after each recorded iteration (under the lock)."""
        if rec["verdict"] == "lost" and self.stop_on_loss:
            self._halt.set()
        if rec["verdict"] == "infra-error" and self.pb.on_infra_error == "stop":
            self._halt.set()
        streak = 0  # infrastructure errors in a row, in the order they were recorded
        for r in reversed(self.records):
            if r["verdict"] != "infra-error":
                break
            streak += 1
        if streak >= self.pb.max_infra_errors_in_a_row and not self.stopped:
            self.stopped = (f"the host is broken: {streak} infrastructure errors in a row, "
                            f"the last: {rec['reason']}")  # fmt: skip
            log.error("stopping: %s", self.stopped)
            self._halt.set()

    def iteration(
        self, lane: Lane, case: Case, plan: RacePlan, grace_ms: float, run_dir: Path
    ) -> dict[str, Any]:
        it_dir = run_dir / "iterations" / f"{plan.iteration:04d}"
        r = iterate(lane.backend, lane.vm, plan, grace_ms, reset=self.reset, dest=it_dir,
                    keep_failed=self.opts.keep_failed)  # fmt: skip
        rec = record(r, case.name, self.strategy, lane.vm, self.reset, it_dir)
        if plan.arm is not None:
            rec["search"] = self._search_of.get(plan.arm)
        if "timeline" in self.pb.collect or r.verdict.kind != "preserved":
            rec["timeline"] = r.evidence.timeline_ms()
            (it_dir / "timeline.json").write_text(
                json.dumps({"record": rec, "evidence": r.evidence.as_dict()}, indent=2, default=str)
            )
        return rec

    def write_calibration(self, accel: str) -> None:
        """baselines.yaml's calibration: the slowest delivery (the grace), and, when the
        run had one guest, its servicing-lag and fire-skew spread: the reference a
        parallel run's summary compares its own with, so contention shows."""
        delays = [
            r["delivery_ms"]
            for r in self.records
            if r.get("delivery_ms") is not None and r["verdict"] in ("preserved", "delivered-before")
        ]
        if delays:
            cal: dict[str, Any] = {"max_delivery_ms": max(delays), "n": len(delays), "time": time.time(),
                                   "pid": os.getpid()}  # fmt: skip
            if self.lanes == 1:
                cal["one_guest"] = spread(self.records)
            calibration_path(accel).write_text(json.dumps(cal))


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
        "arm": plan.arm,
        "phase_to_fire_ms": ev.phase_to_fire_ms,
        "phase_times_ms": ev.phase_times_ms() or None,
        "skew_ms": ev.skew_ms(plan.offset_ms) if plan.service and plan.shutdown else None,
        "servicing_lag_ms": ev.servicing_lag_ms,
        "servicing_ms": ev.servicing_ms,
        "delivery_ms": ev.delivery_ms,
        "servicing_proof": ev.servicing_proof,
        "stream": ev.stream,
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


def default_run_dir(playbook: str) -> Path:
    """Where a run goes without --out: runs/<time>-<playbook>."""
    return Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{playbook}"


def _flight(case: Case, plan: RacePlan) -> tuple[str, float | str | None]:
    """What a plan in flight is counted under: its case and its search arm, else its offset."""
    return case.name, plan.arm if plan.arm is not None else plan.offset_ms


class _Dealer:
    """The run's plans, handed to one lane at a time (the generator is not thread-safe,
    and an adaptive one may wait here for the verdicts of the probes in flight)."""

    def __init__(self, plans: Iterator[tuple[Case, RacePlan]]) -> None:
        self._plans = plans
        self._lock = threading.Lock()

    def next(self) -> tuple[Case, RacePlan] | None:
        with self._lock:
            return next(self._plans, None)


def _join(threads: list[threading.Thread]) -> None:
    """Join with a timeout, so Ctrl-C reaches the main thread while lanes run."""
    for t in threads:
        while t.is_alive():
            t.join(0.2)


def _sort_results(path: Path) -> None:
    """results.jsonl in iteration order (lanes finish out of order; a resume appends):
    rewritten through a fsynced temporary file and an atomic rename, so a crash here
    leaves the old file whole. Nothing is done when the order is already right."""
    recs = read_results(path)
    order = [r.get("iteration", 0) for r in recs]
    if order == sorted(order):
        return
    tmp = path.with_suffix(".jsonl.sorting")
    with tmp.open("w", encoding="utf-8") as f:
        for r in sorted(recs, key=lambda r: r.get("iteration", 0)):
            f.write(json.dumps(r, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _local_backend(kind: str) -> Backend:
    """This machine's backend of ``kind`` (a run given no backend, and its extra lanes)."""
    k = registry.get(kind)
    return k.open(k.host_entry(name="local", uri="local", kind=kind), HostOptions())
