"""Parallel lanes: two guests racing at once give the same verdicts and the same window
as one guest on a deterministic schedule, while really overlapping in time; results
stay one file in iteration order; and the lane count is capped and refused honestly."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from testbed.backends.qemu.backend import QemuBackend
from testbed.core.config import ConfigError, VmConfig
from testbed.engine.options import RunOptions
from testbed.engine.playbook import Playbook, ScheduleSpec
from testbed.engine.runner import Runner
from testbed.report import finish_run

# Away from every edge of the lab's windows (strategy none, save 331 ms): before
# servicing, inside the save, after the restore.
OFFSETS = [-80.0, 60.0, 160.0, 260.0, 700.0, 800.0]
EXPECTED = ["delivered-before", "lost", "lost", "lost", "preserved", "preserved"]
WINDOW_TOLERANCE_MS = 25.0  # servicing lag and fire skew of two differently loaded runs


def _playbook(parallel: int) -> Playbook:
    return Playbook(
        name=f"par{parallel}",
        vm_config="-",
        iterations=len(OFFSETS),
        schedule=ScheduleSpec(kind="fixed", offsets_ms=OFFSETS),
        parallel=parallel,
        expect={},
    )


def _lines(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in (run_dir / "results.jsonl").read_text().splitlines()]


@pytest.mark.vm
def test_two_lanes_give_the_serial_verdicts_and_window(tmp_path: Path, ref_cfg: VmConfig) -> None:
    serial = Runner(_playbook(1), ref_cfg, RunOptions(finish=finish_run, out=tmp_path / "serial")).run()
    par = Runner(_playbook(2), ref_cfg, RunOptions(finish=finish_run, out=tmp_path / "par")).run()
    assert [r["verdict"] for r in sorted(serial.records, key=lambda r: r["iteration"])] == EXPECTED
    lines = _lines(par.run_dir)
    assert [r["iteration"] for r in lines] == list(range(len(OFFSETS)))  # one file, iteration order
    assert [r["verdict"] for r in lines] == EXPECTED
    assert [r["planned_offset_ms"] for r in lines] == OFFSETS  # the schedule decided, not the lanes
    assert {r["lane"] for r in lines} == {0, 1}
    # The lanes really overlapped: some iteration of lane 1 started before one of lane 0 ended.
    spans = {lane: [(r["started"], r["started"] + r["duration_s"]) for r in lines if r["lane"] == lane]
             for lane in (0, 1)}  # fmt: skip
    assert any(a0 < b1 and a1 < b0 for a0, b0 in spans[0] for a1, b1 in spans[1])
    ws, wp = serial.summary["window"], par.summary["window"]
    assert ws and wp and ws["anchor"] == wp["anchor"]
    for k in ("first_loss_ms", "last_loss_ms"):
        assert abs(ws[k] - wp[k]) <= WINDOW_TOLERANCE_MS, (k, ws, wp)
    # Contention shows: every record keeps its skew and servicing lag; the summary says N.
    assert all(r["skew_ms"] is not None and r["servicing_lag_ms"] is not None for r in lines)
    assert par.summary["parallel"] == 2 and serial.summary["parallel"] == 1
    assert "2 guests raced at once" in (par.run_dir / "summary.md").read_text()
    assert json.loads((par.run_dir / "run.json").read_text())["parallel"] == 2


def test_lanes_are_capped_by_max_guests_and_said() -> None:
    cfg_pb = _playbook(5)
    r = Runner(cfg_pb, _ref(), RunOptions(backend=QemuBackend(), max_guests=3, open_backend=QemuBackend))
    assert r.lanes == 3
    assert "parallel 5 capped to 3" in r.describe()


def test_a_backend_without_lanes_is_refused_with_the_reason() -> None:
    class OneAtATime(QemuBackend):
        kind = "one"
        capabilities = dataclasses.replace(
            QemuBackend.capabilities, parallel=False, reasons={"parallel": "it runs one guest at a time"}
        )

    with pytest.raises(ConfigError, match="runs one guest at a time"):
        Runner(_playbook(2), _ref(), RunOptions(backend=OneAtATime(), open_backend=OneAtATime))
    with pytest.raises(ConfigError, match="no way to open more"):
        Runner(_playbook(2), _ref(), RunOptions(backend=QemuBackend()))


def _ref() -> VmConfig:
    from testbed.engine.playbook import load_vm_config

    return load_vm_config(Path(__file__).resolve().parents[2] / "vm_configs/reference-linux.yaml")
