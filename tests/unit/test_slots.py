from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from testbed.hostprog.slots import GuestSlot


def test_machine_wide_guest_limit_across_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESTBED_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("TESTBED_MAX_GUESTS", "2")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time; from testbed.hostprog.slots import GuestSlot; GuestSlot().acquire();"
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


def test_slots_are_shared_between_users(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root holds both slots; another user (nobody), with no TESTBED_RUNTIME_DIR of its own
    choosing, finds the same runtime dir and must wait: the limit is the machine's, not
    each user's (non-root users used to get a per-user dir, so two users ran four guests)."""
    import os
    import shutil

    from testbed.core import paths

    if os.geteuid() != 0 or shutil.which("setpriv") is None or not Path("/usr/bin/python3").exists():
        pytest.skip("needs root, setpriv and /usr/bin/python3 to act as another user")
    monkeypatch.delenv("TESTBED_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("TESTBED_MAX_GUESTS", "2")
    assert paths.runtime_dir() == Path(paths.RUNTIME_DIR)  # the same default for root and anyone
    # The slots themselves in a runtime dir of this test's own (made the way runtime_dir
    # makes /tmp/testbed), so real runs on this machine neither disturb it nor are disturbed.
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="testbed-runtime-")) / "rt"
    shared.parent.chmod(0o755)
    monkeypatch.setenv("TESTBED_RUNTIME_DIR", str(shared))
    paths.runtime_dir()
    a, b = GuestSlot(timeout=1).acquire(), GuestSlot(timeout=1).acquire()
    # What the other user imports, copied where it may read it (the clone may sit in a
    # folder only root can enter, and pytest's tmp_path is private too).
    import tempfile

    import platformdirs

    import testbed

    site = Path(tempfile.mkdtemp(prefix="testbed-other-user-"))
    site.chmod(0o755)
    for name in (
        "__init__.py",
        "core/__init__.py",
        "core/paths.py",
        "hostprog/__init__.py",
        "hostprog/slots.py",
    ):
        (site / "testbed" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(testbed.__file__).parent / name, site / "testbed" / name)
    shutil.copytree(Path(platformdirs.__file__).parent, site / "platformdirs")
    for p in [site, *site.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    code = ("from testbed.hostprog.slots import GuestSlot\nfrom testbed.core import paths\nprint(paths.runtime_dir())\n"
            "try:\n    GuestSlot(timeout=0.5).acquire(); print('acquired')\nexcept TimeoutError:\n    print('waited')\n")  # fmt: skip
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TESTBED_MAX_GUESTS": "2", "TESTBED_RUNTIME_DIR": str(shared),
           "PYTHONPATH": str(site)}  # fmt: skip
    as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3"]
    probe = subprocess.run([*as_nobody, "-c", "pass"], capture_output=True, text=True, env=env, timeout=60)
    if probe.returncode != 0:  # a root whose system files nobody may read (a chroot unpacked by root's umask)
        a.release()
        b.release()
        shutil.rmtree(site, ignore_errors=True)
        pytest.skip(f"user nobody cannot run python3 here at all: {probe.stderr.strip()[:200]}")
    try:
        r = subprocess.run([*as_nobody, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    finally:
        a.release()
        b.release()
        shutil.rmtree(site, ignore_errors=True)
        shutil.rmtree(shared.parent, ignore_errors=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(shared), "waited"]
