"""Host preparation at fleet scale through Ansible (an optional extra: testbed[hosts]).

testbed's inventory is rendered as an Ansible inventory (groups by host kind,
connection settings, never secrets: a password is only ever a lookup of the
environment variable the inventory names), and `testbed host prepare` runs the
playbook of each host's kind with ansible-playbook.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ruamel.yaml import YAML

import testbed
from testbed.backends import registry
from testbed.core.config import HostEntry
from testbed.hosts import Inventory

RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)")


class AnsibleMissing(Exception):
    """ansible-playbook is not installed."""


def project_root() -> Path:
    root = Path(testbed.__file__).resolve().parents[1]
    if not (root / "playbooks" / "hosts").is_dir():
        raise FileNotFoundError(
            "the Ansible playbooks ship with the source tree; run from a clone of testbed"
        )
    return root


def host_vars(h: HostEntry) -> dict[str, Any]:
    v: dict[str, Any] = {"testbed_kind": h.kind, "testbed_labels": list(h.labels)}
    if h.uri == "local":
        v["ansible_connection"] = "local"
        return v
    u = urlparse(h.uri)
    v["ansible_host"] = u.hostname
    if u.username:
        v["ansible_user"] = u.username
    if u.scheme == "ssh":
        v["ansible_connection"] = "ssh"
        v["ansible_port"] = u.port or 22
        if h.identity_file:
            v["ansible_ssh_private_key_file"] = h.identity_file
        if h.known_hosts:
            v["ansible_ssh_common_args"] = (
                f"-o UserKnownHostsFile={h.known_hosts} -o StrictHostKeyChecking=yes"
            )
        if registry.get(h.kind).host_os == "windows":
            v["ansible_shell_type"] = "powershell"
    else:  # winrm / winrms
        v["ansible_connection"] = "winrm"
        v["ansible_port"] = u.port or (5986 if u.scheme == "winrms" else 5985)
        v["ansible_winrm_scheme"] = "https" if u.scheme == "winrms" else "http"
        v["ansible_winrm_transport"] = "ntlm"
    if h.password_env:
        v["ansible_password"] = "{{ lookup('env', '" + h.password_env + "') }}"
    return v


def render_inventory(inv: Inventory) -> dict[str, Any]:
    groups: dict[str, dict[str, Any]] = {}
    for h in inv.hosts:
        groups.setdefault(f"testbed_{h.kind}", {"hosts": {}})["hosts"][h.name] = host_vars(h)
    return {"all": {"children": groups}}


def dump_yaml(data: Any) -> str:
    import io

    y = YAML()
    y.default_flow_style = False
    buf = io.StringIO()
    y.dump(data, buf)
    return buf.getvalue()


def ansible_playbook() -> str:
    exe = shutil.which("ansible-playbook") or str(Path(sys.executable).with_name("ansible-playbook"))
    if not Path(exe).exists():
        raise AnsibleMissing(
            "ansible-playbook not found: pip install 'testbed[hosts]' (Ansible is an optional extra)"
        )
    return exe


def build_wheel(dest: Path) -> Path:
    """The testbed wheel that kvm-host.yml installs on the host."""
    root = project_root()
    # A fixed SOURCE_DATE_EPOCH makes the wheel byte-identical across builds, so
    # copying it to a prepared host is not a change.
    env = {**os.environ, "SOURCE_DATE_EPOCH": "315532800"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(dest), str(root)], check=True, capture_output=True, env=env)  # fmt: skip
    return next(dest.glob("testbed-*.whl"))


@contextmanager
def prepared_inputs(inv: Inventory) -> Iterator[tuple[Path, Path]]:
    with tempfile.TemporaryDirectory(prefix="testbed-prepare-") as tmp:
        d = Path(tmp)
        (d / "inventory.yml").write_text(dump_yaml(render_inventory(inv)))
        yield d / "inventory.yml", build_wheel(d)


def prepare(
    inv: Inventory,
    targets: list[HostEntry],
    on_line: Callable[[str], None],
    extra_env: dict[str, str] | None = None,
) -> dict[str, dict[str, int]]:
    """Run the right playbook for each kind among ``targets``; returns the recap per host."""
    exe = ansible_playbook()
    recap: dict[str, dict[str, int]] = {}
    with prepared_inputs(inv) as (inventory, wheel):
        for kind in sorted({t.kind for t in targets}):
            playbook = registry.get(kind).host_playbook
            if playbook is None:
                for t in targets:
                    if t.kind == kind:
                        recap[t.name] = {"ok": 0, "changed": 0, "unreachable": 0, "failed": 1}
                on_line(f"no preparation playbook for hosts of kind {kind}")
                continue
            names = ",".join(t.name for t in targets if t.kind == kind)
            argv = [exe, "-i", str(inventory), str(project_root() / "playbooks" / "hosts" / playbook),
                    "-e", f"testbed_targets={names}", "-e", f"testbed_wheel={wheel}"]  # fmt: skip
            env = {**os.environ, "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1", **(extra_env or {})}
            p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            assert p.stdout is not None
            for line in p.stdout:
                line = line.rstrip("\n")
                on_line(line)
                m = RECAP.match(line)
                if m:
                    recap[m.group(1)] = dict(zip(("ok", "changed", "unreachable", "failed"),
                                                 map(int, m.groups()[1:]), strict=True))  # fmt: skip
            p.wait()
    return recap
