"""Hyper-V answers the lab's questions, through the CLI, over real pywinrm against the
WS-Man stand-in: a phase sweep on OpenHCL's COM3 lines, the IC-ready delay curve and the
flaky-window search. The emulated host's guests are modeled (no QEMU): servicing takes
``job_ms``, OpenHCL prints its lines on COM3 at fixed points of it, the IC's channel is
closed by the save and open again after the restore (VMBus redirection), and the IGVM
build named lossy drops a request taken between OpenHCL's receipt of the servicing
request and that close (#954). What is fired, and when, is decided by the uploaded
Testbed.psm1's parameters and the backend, never by the emulator.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSWORD, HvLab  # type: ignore[import-not-found]
from hyperv_emulator import IC_CLOSE, IC_REOPEN, OPENHCL_LINES  # type: ignore[import-not-found]
from typer.testing import CliRunner

from testbed.backends.hyperv.phases import NAMES
from testbed.cli import app

ROOT = Path(__file__).resolve().parents[2]
JOB_MS = 400.0


def modeled(hv: HvLab, tmp_path: Path, lossy: bool = True) -> Path:
    """The emulated host set up as above, and a vm_config for it (COM3 on: 26H1)."""
    hv.emulator.job_ms = JOB_MS
    hv.emulator.servicing_closes_ic = True
    hv.emulator.lossy_builds = ("openhcl.bin",) if lossy else ()
    spec = hv.cfg.hyperv  # type: ignore[attr-defined]
    cfg = tmp_path / "hv.yaml"
    cfg.write_text(f"name: hv-model\nbackend: hyperv\nhyperv:\n  igvm: {{path: {spec.igvm.path}}}\n"
                   f"  vtl0_vhd: {{path: {spec.vtl0_vhd.path}}}\n  shutdown_grace_ms: 300\n  ic_ready_timeout_s: 30\n")  # fmt: skip
    return cfg


def cli(hv: HvLab, *args: str, env: dict[str, str] | None = None) -> Any:
    port = hv.standin.server.server_address[1]
    env = {"TESTBED_WINRM_PASSWORD": PASSWORD, "COLUMNS": "250", **(env or {})}
    return CliRunner().invoke(app, [*args, "--host", f"winrm://LAB%5Ctester@127.0.0.1:{port}"], env=env)


def records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]


def test_a_phase_sweep_fires_on_openhcls_com3_lines_and_prints_its_table(
    hv_model: HvLab, tmp_path: Path
) -> None:
    cfg = modeled(hv_model, tmp_path)
    out = tmp_path / "run"
    r = cli(
        hv_model, "run", str(ROOT / "playbooks/phase-sweep.yaml"), "--vm-config", str(cfg), "--out", str(out)
    )
    assert r.exit_code == 0, r.output
    recs = records(out)
    by_phase: dict[str, list[dict[str, Any]]] = {}
    for rec in recs:
        by_phase.setdefault(str(rec["phase"]), []).append(rec)
    assert set(by_phase) == set(NAMES), set(by_phase)
    # The sweep's delays (0 and 2 ms) after each phase; its midpoints lie between phases.
    at_phase = {
        name: [x for x in xs if x["planned_offset_ms"] in (0.0, 2.0)] for name, xs in by_phase.items()
    }
    assert all(len(xs) == 6 for xs in at_phase.values()), {k: len(v) for k, v in at_phase.items()}
    # Inside the #954 window (OpenHCL has the request, its channel is not closed yet): lost.
    assert {x["verdict"] for x in at_phase["received"] + at_phase["stopping"]} == {"lost"}
    # The IC's channel closed by the save until after the job: the host refuses the request.
    for name in ("vtl2-restart", "state-received", "resuming", "job-done"):
        assert {x["verdict"] for x in by_phase[name]} == {"rejected"}, (name, by_phase[name])
    # Each shot's latency is the host's own account: its Stopwatch's fire stamp less the
    # line's arrival + delay (how small it is depends on the emulated host's scheduler, so it
    # is not bounded here; bench/ measures the lab's).
    for x in recs:
        race = json.loads((Path(x["dir"]) / "race.json").read_text())
        assert race["FirePlannedMs"] == pytest.approx(race["AnchorMs"] + x["planned_offset_ms"], abs=1e-6)
        assert (
            x["skew_ms"] == pytest.approx(race["FireMs"] - race["FirePlannedMs"], abs=1e-3)
            and x["skew_ms"] >= 0
        )
    line_at = {name: f * JOB_MS for f, name in zip([f for f, _ in OPENHCL_LINES], NAMES, strict=False)}
    for name, at in line_at.items():  # the phase's time from the servicing request, as the host saw it
        got = [x["phase_times_ms"][name] for x in recs]
        assert all(abs(g - at) < 5.0 for g in got), (name, got, at)
    table = r.output[r.output.index("per phase") :] if "per phase" in r.output else r.output
    assert all(name in table for name in NAMES), r.output


def test_the_ic_ready_delay_curve_fires_after_the_ics_return_to_ok(hv_model: HvLab, tmp_path: Path) -> None:
    cfg = modeled(hv_model, tmp_path, lossy=False)
    out = tmp_path / "run"
    r = cli(hv_model, "run", str(ROOT / "playbooks/ic-ready-delay.yaml"), "--vm-config", str(cfg),
            "--iterations", "8", "--out", str(out))  # fmt: skip
    assert r.exit_code == 0, r.output
    recs = records(out)
    assert {x["verdict"] for x in recs} == {"preserved"}, [x["verdict"] for x in recs]
    races = [json.loads((Path(x["dir"]) / "race.json").read_text()) for x in recs]
    for race in races:
        states = [s["State"] for s in race["IcTransitions"]]
        assert states[-2:] == ["No Contact", "OK"], states  # it left OK with the save, came back after
        back = race["AnchorMs"] - race["ServiceMs"]
        assert IC_REOPEN * JOB_MS <= back < IC_REOPEN * JOB_MS + 3 * race["AnchorResolutionMs"] + 5
        assert 0 < race["AnchorResolutionMs"] < 20  # sampled back to back: the stamp's resolution
    delays = sorted({float(x["offset_ms"]) for x in recs if x["offset_ms"] is not None})
    assert len(delays) == 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["preserved"] == 8


def test_a_shot_before_the_ic_closes_is_lost_on_the_lossy_build_and_held_on_the_fixed_one(
    hv_model: HvLab, tmp_path: Path
) -> None:
    """The same offsets, two builds: the model's loss is the build's, not the harness's."""
    at = (OPENHCL_LINES[0][0] + IC_CLOSE) / 2 * JOB_MS  # between the receipt and the close
    verdicts = {}
    for lossy in (True, False):
        cfg = modeled(hv_model, tmp_path, lossy=lossy)
        out = tmp_path / f"run-{lossy}"
        pb = tmp_path / "pb.yaml"
        pb.write_text(f"name: two-builds\nvm_config: {cfg}\niterations: 3\nexpect: {{}}\n"
                      f"schedule: {{kind: fixed, offsets_ms: [{at}]}}\n")  # fmt: skip
        r = cli(hv_model, "run", str(pb), "--out", str(out))
        assert r.exit_code == 0, r.output
        verdicts[lossy] = {x["verdict"] for x in records(out)}
    assert verdicts == {True: {"lost"}, False: {"preserved"}}


