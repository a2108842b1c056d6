"""`testbed host check winrm://...` against the stand-in: each problem with its fix."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from conftest import PASSWORD, HvLab  # type: ignore[import-not-found]
from typer.testing import CliRunner

from testbed.cli import app


def check(hv_lab: HvLab | None, password: str = PASSWORD, port: int | None = None) -> tuple[int, str]:
    port = port or (hv_lab.standin.server.server_address[1] if hv_lab else 0)
    env = {"TESTBED_WINRM_PASSWORD": password, "COLUMNS": "250"}
    r = CliRunner().invoke(app, ["host", "check", f"winrm://LAB%5Ctester@127.0.0.1:{port}"], env=env)
    return r.exit_code, r.output


def test_a_ready_host_passes(hv_lab: HvLab) -> None:
    code, out = check(hv_lab)
    assert code == 0, out
    assert "client edition, build 28000" in out and "COM3" in out and "available" in out


def test_missing_registry_value_says_how_to_set_it(hv_lab: HvLab) -> None:
    hv_lab.emulator.allow_firmware = False
    code, out = check(hv_lab)
    assert code == 3 and "AllowFirmwareLoadFromFile" in out and "Set-ItemProperty" in out


def test_old_build_and_no_hyperv(hv_lab: HvLab) -> None:
    hv_lab.emulator.build = 22631
    hv_lab.emulator.hyperv_enabled = False
    code, out = check(hv_lab)
    assert code == 3
    assert "build 22631 (OpenHCL needs 26100+)" in out and "Install-WindowsFeature -Name Hyper-V" in out
    assert "not on this build" in out  # COM3 is reported, not required


def test_wrong_password_is_a_401_with_a_fix(hv_lab: HvLab) -> None:
    code, out = check(hv_lab, password="nope")
    assert code == 3 and "401" in out and "password variable" in out and "nope" not in out


def test_winrm_not_listening(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    code, out = check(None, port=port)
    assert code == 3 and "winrm quickconfig" in out


def test_password_variable_missing() -> None:
    r = CliRunner().invoke(
        app, ["host", "check", "winrm://admin@hv1"], env={"TESTBED_WINRM_PASSWORD": None, "COLUMNS": "250"}
    )
    assert r.exit_code == 3 and "TESTBED_WINRM_PASSWORD is not set" in r.output


@pytest.mark.vm
def test_testbed_run_against_a_winrm_host(hv_lab: HvLab, tmp_path: Path) -> None:
    """The CLI picks the Hyper-V backend from the vm_config and the winrm:// URI."""
    assert hv_lab.cfg.hyperv is not None
    hv = hv_lab.cfg.hyperv
    (tmp_path / "hv.yaml").write_text(
        "name: hv-cli\nbackend: hyperv\nhyperv:\n"
        f"  igvm: {{path: {hv.igvm.path}}}\n  vtl0_vhd: {{path: {hv.vtl0_vhd.path}}}\n"
        "  ic_ready_timeout_s: 30\n"
    )
    (tmp_path / "pb.yaml").write_text(
        "name: hv-cli-run\nvm_config: hv.yaml\niterations: 1\n"
        "schedule: {kind: fixed, offsets_ms: [1500]}\ngrace_ms: 1500\nexpect: {lost: 0}\n"
    )
    port = hv_lab.standin.server.server_address[1]
    env = {"TESTBED_WINRM_PASSWORD": PASSWORD, "COLUMNS": "250"}
    r = CliRunner().invoke(app, ["run", str(tmp_path / "pb.yaml"), "--host", f"winrm://LAB%5Ctester@127.0.0.1:{port}",
                                 "--out", str(tmp_path / "out")], env=env)  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {k: v for k, v in summary["counts"].items() if v} == {"preserved": 1}, summary["counts"]
    assert "accel hyperv" in r.output


def test_gc_host_on_a_winrm_host(hv_lab: HvLab) -> None:
    dead = hv_lab.emulator.adopt("left-behind", f"{socket.gethostname()}:999999:1")
    port = hv_lab.standin.server.server_address[1]
    env = {"TESTBED_WINRM_PASSWORD": PASSWORD, "COLUMNS": "250"}
    r = CliRunner().invoke(app, ["gc", "--host", f"winrm://LAB%5Ctester@127.0.0.1:{port}"], env=env)
    assert r.exit_code == 0, r.output
    assert "removed Hyper-V VM left-behind" in r.output and dead not in hv_lab.emulator.vms
