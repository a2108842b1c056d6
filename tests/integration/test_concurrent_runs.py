"""Two `testbed run`s at once on one host keep to the machine's guest limit, and the
one that waits for a slot says so (on its stderr, and in the record's boot timing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm
ROOT = Path(__file__).resolve().parents[2]


def test_two_runs_share_one_slot_and_the_waiting_one_says_so(tmp_path: Path) -> None:
    env = {**os.environ, "TESTBED_MAX_GUESTS": "1", "COLUMNS": "200"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "testbed.cli",
                "run",
                str(ROOT / "playbooks/quick.yaml"),
                "--offsets",
                "150",
                "--iterations",
                "2",
                "--out",
                str(tmp_path / f"run{i}"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for i in (0, 1)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (o, e) in zip(procs, outs, strict=True):
        assert p.returncode == 0, o + e  # both lost the shutdown at 150 ms, as quick.yaml expects
    said = [" ".join(e.split()) for _o, e in outs]
    assert any("guest slots of this host are busy" in s for s in said), said
    for i in (0, 1):
        recs = [json.loads(ln) for ln in (tmp_path / f"run{i}" / "results.jsonl").read_text().splitlines()]
        assert [r["verdict"] for r in recs] == ["lost", "lost"]
    waits = [json.loads(ln).get("slot_wait_s") or 0 for i in (0, 1)
             for ln in (tmp_path / f"run{i}" / "results.jsonl").read_text().splitlines()]  # fmt: skip
    assert max(waits) > 1.0