@pytest.mark.parametrize("hv_model", ["server-2025"], indirect=True)
def test_a_com3_phase_on_a_host_without_com3_is_an_infra_error_that_says_why(
    hv_model: HvLab, tmp_path: Path
) -> None:
    cfg = modeled(hv_model, tmp_path)
    pb = tmp_path / "pb.yaml"
    pb.write_text(f"name: no-com3\nvm_config: {cfg}\nexpect: {{}}\nmax_infra_errors_in_a_row: 1\n"
                  "schedule: {kind: phases, delays_ms: [0], midpoint: false, repeat: 1}\n")  # fmt: skip
    out = tmp_path / "run"
    r = cli(hv_model, "run", str(pb), "--out", str(out))
    first = records(out)[0]
    assert first["verdict"] == "infra-error" and "has no COM3" in first["reason"], first
    assert r.exit_code == 3, r.output


def test_parallel_2_races_two_vms_at_once_and_memory_caps_a_third(hv_model: HvLab, tmp_path: Path) -> None:
    """Two lanes, each its own VM (name, pipes, folder, checkpoint), racing at the same time;
    a third does not fit the host's free memory, so the run goes on with two and says so."""
    cfg = modeled(hv_model, tmp_path, lossy=False)
    hv_model.emulator.free_memory_mb = 2 * (2048 + 512) + 100  # room for two VMs of 2048 MB
    pb = tmp_path / "pb.yaml"
    # Offsets far past the IC's return (440 ms): this test is about lanes, not the window, and
    # two lanes spinning on two cores can delay a shot by tens of ms (CI once fired 20 ms late).
    pb.write_text(f"name: two-at-once\nvm_config: {cfg}\niterations: 8\nexpect: {{lost: 0}}\n"
                  "schedule: {kind: fixed, offsets_ms: [700, 900]}\n")  # fmt: skip
    out = tmp_path / "run"
    r = cli(hv_model, "run", str(pb), "--parallel", "3", "--out", str(out), env={"TESTBED_MAX_GUESTS": "4"})
    assert r.exit_code == 0, r.output
    run = json.loads((out / "run.json").read_text())
    assert (
        run["parallel"] == 2 and "2 of 3 lanes" in run["parallel_note"] and "MB free" in run["parallel_note"]
    )
    races = [json.loads((Path(x["dir"]) / "race.json").read_text()) for x in records(out)]
    assert len({x["VmId"] for x in races}) == 2  # a VM per lane, each restored from its own checkpoint
    spans = sorted((datetime.fromisoformat(x["StartedUtc"]), x["EndMs"]) for x in races)
    overlapping = sum(
        1
        for (a, a_ms), (b, _) in zip(spans, spans[1:], strict=False)
        if (b - a).total_seconds() * 1000 < a_ms
    )
    assert overlapping >= 1, spans  # the lanes raced at the same time
    assert {x["verdict"] for x in records(out)} == {"preserved"}
    assert hv_model.emulator.vms == {}  # both removed at the end


