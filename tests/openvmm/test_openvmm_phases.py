"""OpenVMM answers the lab's questions: the shutdown fired on servicing phases seen live on
openvmm's log and OpenHCL's COM3 (the stand-in prints them in openvmm's format, the
debug ones only when OPENVMM_LOG enables them), and after the shutdown IC's
re-negotiation on COM1 (the IC-ready anchor); through the CLI on the stand-in."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.backends.openvmm.console import PHASES

pytestmark = pytest.mark.vm
ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "testbed.cli", *args], capture_output=True, text=True,
                          timeout=900, cwd=ROOT)  # fmt: skip


def records(run: Path) -> list[dict[str, object]]:
    return [json.loads(ln) for ln in (run / "results.jsonl").read_text().splitlines()]


def standin_lab(tmp_path: Path, knob: str) -> Path:
    """The reference lab's vm_config with one more lab knob (``name: value``), for the
    stand-in's guest (TESTBED_STANDIN_VM_CONFIG)."""
    lab = tmp_path / "lab.yaml"
    lab.write_text(
        (ROOT / "vm_configs/reference-linux.yaml").read_text().replace("lab:\n", f"lab:\n  {knob}\n")
    )
    return lab


BUILDS = ["v2-r5", "v2-r6", "v2-r7"]


def bisection(ov_config, tmp_path: Path, name: str, **spec: object) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    """A vm_config with the three builds as IGVM files, on a lab whose v2-r6 and later lose
    every held message (regression_pct 100), and a bisection playbook over them whose SPRT
    (p1 0.9) decides each build in a few tries: (vm_config, playbook)."""
    from openvmm_standin import igvm_file  # type: ignore[import-not-found]

    lab = standin_lab(tmp_path, "regression_pct: 100")
    cfg = ov_config(name=name, images={b: str(igvm_file(tmp_path, b)) for b in BUILDS},
                    env={"TESTBED_STANDIN_VM_CONFIG": str(lab)}, **spec)  # fmt: skip
    pb = tmp_path / f"{name}-bisect.yaml"
    pb.write_text(f"name: {name}-bisect\nvm_config: {cfg}\nstrategy: pause-resume\nreset: cold\nexpect: {{}}\n"
                  "iterations: 20\nschedule: {kind: fixed, offsets_ms: [150]}\n"
                  f"bisect: {{builds: {BUILDS}, p0: 0.01, p1: 0.9, alpha: 0.05, beta: 0.05, max_per_build: 6}}\n")  # fmt: skip
    return cfg, pb


