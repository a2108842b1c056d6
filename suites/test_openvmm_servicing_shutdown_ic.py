"""The lab suite on an OpenVMM host with OpenHCL (WHP): the seed's test in its exact order,
the sweep that found openvmm #954, and the baseline. Run it on the host (or over SSH):

    pytest suites/ --testbed-host ov1 --testbed-inventory hosts.yaml \\
        --testbed-vm-config vm_configs/openvmm-openhcl.yaml --testbed-require openvmm

On any other kind of host these tests skip (and --testbed-require openvmm turns that
skip into a failure, so a CI job cannot pass by running nothing).
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.testbed_openvmm]


def test_seed_order_service_then_shutdown_once_servicing_completed(testbed_race) -> None:  # type: ignore[no-untyped-def]
    """openhcl_servicing_shutdown_ic: service-vtl2, then shutdown once servicing completed."""
    r = testbed_race.once(None, after_ready=True)
    assert r.verdict in ("preserved", "rejected"), r.reason  # refused while the IC reopens is not a loss
    testbed_race.assert_no_loss()


def test_shutdown_ic_across_servicing_is_never_lost(testbed_race) -> None:  # type: ignore[no-untyped-def]
    testbed_race.playbook(ROOT / "playbooks/servicing-shutdown-ic.yaml", iterations=4)
    testbed_race.assert_no_loss()


def test_baseline_shutdown_without_servicing(testbed_race) -> None:  # type: ignore[no-untyped-def]
    r = testbed_race.once(0.0, servicing=False)
    assert r.verdict == "delivered-before", r.reason
