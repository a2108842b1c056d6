"""The Hyper-V backend end to end: real pywinrm traffic (NTLM, sealed messages) to the
WS-Man stand-in, Testbed.psm1's calls answered by an emulated Hyper-V host whose VMs are
reference-lab QEMU guests, serviced and shut down for real. Each fault has its verdict."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
from pathlib import Path

import pytest
from conftest import PASSWORD, USER, HvLab  # type: ignore[import-not-found]
from winrm_standin import B64  # type: ignore[import-not-found]

from testbed.backends.hyperv.backend import HyperVBackend
from testbed.core.config import Artifact
from testbed.core.errors import InfraError
from testbed.core.evidence import RacePlan
from testbed.engine.options import RunOptions
from testbed.engine.playbook import Playbook, ScheduleSpec
from testbed.engine.runner import Runner

pytestmark = pytest.mark.vm

# Offsets where the lab's verdict is not at an edge (save 300 ms, restore 100 ms):
# before servicing, inside the save, well after servicing.
OFFSETS = [-300.0, 100.0, 1500.0]
EXPECTED = ["delivered-before", "lost", "preserved"]


def playbook(offsets: list[float], **kw: object) -> Playbook:
    return Playbook(
        name="hv-short",
        vm_config="-",
        iterations=len(offsets),
        schedule=ScheduleSpec(kind="fixed", offsets_ms=offsets),
        grace_ms=1500,
        expect={},
        **kw,  # type: ignore[arg-type]
    )


def run(backend: HyperVBackend, cfg, out: Path, offsets: list[float], **kw: object) -> list[dict]:  # type: ignore[no-untyped-def]
    res = Runner(playbook(offsets, **kw), cfg, RunOptions(out=out, backend=backend)).run()
    return res.records


def test_playbook_through_hyperv_gives_the_lab_verdicts(hv_lab: HvLab, ref_cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    direct = Runner(playbook(OFFSETS), ref_cfg, RunOptions(out=tmp_path / "lab", reset="snapshot")).run()
    lab_verdicts = [r["verdict"] for r in direct.records]
    assert lab_verdicts == EXPECTED, [(r["verdict"], r["reason"]) for r in direct.records]

    recs = run(hv_lab.backend(), hv_lab.cfg, tmp_path / "hv", OFFSETS)
    assert [r["verdict"] for r in recs] == lab_verdicts, [(r["verdict"], r["reason"]) for r in recs]
    lost = recs[1]
    assert "IC OK" in lost["reason"] and any("InitiateShutdown" in e for e in lost["evidence"])
    assert any("hv_utils: Shutdown request received" in e for e in recs[2]["evidence"])
    # Offsets were timed on the host; where the paravisor logged its save on COM3, they are
    # also reported against that (the VM that shut down at -300 ms was never serviced).
    for r, planned in zip(recs, OFFSETS, strict=True):
        assert abs(r["offset_ms"] - planned) < 2.0
    assert recs[0]["guest_offset_ms"] is None
    assert all(r["guest_offset_ms"] is not None for r in recs[1:])
    # The exact Options integer reached ReloadManagementVtl: 0x1 | 0x10.
    assert {r["Options"] for r in hv_lab.emulator.races} == {17}
    # Every VM was removed, and the evidence files are in the run folder.
    assert hv_lab.emulator.vms == {}
    it = Path(recs[1]["dir"])
    assert (it / "race.json").exists() and (it / "events.json").exists()
    assert "hv_utils" in (Path(recs[2]["dir"]) / "com1.log").read_text()
    assert hv_lab.standin.encrypted_requests > 0  # the whole conversation was sealed
    manifest = json.loads((tmp_path / "hv" / "run.json").read_text())
    assert PASSWORD not in json.dumps(manifest)
    assert manifest["igvm_sha256"] == hashlib.sha256((tmp_path / "openhcl.bin").read_bytes()).hexdigest()


def test_ic_no_contact_at_start_is_an_infra_error(hv_lab: HvLab, tmp_path: Path) -> None:
    hv_lab.emulator.faults.ic_status = "No Contact"
    (rec,) = run(hv_lab.backend(), hv_lab.cfg, tmp_path, [100.0])
    assert rec["verdict"] == "infra-error"
    assert "reported 'No Contact', not OK" in rec["reason"]


def test_ic_degraded_when_fired_is_rejected(hv_lab: HvLab, tmp_path: Path) -> None:
    hv_lab.emulator.faults.ic_at_race = "Degraded"
    (rec,) = run(hv_lab.backend(), hv_lab.cfg, tmp_path, [1500.0])
    assert rec["verdict"] == "rejected"
    assert "'Degraded'" in rec["reason"] and "32775" in rec["reason"]


def test_reload_returning_32773_is_servicing_failed(hv_lab: HvLab, tmp_path: Path) -> None:
    hv_lab.emulator.faults.reload_return = 32773
    (rec,) = run(hv_lab.backend(), hv_lab.cfg, tmp_path, [100.0])
    assert rec["verdict"] == "servicing-failed"
    assert rec["reason"].startswith("ReloadManagementVtl returned 32773")


def test_a_job_that_never_finishes_is_servicing_failed(hv_lab: HvLab, tmp_path: Path) -> None:
    hv_lab.emulator.faults.job_never_finishes = True
    (rec,) = run(hv_lab.backend(), hv_lab.cfg, tmp_path, [1500.0])
    assert rec["verdict"] == "servicing-failed"
    assert "still in state 4 after TimeoutHintSecs + 30 s" in rec["reason"]


def test_a_failed_save_is_named_by_its_error_code(hv_lab: HvLab, tmp_path: Path) -> None:
    hv_lab.emulator.faults.job_error = 0xC0370802
    (rec,) = run(hv_lab.backend(), hv_lab.cfg, tmp_path, [1500.0])
    assert rec["verdict"] == "servicing-failed"
    assert "ErrorCode 0xC0370802 (the management VTL failed to save state" in rec["reason"]


def test_dropped_connection_mid_receive_is_infra_error_not_lost(hv_lab: HvLab, tmp_path: Path) -> None:
    hv_lab.standin.faults.drop_on = "Invoke-TestbedRace"
    (rec,) = run(hv_lab.backend(), hv_lab.cfg, tmp_path, [100.0])
    assert rec["verdict"] == "infra-error"
    assert "ConnectionError" in rec["reason"] or "Connection aborted" in rec["reason"]
    assert hv_lab.emulator.vms == {}  # cleaned up over a new connection


def test_malformed_clixml_is_infra_error(hv_lab: HvLab, tmp_path: Path) -> None:
    hv_lab.standin.faults.malformed_on = "Invoke-TestbedRace"
    (rec,) = run(hv_lab.backend(), hv_lab.cfg, tmp_path, [100.0])
    assert rec["verdict"] == "infra-error"
    assert "malformed CLIXML" in rec["reason"]


def test_wrong_password_fails_preflight_with_a_fix(hv_lab: HvLab) -> None:
    rep = hv_lab.backend(password="wrong").preflight(hv_lab.cfg)
    assert not rep.ok
    (check,) = rep.checks
    assert "401" in check.detail and "password variable" in check.fix and "wrong" not in check.detail


def test_missing_registry_value_blocks_provisioning(hv_lab: HvLab) -> None:
    hv_lab.emulator.allow_firmware = False
    with (
        hv_lab.backend() as b,
        pytest.raises(InfraError, match="AllowFirmwareLoadFromFile.*Set-ItemProperty"),
    ):
        b.provision(hv_lab.cfg)


def test_artifacts_pulled_by_url_are_hash_checked(hv_lab: HvLab) -> None:
    import hashlib

    data = b"VHDX served by a lab share\n" * 10
    url = "https://artifacts.lab/vtl0.vhdx"
    hv_lab.emulator.remote_store[url] = data
    assert hv_lab.cfg.hyperv is not None
    good = Artifact(url=url, sha256=hashlib.sha256(data).hexdigest())
    with hv_lab.backend() as b:
        path, digest = b.artifact(good, Path("."))
        assert digest == good.sha256
        assert hv_lab.emulator.files[path] == data and good.sha256 in path  # type: ignore[operator]
        bad = Artifact(url=url, sha256="ab" * 32)
        with pytest.raises(InfraError, match="expected abab"):
            b.artifact(bad, Path("."))


def test_gc_removes_vms_of_dead_owners_only(hv_lab: HvLab) -> None:
    me = socket.gethostname()
    dead = hv_lab.emulator.adopt("left-behind", f"{me}:999999:1")
    other = hv_lab.emulator.adopt("someone-else", "otherbox:1:1")
    with hv_lab.backend() as b:
        actions = b.gc_host()
    assert dead not in hv_lab.emulator.vms and other in hv_lab.emulator.vms
    assert any("removed Hyper-V VM left-behind" in a for a in actions)
    assert any("kept someone-else" in a for a in actions)


def test_race_parameters_reach_the_host_as_data(hv_lab: HvLab) -> None:
    """The race call is one small script: its parameters are base64 JSON, not PowerShell."""
    with hv_lab.backend() as b:
        vm = b.provision(hv_lab.cfg)
        try:
            b.start(vm)
            ev = b.race(vm, RacePlan(0, 1500.0), 1500.0)
        finally:
            b.destroy(vm)
    fn, params = next(c for c in hv_lab.host.calls if c[0] == "Invoke-TestbedRace")
    assert params["OffsetMs"] == 1500.0 and params["Options"] == 17 and params["GraceMs"] >= 3000
    from winrm_standin import B64  # type: ignore[import-not-found]

    from testbed.transport.powershell import CALL

    calls = [s for s in hv_lab.host.scripts_seen if "& $a.function @p" in s]
    assert calls and all(B64.sub("FromBase64String('')", s) == CALL.format(b64="") for s in calls)
    assert ev.guest_anchor == "COM3" and ev.raw["race"]["FireReturn"] == 0
    _, ev_params = next(c for c in hv_lab.host.calls if c[0] == "Get-TestbedEvents")
    assert ev_params["SettleMs"] == 3000  # the VM went off: wait for the event that says how


def test_hyperv_route_over_real_ssh(hv_lab: HvLab, tmp_path: Path) -> None:
    """Windows OpenSSH route: a real sshd whose PATH has a fake powershell.exe that answers
    from the same emulated host; the playbook runs through the SSH transport."""
    from sshd import run_sshd  # type: ignore[import-not-found]
    from winrm_standin import serve_unix  # type: ignore[import-not-found]

    from testbed.core.config import HostEntry
    from testbed.hosts import open_backend

    with serve_unix(hv_lab.host, str(tmp_path)) as bindir:
        with run_sshd(tmp_path / "sshd", env={"PATH": f"{bindir}:/usr/bin:/bin"}) as s:
            entry = HostEntry(name="hv-ssh", uri=s.uri, kind="hyperv", identity_file=str(s.key),
                              known_hosts=str(s.known_hosts))  # fmt: skip
            backend = open_backend(entry, "hyperv")
            recs = run(backend, hv_lab.cfg, tmp_path / "run", [-300.0, 1500.0])  # type: ignore[arg-type]
    assert [r["verdict"] for r in recs] == ["delivered-before", "preserved"], [r["reason"] for r in recs]
    assert hv_lab.standin.requests == []  # nothing went over WinRM
    assert hv_lab.host.stdin_uploads >= 3  # module, IGVM, VHDX streamed on the SSH channel's stdin


def test_nested_hyperv_through_powershell_direct(hv_lab: HvLab, tmp_path: Path, ref_cfg,  # type: ignore[no-untyped-def]
                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """L0 creates the L1 VM; everything else runs inside it through Invoke-Command -VMName."""
    from hyperv_emulator import PROFILES, EmulatedHyperV  # type: ignore[import-not-found]
    from winrm_standin import EmulatedHost  # type: ignore[import-not-found]

    from testbed.backends.hyperv.config import NestedSpec

    # L1: Server, no COM3, no network (its adapter is on no switch), and PowerShell Direct
    # refuses the first two sessions while it finishes its first boot.
    l1 = EmulatedHyperV(ref_cfg, "none", profile=PROFILES["server-2025"], network=False)
    l1_host = EmulatedHost(files=l1.files, functions=l1.functions(), execution_policy="Restricted")

    def l1_up(name: str) -> None:
        hv_lab.host.vms[name] = ("Administrator", "l1 pass", l1_host)
        hv_lab.host.direct_not_ready[name] = 2

    hv_lab.emulator.on_l1 = l1_up
    (tmp_path / "l1.vhdx").write_bytes(b"L1 Windows image\n" * 20)
    vhd_url = "https://artifacts.example/vtl0.vhdx"
    hv_lab.emulator.remote_store[vhd_url] = vhd = b"VTL0 disk from a URL\n" * 30
    monkeypatch.setenv("TB_L1_PASS", "l1 pass")
    assert hv_lab.cfg.hyperv is not None
    nested = NestedSpec(l1_vhd=Artifact(path=str(tmp_path / "l1.vhdx")), password_env="TB_L1_PASS",
                        host_dir=r"E:\l0", ps_direct_timeout_s=10)  # fmt: skip
    vtl0 = Artifact(url=vhd_url, sha256=hashlib.sha256(vhd).hexdigest())
    hv = hv_lab.cfg.hyperv.model_copy(update={"nested": nested, "host_dir": r"D:\l1", "vtl0_vhd": vtl0})
    cfg = hv_lab.cfg.model_copy(update={"hyperv": hv})
    monkeypatch.setattr("testbed.transport.powershell.PS_DIRECT_POLL_S", 0.05)
    try:
        recs = run(hv_lab.backend(), cfg, tmp_path / "run", [1500.0])
    finally:
        l1.close()
    assert [r["verdict"] for r in recs] == ["preserved"], [r["reason"] for r in recs]
    # L0 only made L1 and pulled the URL artifact (L1 cannot reach it); the rest ran in L1.
    assert [c[0] for c in hv_lab.host.calls] == ["New-TestbedL1Vm", "Get-TestbedArtifact", "Remove-TestbedVm"]
    assert "Invoke-TestbedRace" in [c[0] for c in l1_host.calls] and l1.races
    assert "Get-TestbedArtifact" not in [c[0] for c in l1_host.calls]
    assert rf"D:\l1\cache\{vtl0.sha256}\vtl0.vhdx" in l1_host.files  # copied in over PowerShell Direct
    assert hv_lab.host.direct_not_ready == {next(iter(hv_lab.host.vms)): 0}  # both refusals were waited out
    assert any("Invoke-Command -VMName $a.vm" in s for s in hv_lab.host.scripts_seen)
    assert any(
        "Copy-Item -ToSession $s" in s for s in hv_lab.host.scripts_seen
    )  # files: staged on L0, copied in
    # The password is on stdin only: not in any script nor in its base64 parameters.
    decoded = [base64.b64decode(m) for s in hv_lab.host.scripts_seen for m in B64.findall(s)]
    assert decoded and not any(b"l1 pass" in d for d in decoded)
    assert not any("l1 pass" in s for s in hv_lab.host.scripts_seen)
    assert hv_lab.emulator.l1 == {}  # the L1 VM was removed at the end
    assert hv_lab.host.files and all(f.startswith("E:\\l0\\") for f in hv_lab.host.files)  # L1 disk, module
    assert l1_host.files and all(f.startswith("D:\\l1\\") for f in l1_host.files)


def test_l1_cannot_pull_artifacts_itself(ref_cfg) -> None:  # type: ignore[no-untyped-def]
    """The host rule the staging above exists for: inside L1 a URL does not resolve and a
    share is a second hop."""
    from hyperv_emulator import EmulatedHyperV  # type: ignore[import-not-found]

    l1 = EmulatedHyperV(ref_cfg, "none", network=False)
    try:
        with pytest.raises(RuntimeError, match="could not be resolved"):
            l1.artifact("ab" * 32, "x.vhdx", r"D:\c", Url="https://artifacts.example/x.vhdx")
        with pytest.raises(RuntimeError, match="Access is denied"):
            l1.artifact("ab" * 32, "x.vhdx", r"D:\c", SharePath=r"\\srv\share\x.vhdx")
    finally:
        l1.close()


def test_winrm_password_never_in_logs(
    hv_lab: HvLab, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    with hv_lab.backend() as b:
        b.preflight()
    assert PASSWORD not in caplog.text and USER.split("\\")[1] in b.host
    assert os.environ.get("NTLM_USER_FILE")


@pytest.mark.parametrize(
    ("fault", "verdict", "said"),
    [
        (
            "shutdown_job_fails",
            "rejected",
            "InitiateShutdown started a job that ended Exception with HRESULT 0x80004005",
        ),
        ("worker_terminated", "infra-error", "worker process terminated (event 14070)"),
        (
            "com1_unreadable",
            "infra-error",
            "inconclusive: COM1 could not be read (All pipe instances are busy.)",
        ),
    ],
)
def test_host_faults_that_used_to_pass_for_lost(hv_lab: HvLab, tmp_path: Path, fault: str, verdict: str,
                                               said: str) -> None:  # fmt: skip
    """Each of these scored `lost` before: a shutdown job failing after 4096, a worker that
    died (14070 is a VMMS event, now read), a COM1 that was never readable."""
    setattr(hv_lab.emulator.faults, fault, True)
    (rec,) = run(hv_lab.backend(), hv_lab.cfg, tmp_path, [100.0])
    assert rec["verdict"] == verdict and said in rec["reason"], rec["reason"]


def module_calls(hv_lab: HvLab) -> list[str]:
    return [c[0] for c in hv_lab.host.calls if c[0] not in ("Get-TestbedPreflight",)]


def test_snapshot_reset_restores_a_checkpoint_and_gives_the_cold_verdicts(
    hv_lab: HvLab, tmp_path: Path
) -> None:
    """The faster reset: one VM, checkpointed at IC OK, restored for every iteration (the
    first too); 3 module calls per iteration instead of 5, and the same verdicts."""
    cold = run(hv_lab.backend(), hv_lab.cfg, tmp_path / "cold", OFFSETS, reset="cold")
    cold_calls = module_calls(hv_lab)
    hv_lab.host.calls.clear()
    snap = run(hv_lab.backend(), hv_lab.cfg, tmp_path / "snap", OFFSETS, reset="snapshot")
    snap_calls = module_calls(hv_lab)
    assert [r["verdict"] for r in snap] == [r["verdict"] for r in cold] == EXPECTED
    assert {r["reset"] for r in cold} == {"cold"} and {r["reset"] for r in snap} == {"snapshot"}
    per_iteration = ["Invoke-TestbedRace", "Get-TestbedEvents"]
    assert cold_calls == ["New-TestbedVm", "Start-TestbedVm", *per_iteration, "Remove-TestbedVm"] * 3
    assert snap_calls == ["New-TestbedVm", "Start-TestbedVm", "Save-TestbedCheckpoint",
                          *(["Restore-TestbedVm", *per_iteration] * 3), "Remove-TestbedVm"]  # fmt: skip
    assert hv_lab.emulator.vms == {}  # the kept VM went at the end of the run


def test_a_host_that_refuses_checkpoints_falls_back_to_cold_and_says_so(
    hv_lab: HvLab, tmp_path: Path
) -> None:
    hv_lab.emulator.faults.checkpoint_refused = True
    recs = run(hv_lab.backend(), hv_lab.cfg, tmp_path, OFFSETS, reset="snapshot")
    assert [r["verdict"] for r in recs] == EXPECTED
    assert {r["reset"] for r in recs} == {"cold"}
    assert all("refused a checkpoint" in r["reset_fallback"] and "not supported" in r["reset_fallback"]
               for r in recs)  # fmt: skip
    assert module_calls(hv_lab).count("Save-TestbedCheckpoint") == 1  # asked once, not per iteration
    assert hv_lab.emulator.vms == {}
