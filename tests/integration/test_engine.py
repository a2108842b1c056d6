"""The race engine end to end on real guests: sweeps, window estimates, infra errors, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from junitparser import JUnitXml

from testbed.backends.qemu.backend import QemuBackend
from testbed.backends.qemu.capabilities import servicing_phases
from testbed.core.config import VmConfig
from testbed.core.evidence import RacePlan
from testbed.core.paths import runtime_dir
from testbed.core.runfolder import read_results
from testbed.engine.options import RunOptions
from testbed.engine.playbook import Playbook, ScheduleSpec
from testbed.engine.runner import Runner
from testbed.hostprog import leases
from testbed.report import finish_run

pytestmark = pytest.mark.vm
ROOT = Path(__file__).resolve().parents[2]
SAVE_MS = 300.0
# Sweep: 16 points over [-100, 650] -> a 50 ms grid; 40 iterations cycle through it.
START, STOP, POINTS, ITERATIONS = -100.0, 650.0, 16, 40
STEP = (STOP - START) / (POINTS - 1)


def sweep(tmp_path: Path, cfg: VmConfig, strategy: str) -> tuple[dict[str, object], list[dict[str, object]]]:
    pb = Playbook(
        name=f"sweep-{strategy}",
        vm_config="unused",
        strategy=strategy,
        iterations=ITERATIONS,
        schedule=ScheduleSpec(kind="linear", start_ms=START, stop_ms=STOP, count=POINTS),
        reset="snapshot",
        grace_ms=1200,
        expect={"duplicated": 0},
    )
    result = Runner(pb, cfg, RunOptions(finish=finish_run, out=tmp_path / strategy, seed=1)).run()
    return result.summary, result.records


def test_none_sweep_finds_losses_only_inside_the_configured_window(tmp_path: Path, ref_cfg: VmConfig) -> None:
    summary, records = sweep(tmp_path, ref_cfg, "none")
    assert summary["counts"]["infra-error"] == 0, summary["counts"]
    lost = [r for r in records if r["verdict"] == "lost"]
    assert len(lost) >= 10, summary["counts"]
    # Tolerance: skew p99 + one grid step + the anchor jitter (servicing lag spread).
    lags = [float(r["servicing_lag_ms"]) for r in records if r.get("servicing_lag_ms") is not None]
    jitter = max(lags) - min(lags)
    tol = float(summary["skew_ms"]["p99"]) + STEP + jitter  # type: ignore[index]
    # Guard band: no loss outside the configured window [0, save_ms] (paravisor anchor).
    for r in records:
        g = r["guest_offset_ms"]
        if g is not None and (g < -tol or g > SAVE_MS + tol):
            assert r["verdict"] != "lost", r
    for r in lost:
        assert -tol <= float(r["guest_offset_ms"]) <= SAVE_MS + tol, r  # type: ignore[arg-type]
    w = summary["window"]
    assert w["anchor"] == "guest_offset_ms"  # type: ignore[index]
    # The estimate matches the configured window on both edges, not merely overlaps it.
    assert abs(w["first_loss_ms"] - 0.0) <= tol, w  # type: ignore[index]
    assert abs(w["last_loss_ms"] - SAVE_MS) <= tol, w  # type: ignore[index]
    # Before the window: delivered-before; after the close: rejected (IC not ready) or preserved.
    assert {
        r["verdict"] for r in records if r["guest_offset_ms"] is not None and r["guest_offset_ms"] < -tol
    } <= {"delivered-before"}
    assert summary["counts"]["duplicated"] == 0


def test_pause_resume_sweep_has_no_loss_and_no_duplicate(tmp_path: Path, ref_cfg: VmConfig) -> None:
    summary, records = sweep(tmp_path, ref_cfg, "pause-resume")
    assert summary["counts"]["infra-error"] == 0, summary["counts"]
    assert summary["counts"]["lost"] == 0 and summary["counts"]["duplicated"] == 0, summary["counts"]
    assert summary["counts"]["preserved"] >= 10
    assert summary["zero_loss_bound"].startswith(f"0 losses in {ITERATIONS} iterations")  # type: ignore[union-attr]
    assert float(summary["skew_ms"]["p99"]) < 5.0  # type: ignore[index]


def test_qemu_killed_under_the_engine_is_infra_error(ref_cfg: VmConfig) -> None:
    with QemuBackend() as b:
        vm = b.provision(ref_cfg, "none")
        try:
            b.start(vm, reset="snapshot")
            lease = next(
                lz for _p, lz in leases.read_all(runtime_dir() / "leases") if lz and lz.name == vm.name
            )
            killer = threading.Timer(0.1, os.kill, (lease.qemu_pid, signal.SIGKILL))
            killer.start()
            ev = b.race(vm, RacePlan(3, 200.0), grace_ms=1000)
            killer.join()
        finally:
            b.destroy(vm)
    v = b.classify(ev)
    assert v.kind == "infra-error", v
    assert "QEMU exited" in v.reason


def test_sigint_mid_run_keeps_results_and_reports_rebuild(tmp_path: Path) -> None:
    pb = tmp_path / "long.yaml"
    pb.write_text(
        f"name: long\nvm_config: {ROOT / 'vm_configs/reference-linux.yaml'}\nstrategy: none\n"
        "iterations: 30\nschedule: {kind: fixed, offsets_ms: [150]}\nreset: snapshot\n"
    )
    out = tmp_path / "run"
    p = subprocess.Popen(
        [sys.executable, "-m", "testbed.cli", "run", str(pb), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        end = time.monotonic() + 180
        while len(read_results(out / "results.jsonl")) < 2:
            assert p.poll() is None and time.monotonic() < end, "run did not get going"
            time.sleep(0.2)
        time.sleep(0.7)  # land the interrupt mid-iteration
        os.killpg(p.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
        _o, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, err
    lines = (out / "results.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]  # every line is valid JSON
    assert 2 <= len(recs) < 30
    assert all(r["verdict"] == "lost" for r in recs), [r["verdict"] for r in recs]
    run = json.loads((out / "run.json").read_text())
    assert run["interrupted"] is True
    for f in ("summary.json", "junit.xml", "report.html", "summary.md"):
        (out / f).unlink()
    r = subprocess.run(
        [sys.executable, "-m", "testbed.cli", "report", str(out)], capture_output=True, text=True
    )
    assert r.returncode == 1  # the expectation lost: 0 is violated by a `none` run
    xml = JUnitXml.fromfile(str(out / "junit.xml"))
    assert sum(1 for s in xml for _c in s) == len(recs)
    assert (out / "report.html").exists() and json.loads((out / "summary.json").read_text())["interrupted"]


def test_repro_replays_an_iteration_and_compare_tests_two_runs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "testbed.cli", "run", str(ROOT / "playbooks/quick.yaml"), "--iterations",
                        "2", "--offsets", "150,-250", "--out", str(out)], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr  # quick.yaml expects losses: one at 150 ms
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = subprocess.run([sys.executable, "-m", "testbed.cli", "repro", str(out), "--iteration", "0"],
                       capture_output=True, text=True, cwd=elsewhere, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "iteration 0: was lost, now lost" in " ".join(r.stdout.split())
    r = subprocess.run([sys.executable, "-m", "testbed.cli", "compare", str(out), str(out)], capture_output=True,
                       text=True)  # fmt: skip
    assert r.returncode == 0 and "p = 1: no significant difference" in r.stdout


@pytest.mark.parametrize(
    ("attach_ms", "delays", "verdicts", "safe", "answer"),
    [
        # VTL0 attaches 300 ms after the re-offer: posted in the gap, accepted, never acted on.
        (300, [0.0, 100.0, 700.0], ["lost", "lost", "preserved"], 700.0, "wait at least 700 ms after ready"),
        (0, [0.0, 100.0], ["preserved", "preserved"], 0.0, "no wait needed"),
    ],
)
def test_ic_ready_delay_finds_how_long_to_wait_after_ready(
    ref_cfg: VmConfig, tmp_path: Path, attach_ms: int, delays: list[float], verdicts: list[str], safe: float,
    answer: str,
) -> None:  # fmt: skip
    from testbed.engine.playbook import load_playbook

    shipped, _ = load_playbook(ROOT / "playbooks" / "ic-ready-delay.yaml")
    assert shipped.shutdown == "ic-ready" and shipped.lab["vtl0_attach_ms"] == 250
    pb = shipped.model_copy(update={
        "iterations": len(delays), "schedule": ScheduleSpec(kind="fixed", offsets_ms=delays),
        "lab": {"vtl0_attach_ms": attach_ms}})  # fmt: skip
    res = Runner(pb, ref_cfg, RunOptions(finish=finish_run, out=tmp_path / "run")).run()
    assert [r["verdict"] for r in res.records] == verdicts, [r["reason"] for r in res.records]
    for r, d in zip(res.records, delays, strict=True):
        assert r["shutdown_mode"] == "ic-ready" and abs(r["ic_ready_offset_ms"] - d) < 5.0, r
        assert abs(r["skew_ms"]) < 5.0
    # Where the seconds went, per iteration and in the summary.
    assert all(
        {"start", "race", "servicing", "after_servicing", "teardown"} <= set(r["phases_s"])
        for r in res.records
    )
    assert res.summary["phases_s"]["all"]["race"] > res.summary["phases_s"]["all"]["servicing"] > 0
    curve = res.summary["ic_ready_delay"]
    assert curve["safe_delay_ms"] == safe and curve["answer"].startswith(answer), curve
    assert "How long after ready?" in (tmp_path / "run" / "report.html").read_text()
    assert "after the IC is ready" in (tmp_path / "run" / "summary.md").read_text()


def phase_pb(strategy: str, **schedule: object) -> Playbook:
    from testbed.engine.playbook import load_playbook

    shipped, _ = load_playbook(ROOT / "playbooks" / "phase-sweep.yaml")
    assert shipped.schedule.kind == "phases"
    spec = shipped.schedule.model_copy(update=schedule)
    return shipped.model_copy(update={"strategy": strategy, "schedule": spec})


def test_phase_sweep_for_none_puts_every_loss_before_the_port_closes(
    ref_cfg: VmConfig, tmp_path: Path
) -> None:
    """Every observable phase once at delay 0: losses only from the servicing request up
    to the port's close; refused while the channel is gone; delivered after the re-offer."""
    res = Runner(phase_pb("none", delays_ms=[0.0], midpoint=False, repeat=1), ref_cfg,
                 RunOptions(finish=finish_run, out=tmp_path / "none")).run()  # fmt: skip
    by = {r["phase"]: r for r in res.records}
    order = servicing_phases("none")
    assert list(by) and set(by) == set(order), sorted(by)
    close = order.index("port-close")
    assert all(order.index(p) <= close for p, r in by.items() if r["verdict"] == "lost"), {
        p: r["verdict"] for p, r in by.items()
    }
    # Inside the save the message sits in the guest's port buffer and the close discards
    # it. At save-end and port-close it may instead reach QEMU after the guest closed the
    # port, which holds it for the reopen (preserved): the window ends there, by a race.
    assert {by[p]["verdict"] for p in ("request-seen", "save-start")} == {"lost"}
    assert {by[p]["verdict"] for p in ("save-end", "port-close")} <= {"lost", "preserved"}
    # While the channel is gone the host refuses; once it is re-offered, it is delivered.
    # (exec and port-reopen arrive on `get` right around CLOSING and HELLO on `vmbus`:
    # two ports, no order between them, so those two may go either way, never lost.)
    assert {by[p]["verdict"] for p in ("restore-start", "restore-end")} == {"rejected"}
    assert by["ic-reoffered"]["verdict"] == "preserved"
    for r in res.records:  # the trigger: fired right after the phase's line arrived, and said so
        assert r["phase_to_fire_ms"] is not None and 0 <= r["phase_to_fire_ms"] < 2.0, r
        assert r["phase_times_ms"][r["phase"]] >= 0
    table = res.summary["phase_sweep"]
    assert len(table["cells"]) == len(order) and [t["phase"] for t in table["timeline"]][:2] == order[:2]
    assert "phase sweep" in (tmp_path / "none" / "summary.md").read_text()
    assert "Phase sweep" in (tmp_path / "none" / "report.html").read_text()


