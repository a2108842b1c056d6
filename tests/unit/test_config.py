from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from testbed.backends.qemu.capabilities import servicing_phases
from testbed.core.config import ConfigError, check_expectation, load_model
from testbed.engine.playbook import Playbook, load_playbook, load_vm_config

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_shipped_configs_and_playbooks_load() -> None:
    cfg = load_vm_config(ROOT / "vm_configs/reference-linux.yaml")
    assert cfg.lab.save_ms >= 300  # CI window: >= 10x the servicing-start jitter
    for pb in sorted((ROOT / "playbooks").glob("*.yaml")):
        playbook, vmc = load_playbook(pb)
        assert playbook.resolved_cases(), pb
        assert vmc.name == "reference-linux"


def test_unknown_key_names_file_and_line(tmp_path: Path) -> None:
    p = write(tmp_path, "name: x\nmemory_mib: 256\nlab:\n  save_ms: 10\n  sav_ms: 3\n")
    with pytest.raises(ConfigError) as e:
        load_vm_config(p)
    assert e.value.line == 5
    assert str(e.value).startswith(f"{p}:5: ")
    assert "unknown key 'lab.sav_ms'" in str(e.value)


def test_wrong_type_and_bad_value_lines(tmp_path: Path) -> None:
    p = write(tmp_path, "name: x\ncpus: many\n")
    with pytest.raises(ConfigError) as e:
        load_vm_config(p)
    assert e.value.line == 2 and "cpus" in e.value.message
    p = write(tmp_path, "name: x\n\naccel: vmware\n")
    with pytest.raises(ConfigError) as e:
        load_vm_config(p)
    assert e.value.line == 3 and "'auto', 'kvm' or 'tcg'" in e.value.message
    p = write(tmp_path, "name: x\nparavisor:\n  version: v9\n")
    with pytest.raises(ConfigError) as e:
        load_vm_config(p)
    assert e.value.line == 3 and "v2-replay" in e.value.message


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    p = write(tmp_path, "name: x\nlab: [1, 2\ncpus: 1\n")
    with pytest.raises(ConfigError) as e:
        load_vm_config(p)
    assert e.value.line is not None and e.value.line >= 2
    assert "YAML syntax" in e.value.message


def test_playbook_schedule_and_expect_validation(tmp_path: Path) -> None:
    p = write(tmp_path, "name: p\nvm_config: x.yaml\nschedule:\n  kind: linear\n  start_ms: 0\n")
    with pytest.raises(ConfigError) as e:
        load_model(p, Playbook)
    assert e.value.line == 3 and "stop_ms, count" in e.value.message
    p = write(tmp_path, "name: p\nvm_config: x.yaml\nexpect:\n  lots: 0\n")
    with pytest.raises(ConfigError) as e:
        load_model(p, Playbook)
    assert e.value.line == 3 and "unknown verdict 'lots'" in e.value.message
    p = write(tmp_path, "name: p\nvm_config: missing.yaml\n")
    with pytest.raises(ConfigError) as e:
        load_playbook(p)
    assert e.value.line == 2 and "not found" in e.value.message


def test_expectations() -> None:
    assert check_expectation(0, 0) and not check_expectation(0, 1)
    assert check_expectation(">0", 3) and not check_expectation(">0", 0)
    assert check_expectation("<=2", 2) and not check_expectation("<=2", 3)


def test_cli_config_error_exit_code_2_without_traceback(tmp_path: Path) -> None:
    p = write(tmp_path, "name: p\nvm_config: ../nope.yaml\niterations: -3\n")
    r = subprocess.run([sys.executable, "-m", "testbed.cli", "run", str(p)], capture_output=True, text=True)
    assert r.returncode == 2
    assert f"{p}:3:" in r.stderr.replace("\n", "")
    assert "Traceback" not in r.stderr


def test_cli_help_everywhere() -> None:
    for args in (
        [],
        ["run"],
        ["image", "build"],
        ["vm", "up"],
        ["host", "check"],
        ["gc"],
        ["report"],
    ):
        r = subprocess.run(
            [sys.executable, "-m", "testbed.cli", *args, "--help"], capture_output=True, text=True
        )
        assert r.returncode == 0, (args, r.stderr)
        assert "Usage" in r.stdout
    r = subprocess.run([sys.executable, "-m", "testbed.cli", "--help"], capture_output=True, text=True)
    assert "130" in r.stdout and "infrastructure" in r.stdout  # exit codes are documented


