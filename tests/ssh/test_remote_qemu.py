"""Playbooks against a QEMU host reached over real SSH: same verdicts, and a lost
connection is an infra-error that leaves no remote QEMU."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import pytest

from testbed.backends.qemu.backend import QemuBackend
from testbed.backends.qemu.config import LabKnobs
from testbed.core.config import VmConfig
from testbed.engine.options import RunOptions
from testbed.engine.playbook import Playbook, ScheduleSpec
from testbed.engine.runner import Runner
from testbed.transport.ssh import SshTransport

pytestmark = pytest.mark.vm
# delivered-before, lost, rejected (with `none`). The not-ready window runs from
# the close (servicing lag + 300 ms save) to the re-offer (+ exec + restore_ms):
# a 1000 ms restore puts 800 ms inside it however slow the host's servicing start.
OFFSETS = [-300.0, 150.0, 800.0]
LAB = LabKnobs(save_ms=300, restore_ms=1000, servicing_timeout_ms=8000)


@pytest.fixture
def lab_cfg(ref_cfg: VmConfig) -> VmConfig:
    return ref_cfg.model_copy(update={"lab": LAB})


def ssh(sshd) -> SshTransport:  # type: ignore[no-untyped-def]
    return SshTransport(
        sshd.host, sshd.port, "root", identity=str(sshd.key), known_hosts=str(sshd.known_hosts)
    )


def playbook(n: int, strategy: str = "none") -> Playbook:
    return Playbook(name="short", vm_config="-", strategy=strategy, iterations=n,
                    schedule=ScheduleSpec(kind="fixed", offsets_ms=OFFSETS), reset="snapshot",
                    grace_ms=1200, expect={}, max_infra_errors=5)  # fmt: skip


def test_same_verdicts_over_ssh_as_local(sshd, lab_cfg: VmConfig, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    t = ssh(sshd)
    remote = Runner(playbook(3), lab_cfg, RunOptions(out=tmp_path / "ssh", backend=QemuBackend(t))).run()
    local = Runner(playbook(3), lab_cfg, RunOptions(out=tmp_path / "local")).run()
    assert [r["verdict"] for r in remote.records] == [r["verdict"] for r in local.records]
    assert [r["verdict"] for r in remote.records] == ["delivered-before", "lost", "rejected"]
    assert remote.records[1]["skew_ms"] < 5.0  # fired on the host, not across the network
    run = (tmp_path / "ssh" / "run.json").read_text()
    assert "ssh://root@127.0.0.1" in run
    # The image and the agent were uploaded into the remote host's own cache.
    assert list(sshd.remote_cache.glob("images/*/initrd.cpio"))
    assert list(sshd.remote_cache.glob("snapshots/*.mig"))


def test_connection_killed_mid_iteration_is_infra_error(sshd, ref_cfg: VmConfig, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    t = ssh(sshd)
    pb = playbook(2).model_copy(update={"schedule": ScheduleSpec(kind="fixed", offsets_ms=[150.0])})
    runner = Runner(pb, ref_cfg, RunOptions(out=tmp_path / "cut", backend=QemuBackend(t)))
    fired = threading.Event()

    def cut_when_racing(ev: dict[str, object]) -> None:
        if ev["event"] == "start" and not fired.is_set():
            fired.set()
            threading.Timer(1.2, t.sever).start()  # lands inside the first iteration

    runner.progress = cut_when_racing
    result = runner.run()
    first, second = result.records
    assert first["verdict"] == "infra-error", first
    assert "AgentLost" in first["reason"] or "Transport" in first["reason"]
    assert second["verdict"] == "lost"  # the run went on over a new connection
    assert result.summary["counts"]["lost"] == 1  # never counted a lost host as a lost message
    # conftest's no_leaked_qemu fixture asserts no QEMU is left, by pid.


def test_remote_host_behind_a_slow_network_gives_the_same_verdicts(lab_cfg: VmConfig, tmp_path: Path) -> None:
    """The host sits in a network namespace behind 20 ms +- 5 ms of delay (tc netem
    on the veth; where the kernel has no netem qdisc, a delaying TCP relay in front
    of the namespace's sshd). The race is fired on the host, so verdicts and skew
    do not move."""
    from sshd import can_netns, delay_proxy, netem_available, netns_pair, run_sshd  # type: ignore[import-not-found]

    use_ns = can_netns()  # not available inside every chroot: then sshd stays on loopback
    netem = use_ns and netem_available()
    with contextlib.ExitStack() as stack:
        listen = "127.0.0.1"
        if use_ns:
            _h, listen = stack.enter_context(netns_pair("tbnetem", delay_ms=20 if netem else 0, jitter_ms=5))
        s = stack.enter_context(run_sshd(tmp_path / "sshd", host=listen, netns="tbnetem" if use_ns else None))
        host, port, kh = s.host, s.port, s.known_hosts
        if not netem:
            port = stack.enter_context(delay_proxy((s.host, s.port), 20, 5))
            host = "127.0.0.1"
            kh = tmp_path / "kh"
            kh.write_text(f"[{host}]:{port} {s.host_pub}\n")
        t = SshTransport(host, port, "root", identity=str(s.key), known_hosts=str(kh))
        t0 = time.monotonic()
        t.run(["true"]).check()
        assert time.monotonic() - t0 > 0.04, "the delay is really in the path"
        res = Runner(playbook(3), lab_cfg, RunOptions(out=tmp_path / "netem", backend=QemuBackend(t))).run()
    assert [r["verdict"] for r in res.records] == ["delivered-before", "lost", "rejected"]
    assert max(abs(r["skew_ms"]) for r in res.records if r["skew_ms"] is not None) < 5.0
