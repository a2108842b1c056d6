"""The pytest plugin, driven by real pytest runs in a temp dir (pytester)."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from junitparser import JUnitXml

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "vm_configs/reference-linux.yaml")


def test_options_are_registered(pytester: pytest.Pytester) -> None:
    r = pytester.runpytest_subprocess("--help")
    for opt in ("--testbed-host", "--testbed-inventory", "--testbed-vm-config", "--testbed-out",
                "--testbed-keep-failed", "--testbed-require"):  # fmt: skip
        assert opt in r.stdout.str()


def test_kind_markers_skip_with_the_reason_or_fail_when_required(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.testbed_hyperv
        def test_needs_hyperv():
            pass

        @pytest.mark.testbed_qemu
        def test_needs_qemu():
            pass
        """
    )
    r = pytester.runpytest_subprocess("--testbed-host", "local", "-rs")
    r.assert_outcomes(passed=1, skipped=1)
    assert "needs a Hyper-V host (WinRM); host local is of kind qemu" in r.stdout.str()
    r = pytester.runpytest_subprocess("--testbed-host", "local", "--testbed-require", "hyperv")
    r.assert_outcomes(passed=1, errors=1)  # fails in setup: never green, never skipped
    assert r.ret != 0 and "--testbed-require hyperv: needs a Hyper-V host" in r.stdout.str()


def test_xdist_gives_one_worker_per_host_and_never_shares_a_host(pytester: pytest.Pytester) -> None:
    inv = pytester.path / "hosts.yaml"
    inv.write_text("hosts:\n  - {name: h1, uri: local}\n  - {name: h2, uri: local}\n")
    log = pytester.path / "seen.jsonl"
    pytester.makepyfile(
        f"""
        import json, os
        import pytest

        @pytest.mark.parametrize("n", range(4))
        def test_on_host(testbed_host, n):
            with open({str(log)!r}, "a") as f:
                f.write(json.dumps({{"host": testbed_host.name, "worker": os.environ["PYTEST_XDIST_WORKER"]}}) + "\\n")
        """
    )
    r = pytester.runpytest_subprocess("--testbed-inventory", str(inv), "--testbed-host", "all",
                                      "-n", "auto", "--dist", "loadgroup")  # fmt: skip
    r.assert_outcomes(passed=8)
    assert "2 workers" in r.stdout.str()  # -n auto: one per host, not one per core
    seen = [json.loads(x) for x in log.read_text().splitlines()]
    workers_of = {h: {s["worker"] for s in seen if s["host"] == h} for h in ("h1", "h2")}
    assert all(len(w) == 1 for w in workers_of.values()), workers_of
    assert workers_of["h1"] != workers_of["h2"]


@pytest.mark.vm
def test_fixtures_provision_a_real_vm_and_failures_carry_evidence(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_vm_loses_in_the_window(testbed_vm):
            r = testbed_vm.race(150)
            assert r.verdict == "lost"

        def test_no_loss(testbed_race):
            testbed_race.once(150, strategy="none")
            testbed_race.assert_no_loss()
        """
    )
    junit = pytester.path / "junit.xml"
    r = pytester.runpytest_subprocess("--testbed-host", "local", "--testbed-vm-config", CONFIG,
                                      f"--junitxml={junit}")  # fmt: skip
    r.assert_outcomes(passed=1, failed=1)
    out = r.stdout.str()
    assert "1 lost and 0 duplicated in 1 iterations" in out and "Wilson 95%" in out
    assert "testbed evidence" in out and "never seen by VTL0" in out
    xml = JUnitXml.fromfile(str(junit))  # parses: the file CI systems read
    assert sum(1 for suite in xml for _case in suite) == 2
    case = ET.parse(junit).getroot().find(".//testcase[@name='test_no_loss[local]']")
    assert case is not None and case.find("failure") is not None
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    m = re.match(r"lost at ([0-9.]+) ms: ", props["testbed.race.1"])
    assert m and abs(float(m.group(1)) - 150.0) < 5.0, props["testbed.race.1"]  # actual offset, skew included
    assert "host sent vmbus: MSG" in props["testbed.evidence.1"]


@pytest.mark.vm
def test_keep_failed_keeps_the_vm_until_the_session_ends(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_fails(testbed_vm):
            assert testbed_vm.record["vm_config"] == "reference-linux"
            assert False, "inspect me"
        """
    )
    r = pytester.runpytest_subprocess("--testbed-host", "local", "--testbed-vm-config", CONFIG,
                                      "--testbed-keep-failed", "-s")  # fmt: skip
    r.assert_outcomes(failed=1)
    assert re.search(r"testbed: kept VM reference-linux-\S+ on local until the session ends", r.stdout.str())