def test_phase_sweep_for_pause_resume_loses_nowhere(ref_cfg: VmConfig, tmp_path: Path) -> None:
    res = Runner(phase_pb("pause-resume", delays_ms=[0.0], midpoint=True, repeat=1), ref_cfg,
                 RunOptions(finish=finish_run, out=tmp_path / "pr")).run()  # fmt: skip
    phases = servicing_phases("pause-resume")
    assert len(res.records) == 2 * len(phases) - 1  # each phase at 0 ms, then each gap's midpoint
    assert not [r for r in res.records if r["verdict"] in ("lost", "duplicated")], [
        (r["phase"], r["planned_offset_ms"], r["verdict"]) for r in res.records
    ]
    mids = res.records[len(phases) :]  # after the cells, one per gap, aimed at its middle
    assert {r["phase"] for r in mids} == set(phases[:-1])
    # Fired on the host's clock after the phase's line: late only by the host's scheduling
    # (a TCG guest exec'ing its new image competes for the same 2 cores), never early.
    assert all(r["skew_ms"] is not None and 0 <= r["skew_ms"] < 50.0 for r in res.records)
    times = [r["phase_times_ms"] for r in res.records[: len(phases)]]
    for r in mids:
        nxt = phases[phases.index(r["phase"]) + 1]
        gap = sum(t[nxt] - t[r["phase"]] for t in times) / len(times)
        assert r["planned_offset_ms"] == pytest.approx(gap / 2, abs=0.002)
