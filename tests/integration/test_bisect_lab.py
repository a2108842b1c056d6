"""testbed bisect on real lab guests: the lab's build series loses 15% of the held
messages from v2-r6 on; an SPRT per build names v2-r6 (the short proof CI runs, on
three builds), and the whole series through the command line (a hunt)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.core.config import VmConfig
from testbed.engine.options import RunOptions
from testbed.engine.playbook import BisectSpec, Playbook, ScheduleSpec
from testbed.engine.runner import Runner
from testbed.report import finish_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.vm
def test_the_sprt_bisection_names_the_regressed_build(tmp_path: Path, ref_cfg: VmConfig) -> None:
    # beta 0.001: a bad build passes for good with at most 0.1% chance, so this stays a proof.
    pb = Playbook(name="bisect3", vm_config="-", strategy="pause-resume", iterations=300, parallel=2,
                  schedule=ScheduleSpec(kind="random", lo_ms=40, hi_ms=260, count=300),
                  bisect=BisectSpec(builds=["v2-r5", "v2-r6", "v2-r7"], beta=0.001, max_per_build=120),
                  expect={})  # fmt: skip
    res = Runner(pb, ref_cfg, RunOptions(finish=finish_run, out=tmp_path / "run")).run()
    b = res.summary["bisect"]
    assert b["answer"].startswith("first bad build: v2-r6 "), b["answer"]
    rows = {x["build"]: x for x in b["builds"]}
    assert (
        rows["v2-r5"]["decision"] == "good" and rows["v2-r5"]["lost"] == 0
    )  # the lab's good build never loses
    assert rows["v2-r6"]["decision"] == rows["v2-r7"]["decision"] == "bad"
    assert {r["image"] for r in res.records} == {"v2-r5", "v2-r6", "v2-r7"}
    assert all(r["servicing_proof"] == "restarted" for r in res.records if r["verdict"] != "infra-error")
    assert b["answer"] in (res.run_dir / "summary.md").read_text()


@pytest.mark.vm
@pytest.mark.hunt
def test_testbed_bisect_over_the_whole_series(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "testbed.cli", "bisect", str(ROOT / "playbooks/bisect.yaml"),
                        "--parallel", "2", "--out", str(tmp_path / "run")], capture_output=True, text=True,
                       timeout=1800, env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert "bisect: first bad build: v2-r6 " in p.stdout, p.stdout


def test_bisect_without_builds_is_refused_with_what_to_do(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "testbed.cli", "bisect", str(ROOT / "playbooks/quick.yaml")],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 2 and "no bisect section and no --builds" in p.stderr, p.stdout + p.stderr


def test_a_bisect_section_is_checked() -> None:
    with pytest.raises(ValueError, match="p0 .* must be below p1"):
        BisectSpec(builds=["a", "b"], p0=0.2, p1=0.1)
    with pytest.raises(ValueError, match="builds listed twice: a"):
        BisectSpec(builds=["a", "b", "a"])
