"""The OpenVMM backend end to end against the stand-in openvmm (a real pty, the real
console protocol and log format, a reference-lab guest behind it): the shipped
playbook through the CLI reproduces #954 with ``none`` and shows #962 with
``pause-resume``; faults give their verdicts; the same race runs over a real sshd."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.backends.openvmm.backend import OpenVmmBackend
from testbed.core.evidence import RacePlan
from testbed.engine.iterate import iterate
from testbed.engine.playbook import load_vm_config

pytestmark = pytest.mark.vm
ROOT = Path(__file__).resolve().parents[2]
OFFSETS = "-300,150,900"  # before servicing, inside the save window, after servicing


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "testbed.cli", *args], capture_output=True, text=True, timeout=600
    )


def verdicts(run: Path) -> list[str]:
    return [json.loads(ln)["verdict"] for ln in (run / "results.jsonl").read_text().splitlines()]


def test_playbook_reproduces_954_with_none_and_962_with_pause_resume(ov_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = ov_config()
    runs = {}
    for strategy in ("none", "pause-resume"):
        runs[strategy] = tmp_path / strategy
        r = cli("run", str(ROOT / "playbooks/servicing-shutdown-ic.yaml"), "--vm-config", str(cfg), "--strategy",
                strategy, "--offsets", OFFSETS, "--iterations", "3", "--out", str(runs[strategy]))  # fmt: skip
        assert r.returncode == (1 if strategy == "none" else 0), r.stdout + r.stderr
    assert verdicts(runs["none"]) == ["delivered-before", "lost", "preserved"]
    assert verdicts(runs["pause-resume"]) == ["delivered-before", "preserved", "preserved"]
    rec = json.loads((runs["none"] / "results.jsonl").read_text().splitlines()[1])
    assert abs(rec["skew_ms"]) < 5 and rec["guest_offset_ms"] is not None  # COM3's servicing start
    assert "vtl2 servicing complete" in (runs["none"] / "iterations/0001/log.log").read_text()
    run = json.loads((runs["none"] / "run.json").read_text())
    assert run["host_kind"] == "openvmm" and run["openvmm_version"].startswith("openvmm ")
    r = cli("compare", str(runs["none"]), str(runs["pause-resume"]))
    assert r.returncode == 0 and "Fisher exact test" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize(
    ("cmdline", "image", "expected", "said"),
    [
        (["OPENHCL_TEST_CONFIG=SERVICING_SAVE_FAIL"], None, "servicing-failed", "vtl2 servicing failed"),
        (
            ["OPENHCL_TEST_CONFIG=SERVICING_SAVE_STUCK"],
            None,
            "servicing-failed",
            "no 'vtl2 servicing complete' within",
        ),
        ([], "panicky", "guest-crash", "reason=TripleFault"),  # servicing into a build that panics in restore
    ],
)
def test_faults_give_their_verdicts(ov_config, cmdline: list[str], image: str | None, expected: str, said: str,  # type: ignore[no-untyped-def]
                                    tmp_path: Path) -> None:  # fmt: skip
    from openvmm_standin import igvm_file  # type: ignore[import-not-found]

    panicky = str(igvm_file(tmp_path, "v2-panic"))
    cfg = load_vm_config(ov_config(openhcl_cmdline=cmdline, images={"panicky": panicky}))
    with OpenVmmBackend() as b:
        vm = b.provision(cfg, "pause-resume")
        r = iterate(b, vm, RacePlan(1, 150.0, image=image), 1500.0, dest=tmp_path / "it")
    assert r.verdict.kind == expected, r.verdict
    assert said in r.verdict.reason + " ".join(r.verdict.evidence)


def test_a_shutdown_after_servicing_in_the_seed_order_and_cross_version(ov_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The seed's order (service, then shutdown once servicing completed), into another build."""
    cfg = load_vm_config(ov_config())
    with OpenVmmBackend() as b:
        vm = b.provision(cfg, "none")
        r = iterate(b, vm, RacePlan(1, None, True, True, "after-ready", "v1"), 1500.0, dest=tmp_path / "it")
    assert r.verdict.kind in ("preserved", "rejected"), r.verdict  # refused while the IC reopens is allowed
    assert "service-vtl2 --igvm" in (tmp_path / "it" / "console.log").read_text()


