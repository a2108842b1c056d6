"""pytest plugin (entry point ``pytest11``): lab suites against real hosts.

Options: ``--testbed-host URI|NAME|all``, ``--testbed-inventory FILE``,
``--testbed-vm-config F``, ``--testbed-out DIR``, ``--testbed-keep-failed``,
``--testbed-require KIND``.

Fixtures: ``testbed_host`` (an open :class:`testbed.api.Host`; with
``--testbed-host all`` the test runs once per inventory host),
``testbed_vm`` (a provisioned reference VM, destroyed after the test, or kept
until the session ends with ``--testbed-keep-failed`` when the test failed),
``testbed_race`` (run one race or a playbook; verdicts and stats come back,
and the evidence of what ran is attached to the test's JUnit entry).

Markers: ``testbed_<kind>`` for every registered backend kind
(``testbed_qemu``, ``testbed_hyperv``, ``testbed_openvmm``, ...) and for the
sub-kinds a kind declares by inventory label (``testbed_nested``): the test
needs a host of that kind and is skipped, with the reason, on any other, unless
``--testbed-require KIND`` makes that a failure (so a misconfigured self-hosted
runner cannot go green on skips).

Fleet: with ``--testbed-host all`` and ``-n auto --dist loadgroup``
(pytest-xdist), ``-n auto`` means one worker per inventory host and every
test is in the ``xdist_group`` of its host, so no two workers share a host.
"""

from __future__ import annotations

import json
import os
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.backends import registry
from testbed.core.config import HostEntry
from testbed.engine.playbook import load_vm_config
from testbed.engine.stats import summarize, wilson
from testbed.hosts import load_inventory


def kind_markers() -> dict[str, tuple[str, str]]:
    """marker name -> (kind, what it needs), from the registered backends."""
    out: dict[str, tuple[str, str]] = {}
    for k in registry.kinds().values():
        out[k.marker] = (k.kind, k.description)
        out.update({f"testbed_{label}": (label, what) for label, what in k.labels.items()})
    return out


