"""A 2x2 matrix on real lab guests (strategy x paravisor upgrade path): four cells,
each a run of its own with its loss rate and verdicts, expectations per cell, the
table in summary.md and report.html, and compare cell by cell."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.core.config import ConfigError
from testbed.engine.matrix import MatrixRunner, expand
from testbed.engine.options import RunOptions
from testbed.engine.playbook import load_playbook
from testbed.report import finish_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.vm
def test_a_2x2_matrix_through_the_command_line(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "testbed.cli", "run", str(ROOT / "playbooks/matrix.yaml"), "--iterations",
                        "3", "--out", str(tmp_path / "m")], capture_output=True, text=True, timeout=900,
                       env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    cells = json.loads((tmp_path / "m/matrix.json").read_text())["matrix"]["cells"]
    assert [c["name"] for c in cells] == ["strategy=none, paravisor=v2->v2", "strategy=none, paravisor=v1->v2",
                                          "strategy=pause-resume, paravisor=v2->v2",
                                          "strategy=pause-resume, paravisor=v1->v2"]  # fmt: skip
    for c in cells:
        assert c["n"] == 3 and not c["violations"], c
        assert (c["lost"] > 0) == c["name"].startswith("strategy=none"), c
        recs = [
            json.loads(ln) for ln in (tmp_path / "m" / c["dir"] / "results.jsonl").read_text().splitlines()
        ]
        assert {r["strategy"] for r in recs} == {c["values"]["strategy"]}
        assert {r["image"] for r in recs} == {"v2"}  # serviced into v2 from either image
    booted = json.loads((tmp_path / "m" / cells[1]["dir"] / "run.json").read_text())["paravisor"]
    assert booted == "v1"
    assert "| strategy=none, paravisor=v1->v2 | " in p.stdout  # the table is printed
    html = (tmp_path / "m/report.html").read_text()
    assert (
        html.count("background:#ffcdd2") == 2 and html.count("background:#c8e6c9") == 2
    )  # coloured by verdict
    same = subprocess.run([sys.executable, "-m", "testbed.cli", "compare", str(tmp_path / "m"), str(tmp_path / "m")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert same.returncode == 0 and same.stdout.count("paravisor=") == 4, same.stdout


def test_matrix_cells_are_checked_before_anything_runs(tmp_path: Path) -> None:
    pb, cfg = load_playbook(ROOT / "playbooks/matrix.yaml")
    cells = expand(pb, cfg)
    assert len(cells) == 4 and cells[1].cfg.paravisor.version == "v1" and cells[1].playbook.image == "v2"
    bad = pb.model_copy(
        update={"matrix": pb.matrix.model_copy(update={"dimensions": {"strategy": ["none", "nope"]}})}
    )  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="matrix cell .*nope"):
        MatrixRunner(bad, cfg, RunOptions(finish=finish_run, out=tmp_path))
    with pytest.raises(ValueError, match="matrix dimension 'colour'"):
        type(pb.matrix).model_validate({"dimensions": {"colour": ["red"]}})
