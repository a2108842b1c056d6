from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from testbed.hostprog import leases


def dead_pid() -> tuple[int, int | None]:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    st = leases.start_time(p.pid)
    p.wait()
    return p.pid, st


def sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "300"], start_new_session=True)


def test_gc_kills_process_of_dead_owner_and_removes_workdir(tmp_path: Path) -> None:
    victim = sleeper()
    owner, owner_start = dead_pid()
    wd = tmp_path / "wd"
    wd.mkdir()
    leases.write(
        tmp_path / "leases",
        leases.Lease(
            "vm1", victim.pid, leases.start_time(victim.pid), owner, owner_start, str(wd), time.time()
        ),
    )
    actions = leases.gc(tmp_path / "leases")
    assert any("killed" in a for a in actions)
    assert victim.wait(timeout=5) == -signal.SIGTERM
    assert not list((tmp_path / "leases").glob("*.json"))
    assert not wd.exists()


def test_gc_leaves_leases_of_live_owners(tmp_path: Path) -> None:
    victim = sleeper()
    try:
        leases.write(
            tmp_path,
            leases.Lease(
                "vm2",
                victim.pid,
                leases.start_time(victim.pid),
                os.getpid(),
                leases.start_time(os.getpid()),
                "",
                time.time(),
            ),
        )
        assert leases.gc(tmp_path) == []
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_pid_reuse_is_not_mistaken_for_the_leased_process(tmp_path: Path) -> None:
    victim = sleeper()
    try:
        owner, owner_start = dead_pid()
        # The lease recorded another start time: this pid now belongs to someone else.
        leases.write(tmp_path, leases.Lease("vm3", victim.pid, 1, owner, owner_start, "", time.time()))
        actions = leases.gc(tmp_path)
        assert actions == [f"removed lease vm3-{victim.pid}.json"]
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_unreadable_lease_is_removed(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    assert leases.gc(tmp_path) == ["removed unreadable lease bad.json"]