def test_ic_ready_needs_delays_and_servicing(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "name: p\nvm_config: x.yaml\nshutdown: ic-ready\nschedule: {kind: fixed, offsets_ms: [0, -50]}\n",
    )
    with pytest.raises(ConfigError) as e:
        load_model(p, Playbook)
    assert "offsets must be >= 0 (got -50 ms)" in e.value.message and str(p) in str(e.value)
    p = write(tmp_path, "name: p\nvm_config: x.yaml\nshutdown: ic-ready\nservicing: false\n")
    with pytest.raises(ConfigError, match="it needs servicing: true"):
        load_model(p, Playbook)


def test_a_backend_without_the_shutdown_mode_refuses_the_run_before_it_starts(tmp_path: Path) -> None:
    """The out-of-tree table backend fires at offsets only (every in-tree kind has every mode)."""
    import sys

    from testbed.core.config import HostEntry
    from testbed.engine.options import RunOptions
    from testbed.engine.runner import Runner

    sys.path.insert(0, str(ROOT / "tests" / "plugins_site"))
    from tablebackend import TableBackend  # type: ignore[import-not-found]

    pb, cfg = load_playbook(ROOT / "playbooks" / "ic-ready-delay.yaml")
    backend = TableBackend(HostEntry(name="t", uri="table://1", kind="table"))  # never called
    path = ROOT / "playbooks" / "ic-ready-delay.yaml"
    with pytest.raises(
        ConfigError, match="shutdown 'ic-ready': the table backend cannot fire the shutdown a delay"
    ) as e:
        Runner(pb, cfg, RunOptions(out=tmp_path / "r", backend=backend), playbook_path=path)
    line = next(i for i, ln in enumerate(path.read_text().splitlines(), 1) if ln.startswith("shutdown:"))
    assert (e.value.path, e.value.line) == (path, line)  # the key that asked, with the backend's reason
    assert "a table has no IC to wait for" in e.value.message


def test_phase_schedules_are_refused_where_phases_cannot_be_seen(tmp_path: Path) -> None:
    from testbed.backends.hyperv.backend import HyperVBackend
    from testbed.backends.qemu.backend import QemuBackend
    from testbed.engine.options import RunOptions
    from testbed.engine.runner import Runner
    from testbed.transport.powershell import PowerShellRunner

    pb, cfg = load_playbook(ROOT / "playbooks" / "phase-sweep.yaml")
    hv = Runner(pb, cfg, RunOptions(out=tmp_path / "r", backend=HyperVBackend(PowerShellRunner())))
    assert {p.phase for p in hv.plans(hv.cases()[0], 0)} == {
        "received", "stopping", "vtl2-restart", "state-received", "resuming", "job-done"
    }  # fmt: skip
    bad = pb.model_copy(update={"schedule": pb.schedule.model_copy(update={"phases": ["quiesce"]})})
    qemu = QemuBackend.__new__(QemuBackend)  # the refusal needs no agent: nothing is started
    qemu.kind, qemu.host = "qemu", "local"
    with pytest.raises(ConfigError, match="phases quiesce are not observable with strategy none"):
        Runner(bad, cfg, RunOptions(out=tmp_path / "r2", backend=qemu))
    ok = Runner(
        pb.model_copy(update={"strategy": "mask"}), cfg, RunOptions(out=tmp_path / "r3", backend=qemu)
    )
    case = ok.cases()[0]
    assert ok.iterations_of(case) == (12 * 2 + 11) * 3  # 12 phases with mask, 2 delays, midpoints, repeat 3
    plans = list(ok.plans(case, 0))[: 12 * 2 * 3]
    assert {(p.phase, p.offset_ms) for p in plans} == {(ph, d) for ph in servicing_phases("mask")
                                                      for d in (0.0, 2.0)}  # fmt: skip
    assert {p.shutdown_mode for p in plans} == {"phase"}
