"""Files and command lines nobody here wrote: every problem ends in exit 2 and
``file:line: what is wrong``, before anything is provisioned, never a traceback; a run
that measured nothing exits 3; no password reaches a message."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from testbed.core.capabilities import Capabilities
from testbed.core.config import ConfigError
from testbed.engine.playbook import load_playbook, load_vm_config
from testbed.hosts import load_inventory

ROOT = Path(__file__).resolve().parents[2]
# A host that cannot be reached: a command that got as far as provisioning would fail
# there with exit 3, so exit 2 proves the input was refused first.
DEAD_HOST = "ssh://nobody@127.0.0.1:1"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "testbed.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "250", **(env or {})})  # fmt: skip


def refused(r: subprocess.CompletedProcess[str], *words: str) -> None:
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "Traceback" not in out, out
    for w in words:
        assert w in out, out


def playbook(tmp_path: Path, body: str, name: str = "pb.yaml") -> Path:
    (tmp_path / "vm.yaml").write_text((ROOT / "vm_configs/reference-linux.yaml").read_text())
    p = tmp_path / name
    p.write_text("name: t\nvm_config: vm.yaml\n" + body)
    return p


def test_paths_that_are_folders(tmp_path: Path) -> None:
    refused(cli("run", str(playbook(tmp_path, "")), "--vm-config", str(tmp_path), "--host", DEAD_HOST),
            "is a folder, not a YAML file")  # fmt: skip
    refused(
        cli("run", str(playbook(tmp_path, "")), "--inventory", str(tmp_path), "--host", "lab1"), "is a folder"
    )
    (tmp_path / "sub").mkdir()
    p = tmp_path / "pb2.yaml"
    p.write_text("name: t\nvm_config: sub\n")
    refused(cli("run", str(p), "--host", DEAD_HOST), f"{p}:2", "is a folder")
    p.write_text("name: t\nvm_config: ''\n")
    refused(cli("run", str(p), "--host", DEAD_HOST), f"{p}:2", "vm_config is empty")


@pytest.mark.parametrize(
    ("data", "said"),
    [(b"name: t\nvm_config: vm.yaml\niterations: 3\x00\n", ":3: a NUL byte"),
     (b"name: t\n# caf\xe9\nvm_config: vm.yaml\n", ":2: not UTF-8"),
     (b"name: t\nvm_config: vm.yaml\x07\n", ":2: YAML cannot read it")],
)  # fmt: skip
def test_bytes_yaml_cannot_read(tmp_path: Path, data: bytes, said: str) -> None:
    playbook(tmp_path, "")
    for target in ("pb.yaml", "inv.yaml"):
        p = tmp_path / target
        p.write_bytes(data)
        args = (
            ["run", str(p), "--host", DEAD_HOST]
            if target == "pb.yaml"
            else ["host", "inventory", "--inventory", str(p)]
        )
        refused(cli(*args), f"{p}{said}")


@pytest.mark.parametrize(
    ("body", "said"),
    [
        ("schedule: {kind: fixed, offsets_ms: [.nan]}\n", "schedule.offsets_ms.0"),
        ("schedule: {kind: fixed, offsets_ms: [1e999]}\n", "schedule.offsets_ms.0"),
        ("schedule: {kind: fixed, offsets_ms: []}\n", "schedule.offsets_ms"),
        ("schedule: {kind: linear, start_ms: 5, stop_ms: 1, count: 0}\n", "schedule.count"),
        ("grace_ms: -5\n", "grace_ms"),
        ("grace_ms: .inf\n", "grace_ms"),
        ("expect: {lost: -1}\n", "is not a count"),
        ("iterations: 0\n", "iterations"),
    ],
)
def test_values_that_parse_but_make_no_sense(tmp_path: Path, body: str, said: str) -> None:
    p = playbook(tmp_path, body)
    refused(cli("run", str(p), "--host", DEAD_HOST), f"{p}:3", said)


@pytest.mark.parametrize("offsets", ["nan", "1e999,5", "random:0:100:200000", "linear:5:1:0", "inf"])
def test_bad_offsets_are_refused_before_provisioning(tmp_path: Path, offsets: str) -> None:
    refused(
        cli("run", str(playbook(tmp_path, "")), "--offsets", offsets, "--host", DEAD_HOST), "bad --offsets"
    )


@pytest.mark.parametrize("n", ["0", "-1"])
def test_zero_or_negative_iterations_is_a_usage_error(tmp_path: Path, n: str) -> None:
    refused(cli("run", str(playbook(tmp_path, "")), "--iterations", n, "--host", DEAD_HOST), "--iterations")


def test_an_empty_pattern_matches_everything_and_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "hv.yaml"
    p.write_text("name: hv\nbackend: hyperv\nhyperv:\n  igvm: {path: a}\n  vtl0_vhd: {path: b}\n"
                 "  vtl0_shutdown_pattern: ''\n")  # fmt: skip
    with pytest.raises(ConfigError) as e:
        load_vm_config(p)
    assert e.value.line == 6 and "empty pattern" in str(e.value)


class TableHost:
    kind, host = "qemu", "nowhere"
    capabilities = Capabilities(shutdown_modes=("offset",))


def test_the_offsets_count_sets_the_iterations_and_the_run_says_so(tmp_path: Path) -> None:
    from testbed.engine.options import RunOptions
    from testbed.engine.runner import Runner
    from testbed.engine.schedule import parse_schedule

    pb, cfg = load_playbook(ROOT / "playbooks/servicing-shutdown-ic.yaml")
    table = TableHost()  # a backend that is never called: planning needs only its declared capabilities
    r = Runner(pb, cfg, RunOptions(offsets=parse_schedule("random:-30:60:80"), backend=table))  # type: ignore[arg-type]
    assert [c.iterations for c in r.cases()] == [80]  # not the playbook's 16
    r = Runner(pb, cfg, RunOptions(offsets=parse_schedule("10,50,90"), iterations=7, backend=table))  # type: ignore[arg-type]
    assert r.describe() == "servicing-shutdown-ic: 7 iterations, schedule fixed of 3 offsets, cycled to 7"
    assert "its number of offsets sets the iterations" in " ".join(cli("run", "--help").stdout.split())


def test_no_password_in_any_message(tmp_path: Path) -> None:
    inv = tmp_path / "inv.yaml"
    inv.write_text("hosts:\n  - name: h\n    uri: ssh://tester:hunter2@lab.example\n")
    r = cli("host", "inventory", "--inventory", str(inv))
    refused(r, "no passwords in URIs", "ssh://tester:***@lab.example")
    assert "hunter2" not in r.stdout + r.stderr
    r = cli("run", str(playbook(tmp_path, "")), "--host", "ssh://tester:hunter2@lab.example")
    refused(r, "***")
    assert "hunter2" not in r.stdout + r.stderr
    # A password in the environment (password_env) never shows, even with debug logging.
    r = cli("-v", "host", "check", "winrm://tester@127.0.0.1:1", env={"TESTBED_WINRM_PASSWORD": "s3cr3t-pw"})
    assert r.returncode == 3 and "s3cr3t-pw" not in r.stdout + r.stderr


# ---- fuzzing the loaders: any damage is a ConfigError, nothing else ----------------------

SHIPPED = (
    sorted((ROOT / "playbooks").glob("*.yaml"))
    + sorted((ROOT / "vm_configs").glob("*.yaml"))
    + sorted((ROOT / "ci").glob("hosts-*.yaml"))
)
WEIRD = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.text(max_size=8),
                  st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0]), st.lists(st.integers(), max_size=3),
                  st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))  # fmt: skip


def _paths(node: object, prefix: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _load(path: Path) -> None:
    loader = {"vm_configs": load_vm_config, "ci": load_inventory}.get(path.parent.name, load_playbook)
    try:
        loader(path)
    except ConfigError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_shipped_files_give_config_errors_only(
    data: st.DataObject, tmp_path_factory: pytest.TempPathFactory
) -> None:
    src = data.draw(st.sampled_from(SHIPPED))
    yaml = YAML(typ="safe")
    doc = yaml.load(src.read_text())
    target = data.draw(st.sampled_from(_paths(doc)))
    parent = doc
    for k in target[:-1]:
        parent = parent[k]  # type: ignore[index]
    how = data.draw(st.sampled_from(["delete", "rename", "retype"]))
    key = target[-1]
    if how == "delete":
        del parent[key]  # type: ignore[attr-defined]
    elif how == "rename" and isinstance(parent, dict):
        parent[data.draw(st.text(min_size=1, max_size=10))] = parent.pop(key)
    else:
        parent[key] = data.draw(WEIRD)  # type: ignore[index]
    d = tmp_path_factory.mktemp("fuzz") / src.parent.name
    d.mkdir()
    out = d / src.name
    with out.open("w") as f:
        yaml.dump(doc, f)
    for vm in (ROOT / "vm_configs").glob("*.yaml"):  # what playbooks name, beside them
        if not (d.parent / "vm_configs" / vm.name).exists() and src.parent.name == "playbooks":
            (d.parent / "vm_configs").mkdir(exist_ok=True)
            (d.parent / "vm_configs" / vm.name).write_text(vm.read_text())
    _load(out)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(src=st.sampled_from(SHIPPED), at=st.floats(0, 1), junk=st.binary(min_size=1, max_size=4))
def test_fuzzed_bytes_give_config_errors_only(src: Path, at: float, junk: bytes,
                                             tmp_path_factory: pytest.TempPathFactory) -> None:  # fmt: skip
    raw = src.read_bytes()
    i = int(at * len(raw))
    d = tmp_path_factory.mktemp("bytes") / src.parent.name
    d.mkdir()
    (d / src.name).write_bytes(raw[:i] + junk + raw[i:])
    _load(d / src.name)


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("schedule: {kind: fixed, offsets_ms: [1e300]}", "less than or equal to 600000"),
        ("schedule: {kind: adaptive, lo_ms: -1e9, hi_ms: 5}", "greater than or equal to -600000"),
        (
            "schedule: {kind: adaptive, lo_ms: 0, hi_ms: 5, resolution_ms: 1e12}",
            "less than or equal to 60000",
        ),
        ("seed: -3", "greater than or equal to 0"),
        ("max_infra_errors: 99999999999", "less than or equal to 1000000"),
        ("iterations: 99999999999999999999", "less than or equal to 1000000"),
    ],
)
def test_playbook_counts_and_durations_have_bounds_with_the_line(
    tmp_path: Path, line: str, words: str
) -> None:
    (tmp_path / "vm.yaml").write_text("name: m\nbackend: mock\n")
    p = tmp_path / "pb.yaml"
    p.write_text(f"name: t\nvm_config: vm.yaml\n{line}\n")
    with pytest.raises(ConfigError) as e:
        load_playbook(p)
    assert e.value.line == 3 and words in e.value.message, e.value
