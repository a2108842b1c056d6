"""Declared capabilities: nothing granted by default, names checked, reasons quoted, and
every shipped kind declares the same value on its kind and on its backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.backends import registry
from testbed.core.capabilities import CAPABILITIES, Capabilities
from testbed.core.config import ConfigError
from testbed.engine import requirements
from testbed.engine.playbook import load_playbook

ROOT = Path(__file__).resolve().parents[2]


def test_nothing_is_granted_by_default() -> None:
    caps = Capabilities()
    assert caps.granted() == []
    assert all(not caps.has(name) for name in CAPABILITIES)
    assert caps.why_not("parallel") == "the backend does not declare it"


def test_unknown_names_are_refused_when_declared() -> None:
    with pytest.raises(ValueError, match="unknown shutdown modes"):
        Capabilities(shutdown_modes=("soon",))
    with pytest.raises(ValueError, match="reasons for unknown capabilities"):
        Capabilities(reasons={"teleport": "no"})


def test_phases_need_both_a_phase_list_and_the_phase_mode() -> None:
    assert not Capabilities(phases=lambda s: ["a"]).has("phases")
    assert not Capabilities(shutdown_modes=("phase",)).has("phases")
    assert Capabilities(shutdown_modes=("phase",), phases=lambda s: ["a"]).has("phases")


@pytest.mark.parametrize("kind", ["qemu", "hyperv", "openvmm"])
def test_each_kind_declares_what_its_backend_does(kind: str) -> None:
    k = registry.get(kind)
    assert k.capabilities.granted(), kind
    missing = [n for n in CAPABILITIES if not k.capabilities.has(n) and n != "shutdown:none"]
    assert all(n in k.capabilities.reasons for n in missing), (kind, missing)  # every refusal has words


@pytest.mark.parametrize(
    ("playbook", "kind", "key", "words"),
    [
        ("stream.yaml", "openvmm", "stream:", "only the reference lab streams"),
        ("stream.yaml", "hyperv", "stream:", "only the reference lab streams"),
    ],
)
def test_shipped_playbooks_are_refused_at_the_asking_line(
    playbook: str, kind: str, key: str, words: str
) -> None:
    path = ROOT / "playbooks" / playbook
    pb, _cfg = load_playbook(path)
    caps = registry.get(kind).capabilities
    with pytest.raises(ConfigError) as e:
        requirements.refuse_missing(requirements.asks(pb, pb.resolved_cases()), caps, kind, path)
    line = next(i for i, ln in enumerate(path.read_text().splitlines(), 1) if ln.startswith(key))
    assert e.value.line == line and words in e.value.message, e.value
