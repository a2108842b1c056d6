"""Inventory and the host commands against the real sshd."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from clirun import run_cli  # type: ignore[import-not-found]

from testbed.core.config import ConfigError
from testbed.hosts import load_inventory


def inventory(tmp_path: Path, sshd, extra: str = "") -> Path:  # type: ignore[no-untyped-def]
    p = tmp_path / "hosts.yaml"
    p.write_text(
        "hosts:\n"
        "  - name: lab1\n"
        f"    uri: ssh://root@{sshd.host}:{sshd.port}\n"
        "    labels: [kvm, fast]\n"
        f"    identity_file: {sshd.key}\n"
        f"    known_hosts: {sshd.known_hosts}\n" + extra
    )
    return p


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, timeout=300)


def test_host_check_runs_on_the_remote_host(sshd, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    r = cli("host", "check", "lab1", "--inventory", str(inventory(tmp_path, sshd)))
    assert "host: qemu" in r.stdout and "QEMU" not in r.stderr, r.stderr
    assert "host: disk" in r.stdout and "host: runtime dir" in r.stdout
    assert r.returncode == 0, r.stdout + r.stderr


def test_gc_on_a_remote_host(sshd, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    r = cli("gc", "--host", "lab1", "--inventory", str(inventory(tmp_path, sshd)))
    assert r.returncode == 0, r.stderr
    assert "nothing to clean" in r.stdout or "removed lease" in r.stdout


def test_inventory_rejects_inline_secrets_with_a_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("hosts:\n  - name: a\n    uri: local\n  - name: b\n    uri: ssh://root:hunter2@h:22\n")
    with pytest.raises(ConfigError) as e:
        load_inventory(p)
    assert e.value.line == 5 and "password_env" in e.value.message
    p.write_text("hosts:\n  - name: a\n    uri: local\n    password: x\n")
    with pytest.raises(ConfigError) as e:
        load_inventory(p)
    assert e.value.line == 4 and "unknown key" in e.value.message


def test_unknown_host_name_is_a_usage_error(sshd, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    r = cli("host", "check", "nope", "--inventory", str(inventory(tmp_path, sshd)))
    assert r.returncode == 2 and "no host named 'nope'" in " ".join(r.stderr.split())  # rich wraps long paths