def test_a_bisection_over_three_igvm_builds_names_the_bad_one(hv_model: HvLab, tmp_path: Path) -> None:
    """Each try services into a build of hyperv.images (the VM's firmware file overwritten,
    hash-checked); the third build loses what it takes before its channel closes."""
    modeled(hv_model, tmp_path, lossy=False)
    hv_model.emulator.lossy_builds = ("openhcl-r3.bin",)
    images = ""
    for r in ("r1", "r2", "r3"):
        (tmp_path / f"openhcl-{r}.bin").write_bytes(f"IGVM build {r}\n".encode() * 64)
        images += f"    {r}: {{path: openhcl-{r}.bin}}\n"
    spec = hv_model.cfg.hyperv  # type: ignore[attr-defined]
    (tmp_path / "hv-builds.yaml").write_text(
        f"name: hv-builds\nbackend: hyperv\nhyperv:\n  igvm: {{path: openhcl-r1.bin}}\n"
        f"  vtl0_vhd: {{path: {spec.vtl0_vhd.path}}}\n  shutdown_grace_ms: 300\n  images:\n{images}"
    )
    pb = tmp_path / "bisect.yaml"
    pb.write_text("name: hv-bisect\nvm_config: hv-builds.yaml\niterations: 60\nexpect: {}\n"
                  "schedule: {kind: fixed, offsets_ms: [20, 30]}\n"
                  "bisect: {builds: [r1, r2, r3], p0: 0.01, p1: 0.5, alpha: 0.05, beta: 0.05, max_per_build: 20}\n")  # fmt: skip
    out = tmp_path / "run"
    r = cli(hv_model, "bisect", str(pb), "--out", str(out))
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bisect"]["answer"].startswith("first bad build: r3 "), summary["bisect"]
    recs = records(out)
    assert {x["image"] for x in recs} >= {"r3"} and {x["verdict"] for x in recs if x["image"] == "r3"} == {
        "lost"
    }
    copies = [c for c in hv_model.host.calls if c[0] == "Set-TestbedServicingIgvm"]
    assert copies and all(c[1]["IgvmPath"].endswith(("openhcl-r1.bin", "openhcl-r2.bin", "openhcl-r3.bin"))
                          for c in copies)  # fmt: skip
    assert all(len(set(aces)) == len(aces) for aces in hv_model.emulator.acl.values())  # no ACE twice


