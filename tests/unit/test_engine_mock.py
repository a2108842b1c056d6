"""The engine, its schedules and searches, the reports and the CLI, through the mock
backend (an in-process fake VM shipped with testbed): every question testbed answers,
asked without QEMU, in seconds. The same questions on real guests are in
tests/integration/."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from testbed.backends.mock.backend import MockBackend
from testbed.core.config import ConfigError
from testbed.engine.options import RunOptions, RunResult
from testbed.engine.playbook import load_playbook
from testbed.engine.runner import Runner
from testbed.report import finish_run

# The mock's defaults: servicing 300 ms, a window [5, 200) ms that loses every try under
# strategy none, the IC refused from 200 ms until its re-offer at 300 ms.
VM = "name: m\nbackend: mock\n"


def run(tmp_path: Path, body: str, vm: str = VM, **opts: Any) -> RunResult:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "vm.yaml").write_text(vm)
    pb_path = tmp_path / "pb.yaml"
    pb_path.write_text("name: t\nvm_config: vm.yaml\n" + body + ("" if "expect:" in body else "expect: {}\n"))
    pb, cfg = load_playbook(pb_path)
    options = RunOptions(out=tmp_path / "run", backend=MockBackend(), open_backend=MockBackend, finish=finish_run,
                         **opts)  # fmt: skip
    return Runner(pb, cfg, options, playbook_path=pb_path).run()


def verdicts(res: RunResult) -> dict[float, str]:
    return {r["planned_offset_ms"]: r["verdict"] for r in res.records}


def test_a_sweep_gives_the_modelled_verdict_at_each_offset_and_every_report(tmp_path: Path) -> None:
    res = run(tmp_path, "iterations: 5\nschedule: {kind: fixed, offsets_ms: [-20, 10, 150, 250, 400]}\n")
    assert verdicts(res) == {-20.0: "delivered-before", 10.0: "lost", 150.0: "lost", 250.0: "rejected",
                             400.0: "preserved"}  # fmt: skip
    assert res.exit_code == 0 and res.summary["counts"]["lost"] == 2
    for f in ("results.jsonl", "run.json", "summary.json", "junit.xml", "summary.md", "report.html"):
        assert (res.run_dir / f).stat().st_size > 0, f
    md = (res.run_dir / "summary.md").read_text()
    assert "mock mock: accel mock, backend_version mock 1, paravisor mock-v1" in md
    assert "QEMU" not in md and "kernel" not in md  # another backend's fields are not printed


def test_pause_resume_loses_nothing_and_expectations_decide_the_exit_code(tmp_path: Path) -> None:
    res = run(tmp_path, "strategy: pause-resume\niterations: 8\nschedule: {kind: linear, start_ms: 0, "
                        "stop_ms: 190, count: 8}\nexpect: {lost: 0}\n")  # fmt: skip
    assert set(verdicts(res).values()) == {"preserved"} and res.exit_code == 0
    res = run(tmp_path, "iterations: 4\nschedule: {kind: fixed, offsets_ms: [50]}\nexpect: {lost: 0}\n")
    assert res.exit_code == 1 and res.summary["expectations"]["violations"]


def test_the_adaptive_search_brackets_the_window(tmp_path: Path) -> None:
    res = run(
        tmp_path, "iterations: 30\nschedule: {kind: adaptive, lo_ms: -100, hi_ms: 400, resolution_ms: 4}\n"
    )
    lost = sorted(x for x, v in verdicts(res).items() if v == "lost")
    kept = sorted(x for x, v in verdicts(res).items() if v != "lost")
    below = max(x for x in kept if x < lost[0])
    assert 5 - 4 <= lost[0] and lost[0] - below <= 4  # the window's start found to 4 ms
    assert lost[-1] < 200


def test_the_flaky_search_finds_a_partly_losing_window(tmp_path: Path) -> None:
    vm = VM + "window: {lo_ms: 100, hi_ms: 140, rate: 0.5}\n"
    res = run(tmp_path, "iterations: 200\nschedule: {kind: flaky, lo_ms: 0, hi_ms: 200, buckets: 5, "
                        "target_rate: 0.2, confirm: 12}\n", vm)  # fmt: skip
    answer = res.summary["flaky_search"]["answer"]
    assert answer.startswith("window found") and ("[80, 120)" in answer or "[120, 160)" in answer), answer


def test_a_phase_sweep_fires_on_each_phase(tmp_path: Path) -> None:
    res = run(tmp_path, "schedule: {kind: phases, delays_ms: [0], midpoint: false, repeat: 1}\n")
    by_phase = {r["phase"]: r["verdict"] for r in res.records}
    assert by_phase["save-start"] == "lost" and by_phase["ic-reoffered"] == "preserved"
    assert "Phase sweep" in (res.run_dir / "report.html").read_text()


def test_ic_ready_delays_are_measured_from_the_reoffer(tmp_path: Path) -> None:
    res = run(
        tmp_path, "shutdown: ic-ready\niterations: 3\nschedule: {kind: fixed, offsets_ms: [0, 50, 100]}\n"
    )
    assert all(
        r["ic_ready_offset_ms"] == pytest.approx(r["planned_offset_ms"], abs=0.05) for r in res.records
    )
    assert res.summary["ic_ready_delay"]


def test_a_bisection_names_the_first_bad_build(tmp_path: Path) -> None:
    vm = VM + "builds: {b1: 0.0, b2: 0.0, b3: 0.0, b4: 0.6, b5: 0.6}\nparavisor: b1\n"
    res = run(tmp_path, "iterations: 300\nschedule: {kind: fixed, offsets_ms: [50, 120]}\n"
                        "bisect: {builds: [b1, b2, b3, b4, b5], p0: 0.01, p1: 0.4}\n", vm)  # fmt: skip
    assert res.summary["bisect"]["answer"].startswith("first bad build: b4 "), res.summary["bisect"]


def test_two_lanes_run_every_plan_once(tmp_path: Path) -> None:
    vm = VM + "race_ms: 20\n"
    res = run(tmp_path, "parallel: 2\niterations: 12\nschedule: {kind: linear, start_ms: 0, stop_ms: 400, "
                        "count: 12}\n", vm, max_guests=2)  # fmt: skip
    assert sorted(r["iteration"] for r in res.records) == list(range(12))
    assert json.loads((res.run_dir / "run.json").read_text())["parallel"] == 2


def test_what_the_mock_cannot_do_is_refused_at_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        run(tmp_path, "iterations: 2\nstream: {interval_ms: 5}\n")
    assert e.value.line == 4 and "the mock models one message" in e.value.message


def test_the_cli_runs_a_playbook_on_a_mock_host(tmp_path: Path) -> None:
    (tmp_path / "vm.yaml").write_text(VM)
    (tmp_path / "pb.yaml").write_text("name: cli\nvm_config: vm.yaml\niterations: 3\n"
                                      "schedule: {kind: fixed, offsets_ms: [400]}\n")  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "testbed.cli", "run", str(tmp_path / "pb.yaml"), "--host", "mock://x",
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "preserved 3" in r.stdout and (tmp_path / "out" / "report.html").exists()


def test_the_window_search_closes_both_edges_from_the_phases(tmp_path: Path) -> None:
    """The mock's window runs from its save start (6 ms) to its save end (180 ms), both
    phases: seeded from the measured phase times, 14 tries bring both edges to 2 ms; the
    same budget without phases (offset bisection alone) cannot, and the summary says
    which edge and why."""
    from testbed.engine.schedule import adaptive

    vm = VM + "window: {lo_ms: 6, hi_ms: 180}\nrefuse_until_reoffer: false\n"
    body = (
        "iterations: 14\nschedule: {kind: adaptive, lo_ms: -100, hi_ms: 700, coarse: 8, resolution_ms: 2}\n"
    )
    res = run(tmp_path, body, vm)
    lo, hi = res.summary["window"]["bracket_ms"]
    first, last = res.summary["window"]["first_loss_ms"], res.summary["window"]["last_loss_ms"]
    assert first - lo <= 2.0 + 1e-6 and hi - last <= 2.0 + 1e-6, res.summary["window"]
    assert "window_edges" not in res.summary

    def lost(x: float) -> str:
        return "lost" if 6 <= x < 180 else "preserved"

    seen: dict[float, str] = {}
    for x in adaptive(-100, 700, 14, lambda x: seen.get(x), coarse=8, resolution_ms=2):
        seen[x] = lost(x)
    lost_at = sorted(x for x, v in seen.items() if v == "lost")
    below = max(x for x in seen if x < lost_at[0])
    assert lost_at[0] - below > 2  # bisection alone has not closed the lower edge in 14
    short = run(tmp_path / "short", "iterations: 10\nschedule: {kind: adaptive, lo_ms: -100, hi_ms: 700, "
                "coarse: 8, resolution_ms: 2}\n", VM)  # fmt: skip
    assert any("budget of 10 tries ran out" in e for e in short.summary["window_edges"]), short.summary
    assert "budget of 10 tries ran out" in (short.run_dir / "summary.md").read_text()
