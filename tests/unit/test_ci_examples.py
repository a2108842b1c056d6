"""The CI examples that ship in ci/: they parse, and what they run exists."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_OPTIONS = {"--testbed-host", "--testbed-inventory", "--testbed-vm-config", "--testbed-out",
                  "--testbed-keep-failed", "--testbed-require", "--junitxml"}  # fmt: skip


def commands(path: Path) -> list[str]:
    if path.suffix == ".sh":
        return [ln.strip() for ln in path.read_text().splitlines() if ln.strip().startswith(".venv/bin/")]
    data = YAML(typ="safe").load(path.read_text())
    steps = data["jobs"]["lab-suite"]["steps"] if "jobs" in data else data["steps"]
    return [
        s.get("run") or s.get("script") or s.get("pwsh") for s in steps if {"run", "script", "pwsh"} & set(s)
    ]


@pytest.mark.parametrize(
    "name", ["github-actions-hyperv.yml", "github-actions-openvmm.yml", "azure-pipelines.yml", "run-suite.sh"]
)
def test_ci_example_commands_exist(name: str) -> None:
    cmds = commands(ROOT / "ci" / name)
    assert any("pytest suites/" in c for c in cmds)
    for c in cmds:
        for part in c.split("&&"):
            argv = shlex.split(re.sub(r"\$\([^)]*\)|\$\{?\w+\}?", "X", part.strip()))
            if not argv or not argv[0].endswith(("testbed", "pytest")):
                continue
            if argv[0].endswith("pytest"):
                unknown = {a for a in argv if a.startswith("--")} - PLUGIN_OPTIONS
                assert not unknown, f"{name}: pytest options the plugin does not define: {unknown}"
                continue
            sub = [a for a in argv[1:3] if not a.startswith("-") and a not in ("X",)]
            words = sub[:2] if sub and sub[0] in ("host", "image", "vm") else sub[:1]
            r = subprocess.run(
                [sys.executable, "-m", "testbed.cli", *words, "--help"], capture_output=True, text=True
            )
            assert r.returncode == 0, f"{name}: 'testbed {' '.join(words)}' does not exist"
            for opt in (a.split("=")[0] for a in argv if a.startswith("--")):
                assert opt in r.stdout, f"{name}: testbed {' '.join(words)} has no option {opt}"


@pytest.mark.parametrize("name", ["github-actions-hyperv.yml", "azure-pipelines.yml"])
def test_windows_examples_use_the_windows_venv_and_the_hyperv_suite(name: str) -> None:
    cmds = commands(ROOT / "ci" / name)
    assert not any(".venv/bin/" in c for c in cmds)  # a Windows venv has Scripts/, not bin/
    suite = next(c for c in cmds if "pytest suites/" in c)
    assert (
        "--testbed-vm-config vm_configs/hyperv-openhcl.yaml" in suite and "--testbed-require hyperv" in suite
    )


def test_github_workflow_targets_the_hyperv_runner_and_uploads() -> None:
    data = YAML(typ="safe").load((ROOT / "ci/github-actions-hyperv.yml").read_text())
    job = data["jobs"]["lab-suite"]
    assert job["runs-on"] == ["self-hosted", "hyperv"]
    assert any(s.get("uses", "").startswith("actions/upload-artifact") for s in job["steps"])


def test_openvmm_workflow_targets_its_runner_and_requires_the_kind() -> None:
    data = YAML(typ="safe").load((ROOT / "ci/github-actions-openvmm.yml").read_text())
    job = data["jobs"]["lab-suite"]
    assert job["runs-on"] == ["self-hosted", "openvmm"]
    suite = next(c for c in commands(ROOT / "ci/github-actions-openvmm.yml") if "pytest suites/" in c)
    assert (
        "--testbed-vm-config vm_configs/openvmm-openhcl.yaml" in suite
        and "--testbed-require openvmm" in suite
    )
    inv = YAML(typ="safe").load((ROOT / "ci/hosts-openvmm.yaml").read_text())
    assert inv["hosts"][0]["kind"] == "openvmm"
