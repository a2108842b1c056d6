"""A fleet on real guests: two SSH lab hosts on loopback (two sshd on their own ports,
each with its own keys and remote cache, so each runs its own agent) in one
``testbed run playbooks/window-hunt.yaml --host h1,h2``; then the same with one host's
sshd and agent killed mid-run. One window, records naming their host, the dead host
drained with the reason while the other finishes the budget, and no QEMU left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clirun import communicate  # type: ignore[import-not-found]

pytestmark = pytest.mark.vm
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def two_hosts(tmp_path: Path) -> Iterator[tuple[Path, list[object]]]:
    from sshd import run_sshd  # type: ignore[import-not-found]

    with run_sshd(tmp_path / "h1") as a, run_sshd(tmp_path / "h2") as b:
        inv = tmp_path / "hosts.yaml"
        inv.write_text("hosts:\n" + "".join(
            f"  - name: {n}\n    uri: ssh://root@{s.host}:{s.port}\n    identity_file: {s.key}\n"
            f"    known_hosts: {s.known_hosts}\n" for n, s in (("h1", a), ("h2", b))))  # fmt: skip
        yield inv, [a, b]


def _descendants(pid: int) -> list[int]:
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(k) for k in kids] + [g for k in kids for g in _descendants(int(k))]


def _run(inv: Path, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "testbed.cli", "run", str(ROOT / "playbooks/window-hunt.yaml"),
                             "--host", "h1,h2", "--inventory", str(inv), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "COLUMNS": "200"})  # fmt: skip


def _records(out: Path) -> list[dict[str, object]]:
    p = out / "results.jsonl"
    return [json.loads(ln) for ln in p.read_text().splitlines()] if p.exists() else []


def test_one_window_hunt_over_two_hosts(two_hosts: tuple[Path, list[object]], tmp_path: Path) -> None:
    inv, _hosts = two_hosts
    p = _run(inv, tmp_path / "run")
    out, err = communicate(p, 900)
    assert p.returncode == 0, out + err  # window-hunt expects losses (strategy none): it finds the window
    recs = _records(tmp_path / "run")
    assert {r["host"] for r in recs} == {"h1", "h2"} and len(recs) == 24
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["window"] and summary["counts"]["lost"] > 0
    assert [h["host"] for h in summary["per_host"]["hosts"]] == ["h1", "h2"]
    assert "per host:" in out


def test_a_host_killed_mid_run_is_drained_and_the_other_finishes(
    two_hosts: tuple[Path, list[object]], tmp_path: Path
) -> None:
    inv, hosts = two_hosts
    out_dir = tmp_path / "run"
    p = _run(inv, out_dir)
    end = time.monotonic() + 600
    while len(_records(out_dir)) < 4 and p.poll() is None and time.monotonic() < end:
        time.sleep(0.2)
    victim = hosts[1].proc.pid  # type: ignore[attr-defined]
    for pid in [*_descendants(victim), victim]:  # its sessions, the agent, its QEMU, then sshd
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    killed_at = len(_records(out_dir))
    out, err = communicate(p, 900)
    recs = _records(out_dir)  # every line is valid JSON
    assert len(recs) == 24 and sorted(r["iteration"] for r in recs) == list(range(24)), out + err
    on_h2 = [r for r in recs if r["host"] == "h2"]
    assert on_h2[-1]["verdict"] == "infra-error" and on_h2[-1].get("host_gone"), on_h2[-1]
    assert len([r for r in recs if r["host"] == "h1"]) >= 24 - killed_at  # h1 took the rest of the budget
    run = json.loads((out_dir / "run.json").read_text())
    h2 = next(h for h in run["fleet"] if h["name"] == "h2")
    assert h2["drained"].startswith("it stopped answering") and h2["drained_at"]
    assert p.returncode in (0, 1), out + err  # the run went on: not an infrastructure failure
    # conftest's no_leaked_qemu checks, by pid, that neither host left a QEMU.
