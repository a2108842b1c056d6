"""One run over many hosts, on the mock backend: lanes spread over the hosts, one budget
spent fleet-wide, records naming their host, a host that stops answering drained with
the reason while the others finish, per-host answers and the test of whether the loss
rate depends on the host. The same on real guests over two sshd hosts is in
tests/ssh/test_fleet.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from testbed.backends.mock.backend import MockBackend
from testbed.engine.fleet import FleetHost, per_host, split_lanes
from testbed.engine.playbook import load_playbook
from testbed.engine.runner import Runner, RunOptions, RunResult
from testbed.report import finish_run

FLAKY = ("iterations: 300\nexpect: {}\nschedule: {kind: flaky, lo_ms: 0, hi_ms: 200, buckets: 5, target_rate: 0.2, "
         "confirm: 12}\n")  # fmt: skip
WINDOW = "window: {lo_ms: 100, hi_ms: 140, rate: 0.5}\n"


def host(name: str, max_guests: int | None = None) -> FleetHost:
    return FleetHost(name, "mock", lambda: MockBackend(name), max_guests)


def fleet_run(tmp_path: Path, vm: str, body: str, hosts: list[FleetHost], parallel: int = 1) -> RunResult:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "vm.yaml").write_text("name: m\nbackend: mock\n" + vm)
    (tmp_path / "pb.yaml").write_text("name: f\nvm_config: vm.yaml\n" + body)
    pb, cfg = load_playbook(tmp_path / "pb.yaml")
    opts = RunOptions(out=tmp_path / "run", fleet=hosts, parallel=parallel, finish=finish_run)
    return Runner(pb, cfg, opts, playbook_path=tmp_path / "pb.yaml").run()


def records(res: RunResult) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in (res.run_dir / "results.jsonl").read_text().splitlines()]


def test_lanes_are_spread_over_the_hosts_within_each_hosts_cap() -> None:
    hosts = [host("a", max_guests=1), host("b", max_guests=4), host("c")]
    total, note = split_lanes(hosts, 3)
    assert [h.lanes for h in hosts] == [1, 3, 2] and total == 6  # c: the default limit of 2
    assert "a capped to 1" in note and "c capped to 2" in note


def test_one_search_spends_one_budget_over_two_hosts(tmp_path: Path) -> None:
    res = fleet_run(tmp_path, WINDOW, FLAKY, [host("a"), host("b")], parallel=2)
    recs = records(res)
    assert Counter(r["host"] for r in recs).keys() == {"a", "b"}
    assert {r["host_kind"] for r in recs} == {"mock"}
    assert res.summary["flaky_search"]["answer"].startswith("window found")
    assert len(recs) <= 300 and sorted(r["iteration"] for r in recs) == list(range(len(recs)))
    ph = res.summary["per_host"]
    assert [h["host"] for h in ph["hosts"]] == ["a", "b"] and "Fisher's exact test" in ph["answer"]
    assert (
        "| a |" in (res.run_dir / "summary.md").read_text()
        and "Per host" in (res.run_dir / "report.html").read_text()
    )


def test_a_host_that_stops_answering_is_drained_and_the_others_finish(tmp_path: Path) -> None:
    # Races take 20 ms, so host a cannot take the whole budget while b fails its streak
    # (with instant races, a fresh Debian root once gave b only 6 tries).
    vm = "breaks_after: {b: 4}\nrace_ms: 20\n"
    body = "iterations: 40\nexpect: {}\nschedule: {kind: linear, start_ms: 300, stop_ms: 400, count: 40}\n"
    res = fleet_run(tmp_path, vm, body, [host("a"), host("b")])
    recs = records(res)
    on_b = [r for r in recs if r["host"] == "b"]
    assert [r["verdict"] for r in on_b] == ["preserved"] * 4 + ["infra-error"] * 5  # the streak, then drained
    assert "the race failed" in on_b[-1]["reason"]
    assert len(recs) == 40 and res.exit_code == 0 and res.stopped is None  # a finished the budget
    run = json.loads((res.run_dir / "run.json").read_text())
    left = {h["name"]: h for h in run["fleet"]}
    assert (
        left["b"]["drained"].startswith("5 infrastructure errors in a row") and left["a"]["drained"] is None
    )
    row = {h["host"]: h for h in res.summary["per_host"]["hosts"]}["b"]
    assert row["left"]["reason"] == left["b"]["drained"] and row["infra_errors"] == 5


def test_an_unreachable_host_leaves_at_the_start(tmp_path: Path) -> None:
    res = fleet_run(tmp_path, "unreachable: [b]\n", "iterations: 6\nexpect: {}\n", [host("a"), host("b")])
    assert {r["host"] for r in records(res)} == {"a"} and len(records(res)) == 6
    run = json.loads((res.run_dir / "run.json").read_text())
    assert "could not start" in next(h for h in run["fleet"] if h["name"] == "b")["drained"]


def test_when_every_host_leaves_the_run_it_is_exit_3(tmp_path: Path) -> None:
    vm = "breaks_after: {a: 0, b: 0}\n"
    res = fleet_run(tmp_path / "none", vm, "iterations: 30\nexpect: {}\n", [host("a"), host("b")])
    assert res.exit_code == 3 and res.stopped and res.stopped.startswith("every host left the run")
    vm = "breaks_after: {a: 3, b: 3}\n"  # some tries measured, then both hosts gone
    body = "iterations: 30\nexpect: {}\nschedule: {kind: fixed, offsets_ms: [400]}\n"
    res = fleet_run(tmp_path / "some", vm, body, [host("a"), host("b")])
    assert res.exit_code == 3 and res.summary["counts"]["preserved"] == 6


def test_a_bisection_over_two_hosts_names_the_same_build_as_over_one(tmp_path: Path) -> None:
    vm = "builds: {b1: 0.0, b2: 0.0, b3: 0.6, b4: 0.6}\nparavisor: b1\n"
    body = ("iterations: 300\nexpect: {}\nschedule: {kind: fixed, offsets_ms: [50, 120]}\n"
            "bisect: {builds: [b1, b2, b3, b4], p0: 0.01, p1: 0.4}\n")  # fmt: skip
    one = fleet_run(tmp_path / "one", vm, body, [host("a")]) if (tmp_path / "one").mkdir() is None else None
    two = (
        fleet_run(tmp_path / "two", vm, body, [host("a"), host("b")])
        if (tmp_path / "two").mkdir() is None
        else None
    )
    assert one and two
    assert one.summary["bisect"]["answer"].startswith("first bad build: b3 ")
    assert two.summary["bisect"]["answer"].startswith("first bad build: b3 ")


def test_per_host_says_when_the_loss_rate_depends_on_the_host() -> None:
    recs = [{"host": "a", "verdict": "lost"}] * 20 + [{"host": "a", "verdict": "preserved"}] * 20
    recs += [{"host": "b", "verdict": "preserved"}] * 40
    ph = per_host(recs, None)
    assert (
        ph is not None and ph["p"] < 0.001 and ph["answer"].startswith("the loss rate differs between hosts")
    )
    three = recs + [{"host": "c", "verdict": "preserved"}] * 40
    ph3 = per_host(three, None)
    assert ph3 is not None and "Bonferroni-corrected for 3 tests" in ph3["test"]
    assert per_host([r for r in recs if r["host"] == "a"], None) is None


def test_the_cli_runs_all_inventory_hosts_and_compares_two(tmp_path: Path) -> None:
    (tmp_path / "vm.yaml").write_text("name: m\nbackend: mock\n" + WINDOW)
    (tmp_path / "pb.yaml").write_text("name: f\nvm_config: vm.yaml\n" + FLAKY)
    (tmp_path / "hosts.yaml").write_text(
        "hosts:\n  - {name: h1, uri: 'mock://one', kind: mock, labels: [lab]}\n"
        "  - {name: h2, uri: 'mock://two', kind: mock, labels: [lab]}\n  - {name: h3, uri: 'mock://three', kind: mock}\n"
    )
    env = {**os.environ, "COLUMNS": "200"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "testbed.cli", *args], capture_output=True, text=True,
                              timeout=120, env=env)  # fmt: skip

    r = cli("run", str(tmp_path / "pb.yaml"), "--host", "@lab", "--inventory", str(tmp_path / "hosts.yaml"),
            "--out", str(tmp_path / "run"))  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert {json.loads(ln)["host"] for ln in (tmp_path / "run/results.jsonl").read_text().splitlines()} == {
        "h1",
        "h2",
    }
    assert "per host:" in r.stdout
    r = cli("compare", f"{tmp_path / 'run'}@h1", f"{tmp_path / 'run'}@h2")
    assert r.returncode == 0 and "Fisher exact test" in r.stdout, r.stdout + r.stderr
    r = cli(
        "run",
        str(tmp_path / "pb.yaml"),
        "--host",
        "all",
        "--inventory",
        str(tmp_path / "hosts.yaml"),
        "--dry-run",
    )
    assert r.returncode == 0 and "on h1, h2, h3 (mock)" in r.stdout, r.stdout + r.stderr


def test_a_host_whose_connection_is_lost_is_drained_at_once(tmp_path: Path) -> None:
    body = "iterations: 30\nexpect: {}\nschedule: {kind: fixed, offsets_ms: [400]}\n"
    res = fleet_run(tmp_path, "gone_after: {b: 3}\n", body, [host("a"), host("b")])
    on_b = [r for r in records(res) if r["host"] == "b"]
    assert [r["verdict"] for r in on_b] == ["preserved"] * 3 + ["infra-error"] and on_b[-1]["host_gone"]
    assert len(records(res)) == 30 and res.exit_code == 0
    left = {h["host"]: h["left"] for h in res.summary["per_host"]["hosts"]}
    assert left["b"]["reason"].startswith("it stopped answering: ") and left["a"] is None


def test_the_fleet_bench_prints_its_ratios_and_slope() -> None:
    """bench/fleet.py's one short proof (its measurements are run by hand)."""
    import re

    root = Path(__file__).resolve().parents[2]
    p = subprocess.run([sys.executable, str(root / "bench/fleet.py"), "--lanes", "1,4", "--rounds", "2",
                        "--race-ms", "50", "--hosts", "2"], capture_output=True, text=True, timeout=120, cwd=root)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    rows = re.findall(
        r"lanes +(\d+): +(\d+) tries, +[\d.]+ tries/s, ideal +([\d.]+), ratio ([\d.]+)", p.stdout
    )
    assert [(int(a), int(b)) for a, b, _i, _r in rows] == [(1, 2), (4, 8)], p.stdout
    assert all(0 < float(r) <= 1.05 for *_x, r in rows) and float(rows[1][2]) == 80.0
    assert re.search(r"RSS slope: -?[\d.]+ KiB per lane", p.stdout), p.stdout


