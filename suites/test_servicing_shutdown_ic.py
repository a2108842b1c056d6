"""The lab suite: the seed's servicing + shutdown-IC test, its baselines, and cross-version servicing.

Run it against any host:  pytest suites/ --testbed-host local  (or ssh://..., or an
inventory name; --testbed-host all with an inventory runs it on every host).
A test fails on any lost or duplicated message and states the loss rate with its
Wilson interval. There is no rerun-until-green: a flake is a finding.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.testbed_qemu, pytest.mark.vm]


def test_shutdown_ic_across_servicing_is_never_lost(testbed_race) -> None:  # type: ignore[no-untyped-def]
    """openhcl_servicing_shutdown_ic as a sweep, with the #962 protocol."""
    testbed_race.playbook(ROOT / "playbooks/servicing-shutdown-ic.yaml", iterations=8)
    testbed_race.assert_no_loss()


def test_baseline_shutdown_without_servicing(testbed_race) -> None:  # type: ignore[no-untyped-def]
    for _ in range(2):
        r = testbed_race.once(0.0, servicing=False)
        assert r.verdict == "delivered-before", r.reason
    testbed_race.assert_no_loss()


def test_baseline_shutdown_after_servicing_completes(testbed_race) -> None:  # type: ignore[no-untyped-def]
    r = testbed_race.once(None, after_ready=True)
    assert r.verdict == "preserved", r.reason
    testbed_race.assert_no_loss()


@pytest.mark.parametrize(("boot", "target"), [("v1", "v2"), ("v2", "v1")])
def test_cross_version_servicing_keeps_the_message(testbed_race, boot: str, target: str) -> None:  # type: ignore[no-untyped-def]
    r = testbed_race.once(150.0, strategy="pause-resume", paravisor=boot, image=target)
    assert r.verdict == "preserved", r.reason
    testbed_race.assert_no_loss()
