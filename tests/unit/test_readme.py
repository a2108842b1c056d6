"""README's two commands stay true: .ci/run runs command 2 verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    return re.findall(r"```sh\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_has_two_commands_and_ci_runs_the_second() -> None:
    cmds = readme_commands()
    assert len(cmds) == 2
    ci = [
        ln
        for ln in (ROOT / ".ci/run").read_text().splitlines()
        if ln and not ln.startswith(("#", "set ", "cd ", "export "))
    ]
    assert ci == [cmds[1]]
    assert "testbed run playbooks/quick.yaml" in cmds[0] and (ROOT / "playbooks/quick.yaml").exists()