def test_lanes_hold_their_vms_memory_against_each_other() -> None:
    """Each lane's backend holds its VM's share of what the host reported free; the one
    that does not fit is HostFull, and a closed lane gives its share back."""
    import pytest

    from testbed.backends.memory import MemoryHold
    from testbed.core.errors import HostFull

    a, b, c = MemoryHold("h"), MemoryHold("h"), MemoryHold("h")
    a.take(5000, 2000)
    b.take(5000, 2000)
    with pytest.raises(HostFull, match="5000 MB free on h, 4000 MB held by this run's other VMs"):
        c.take(5000, 2000)
    b.release()
    c.take(5000, 2000)
    MemoryHold("other").take(2500, 2000)  # another host's memory is its own
    MemoryHold("h").take(None, 10**9)  # a host that did not say: nothing held, nothing refused
    a.release()
    c.release()


def test_the_writer_thread_writes_every_record_handed_over_with_its_files(tmp_path: Path) -> None:
    """Lanes hand records to the writer thread and race on: after close every record is
    in results.jsonl once, each with its side file written."""
    import threading

    from testbed.core.runfolder import ResultsWriter, read_results

    w = ResultsWriter(tmp_path / "results.jsonl")

    def lane(n: int) -> None:
        for i in range(200):
            it = n * 1000 + i
            w.write({"iteration": it}, {tmp_path / f"{it}.json": {"record": {"iteration": it}}})

    threads = [threading.Thread(target=lane, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w.close()
    its = [r["iteration"] for r in read_results(tmp_path / "results.jsonl")]
    assert sorted(its) == sorted(n * 1000 + i for n in range(8) for i in range(200))
    assert all(json.loads((tmp_path / f"{it}.json").read_text())["record"]["iteration"] == it for it in its)


def test_a_write_the_writer_thread_could_not_make_is_raised_not_swallowed(tmp_path: Path) -> None:
    """A side file that cannot be written (its folder is gone): its record is not written,
    and close() and every later write() raise the error (the runner's 'cannot write the run
    folder')."""
    import pytest

    from testbed.core.runfolder import ResultsWriter, read_results

    w = ResultsWriter(tmp_path / "results.jsonl")
    w.write({"iteration": 0})
    w.write({"iteration": 1}, {tmp_path / "gone" / "timeline.json": {}})
    with pytest.raises(FileNotFoundError):
        w.close()
    with pytest.raises(FileNotFoundError):
        w.write({"iteration": 2})
    assert 1 not in [r["iteration"] for r in read_results(tmp_path / "results.jsonl")]
