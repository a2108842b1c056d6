"""What the Hyper-V docs and configs state, checked against the sources (item 9).

- petri's Restart-OpenHCL (petri/src/vm/hyperv/hyperv.psm1) ORs 1 under
  -OverrideVersionChecks and 16 under -DisableNvmeKeepalive, and powershell.rs passes each
  switch only when the test's servicing flags ask for it: petri does not always send 0x11.
- The OpenVMM guide (Guide/src/dev_guide/getting_started/windows.md, reference/openhcl/
  debugging.md) recommends Windows 11 26H1 (build 28000+) for OpenHCL development, says
  24H2/25H2 work, and names Server 2025 only as lacking COM3.
- `&&` between commands is PowerShell 7 syntax; Windows PowerShell 5.1 refuses it.
"""

from __future__ import annotations

import re
from pathlib import Path

from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[2]


def hyperv_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Running against a real Hyper-V host")
    return text[start : text.index("\n## ", start + 1)]


def test_the_vm_config_says_petri_sets_each_options_bit_on_its_own() -> None:
    cfg = (ROOT / "vm_configs" / "hyperv-openhcl.yaml").read_text()
    assert not re.search(r"petri always sends 0x11", cfg)
    assert "petri sets each bit on its own" in cfg
    assert "-OverrideVersionChecks" in cfg and "-DisableNvmeKeepalive" in cfg


def test_the_readme_says_what_is_known_of_server_2025_and_24h2() -> None:
    sec = hyperv_section()
    assert "Windows 11 24H2 / Server 2025 (build 26100) or newer" not in sec
    assert "recommends Windows 11 26H1" in sec and "24H2/25H2 (26100/26200) work" in sec
    assert "Server 2025 shares 24H2's build" in sec and "untested" in sec


def test_the_ci_examples_chain_commands_only_under_powershell_7() -> None:
    """A step with `&&` runs in pwsh, and the README's Hyper-V section says so."""
    gh = YAML(typ="safe").load((ROOT / "ci" / "github-actions-hyperv.yml").read_text())
    job = gh["jobs"]["lab-suite"]
    shell = job.get("defaults", {}).get("run", {}).get("shell")
    for step in job["steps"]:
        if "&&" in str(step.get("run", "")):
            assert step.get("shell", shell) == "pwsh", step
    az = YAML(typ="safe").load((ROOT / "ci" / "azure-pipelines.yml").read_text())
    for step in az["steps"]:
        chained = [v for k, v in step.items() if k in ("pwsh", "powershell", "script") and "&&" in str(v)]
        assert not chained or "pwsh" in step, step
    assert "needs PowerShell 7" in hyperv_section() and "`pwsh`" in hyperv_section()
