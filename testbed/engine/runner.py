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
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed import __version__
from testbed.backends import registry
from testbed.backends.base import Backend
from testbed.core.config import HostOptions, VmConfig, stable_hash
from testbed.core.errors import HostFull, InfraError
from testbed.core.evidence import RacePlan
from testbed.core.runfolder import ResultsWriter, read_results
from testbed.engine import schedule as sched
from testbed.engine.fleet import FleetHost
from testbed.engine.grace import Deliveries, calibration_path, grace_for, one_guest_reference
from testbed.engine.iterate import iterate
from testbed.engine.options import Progress, RunOptions, RunResult, default_run_dir
from testbed.engine.plan import RunPlan
from testbed.engine.playbook import Case, Playbook
from testbed.engine.policy import conclude
from testbed.engine.records import record, slim, sort_results
from testbed.engine.stats import spread

log = logging.getLogger(__name__)


@dataclass
class Lane:
    """One guest slot of a run: its own backend (agent and connection) and VM, so a
    lane's race never waits on another's RPC."""

    number: int
    backend: Backend
    vm: Any = None
    host: FleetHost | None = None  # the host it runs on (every lane has one once the run starts)


class Runner:
    def __init__(
        self,
        pb: Playbook,
        cfg: VmConfig,
        opts: RunOptions,
        progress: Progress | None = None,
        playbook_path: Path | None = None,
    ) -> None:
        self.opts = opts
        self.progress = progress or (lambda _e: None)
        self.playbook_path = playbook_path
        self.fleet = opts.fleet or []
        if self.fleet:  # many hosts: each lane opens its own backend when the run starts
            kind = registry.get(self.fleet[0].kind)
            caps, kind_name, host_name = kind.capabilities, kind.kind, ",".join(h.name for h in self.fleet)
        else:
            self.backend: Backend = opts.backend or _local_backend(cfg.backend)
            caps, kind_name, host_name = self.backend.capabilities, self.backend.kind, self.backend.host
            self.fleet = [FleetHost(opts.host_spec or self.backend.host, kind_name, self._opener(cfg),
                                    opts.max_guests, first=self.backend)]  # fmt: skip
        self.host_name = host_name
        self.plan = RunPlan(pb, cfg, opts, kind_name, caps, playbook_path)
        self.pb, self.cfg, self.bisect = pb, self.plan.cfg, self.plan.bisect
        self.strategy, self.seed, self.reset = self.plan.strategy, self.plan.seed, self.plan.reset
        self.lanes, self.lanes_note = self.plan.lanes, self.plan.lanes_note
        if len(self.fleet) == 1:
            self.fleet[0].lanes = self.lanes
        self.stop_on_loss = opts.stop_on_loss if opts.stop_on_loss is not None else pb.stop_on_loss
        self.records: list[dict[str, Any]] = []
        self.interrupted = False
        self.stopped: str | None = None  # why the run ended early, when it did
        # Shared by the lanes: records, the writer and the plans in flight are touched
        # only under this condition; ``_halt`` asks every lane to stop after its iteration.
        self._cond = threading.Condition()
        self._halt = threading.Event()
        self._in_flight: Counter[tuple[str, float | str | None]] = Counter()  # see _flight
        self._abandoned = False  # a second Ctrl-C: in-flight iterations are not recorded
        self._write_failed = False  # results.jsonl could not be written (the writer said so at close)
        self._deliveries = Deliveries()  # for the in-run grace
        self._search_of: dict[str, dict[str, Any]] = {}  # a search arm's label -> what the record says of it

    def _opener(self, cfg: VmConfig) -> Callable[[], Backend]:
        """How one more backend of the single host is opened (a lane of its own)."""
        if self.opts.open_backend is not None:
            return self.opts.open_backend
        return lambda: _local_backend(cfg.backend)

    # ---- what the run will do (``RunPlan``) -------------------------------------
    def cases(self) -> list[Case]:
        return self.plan.cases()

    def describe(self) -> str:
        return self.plan.describe()

    def iterations_of(self, case: Case) -> int:
        return self.plan.iterations_of(case)

    def plans(self, case: Case, start_index: int) -> Iterator[RacePlan]:
        """The case's tries as plans, each planned from the tally when the dealer asks."""
        tally = _CaseTally(self, case.name)
        for i, t in enumerate(self.plan.schedule_of(case).tries(tally)):
            if t.arm is not None and t.search is not None:
                self._search_of[t.arm] = t.search
            yield RacePlan(start_index + i, t.offset_ms, case.servicing, case.shutdown != "none", t.mode,
                           t.image or case.image, phase=t.phase, arm=t.arm)  # fmt: skip

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
            "host": self.host_name,
            "host_kind": self.plan.kind,
            "host_spec": self.opts.host_spec or ("local" if self.opts.backend is None else None),
            "inventory": str(self.opts.inventory.resolve()) if self.opts.inventory else None,
            "vm_config_path": str(self.opts.vm_config) if self.opts.vm_config else None,
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
            "schedule_by_case": {c.name: (c.schedule or self.pb.schedule).model_dump() for c in self.cases()},
            "max_infra_errors": self.pb.max_infra_errors,
            "parallel": self.lanes,
            "parallel_note": self.lanes_note or None,
            "fleet": [h.as_dict() for h in self.fleet] if len(self.fleet) > 1 else None,
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
            index += self.iterations_of(case)

    def run(self) -> RunResult:
        """Provision every lane, race until the plans run out or the run stops, then destroy
        every VM, close every backend and conclude (reports via ``RunOptions.finish``)."""
        run_dir = self.run_dir()
        (run_dir / "iterations").mkdir(parents=True, exist_ok=True)
        done = read_results(run_dir / "results.jsonl") if self.opts.resume else []
        self.records = [slim(r) for r in done]
        self._deliveries = Deliveries(self.records)
        writer = ResultsWriter(run_dir / "results.jsonl")
        lanes: list[Lane] = []
        write_failed = False
        try:
            self.race_all(lanes, run_dir, writer, {r["iteration"] for r in done})
        except KeyboardInterrupt:
            self.interrupted = True
            self._halt.set()
            log.warning("interrupted: cleaning up; finished iterations are kept")
        except OSError as e:  # the run folder cannot be written: full, gone, read-only
            self.stopped = f"cannot write the run folder {run_dir}: {e.strerror or e}"
            log.error("stopping: %s", self.stopped)
            write_failed = True
        finally:
            self.tear_down(lanes, run_dir, writer)
        write_failed = write_failed or self._write_failed
        try:
            summary, code = (self.opts.finish or conclude)(run_dir)
        except OSError as e:
            write_failed = True
            self.stopped = self.stopped or f"cannot write the reports in {run_dir}: {e.strerror or e}"
        if write_failed:
            raise InfraError(f"{self.stopped}; results.jsonl keeps every iteration that finished before")
        return RunResult(run_dir, summary, 130 if self.interrupted else code, self.stopped)

    def race_all(self, lanes: list[Lane], run_dir: Path, writer: ResultsWriter, done_ids: set[int]) -> None:
        """Open and provision the other lanes, write run.json, and race every plan."""
        started = time.monotonic()
        errors: list[BaseException] = []
        self.start_lanes(lanes)
        vm = next(lane.vm for lane in lanes if lane.vm is not None)
        grace = grace_for(self.pb, self.cfg, vm.accel)
        run_json = run_dir / "run.json"
        manifest = self.manifest(vm, grace)
        if self.opts.resume and run_json.exists():
            manifest = {**json.loads(run_json.read_text()), "resumed": time.time()}
        run_json.write_text(json.dumps(manifest, indent=2, default=str))
        self.progress({"event": "start", "total": self.plan.total(), "run_dir": str(run_dir), "accel": vm.accel,
                       "grace_ms": grace[0], "done": len(done_ids), "lanes": self.lanes})  # fmt: skip
        deal = _Dealer(self.work(done_ids))
        if self.lanes == 1:  # in this thread: Ctrl-C ends the iteration at once, as ever
            self.lane_loop(lanes[0], deal, grace, run_dir, writer, started)
        else:
            self.run_lanes(lanes, deal, grace, run_dir, writer, started, errors)
        if errors:
            raise errors[0]
        if self.pb.calibrate:
            self.write_calibration(vm.accel)

    def start_lanes(self, lanes: list[Lane]) -> None:
        """Open and provision every host's lanes. In a fleet a host that cannot start is
        drained with the reason and the others go on; alone, its failure ends the run."""
        for h in self.fleet:
            try:
                for i in range(h.lanes):
                    backend = h.first if i == 0 and h.first is not None else h.open()
                    lane = Lane(len(lanes), backend, host=h)
                    lanes.append(lane)
                    try:
                        lane.vm = backend.provision(h.cfg or self.cfg, self.strategy)
                    except HostFull as e:
                        if i == 0:
                            raise
                        lanes.pop()
                        backend.close()
                        self.cap_lanes(h, i, str(e))
                        break
            except InfraError as e:
                if len(self.fleet) == 1:
                    raise
                h.drain(f"could not start: {e}")
                log.error("host %s left the run: %s", h.name, h.drained)
        if all(h.drained for h in self.fleet):
            raise InfraError("no host of the fleet could start: " + "; ".join(f"{h.name}: {h.drained}"
                                                                              for h in self.fleet))  # fmt: skip

    def cap_lanes(self, host: FleetHost, lanes: int, why: str) -> None:
        """Fewer lanes on ``host`` than asked: it has no room for another guest."""
        note = f"{host.name}: {lanes} of {host.lanes} lanes, {why}"
        log.warning("lanes capped: %s", note)
        self.lanes -= host.lanes - lanes
        host.lanes = lanes
        self.lanes_note = "; ".join(x for x in (self.lanes_note, note) if x)

    def tear_down(self, lanes: list[Lane], run_dir: Path, writer: ResultsWriter) -> None:
        """Every VM destroyed and backend closed, results.jsonl in iteration order, and
        run.json told how the run ended: also after Ctrl-C, an error or a full disk."""
        self._halt.set()
        try:
            writer.close()  # every record a lane handed over is written (or its error raised here)
        except OSError as e:
            self.stopped = self.stopped or f"cannot write the run folder {run_dir}: {e.strerror or e}"
            self._write_failed = True
        for lane in lanes:
            if lane.vm is not None:
                lane.backend.destroy(lane.vm)
            lane.backend.close()
        with contextlib.suppress(OSError):  # a full disk must not hide the run's own error
            sort_results(run_dir / "results.jsonl")
            rj = run_dir / "run.json"
            if rj.exists():
                manifest = json.loads(rj.read_text())
                manifest.update({"interrupted": self.interrupted, "finished": time.time(),
                                 "run_dir": str(run_dir), "stopped": self.stopped})  # fmt: skip
                if len(self.fleet) > 1:
                    manifest["fleet"] = [h.as_dict() for h in self.fleet]
                rj.write_text(json.dumps(manifest, indent=2, default=str))

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
        while not self._halt.is_set() and not (lane.host and lane.host.drained):
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
                    now = self._deliveries.grace(grace, self.cfg.shutdown_allowance_ms)
                rec, files = self.iteration(lane, case, plan, now[0], run_dir)
                rec["grace_ms"], rec["grace_source"] = now
                if self.lanes > 1:
                    rec["lane"] = lane.number
                if lane.host is not None:
                    rec["host"], rec["host_kind"] = lane.host.name, lane.host.kind
                with self._cond:
                    if self._abandoned:
                        return
                    self.records.append(slim(rec))  # the whole record is in results.jsonl
                    self._deliveries.add(rec)
                    self.progress({"event": "iteration", "record": rec})
                    self.check_stop(rec)
                writer.write(rec, files)  # handed to the writer thread: the lane races on
            finally:
                with self._cond:
                    self._in_flight[_flight(case, plan)] -= 1
                    self._cond.notify_all()

    def check_stop(self, rec: dict[str, Any]) -> None:
        """The playbook's stop conditions, after each recorded iteration (under the lock).
        Infrastructure errors in a row drain the host they happened on; the run stops when
        no host is left."""
        if rec["verdict"] == "lost" and self.stop_on_loss:
            self._halt.set()
        if rec["verdict"] == "infra-error" and self.pb.on_infra_error == "stop":
            self._halt.set()
        host = next((h for h in self.fleet if h.name == rec.get("host")), self.fleet[0])
        streak = 0  # infrastructure errors in a row on this host, in the order they were recorded
        for r in reversed(self.records):
            if r.get("host", host.name) != host.name:
                continue
            if r["verdict"] != "infra-error":
                break
            streak += 1
        gone = len(self.fleet) > 1 and rec.get("host_gone")  # a fleet drains a lost host at once
        if (streak < self.pb.max_infra_errors_in_a_row and not gone) or host.drained:
            return
        why = (f"it stopped answering: {rec['reason']}" if gone else
               f"{streak} infrastructure errors in a row, the last: {rec['reason']}")  # fmt: skip
        host.drain(why)
        if len(self.fleet) > 1:
            log.error("host %s left the run: %s", host.name, why)
        if all(h.drained for h in self.fleet) and not self.stopped:
            self.stopped = f"the host is broken: {why}" if len(self.fleet) == 1 else "every host left the run: " + \
                "; ".join(f"{h.name}: {h.drained}" for h in self.fleet)  # fmt: skip
            log.error("stopping: %s", self.stopped)
            self._halt.set()

    def iteration(
        self, lane: Lane, case: Case, plan: RacePlan, grace_ms: float, run_dir: Path
    ) -> tuple[dict[str, Any], dict[Path, Any]]:
        """Race ``plan`` on ``lane``: its record, and the files the writer thread writes
        for it (timeline.json), so the lane itself makes no file syscall it can avoid."""
        it_dir = run_dir / "iterations" / f"{plan.iteration:04d}"
        r = iterate(lane.backend, lane.vm, plan, grace_ms, reset=self.reset, dest=it_dir,
                    keep_failed=self.opts.keep_failed)  # fmt: skip
        rec = record(r, case.name, self.strategy, lane.vm, self.reset, it_dir)
        if plan.arm is not None:
            rec["search"] = self._search_of.get(plan.arm)
        files: dict[Path, Any] = {}
        if "timeline" in self.pb.collect or r.verdict.kind != "preserved":
            rec["timeline"] = r.evidence.timeline_ms()
            files[it_dir / "timeline.json"] = {"record": dict(rec), "evidence": r.evidence.as_dict()}
        return rec, files

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


def _flight(case: Case, plan: RacePlan) -> tuple[str, float | str | None]:
    """What a plan in flight is counted under: its case and its search arm, else its offset."""
    return case.name, plan.arm if plan.arm is not None else plan.offset_ms


class _CaseTally:
    """One case's view of the run for its schedule (``schedule.Tally``): the finished
    records and the tries in flight, read under the runner's lock."""

    def __init__(self, runner: Runner, case: str) -> None:
        self.runner, self.case = runner, case

    def snapshot(self, keys: Collection[sched.Key]) -> tuple[list[dict[str, Any]], dict[sched.Key, int]]:
        r = self.runner
        with r._cond:
            done = [x for x in r.records if x.get("case") == self.case]
            return done, {k: r._in_flight[(self.case, k)] for k in keys}

    def settle(self, keys: Collection[sched.Key]) -> None:
        r = self.runner
        with r._cond:
            while any(r._in_flight[(self.case, k)] for k in keys) and not r._halt.is_set():
                r._cond.wait(0.2)


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


def _local_backend(kind: str) -> Backend:
    """This machine's backend of ``kind`` (a run given no backend, and its extra lanes)."""
    k = registry.get(kind)
    return k.open(k.host_entry(name="local", uri="local", kind=kind), HostOptions())
