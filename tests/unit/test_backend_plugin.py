"""A backend is one package: the table backend (tests/plugins_site/tablebackend.py),
registered only through its distribution's ``testbed.backends`` entry point, runs a
playbook through the CLI, the API and the pytest plugin, with no change to testbed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.backends import registry

SITE = Path(__file__).resolve().parents[1] / "plugins_site"
TABLE = {-100.0: "delivered-before", 50.0: "lost", 120.0: "lost", 400.0: "preserved"}


@pytest.fixture
def table_site(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """The site dir on sys.path (this process) and PYTHONPATH (subprocesses); a vm_config
    and a playbook for the table host in tmp_path."""
    monkeypatch.syspath_prepend(str(SITE))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SITE), os.environ.get("PYTHONPATH", "")]))
    registry.kinds.cache_clear()
    rows = "\n".join(f"  {k}: {v}" for k, v in TABLE.items())
    (tmp_path / "table.yaml").write_text(f"name: tbl\nbackend: table\ntable:\n{rows}\n")
    (tmp_path / "pb.yaml").write_text(
        "name: table-sweep\nvm_config: table.yaml\niterations: 4\n"
        "schedule: {kind: fixed, offsets_ms: [-100, 50, 120, 400]}\nexpect: {lost: 0}\n"
    )
    yield tmp_path
    registry.kinds.cache_clear()


def test_the_registry_finds_the_entry_point(table_site: Path) -> None:
    assert {"qemu", "hyperv", "table"} <= set(registry.names())
    assert registry.claiming("table://lab1") is registry.get("table")


def test_cli_run_and_host_check_through_the_table_backend(table_site: Path) -> None:
    out = table_site / "run"
    r = subprocess.run([sys.executable, "-m", "testbed.cli", "run", str(table_site / "pb.yaml"),
                        "--host", "table://lab1", "--out", str(out), "--keep-failed"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr  # two losses against expect lost: 0
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [x["verdict"] for x in recs] == list(TABLE.values())
    assert recs[1]["offset_ms"] == pytest.approx(50.05) and recs[1]["skew_ms"] == pytest.approx(0.05)
    kept = [(out / "iterations" / f"{i:04d}" / "table.txt").read_text() for i in range(4)]
    assert ["everything=True" in k for k in kept] == [
        False,
        True,
        True,
        False,
    ]  # --keep-failed: the lost ones
    run = json.loads((out / "run.json").read_text())
    assert run["host_kind"] == "table" and run["host_spec"] == "table://lab1"
    r = subprocess.run([sys.executable, "-m", "testbed.cli", "repro", str(out), "--iteration", "2"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and "was lost, now lost" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "testbed.cli", "host", "check", "table://lab1",
                        "--config", str(table_site / "table.yaml")], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and "always ready" in r.stdout, r.stdout + r.stderr


def test_api_race_through_the_table_backend(table_site: Path) -> None:
    from testbed.api import open_host

    with open_host("table://lab1") as host, host.vm(table_site / "table.yaml") as vm:
        r = vm.race(offset_ms=120.0)
        assert (r.verdict, r.evidence) == ("lost", ["table[120.0]"])
        assert r.offset_ms == pytest.approx(120.05)
        res = host.run_playbook(table_site / "pb.yaml", table_site / "api-run")
    assert res.exit_code == 1 and res.summary["counts"]["lost"] == 2


def test_pytest_plugin_through_the_table_backend(table_site: Path, pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.testbed_table
        def test_races(testbed_race):
            assert testbed_race.once(400.0).verdict == "preserved"
            assert testbed_race.once(50.0).verdict == "lost"

        @pytest.mark.testbed_qemu
        def test_needs_qemu():
            pass
        """
    )
    r = pytester.runpytest_subprocess("--testbed-host", "table://lab1", "--testbed-vm-config",
                                      str(table_site / "table.yaml"), "-rs")  # fmt: skip
    r.assert_outcomes(passed=1, skipped=1)
    assert "needs a QEMU host (local or over SSH); host table://lab1 is of kind table" in r.stdout.str()


