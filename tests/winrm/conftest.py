"""Fixtures for the Hyper-V backend: the WS-Man stand-in in front of an emulated
Hyper-V host whose VMs are reference-lab guests."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hyperv_emulator import PROFILES, EmulatedHyperV  # type: ignore[import-not-found]
from winrm_standin import EmulatedHost, StandIn, running  # type: ignore[import-not-found]

from testbed.backends.hyperv.backend import HyperVBackend
from testbed.core.config import Artifact, VmConfig
from testbed.engine.playbook import load_vm_config
from testbed.transport.winrm import WinRmPowerShell

ROOT = Path(__file__).resolve().parents[2]
USER, PASSWORD = r"LAB\tester", "s3cret pass"


@dataclass
class HvLab:
    emulator: EmulatedHyperV
    host: EmulatedHost
    standin: StandIn
    cfg: VmConfig  # the shipped hyperv-openhcl.yaml, with test artifacts

    def backend(self, password: str = PASSWORD) -> HyperVBackend:
        return HyperVBackend(WinRmPowerShell(self.standin.endpoint, USER, password, auth="ntlm"))


def hyperv_cfg(tmp: Path, ref_cfg: VmConfig) -> VmConfig:
    """vm_configs/hyperv-openhcl.yaml with small local artifacts and the lab's COM3 marker."""
    (tmp / "openhcl.bin").write_bytes(b"IGVM test image\n" * 100)
    (tmp / "vtl0.vhdx").write_bytes(b"VHDX test image\n" * 50)
    cfg = load_vm_config(ROOT / "vm_configs" / "hyperv-openhcl.yaml")
    assert cfg.hyperv is not None
    hv = cfg.hyperv.model_copy(update={
        "igvm": Artifact(path=str(tmp / "openhcl.bin")),
        "vtl0_vhd": Artifact(path=str(tmp / "vtl0.vhdx")),
        "disable_nvme_keepalive": True,
        "ic_ready_timeout_s": 30,
        "shutdown_grace_ms": 3000.0,  # the lab guest powers off in 0.1 s
        "com3_servicing_start_pattern": r"^PV svc-start ",
    })  # fmt: skip
    return cfg.model_copy(update={"hyperv": hv})


def _emulated(tmp_path: Path, ref_cfg: VmConfig, monkeypatch: pytest.MonkeyPatch, profile_name: str,
              guest: str) -> Iterator[HvLab]:  # fmt: skip
    (tmp_path / "ntlm-users").write_text(f"{USER.replace(chr(92), ':')}:{PASSWORD}\n")
    monkeypatch.setenv("NTLM_USER_FILE", str(tmp_path / "ntlm-users"))
    profile = PROFILES[profile_name]
    emulator = EmulatedHyperV(ref_cfg, "none", profile=profile, guest=guest)
    host = EmulatedHost(files=emulator.files, functions=emulator.functions(),
                        execution_policy=profile.execution_policy, gpo_policy=profile.gpo_policy,
                        oem_codepage=profile.oem_codepage)  # fmt: skip
    try:
        with running(host, auth="ntlm", user=USER, password=PASSWORD) as s:
            yield HvLab(emulator, host, s, hyperv_cfg(tmp_path, ref_cfg))
    finally:
        emulator.close()


@pytest.fixture
def hv_lab(tmp_path: Path, ref_cfg: VmConfig, monkeypatch: pytest.MonkeyPatch,
           request: pytest.FixtureRequest) -> Iterator[HvLab]:  # fmt: skip
    """An emulated host of a profile (``indirect`` parameter; default Windows 11 26H1: a
    client SKU, execution policy Restricted, COM3 available) whose VMs are lab guests."""
    yield from _emulated(tmp_path, ref_cfg, monkeypatch, getattr(request, "param", "win11-26h1"), "lab")


@pytest.fixture
def hv_model(tmp_path: Path, ref_cfg: VmConfig, monkeypatch: pytest.MonkeyPatch,
             request: pytest.FixtureRequest) -> Iterator[HvLab]:  # fmt: skip
    """The same host with modeled guests: no QEMU, the race timed for real as the uploaded
    module times it (not a ``vm`` test)."""
    yield from _emulated(tmp_path, ref_cfg, monkeypatch, getattr(request, "param", "win11-26h1"), "model")
