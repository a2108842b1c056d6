"""What a newcomer meets first: --help that reads (the exit codes as a table, an example
per command), a dry run of every shipped playbook that starts nothing, counts out of
range refused before any host is reached, and a run made with --vm-config that repro
can replay."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOKS = sorted((ROOT / "playbooks").glob("*.yaml"))


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "testbed.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env={**os.environ, "COLUMNS": "200"})  # fmt: skip


def marked_processes(marker: str) -> set[int]:
    """Processes that carry ``marker`` in their environment: only what the command under
    test started (other runs on this machine may have QEMUs of their own)."""
    pids = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker.encode() in (d / "environ").read_bytes():
                    pids.add(int(d.name))
            except OSError:
                pass
    return pids


def cli_watched(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], set[int], Path]:
    """The CLI with QEMU replaced by a script that logs every start: returns the result,
    every process it started while it ran (but itself), and the log of QEMU starts."""
    marker = f"TESTBED_TEST_MARK={uuid.uuid4().hex}"
    log = tmp_path / "qemu-starts.log"
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexit 1\n')
    fake.chmod(0o755)
    env = {**os.environ, "COLUMNS": "200", marker.split("=")[0]: marker.split("=")[1],
           "TESTBED_QEMU_BINARY": str(fake), "PATH": f"{tmp_path}:{os.environ['PATH']}"}  # fmt: skip
    p = subprocess.Popen([sys.executable, "-m", "testbed.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=ROOT, env=env)  # fmt: skip
    seen: set[int] = set()
    while p.poll() is None:
        seen |= marked_processes(marker) - {p.pid}
        time.sleep(0.02)
    out, err = p.communicate()
    return subprocess.CompletedProcess(p.args, p.returncode, out, err), seen, log


def test_help_keeps_the_exit_codes_as_a_table() -> None:
    r = cli("--help")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    for code in ("0", "1", "2", "3", "130"):
        assert any(ln.strip().startswith(code + " ") for ln in lines), code  # one code per line
    assert "``" not in r.stdout and "The ``testbed`` command line" not in r.stdout


COMMANDS = ["run", "bisect", "report", "compare", "repro", "gc", "host check", "host inventory", "host prepare",
            "image build", "image export", "image import", "vm up", "vm list", "vm down"]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_an_example(command: str) -> None:
    r = cli(*command.split(), "--help")
    assert f"  testbed {command}" in r.stdout, r.stdout


@pytest.mark.parametrize("playbook", PLAYBOOKS, ids=[p.name for p in PLAYBOOKS])
def test_a_dry_run_prints_the_plan_and_starts_nothing(playbook: Path, tmp_path: Path) -> None:
    t = time.monotonic()
    r, started, qemu_log = cli_watched(tmp_path, "run", str(playbook), "--dry-run")
    took = time.monotonic() - t
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nothing was started" in r.stdout and "estimate:" in r.stdout and "tries at most" in r.stdout
    assert started == set() and not qemu_log.exists()  # no QEMU, no agent, no process at all
    print(f"{playbook.name}: {took:.2f} s")  # the target is under 2 s; bench/ has no timed test


def test_a_dry_run_refuses_what_the_host_cannot_do_with_the_line() -> None:
    r = cli("run", str(ROOT / "playbooks/stream.yaml"), "--dry-run", "--host", "winrms://tester@127.0.0.1:1")
    assert r.returncode == 2
    said = " ".join(r.stderr.split())
    line = next(i for i, ln in enumerate((ROOT / "playbooks/stream.yaml").read_text().splitlines(), 1)
                if ln.startswith("stream:"))  # fmt: skip
    assert f"stream.yaml:{line}:" in said and "the hyperv backend cannot stream messages" in said, said


@pytest.mark.parametrize(
    "args",
    [
        ["--iterations", "99999999999999999999"],
        ["--iterations", "0"],
        ["--parallel", "100000"],
        ["--max-duration", "-5"],
        ["--seed", "-1"],
        ["--offsets", "random:0:100:999999999"],
    ],
)
def test_counts_out_of_range_are_refused_before_any_host_is_reached(args: list[str]) -> None:
    t = time.monotonic()
    r = cli("run", str(ROOT / "playbooks/quick.yaml"), "--host", "ssh://nobody@192.0.2.1:22", *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert time.monotonic() - t < 30  # no connection attempt to the unroutable host
    assert "192.0.2.1" not in r.stderr or "range" in r.stderr or "less than" in r.stderr


def test_repro_replays_a_run_made_with_another_vm_config(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("name: a\nbackend: mock\n")
    (tmp_path / "b.yaml").write_text("name: b\nbackend: mock\nwindow: {lo_ms: 300, hi_ms: 500}\n"
                                     "refuse_until_reoffer: false\n")  # fmt: skip
    (tmp_path / "pb.yaml").write_text("name: p\nvm_config: a.yaml\niterations: 1\nexpect: {}\n"
                                      "schedule: {kind: fixed, offsets_ms: [400]}\n")  # fmt: skip
    r = cli("run", str(tmp_path / "pb.yaml"), "--host", "mock://x", "--vm-config", str(tmp_path / "b.yaml"),
            "--out", str(tmp_path / "run"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "run" / "run.json").read_text())["vm_config_path"] == str(
        tmp_path / "b.yaml"
    )
    r = cli("repro", str(tmp_path / "run"), "--iteration", "0")
    assert r.returncode == 0 and "was lost, now lost" in r.stdout, r.stdout + r.stderr  # b's window, not a's


def test_bisect_takes_a_vm_config(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text("name: m\nbackend: mock\nbuilds: {g: 0.0, b: 1.0}\nparavisor: g\n")
    r = cli("bisect", str(ROOT / "playbooks/bisect.yaml"), "--vm-config", str(tmp_path / "m.yaml"), "--builds",
            "g,b", "--host", "mock://x", "--dry-run")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "a bisection of builds g (good) .. b (bad)" in r.stdout


def test_the_watch_sees_what_a_real_command_starts(tmp_path: Path) -> None:
    """The dry-run check can fail: host check starts the host agent, which asks QEMU its version."""
    r, started, qemu_log = cli_watched(tmp_path, "host", "check")
    assert started and qemu_log.exists(), (r.stdout, r.stderr)


def test_sigusr1_prints_every_threads_stack_and_the_run_goes_on(tmp_path: Path) -> None:
    """A run that seems hung can say where it waits; the tests' CLI helper relies on it."""
    (tmp_path / "vm.yaml").write_text("name: m\nbackend: mock\nrace_ms: 400\n")
    (tmp_path / "pb.yaml").write_text(
        "name: slow\nvm_config: vm.yaml\niterations: 6\nexpect: {}\nschedule: {kind: fixed, offsets_ms: [400]}\n"
    )
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "testbed.cli", "run", str(tmp_path / "pb.yaml"), "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while not (out / "results.jsonl").exists() and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGUSR1)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stdout + stderr
    assert "Current thread" in stderr or "Thread 0x" in stderr, stderr[-2000:]
    assert 'File "' in stderr and len((out / "results.jsonl").read_text().splitlines()) == 6
