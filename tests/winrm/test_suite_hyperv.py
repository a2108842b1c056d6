"""The Hyper-V lab suite (suites/test_hyperv_servicing_shutdown_ic.py) run by pytest with
the plugin, against the WS-Man stand-in: the emulated host behaves as Hyper-V does (the
VTL2 client masks its SINT across servicing, the lab's `mask` strategy)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import PASSWORD, ROOT, HvLab  # type: ignore[import-not-found]


@pytest.mark.vm
@pytest.mark.parametrize("hv_lab", ["win11-24h2", "win11-25h2", "server-2025", "win11-26h1"], indirect=True)
def test_hyperv_suite_passes_through_the_plugin(
    hv_lab: HvLab, pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hv_lab.emulator.strategy = "mask"
    assert hv_lab.cfg.hyperv is not None
    hv = hv_lab.cfg.hyperv
    cfg = tmp_path / "hv.yaml"
    cfg.write_text(
        "name: hv-suite\nbackend: hyperv\nhyperv:\n"
        f"  igvm: {{path: {hv.igvm.path}}}\n  vtl0_vhd: {{path: {hv.vtl0_vhd.path}}}\n"
        "  ic_ready_timeout_s: 30\n  shutdown_grace_ms: 3000\n  com3_servicing_start_pattern: '^PV svc-start '\n"
    )
    monkeypatch.setenv("TESTBED_WINRM_PASSWORD", PASSWORD)
    port = hv_lab.standin.server.server_address[1]
    r = pytester.runpytest_subprocess(
        str(ROOT / "suites" / "test_hyperv_servicing_shutdown_ic.py"),
        "--testbed-host", f"winrm://LAB%5Ctester@127.0.0.1:{port}",
        "--testbed-vm-config", str(cfg),
        "--testbed-require", "hyperv",
        "-p", "no:cacheprovider",
    )  # fmt: skip
    r.assert_outcomes(passed=3)
    races = hv_lab.emulator.races
    assert len(races) == 1 + 4 + 1  # seed order, the 4-iteration sweep, the baseline
    assert hv_lab.emulator.vms == {}  # every VM removed


def test_hyperv_suite_cannot_pass_by_skipping_on_another_host(pytester: pytest.Pytester) -> None:
    r = pytester.runpytest_subprocess(
        str(ROOT / "suites" / "test_hyperv_servicing_shutdown_ic.py"),
        "--testbed-host", "local", "--testbed-require", "hyperv", "-p", "no:cacheprovider",
    )  # fmt: skip
    r.assert_outcomes(errors=3)  # not skipped: the job fails
    assert r.ret != 0 and "--testbed-require hyperv: needs a Hyper-V host" in r.stdout.str()