def test_a_matrix_over_the_servicing_options_and_timeout_hint(hv_model: HvLab, tmp_path: Path) -> None:
    """ReloadManagementVtl's Options bits and TimeoutHintSecs as matrix dimensions: each
    cell's races reach the host with that cell's values."""
    cfg = modeled(hv_model, tmp_path, lossy=False)
    pb = tmp_path / "matrix.yaml"
    pb.write_text(f"name: hv-flags\nvm_config: {cfg}\niterations: 2\nexpect: {{}}\n"
                  "schedule: {kind: fixed, offsets_ms: [500]}\n"
                  "matrix:\n  dimensions:\n    lab.disable_nvme_keepalive: [0, 1]\n    lab.timeout_hint_secs: [15, 60]\n")  # fmt: skip
    out = tmp_path / "run"
    r = cli(hv_model, "run", str(pb), "--out", str(out))
    assert r.exit_code == 0, r.output
    sent = {(x["Options"], x["TimeoutHintSecs"]) for x in hv_model.emulator.races}
    assert sent == {(0x1, 15), (0x1, 60), (0x11, 15), (0x11, 60)}, sent  # 0x1 override version checks
    assert len(hv_model.emulator.races) == 8
    bad = tmp_path / "bad.yaml"
    bad.write_text(pb.read_text().replace("[15, 60]", "[15, 0]"))
    r = cli(hv_model, "run", str(bad), "--out", str(tmp_path / "bad"))
    assert r.exit_code == 2 and "timeout_hint_secs" in r.output, r.output


def test_one_playbook_on_a_fleet_of_mixed_kinds(hv_model: HvLab, tmp_path: Path) -> None:
    """A Hyper-V host and a mock host in one run, each with the vm_config of its kind named
    in the inventory: both race, every record says its host and kind."""
    cfg = modeled(hv_model, tmp_path, lossy=False)
    (tmp_path / "mock.yaml").write_text("name: mk\nbackend: mock\nrace_ms: 50\n")
    port = hv_model.standin.server.server_address[1]
    inv = tmp_path / "hosts.yaml"
    inv.write_text(f"hosts:\n  - {{name: hv, uri: 'winrm://LAB%5Ctester@127.0.0.1:{port}', kind: hyperv, "
                   f"vm_config: {cfg.name}}}\n  - {{name: mk, uri: 'mock://one', kind: mock, vm_config: mock.yaml}}\n")  # fmt: skip
    pb = tmp_path / "pb.yaml"
    pb.write_text(f"name: mixed\nvm_config: {cfg}\niterations: 12\nexpect: {{}}\n"
                  "schedule: {kind: fixed, offsets_ms: [700, 900]}\n")  # fmt: skip
    env = {"TESTBED_WINRM_PASSWORD": PASSWORD, "COLUMNS": "250"}
    out = tmp_path / "run"
    r = CliRunner().invoke(
        app, ["run", str(pb), "--host", "hv,mk", "--inventory", str(inv), "--out", str(out)], env=env
    )
    assert r.exit_code == 0, r.output
    recs = records(out)
    assert {(x["host"], x["host_kind"]) for x in recs} == {("hv", "hyperv"), ("mk", "mock")}, recs[:2]
    assert len(recs) == 12
    fleet = json.loads((out / "run.json").read_text())["fleet"]
    assert {h["name"]: h["vm_config"] for h in fleet} == {"hv": "hv-model", "mk": "mk"}
    inv.write_text(inv.read_text().replace(", vm_config: mock.yaml", ""))
    r = CliRunner().invoke(
        app, ["run", str(pb), "--host", "hv,mk", "--inventory", str(inv), "--dry-run"], env=env
    )
    assert r.exit_code == 2 and "name its own vm_config in the inventory" in r.output, r.output


def test_the_flaky_window_search_gives_its_answer(hv_model: HvLab, tmp_path: Path) -> None:
    """playbooks/flaky-window.yaml on Hyper-V: time buckets and the host's phase arms, one
    budget; the lossy build's window (OpenHCL has the request, its channel is still open)
    is the answer."""
    cfg = modeled(hv_model, tmp_path)
    out = tmp_path / "run"
    r = cli(hv_model, "run", str(ROOT / "playbooks/flaky-window.yaml"), "--vm-config", str(cfg),
            "--iterations", "120", "--out", str(out))  # fmt: skip
    assert r.exit_code == 0, r.output
    answer = json.loads((out / "summary.json").read_text())["flaky_search"]["answer"]
    assert answer.startswith("window found"), answer
    assert any(arm in answer for arm in ("received", "stopping", "[19, 88)", "[-50, 19)")), answer
