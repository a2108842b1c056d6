"""The lab suite on a Hyper-V host with OpenHCL: the seed's test in its exact order, the
sweep, and the baseline. Run it on the host (or against it over WinRM):

    pytest suites/ --testbed-host hv1 --testbed-inventory hosts.yaml \
        --testbed-vm-config vm_configs/hyperv-openhcl.yaml --testbed-require hyperv

On any other kind of host these tests skip (and --testbed-require hyperv turns that
skip into a failure, so a CI job cannot pass by running nothing).
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.testbed_hyperv]


def test_seed_order_service_then_shutdown_once_the_ic_is_back(testbed_race) -> None:  # type: ignore[no-untyped-def]
    """openhcl_servicing_shutdown_ic: service, wait for the shutdown IC to be OK again, shut down."""
    r = testbed_race.once(None, after_ready=True)
    assert r.verdict == "preserved", r.reason
    testbed_race.assert_no_loss()


def test_shutdown_ic_across_servicing_is_never_lost(testbed_race) -> None:  # type: ignore[no-untyped-def]
    testbed_race.playbook(ROOT / "playbooks/servicing-shutdown-ic.yaml", iterations=4)
    testbed_race.assert_no_loss()


def test_baseline_shutdown_without_servicing(testbed_race) -> None:  # type: ignore[no-untyped-def]
    r = testbed_race.once(0.0, servicing=False)
    assert r.verdict == "delivered-before", r.reason
