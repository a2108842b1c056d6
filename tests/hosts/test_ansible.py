"""Host preparation with Ansible: syntax, the Windows play's modules and arguments, and a
real run of kvm-host.yml against a clean Debian host over SSH (twice: the second changes nothing)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from clirun import run_cli  # type: ignore[import-not-found]
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PLAYS = ROOT / "playbooks" / "hosts"
ANSIBLE_ENV = {
    "ANSIBLE_NOCOLOR": "1",
    "ANSIBLE_LOCALHOST_WARNING": "0",
    "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0",
}


def need_ansible() -> None:
    if not (BIN / "ansible-playbook").exists():
        pytest.fail("Ansible is not installed: pip install -e '.[hosts]' (.ci/run installs it)")


@pytest.mark.parametrize("play", ["kvm-host.yml", "hyperv-host.yml", "openvmm-host.yml"])
def test_playbook_syntax(play: str) -> None:
    need_ansible()
    import os

    r = subprocess.run([str(BIN / "ansible-playbook"), "--syntax-check", "-i", "localhost,", str(PLAYS / play)],
                       capture_output=True, text=True, env={**os.environ, **ANSIBLE_ENV})  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def module_options(module: str) -> set[str]:
    r = subprocess.run([str(BIN / "ansible-doc"), "-j", module], capture_output=True, text=True)
    assert r.returncode == 0, f"module {module} is not in the installed collections: {r.stderr[-300:]}"
    doc = json.loads(r.stdout)[module]["doc"]
    names = set()
    for name, spec in doc.get("options", {}).items():
        names.add(name)
        names.update(spec.get("aliases", []))
    return names


TASK_KEYWORDS = {"name", "when", "register", "loop", "changed_when", "failed_when", "environment", "become",
                 "vars", "tags", "notify", "ignore_errors", "args"}  # fmt: skip


@pytest.mark.parametrize("play", ["hyperv-host.yml", "openvmm-host.yml"])
def test_windows_playbook_uses_real_modules_with_valid_arguments(play: str) -> None:
    """It cannot run here: check every task's module exists (ansible-doc) and takes its arguments."""
    need_ansible()
    plays = YAML(typ="safe").load((PLAYS / play).read_text())
    modules = []
    for task in plays[0]["tasks"]:
        mods = [k for k in task if k not in TASK_KEYWORDS]
        assert len(mods) == 1, task
        mod = mods[0]
        assert mod.startswith(("ansible.windows.", "community.windows.", "chocolatey.chocolatey.")), mod
        args = task[mod]
        if isinstance(args, dict):
            unknown = set(args) - module_options(mod)
            assert not unknown, f"{mod}: unknown arguments {unknown}"
        else:
            module_options(mod)  # free-form (win_shell): the module must still exist
        modules.append(mod)
    assert "ansible.windows.win_optional_feature" in modules and "ansible.windows.win_reboot" in modules
    if play == "hyperv-host.yml":  # client editions use the optional feature, Server the role
        assert "ansible.windows.win_feature" in modules and "ansible.windows.win_regedit" in modules


def test_inventory_renders_for_ansible_without_secrets(tmp_path: Path) -> None:
    inv = tmp_path / "hosts.yaml"
    inv.write_text("hosts:\n  - {name: kvm1, uri: 'ssh://lab@10.0.0.5:2222', identity_file: /k, labels: [a]}\n"
                   "  - {name: hv1, uri: 'winrms://admin@hv1', kind: hyperv, password_env: HV_PASS}\n")  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "testbed.cli", "host", "inventory", "--inventory", str(inv),
                        "--format", "ansible"], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    data = YAML(typ="safe").load(r.stdout)
    kvm = data["all"]["children"]["testbed_qemu"]["hosts"]["kvm1"]
    assert kvm["ansible_host"] == "10.0.0.5" and kvm["ansible_port"] == 2222 and kvm["ansible_user"] == "lab"
    hv = data["all"]["children"]["testbed_hyperv"]["hosts"]["hv1"]
    assert hv["ansible_connection"] == "winrm" and hv["ansible_port"] == 5986
    assert hv["ansible_password"] == "{{ lookup('env', 'HV_PASS') }}"  # a reference, never the secret


@pytest.mark.vm
def test_prepare_a_clean_debian_host_twice_then_check_it(tmp_path: Path) -> None:
    need_ansible()
    if shutil.which("chroot") is None:
        pytest.fail("chroot missing")
    sys.path.insert(0, str(Path(__file__).parent))
    from freshroot import fresh_debian_host  # type: ignore[import-not-found]

    with fresh_debian_host(tmp_path) as host:
        inv = tmp_path / "hosts.yaml"
        inv.write_text(f"hosts:\n  - name: fresh\n    uri: ssh://root@127.0.0.1:{host.port}\n"
                       f"    identity_file: {host.key}\n    known_hosts: {host.known_hosts}\n")  # fmt: skip
        runs = []
        for _ in range(2):
            r = run_cli("host", "prepare", "fresh", "--inventory", str(inv), timeout=1500)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
            row = next(
                ln for ln in r.stdout.splitlines() if ln.strip().startswith("│ fresh") or " fresh " in ln
            )
            runs.append([int(x) for x in row.replace("│", " ").split()[1:5]])
        (ok1, changed1, unreachable1, failed1), (ok2, changed2, unreachable2, failed2) = runs
        assert changed1 > 0 and failed1 == 0 and unreachable1 == 0
        assert changed2 == 0 and failed2 == 0, "a second run must change nothing"
        r = run_cli("host", "check", "fresh", "--inventory", str(inv), timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "host: qemu" in r.stdout
        # ...and a suite runs on the prepared host: a short race over SSH gives the lab's verdicts.
        from testbed.backends.qemu.backend import QemuBackend
        from testbed.engine.options import RunOptions
        from testbed.engine.playbook import Playbook, ScheduleSpec, load_vm_config
        from testbed.engine.runner import Runner
        from testbed.transport.ssh import SshTransport

        t = SshTransport(
            "127.0.0.1", host.port, "root", identity=str(host.key), known_hosts=str(host.known_hosts)
        )
        pb = Playbook(
            name="on-prepared-host",
            vm_config="-",
            strategy="none",
            iterations=2,
            reset="snapshot",
            schedule=ScheduleSpec(kind="fixed", offsets_ms=[-300.0, 150.0]),
            grace_ms=1200,
            expect={},
        )
        res = Runner(pb, load_vm_config(ROOT / "vm_configs/reference-linux.yaml"),
                     RunOptions(out=tmp_path / "run", backend=QemuBackend(t))).run()  # fmt: skip
        assert [rec["verdict"] for rec in res.records] == ["delivered-before", "lost"]
