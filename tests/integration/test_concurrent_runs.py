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


def _qemus() -> set[int]:
    """Live QEMU processes by pid (read here: a `conftest` import would find whichever
    conftest module pytest loaded first under that name)."""
    out = set()
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and (d / "comm").read_text().startswith("qemu-system"):
                if (d / "stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    out.add(int(d.name))
        except OSError:
            continue
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "gone"


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def test_two_runs_and_an_xdist_session_keep_to_the_guest_limit(tmp_path: Path) -> None:
    """Two `testbed run`s and a pytest-xdist session (two workers) on one host with a
    limit of one guest: never more than one guest QEMU at a time (sampled every 20 ms by
    pid; QEMU's version and option probes are no guest),
    everything finishes with its own verdicts, and a waiting party says so."""
    import threading
    import time

    env = {**os.environ, "TESTBED_MAX_GUESTS": "1", "COLUMNS": "200"}
    before = _qemus()
    peak = [0]
    crowd: list[str] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            # Guests only: `qemu-system-x86_64 -version` and option probes are no guest, nor
            # a QEMU's own short-lived fork (the snapshot's `exec:` migration starts one).
            live = _qemus() - before
            now = {p for p in live if "/vms/" in _cmdline(p) and _parent(p) not in live}
            if len(now) > peak[0]:
                peak[0] = len(now)
                crowd[:] = [_cmdline(p)[-200:] for p in now]
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    run = [sys.executable, "-m", "testbed.cli", "run", str(ROOT / "playbooks/quick.yaml"), "--offsets", "150",
           "--iterations", "1"]  # fmt: skip
    procs = [subprocess.Popen([*run, "--out", str(tmp_path / f"run{i}")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in (0, 1)]  # fmt: skip
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider", "-k", "baseline",
         str(ROOT / "suites/test_servicing_shutdown_ic.py")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT))  # fmt: skip
    try:
        outs = [p.communicate(timeout=900) for p in procs]
    finally:
        done.set()
        sampler.join()
    for p, (o, e) in zip(procs, outs, strict=True):
        assert p.returncode == 0, (o or "") + (e or "")
    assert "2 passed" in outs[2][0], outs[2][0]
    assert peak[0] == 1, f"{peak[0]} QEMU processes at once with TESTBED_MAX_GUESTS=1: {crowd}"
    said = " ".join(" ".join(((o or "") + (e or "")).split()) for o, e in outs)
    assert "guest slots of this host are busy" in said