DEFAULT_VM_CONFIG = "vm_configs/reference-linux.yaml"
EVIDENCE_KEY = pytest.StashKey[list[tuple[str, str]]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("testbed", "testbed lab hosts")
    g.addoption(
        "--testbed-host", default=None, help="host URI, inventory name, or 'all' (every inventory host)"
    )
    g.addoption("--testbed-inventory", default=None, help="host inventory YAML")
    g.addoption(
        "--testbed-vm-config", default=None, help=f"vm_config for testbed_vm (default {DEFAULT_VM_CONFIG})"
    )
    g.addoption("--testbed-out", default=None, help="folder for run folders and evidence")
    g.addoption(
        "--testbed-keep-failed", action="store_true", help="keep the VM of a failed test until session end"
    )
    g.addoption("--testbed-require", action="append", default=[], metavar="KIND",
                help="fail (not skip) tests whose host kind is missing; repeatable")  # fmt: skip


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    for name, (kind, what) in kind_markers().items():
        config.addinivalue_line(
            "markers", f"{name}: needs {what}; skipped elsewhere unless --testbed-require {kind}"
        )
    # Evidence goes into <properties> of each testcase, which xunit2 (pytest's
    # default family) drops. Unless the user chose a family, use xunit1, which
    # CI systems read the same way and which keeps them.
    if config.option.xmlpath and "junit_family" not in _explicit_ini(config):
        config._inicache["junit_family"] = "xunit1"


def _explicit_ini(config: pytest.Config) -> set[str]:
    """Ini names the user set (in the ini file, or with -o)."""
    names = set()
    if config.inipath is not None and "junit_family" in config.inipath.read_text(errors="replace"):
        names.add("junit_family")
    for o in getattr(config.option, "override_ini", None) or []:
        names.add(o.split("=", 1)[0])
    return names


# ---- hosts -------------------------------------------------------------------------


def _entries(config: pytest.Config) -> list[HostEntry]:
    host = config.getoption("--testbed-host")
    inv = config.getoption("--testbed-inventory")
    if host == "all" or (host is None and inv):
        if not inv:
            raise pytest.UsageError("--testbed-host all needs --testbed-inventory")
        return load_inventory(inv).hosts
    from testbed.hosts import lookup_entry

    kind = _vm_config_kind(config)
    return [lookup_entry(host or "local", Path(inv) if inv else None, kind=kind)]


def _vm_config_kind(config: pytest.Config) -> str | None:
    """The backend of --testbed-vm-config: it decides what a bare ``local`` or ssh:// is."""
    path = Path(_vm_config_path(config))
    return load_vm_config(path).backend if path.exists() else None


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto``: one worker per host, not per controller core."""
    try:
        return len(_entries(config))
    except Exception:
        return None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "testbed_host_entry" in metafunc.fixturenames:
        entries = _entries(metafunc.config)
        metafunc.parametrize(
            "testbed_host_entry",
            [pytest.param(e, id=e.name, marks=pytest.mark.xdist_group(e.name)) for e in entries],
            scope="session",
        )


@pytest.fixture(scope="session")
def testbed_host_entry(request: pytest.FixtureRequest) -> HostEntry:
    return request.param  # type: ignore[no-any-return]


def _kind_of(entry: HostEntry) -> set[str]:
    labels = registry.get(entry.kind).labels
    return {entry.kind} | {label for label in entry.labels if label in labels}


@pytest.fixture(autouse=True)
def _testbed_kind_markers(request: pytest.FixtureRequest) -> None:
    markers = kind_markers()
    needed = [markers[m.name] for m in request.node.iter_markers() if m.name in markers]
    if not needed:
        return
    config = request.config
    if "testbed_host_entry" in request.fixturenames:
        entries = [request.getfixturevalue("testbed_host_entry")]
    else:
        entries = _entries(config)
    have = set().union(*(_kind_of(e) for e in entries))
    required = set(config.getoption("--testbed-require"))
    for kind, what in needed:
        if kind not in have:
            names = ", ".join(e.name for e in entries)
            msg = f"needs {what}; host {names} is of kind {'/'.join(sorted(have))}"
            if kind in required:
                pytest.fail(f"--testbed-require {kind}: {msg}", pytrace=False)
            pytest.skip(msg)


@pytest.fixture(scope="session")
def testbed_host(testbed_host_entry: HostEntry, request: pytest.FixtureRequest) -> Iterator[Any]:
    from testbed.api import Host
    from testbed.hosts import open_backend

    host = Host(testbed_host_entry, open_backend(testbed_host_entry))
    try:
        yield host
    finally:
        host.close()


@pytest.fixture(scope="session")
def testbed_out(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = request.config.getoption("--testbed-out")
    p = Path(out) if out else tmp_path_factory.mktemp("testbed")
    p.mkdir(parents=True, exist_ok=True)
    return p


def _vm_config_path(config: pytest.Config) -> str:
    return str(
        config.getoption("--testbed-vm-config") or os.environ.get("TESTBED_VM_CONFIG") or DEFAULT_VM_CONFIG
    )


_kept: list[Any] = []


@pytest.fixture
def testbed_vm(testbed_host: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A reference VM on the host (see :class:`testbed.api.Vm`)."""
    strategy = getattr(request, "param", None) or "none"
    cm = testbed_host.vm(_vm_config_path(request.config), strategy)
    vm = cm.__enter__()
    yield vm
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed and request.config.getoption("--testbed-keep-failed"):
        _kept.append(cm)  # destroyed at session end, so it can be inspected until then
        rec = vm.record
        print(f"\ntestbed: kept VM {rec['vm']} on {rec['host']} until the session ends")
    else:
        cm.__exit__(None, None, None)


def pytest_sessionfinish(session: pytest.Session) -> None:
    while _kept:
        _kept.pop().__exit__(None, None, None)


class RaceRunner:
    """What ``testbed_race`` gives a test: run races or playbooks, with evidence recorded."""

    def __init__(self, host: Any, node: pytest.Item, out: Path, vm_config: str) -> None:
        self.host = host
        self.node = node
        self.out = out
        self.vm_config = vm_config
        self.records: list[dict[str, Any]] = []

    def _attach(self, name: str, value: str) -> None:
        self.node.stash.setdefault(EVIDENCE_KEY, []).append((name, value))
        self.node.user_properties.append((name, value))

    def once(self, offset_ms: float | None = 150.0, strategy: str = "none", **kw: Any) -> Any:
        """One iteration on a fresh VM. Returns :class:`testbed.api.RaceResult`."""
        vm_kw = {k: kw.pop(k) for k in ("lab", "paravisor", "reset") if k in kw}
        with self.host.vm(self.vm_config, strategy, **vm_kw) as vm:
            r = vm.race(offset_ms, **kw)
        self.records.append(
            {"verdict": r.verdict, "offset_ms": r.offset_ms, "guest_offset_ms": r.guest_offset_ms}
        )
        self._attach(f"testbed.race.{len(self.records)}", f"{r.verdict} at {r.offset_ms} ms: {r.reason}")
        if r.verdict not in ("preserved", "delivered-before"):
            self._attach(f"testbed.evidence.{len(self.records)}", "\n".join(r.evidence))
        return r

    def playbook(self, path: str | Path, **overrides: Any) -> Any:
        """A whole playbook; returns the RunResult (summary, records, run_dir)."""
        run_dir = self.out / f"{self.node.name}-{Path(path).stem}".replace("/", "_").replace("[", "_").rstrip(
            "]"
        )
        # The session's --testbed-vm-config, not the playbook's own: the host decides the VM.
        res = self.host.run_playbook(path, run_dir, vm_config=load_vm_config(self.vm_config), **overrides)
        self.records.extend(res.records)
        self._attach("testbed.run_dir", str(res.run_dir))
        self._attach(
            "testbed.summary", json.dumps({k: res.summary[k] for k in ("counts", "loss_rate", "loss_ci95")})
        )
        bad = [r for r in res.records if r["verdict"] in ("lost", "duplicated")]
        if bad:
            self._attach("testbed.failed_iterations", ", ".join(r["dir"] for r in bad))
        return res

    def assert_no_loss(self) -> None:
        """Fail on any lost or duplicated message, stating the loss rate with its interval."""
        s = summarize(self.records) if self.records else None
        if s is None:
            raise AssertionError("no iterations ran")
        lost, dup, n = s["counts"]["lost"], s["counts"]["duplicated"], s["product_iterations"]
        if lost or dup:
            lo, hi = wilson(lost + dup, n)
            raise AssertionError(
                f"{lost} lost and {dup} duplicated in {n} iterations: rate {(lost + dup) / n:.1%} "
                f"(Wilson 95% {lo:.1%} to {hi:.1%})"
            )


@pytest.fixture
def testbed_race(testbed_host: Any, request: pytest.FixtureRequest, testbed_out: Path) -> RaceRunner:
    return RaceRunner(testbed_host, request.node, testbed_out, _vm_config_path(request.config))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    rep = yield
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]
        evidence = item.stash.get(EVIDENCE_KEY, [])
        if rep.failed and evidence:
            rep.sections.append(("testbed evidence", "\n".join(f"{k}: {v}" for k, v in evidence)))
    return rep


def pytest_report_header(config: pytest.Config) -> list[str]:
    try:
        names = ", ".join(f"{e.name} ({e.kind})" for e in _entries(config))
    except Exception as e:  # a bad inventory shows up here, then as a usage error
        names = f"unresolved: {e}"
    return [f"testbed: hosts {names}; vm_config {_vm_config_path(config)}"]