def test_a_broken_host_stops_the_run_and_measures_nothing(table_site: Path) -> None:
    """Every iteration infra-error: the run stops after max_infra_errors_in_a_row (5) with
    the reason, and exits 3 (it used to run everything and exit 1, "expectation violated")."""
    (table_site / "broken.yaml").write_text("name: tbl\nbackend: table\ntable: {100.0: infra-error}\n")
    (table_site / "pb-broken.yaml").write_text(
        "name: broken\nvm_config: broken.yaml\niterations: 12\nschedule: {kind: fixed, offsets_ms: [100]}\n"
        "expect: {lost: '>0'}\n"
    )
    out = table_site / "broken-run"
    r = subprocess.run([sys.executable, "-m", "testbed.cli", "run", str(table_site / "pb-broken.yaml"),
                        "--host", "table://lab1", "--out", str(out)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 3, r.stdout + r.stderr
    assert "the host is broken: 5 infrastructure errors in a row" in " ".join(r.stderr.split())
    assert len((out / "results.jsonl").read_text().splitlines()) == 5


def test_a_full_run_folder_is_exit_3_and_keeps_what_finished(table_site: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    small = table_site / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    try:
        (table_site / "pb-long.yaml").write_text(
            "name: long\nvm_config: table.yaml\niterations: 2000\nschedule: {kind: fixed, offsets_ms: [400]}\n"
        )
        r = subprocess.run([sys.executable, "-m", "testbed.cli", "run", str(table_site / "pb-long.yaml"),
                            "--host", "table://lab1", "--out", str(small / "run")],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        said = " ".join(r.stderr.split())
        assert r.returncode == 3, r.stdout + r.stderr
        assert f"cannot write the run folder {small / 'run'}" in said and "No space left on device" in said
        assert "Traceback" not in r.stderr
        lines = (small / "run" / "results.jsonl").read_bytes().splitlines()
        done = [json.loads(ln) for ln in lines if ln.endswith(b"}")]
        assert 0 < len(done) < 2000 and all(d["verdict"] == "preserved" for d in done)
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_a_bisection_on_a_backend_without_builds_is_refused_at_its_line(table_site: Path) -> None:
    """The table backend declares no images: a bisection over builds is refused before any
    try, naming the playbook's line of ``bisect:`` and the backend's own reason (it used to
    run 30 tries "into v2-r1" and print a bisection table)."""
    pb = table_site / "bisect.yaml"
    pb.write_text(
        "name: table-bisect\nvm_config: table.yaml\niterations: 30\n"
        "schedule: {kind: fixed, offsets_ms: [50]}\n"
        "bisect:\n  builds: [v2-r1, v2-r2, v2-r3]\n"
    )
    r = subprocess.run([sys.executable, "-m", "testbed.cli", "run", str(pb), "--host", "table://lab1",
                        "--out", str(table_site / "b")], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2, r.stdout + r.stderr
    err = " ".join(r.stderr.split())
    assert f"{pb}:5:" in err and "a table has no builds to service into" in err, err
    assert not (table_site / "b" / "results.jsonl").exists()


def test_the_plugin_imports_only_the_public_api_and_type_checks_against_it(tmp_path: Path) -> None:
    """A backend written outside the tree needs nothing internal: its only testbed import
    is testbed.backends.api, and mypy (through testbed's py.typed) accepts it as a Backend,
    and refuses it once a method's type is wrong (so the check can fail)."""
    import ast

    source = (SITE / "tablebackend.py").read_text()
    tree = ast.parse(source)
    mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    mods |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in mods if m and m.startswith("testbed")} == {"testbed.backends.api"}
    broken = tmp_path / "brokenbackend.py"
    broken.write_text(source.replace("def gc_host(self) -> list[str]:\n        return []",
                                     "def gc_host(self) -> int:\n        return 0"))  # fmt: skip
    assert broken.read_text() != source
    mypy = [
        str(Path(sys.executable).parent / "mypy"),
        "--strict",
        "--no-incremental",
        "--ignore-missing-imports",
    ]
    root = SITE.parents[1]  # where testbed's own package (and its py.typed) is found
    r = subprocess.run(
        [*mypy, str(SITE / "tablebackend.py")], capture_output=True, text=True, timeout=300, cwd=root
    )
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([*mypy, str(broken)], capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode == 1 and 'expected "Callable[[HostEntry, HostOptions], Backend]"' in r.stdout, (
        r.stdout
    )