def test_history_that_cannot_be_written_aborts_openvmm(ov_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "state").write_text("a file where the state folder should be")
    cfg = load_vm_config(ov_config(env={"XDG_STATE_HOME": str(tmp_path / "state")}))
    with OpenVmmBackend() as b:
        vm = b.provision(cfg, "none")
        r = iterate(b, vm, RacePlan(1, 150.0), 1500.0)
    assert r.verdict.kind == "infra-error" and "openvmm exited" in r.verdict.reason, r.verdict


def test_over_ssh_with_the_standin_on_the_hosts_path(ov_config, standin_bin: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from sshd import run_sshd  # type: ignore[import-not-found]

    from testbed.core.config import HostEntry
    from testbed.core.paths import cache_dir
    from testbed.hosts import open_backend

    cfg = load_vm_config(ov_config(binary="openvmm"))  # found on the host's PATH
    env = {"PATH": f"{standin_bin}:/usr/bin:/bin", "TESTBED_STANDIN_CACHE_DIR": str(cache_dir())}
    with run_sshd(tmp_path / "sshd", env=env) as s:
        entry = HostEntry(name="ov-ssh", uri=s.uri, kind="openvmm", identity_file=str(s.key),
                          known_hosts=str(s.known_hosts))  # fmt: skip
        backend = open_backend(entry, "openvmm")
        try:
            vm = backend.provision(cfg, "none")
            got = [
                iterate(backend, vm, RacePlan(i, off), 1500.0).verdict.kind
                for i, off in enumerate((150.0, -300.0))
            ]
        finally:
            backend.close()
    assert got == ["lost", "delivered-before"]


def test_openvmm_suite_passes_through_the_plugin(ov_config, pytester: pytest.Pytester) -> None:  # type: ignore[no-untyped-def]
    """suites/test_openvmm_servicing_shutdown_ic.py by pytest with the plugin: a bare
    `local` host is an OpenVMM host because the vm_config says so."""
    r = pytester.runpytest_subprocess(
        str(ROOT / "suites" / "test_openvmm_servicing_shutdown_ic.py"),
        "--testbed-host", "local", "--testbed-vm-config", str(ov_config()),
        "--testbed-require", "openvmm", "-p", "no:cacheprovider", "-rA",
    )  # fmt: skip
    print(r.stdout.str()[-6000:])  # on a failure, the suite's own report says which test and why
    r.assert_outcomes(passed=3)


def test_service_flags_are_a_matrix_dimension_and_a_build_without_one_says_so(
    ov_config, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """lab.nvme_keepalive and lab.mana_keepalive as matrix dimensions: each cell types its
    flags; an openvmm build whose console lacks --mana-keepalive refuses the command (clap),
    and those cells are infra-errors that name the flag, never a servicing verdict."""
    cfg = ov_config(env={"TESTBED_STANDIN_SERVICE_FLAGS": "-u,--user-mode-only,-n,--nvme-keepalive"})
    pb = tmp_path / "flags.yaml"
    pb.write_text(f"name: ov-flags\nvm_config: {cfg}\nstrategy: pause-resume\niterations: 1\nexpect: {{}}\n"
                  "reset: cold\nschedule: {kind: fixed, offsets_ms: [900]}\n"
                  "matrix:\n  dimensions:\n    lab.nvme_keepalive: [0, 1]\n    lab.mana_keepalive: [0, 1]\n")  # fmt: skip
    r = cli("run", str(pb), "--out", str(tmp_path / "run"))
    cells = json.loads((tmp_path / "run" / "matrix.json").read_text())["matrix"]["cells"]
    by = {(c["values"]["lab.nvme_keepalive"], c["values"]["lab.mana_keepalive"]): c for c in cells}
    for (nvme, mana), c in by.items():
        cell = tmp_path / "run" / c["dir"]
        recs = [json.loads(ln) for ln in (cell / "results.jsonl").read_text().splitlines()]
        console = (Path(recs[0]["dir"]) / "console.log").read_text()
        assert ("service-vtl2 -n" in console) == bool(nvme), console[-800:]
        if mana:
            assert recs[0]["verdict"] == "infra-error" and "--mana-keepalive" in recs[0]["reason"], recs[0]
            assert "lacks the flag" in recs[0]["reason"]
        else:
            assert recs[0]["verdict"] == "preserved", recs[0]
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]  # infra-errors: not a product verdict
    assert "ov-flags: a matrix of 4 cells" in r.stdout, r.stdout[-2000:]  # the table, printed
    for c in cells:
        row = next(ln for ln in r.stdout.splitlines() if ln.startswith(f"| {c['name']} |"))
        assert ("infra-error 1" if c["values"]["lab.mana_keepalive"] else "preserved 1") in row, row
