"""The stand-in refuses what openvmm refuses, before any VM exists: unknown flags (as
clap does, exit 2), --vtl2 without --hv, a bad serial binding, and a console with no
terminal (the console thread panics and openvmm aborts)."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from openvmm_standin import igvm_file as igvm  # type: ignore[import-not-found]


def run(exe: Path, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          **kw)  # type: ignore[call-overload]  # fmt: skip


def test_unknown_flag_is_refused_as_clap_does(standin_bin: Path) -> None:
    r = run(standin_bin / "openvmm", "--hv", "--vtl2-igvm", "x")
    assert r.returncode == 2
    assert r.stderr.startswith("error: unexpected argument '--vtl2-igvm' found")
    assert "For more information, try '--help'." in r.stderr


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--vtl2", "--igvm", "{igvm}"], "--hv"),
        (["--hv", "--vtl2", "--igvm", "{igvm}", "--com3", "pipe:x"], "is not a known option"),
        (
            ["--hv", "--vtl2", "--igvm", "{igvm}", "--guest-shutdown-action", "poweroff"],
            "expected reset, halt, exit",
        ),
    ],
)
def test_bad_command_lines_are_refused(standin_bin: Path, tmp_path: Path, args: list[str], said: str) -> None:
    path = str(igvm(tmp_path, "v2"))
    r = run(standin_bin / "openvmm", *[a.replace("{igvm}", path) for a in args])
    assert r.returncode == 2 and said in r.stderr, r.stderr


def test_no_terminal_aborts(standin_bin: Path, tmp_path: Path) -> None:
    """No controlling terminal (a new session, stdin a pipe): panic, then SIGABRT."""
    r = run(standin_bin / "openvmm", "--hv", "--vtl2", "--igvm", str(igvm(tmp_path, "v2")), "--com1", "none",
            start_new_session=True)  # fmt: skip
    assert r.returncode == -signal.SIGABRT
    assert "failed to enable raw console mode" in r.stderr


def test_version_and_help_list_the_flags(standin_bin: Path) -> None:
    assert run(standin_bin / "openvmm", "--version").stdout.startswith("openvmm ")
    helptext = run(standin_bin / "openvmm", "--help").stdout
    assert all(f in helptext for f in ("--hv", "--vtl2", "--igvm", "--vmbus-redirect", "--vmbus-com1-serial"))
