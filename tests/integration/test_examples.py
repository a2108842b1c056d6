"""examples/repro_954.py runs and says what it found."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.vm


def test_repro_954_reproduces_and_shows_the_fix() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "examples/repro_954.py")], capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "strategy none: lost" in out and "strategy pause-resume: preserved" in out
    assert "host sent vmbus: MSG" in out  # the evidence lines are printed
    assert "VTL0 SHUTDOWN id=" in out
    assert out.strip().endswith("REPRODUCED: lost without the fix, preserved with it")
