"""The one short proof in CI of each performance benchmark (the measurements themselves
are bench/'s, run by hand): it runs, prints its numbers, and, for the soak, leaves
nothing behind."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm
ROOT = Path(__file__).resolve().parents[2]


def _bench(name: str, *args: str) -> str:
    p = subprocess.run([sys.executable, str(ROOT / "bench" / name), *args], capture_output=True, text=True,
                       timeout=600, cwd=ROOT)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_race_bench_prints_the_ideal_floor_the_rate_and_the_ratio() -> None:
    out = _bench("race.py", "--iterations", "2", "--lanes", "1", "--rounds", "1")
    m = re.search(
        r"N=1: floor \(ideal iterations, 1 at once\) ([\d.]+)/min \| race ([\d.]+)/min \| ratio ([\d.]+)", out
    )
    assert m, out
    floor, rate, ratio = (float(x) for x in m.groups())
    assert floor > 0 and rate > 0 and abs(ratio - rate / floor) < 0.02
    assert re.search(r"fire skew p50 [\d.]+ ms p99 [\d.]+ ms", out) and "'preserved': 2" in out, out


def test_soak_bench_samples_memory_and_leaves_nothing_behind() -> None:
    out = _bench("soak.py", "--iterations", "4", "--every", "2")
    assert len(re.findall(r"controller RSS +[\d.]+ MiB fds +\d+ \| 1 agent\(s\) RSS", out)) == 2, out
    assert re.search(r"controller: RSS slope [-+][\d.]+ % per 1000 iterations", out), out
    assert (
        "left behind: 0 QEMU, 0 vm work dirs, 0 leases, 0 sockets; cache files added beyond the first iteration's key set: 0"
        in out
    ), out