def test_a_phase_sweep_loses_inside_save_and_never_after_the_reoffer(ov_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = ov_config(shutdown_grace_ms=1500)
    pb = tmp_path / "phases.yaml"
    pb.write_text(f"name: ov-phases\nvm_config: {cfg}\nstrategy: none\nreset: cold\nexpect: {{}}\n"
                  "schedule: {kind: phases, delays_ms: [0], midpoint: false, repeat: 1}\n")  # fmt: skip
    r = cli("run", str(pb), "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stdout + r.stderr
    by_phase = {str(x["phase"]): x for x in records(tmp_path / "run")}
    assert list(by_phase) != [] and set(by_phase) == {name for name, _w, _n in PHASES}
    # OpenHCL has the request (COM3), the save under way: #954. (openvmm logs "waiting for guest
    # to send saved state" before it sends the request, so a shot on that line races the
    # request's arrival: delivered before, or lost, as on a real host.)
    assert by_phase["received"]["verdict"] == "lost", by_phase["received"]
    assert by_phase["complete"]["verdict"] == "preserved"  # after the re-offer: delivered
    for name in ("reload", "vtl0-wait", "vtl2-restart"):  # the IC is closed: refused after waiting
        assert by_phase[name]["verdict"] in ("rejected", "lost"), by_phase[name]
    latency = [float(x["phase_to_fire_ms"]) for x in by_phase.values()]  # type: ignore[arg-type]
    assert max(latency) < 20.0, latency  # the line's arrival to the shutdown typed, on the host clock
    print(f"phase trigger latency ms: min {min(latency):.3f} max {max(latency):.3f}")
    assert "phase sweep" in r.stdout  # the table in summary.md


def test_ic_ready_delay_finds_the_wait_after_the_ic_came_back(ov_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lab = standin_lab(tmp_path, "vtl0_attach_ms: 300")  # VTL0 attaches 300 ms after the IC's re-offer (#1174)
    cfg = ov_config(env={"TESTBED_STANDIN_VM_CONFIG": str(lab)})
    pb = tmp_path / "icr.yaml"
    pb.write_text(f"name: ov-icr\nvm_config: {cfg}\nstrategy: pause-resume\nreset: cold\nexpect: {{}}\n"
                  "shutdown: ic-ready\niterations: 2\nschedule: {kind: fixed, offsets_ms: [0, 700]}\n")  # fmt: skip
    r = cli("run", str(pb), "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stdout + r.stderr
    recs = records(tmp_path / "run")
    assert [x["verdict"] for x in recs] == ["lost", "preserved"], [x["reason"] for x in recs]
    for x, d in zip(recs, (0.0, 700.0), strict=True):
        assert abs(float(x["ic_ready_offset_ms"]) - d) < 20.0, x  # type: ignore[arg-type]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["ic_ready_delay"]["safe_delay_ms"] == 700.0


def test_two_openvmm_processes_race_at_once(ov_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = ov_config()
    r = cli("run", str(ROOT / "playbooks/servicing-shutdown-ic.yaml"), "--vm-config", str(cfg), "--strategy", "none",
            "--offsets", "150,900,150,900", "--parallel", "2", "--out", str(tmp_path / "run"))  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr  # the losses at 150 ms violate lost: 0
    recs = records(tmp_path / "run")
    assert sorted(x["lane"] for x in recs) == [0, 0, 1, 1]  # type: ignore[type-var]
    assert [x["verdict"] for x in sorted(recs, key=lambda x: x["iteration"])] == ["lost", "preserved"] * 2  # type: ignore[arg-type, return-value]
    spans = sorted((float(x["started"]), float(x["started"]) + float(x["duration_s"])) for x in recs)  # type: ignore[arg-type]
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))  # really at once


def test_over_ssh_a_phase_sweep_and_the_ic_ready_delay_through_the_cli(
    ov_config, standin_bin: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The same questions of an OpenVMM host reached over a real sshd (the stand-in on the
    host's PATH, the host driver uploaded as a zipapp): the sweep loses inside the save
    and not after the re-offer, with pause-resume at no phase; the IC-ready curve has its
    safe delay; nothing is left."""
    from sshd import run_sshd  # type: ignore[import-not-found]

    from testbed.core.paths import cache_dir

    lab = standin_lab(tmp_path, "vtl0_attach_ms: 300")
    cfg = ov_config(name="ov-sweep", binary="openvmm", shutdown_grace_ms=1500)
    late = ov_config(
        name="ov-late", binary="openvmm", env={"TESTBED_STANDIN_VM_CONFIG": str(lab)}
    )  # #1174's gap
    env = {"PATH": f"{standin_bin}:/usr/bin:/bin", "TESTBED_STANDIN_CACHE_DIR": str(cache_dir())}
    with run_sshd(tmp_path / "sshd", env=env) as s:
        inv = tmp_path / "hosts.yaml"
        inv.write_text(f"hosts:\n  - {{name: ov, uri: '{s.uri}', kind: openvmm, identity_file: '{s.key}', "
                       f"known_hosts: '{s.known_hosts}'}}\n")  # fmt: skip
        sweep = tmp_path / "sweep.yaml"
        sweep.write_text(f"name: ov-ssh-phases\nvm_config: {cfg}\nstrategy: none\nreset: cold\nexpect: {{}}\n"
                         "schedule: {kind: phases, phases: [received, complete], delays_ms: [0], midpoint: false, "
                         "repeat: 1}\n")  # fmt: skip
        r = cli("run", str(sweep), "--host", "ov", "--inventory", str(inv), "--out", str(tmp_path / "sweep"))
        assert r.returncode == 0, r.stdout + r.stderr
        by_phase = {str(x["phase"]): x["verdict"] for x in records(tmp_path / "sweep")}
        assert by_phase == {"received": "lost", "complete": "preserved"}, by_phase
        assert "phase sweep" in r.stdout  # the table, printed
        fixed = tmp_path / "fixed.yaml"  # #962's fix, every phase: nothing accepted and dropped
        fixed.write_text(f"name: ov-ssh-pr\nvm_config: {cfg}\nstrategy: pause-resume\nreset: cold\n"
                         "expect: {lost: 0}\nschedule: {kind: phases, delays_ms: [0], midpoint: false, repeat: 1}\n")  # fmt: skip
        r = cli("run", str(fixed), "--host", "ov", "--inventory", str(inv), "--out", str(tmp_path / "fixed"))
        assert r.returncode == 0, r.stdout + r.stderr
        verdicts = {str(x["phase"]): x["verdict"] for x in records(tmp_path / "fixed")}
        assert set(verdicts) == {name for name, _w, _n in PHASES} and "lost" not in verdicts.values(), (
            verdicts
        )
        icr = tmp_path / "icr.yaml"
        icr.write_text(f"name: ov-ssh-icr\nvm_config: {late}\nstrategy: pause-resume\nreset: cold\nexpect: {{}}\n"
                       "shutdown: ic-ready\niterations: 2\nschedule: {kind: fixed, offsets_ms: [0, 700]}\n")  # fmt: skip
        r = cli("run", str(icr), "--host", "ov", "--inventory", str(inv), "--out", str(tmp_path / "icr"))
        assert r.returncode == 0, r.stdout + r.stderr
        summary = json.loads((tmp_path / "icr" / "summary.json").read_text())
        assert summary["ic_ready_delay"]["safe_delay_ms"] == 700.0, summary["ic_ready_delay"]
    # Nothing left on the host: tests/conftest.py's no_leaked_qemu checks, by pid, every QEMU
    # and stand-in openvmm process this test started (a `pgrep -f qemu-system` matched the
    # shell that ran `apt-get install qemu-system-x86 ... && pytest`).


def test_with_pause_resume_a_phase_sweep_loses_at_no_phase(ov_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """#962's fix on the console race: the same sweep as above with pause-resume; a shot at
    any phase is delivered (held across the save, or before the request reached OpenHCL) or
    refused while the IC is closed, never accepted and dropped."""
    cfg = ov_config(shutdown_grace_ms=1500)
    pb = tmp_path / "phases.yaml"
    pb.write_text(f"name: ov-phases-pr\nvm_config: {cfg}\nstrategy: pause-resume\nreset: cold\nexpect: {{lost: 0}}\n"
                  "schedule: {kind: phases, delays_ms: [0], midpoint: false, repeat: 1}\n")  # fmt: skip
    r = cli("run", str(pb), "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stdout + r.stderr
    by_phase = {str(x["phase"]): x["verdict"] for x in records(tmp_path / "run")}
    assert set(by_phase) == {name for name, _w, _n in PHASES}, by_phase
    assert "lost" not in by_phase.values(), by_phase
    assert by_phase["received"] == by_phase["complete"] == "preserved", by_phase  # held, then delivered
    assert "phase sweep" in r.stdout


def test_a_bisection_over_three_igvm_builds_names_the_bad_one(ov_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`testbed bisect` over three IGVM files, each serviced into with `service-vtl2 --igvm`:
    the lab's series loses every held message from v2-r6 on (regression_pct 100), so an
    SPRT with p1 0.9 decides each build in a few tries and names v2-r6."""
    _cfg, pb = bisection(ov_config, tmp_path, "ov")
    r = cli("bisect", str(pb), "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "first bad build: v2-r6 " in r.stdout, r.stdout
    recs = records(tmp_path / "run")
    tried = {str(x["image"]) for x in recs}
    assert "v2-r6" in tried and tried <= set(BUILDS), tried
    for x in recs:  # each try serviced into its build's IGVM file, on the console
        console = (Path(str(x["dir"])) / "console.log").read_text()
        assert f"service-vtl2 --igvm {tmp_path}/openhcl-{x['image']}.bin" in console, console[-600:]
    assert {str(x["verdict"]) for x in recs if x["image"] == "v2-r6"} == {"lost"}


def test_over_ssh_two_processes_a_bisection_and_a_flag_matrix_through_the_cli(
    ov_config, standin_bin: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The rest of the lab's questions of an OpenVMM host over a real sshd: `--parallel 2`
    (two openvmm processes on the host at once), a bisection over three IGVM builds, and a
    matrix over a service-vtl2 flag with its table printed; nothing left on the host."""
    from sshd import run_sshd  # type: ignore[import-not-found]

    from testbed.core.paths import cache_dir

    cfg, bis = bisection(ov_config, tmp_path, "ov-remote", binary="openvmm")
    env = {"PATH": f"{standin_bin}:/usr/bin:/bin", "TESTBED_STANDIN_CACHE_DIR": str(cache_dir())}
    with run_sshd(tmp_path / "sshd", env=env) as s:
        inv = tmp_path / "hosts.yaml"
        inv.write_text(f"hosts:\n  - {{name: ov, uri: '{s.uri}', kind: openvmm, identity_file: '{s.key}', "
                       f"known_hosts: '{s.known_hosts}', max_guests: 2}}\n")  # fmt: skip
        host = ("--host", "ov", "--inventory", str(inv))
        two = tmp_path / "two.yaml"
        two.write_text(f"name: ov-ssh-two\nvm_config: {cfg}\nstrategy: pause-resume\nreset: cold\n"
                       "expect: {lost: 0}\nparallel: 2\niterations: 4\nschedule: {kind: fixed, offsets_ms: [150, 900, 150, 900]}\n")  # fmt: skip
        r = cli("run", str(two), *host, "--out", str(tmp_path / "two"))
        assert r.returncode == 0, r.stdout + r.stderr
        recs = records(tmp_path / "two")
        assert sorted(x["lane"] for x in recs) == [0, 0, 1, 1], recs  # type: ignore[type-var]
        spans = sorted((float(x["started"]), float(x["started"]) + float(x["duration_s"])) for x in recs)  # type: ignore[arg-type]
        assert any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))  # two processes at once

        r = cli("bisect", str(bis), *host, "--out", str(tmp_path / "bisect"))
        assert r.returncode == 0 and "first bad build: v2-r6 " in r.stdout, r.stdout + r.stderr

        mx = tmp_path / "matrix.yaml"
        mx.write_text(f"name: ov-ssh-matrix\nvm_config: {cfg}\nstrategy: pause-resume\nreset: cold\nexpect: {{lost: 0}}\n"
                      "iterations: 1\nschedule: {kind: fixed, offsets_ms: [900]}\n"
                      "matrix:\n  dimensions:\n    lab.nvme_keepalive: [0, 1]\n")  # fmt: skip
        r = cli("run", str(mx), *host, "--out", str(tmp_path / "matrix"))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "ov-ssh-matrix: a matrix of 2 cells" in r.stdout, r.stdout[-2000:]
        rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| lab.nvme_keepalive")]
        assert len(rows) == 2 and all("preserved 1" in ln and "| met |" in ln for ln in rows), rows
        consoles = [p.read_text() for p in (tmp_path / "matrix").glob("cells/*/iterations/*/console.log")]
        assert sorted("service-vtl2 -n" in c for c in consoles) == [False, True], len(consoles)
    # Nothing left on the host: tests/conftest.py's no_leaked_qemu checks, by pid, every QEMU
    # and stand-in openvmm process this test started (a `pgrep -f qemu-system` matched the
    # shell that ran `apt-get install qemu-system-x86 ... && pytest`).


def release_bin(standin_bin: Path, release: str) -> Path:
    """An ``openvmm`` that stands in for one of openvmm's release branches (the probe of
    --version and --help runs it too, so the release is in the binary, not the vm_config)."""
    exe = standin_bin / f"openvmm-{release}"
    exe.write_text(f'#!/bin/sh\nTESTBED_STANDIN_RELEASE={release} exec "{standin_bin}/openvmm" "$@"\n')
    exe.chmod(0o755)
    return exe


def test_older_openvmm_builds_are_read_as_they_print(ov_config, standin_bin: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """release/2505 logs the phases under hvlite_helpers (the default log filter names it),
    has no --version (clap refuses it) and no COM3 receipt line (the phase says who prints
    it); release/2411 runs service-vtl2 in the console's foreground, so a shot typed during
    servicing is an infra-error that says why, and one typed after it is read as usual."""
    cfg = ov_config(name="ov-2505", binary=str(release_bin(standin_bin, "2505")), shutdown_grace_ms=1500)
    pb = tmp_path / "phases.yaml"
    pb.write_text(f"name: ov-2505\nvm_config: {cfg}\nstrategy: none\nreset: cold\nexpect: {{}}\n"
                  "schedule: {kind: phases, phases: [reload, received], delays_ms: [0], midpoint: false, "
                  "repeat: 1}\n")  # fmt: skip
    r = cli("run", str(pb), "--out", str(tmp_path / "r2505"))
    by_phase = {str(x["phase"]): x for x in records(tmp_path / "r2505")}
    # "reloading IGVM file" (DEBUG, hvlite_helpers) came and the shot followed it: a verdict
    # of servicing (taken and lost, or refused while the IC is closed), not "never came"
    reload = by_phase["reload"]
    assert reload["verdict"] in ("lost", "rejected"), (reload, r.stderr[-2000:])
    assert reload["phase_to_fire_ms"] is not None and float(reload["phase_to_fire_ms"]) >= 0  # type: ignore[arg-type]
    received = by_phase["received"]
    assert received["verdict"] == "infra-error" and "#2672" in str(received["reason"]), received
    run = json.loads((tmp_path / "r2505" / "run.json").read_text())
    assert run["openvmm_version"].startswith("unknown (this build has no --version"), run["openvmm_version"]

    # The second shot comes well after servicing returns (about 0.5 s here) and within the
    # grace the driver waits after it: a loaded machine's slower servicing still fits.
    cfg = ov_config(name="ov-2411", binary=str(release_bin(standin_bin, "2411")), shutdown_grace_ms=3000)
    pb = tmp_path / "fg.yaml"
    pb.write_text(f"name: ov-2411\nvm_config: {cfg}\nstrategy: none\nreset: cold\nexpect: {{}}\niterations: 2\n"
                  "schedule: {kind: fixed, offsets_ms: [150, 2500]}\n")  # fmt: skip
    r = cli("run", str(pb), "--out", str(tmp_path / "r2411"))
    recs = records(tmp_path / "r2411")
    assert [x["verdict"] for x in recs] == ["infra-error", "preserved"], [x["reason"] for x in recs]
    assert "foreground" in str(recs[0]["reason"]) and "#1364" in str(recs[0]["reason"]), recs[0]["reason"]
