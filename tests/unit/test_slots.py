from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from testbed.slots import GuestSlot


def test_machine_wide_guest_limit_across_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESTBED_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("TESTBED_MAX_GUESTS", "2")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time; from testbed.slots import GuestSlot; GuestSlot().acquire();"
            " print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        mine = GuestSlot(timeout=1).acquire()
        with pytest.raises(TimeoutError):
            GuestSlot(timeout=0.5).acquire()  # two guests already: the third waits
        mine.release()
        GuestSlot(timeout=1).acquire().release()
    finally:
        holder.kill()
        holder.wait()
    # A killed holder releases its slot (flock dies with the process).
    a, b = GuestSlot(timeout=1).acquire(), GuestSlot(timeout=1).acquire()
    a.release()
    b.release()
