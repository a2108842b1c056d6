"""An older lab host, for real: a Debian 11 root (Python 3.9.2, QEMU 5.2, no ``-action``)
with its own sshd on loopback. The agent (a zipapp run by the host's python3.9) probes
QEMU's options instead of assuming them, and a short race over SSH gives the lab's
verdicts, ``lost`` included (a lost iteration waits on asyncio.wait_for, whose timeout
is not the builtin TimeoutError before Python 3.11)."""

from __future__ import annotations

from pathlib import Path

import pytest
from freshroot import fresh_debian_host  # type: ignore[import-not-found]

from testbed.backends.qemu.backend import QemuBackend
from testbed.core.config import VmConfig
from testbed.engine.options import RunOptions
from testbed.engine.playbook import Playbook, ScheduleSpec
from testbed.engine.runner import Runner
from testbed.transport.ssh import SshTransport

pytestmark = pytest.mark.vm


def test_debian_11_host_runs_a_race_with_lost_iterations_over_ssh(tmp_path: Path, ref_cfg: VmConfig) -> None:
    with fresh_debian_host(tmp_path, "bullseye", ("qemu-system-x86",)) as host:
        t = SshTransport(
            "127.0.0.1", host.port, "root", identity=str(host.key), known_hosts=str(host.known_hosts)
        )
        backend = QemuBackend(t)
        assert backend.host_info["python"].startswith("3.9.")
        qemu = backend.qemu_info()
        assert qemu["version"].startswith("QEMU emulator version 5.2") and qemu["action"] is False
        rep = backend.preflight(ref_cfg)
        assert rep.ok, [c for c in rep.checks if not c.ok]
        pb = Playbook(name="debian11", vm_config="-", strategy="none", iterations=3, reset="snapshot",
                      schedule=ScheduleSpec(kind="fixed", offsets_ms=[-300.0, 150.0, 900.0]), grace_ms=1200,
                      expect={})  # fmt: skip
        res = Runner(pb, ref_cfg, RunOptions(out=tmp_path / "run", backend=backend)).run()
    assert [r["verdict"] for r in res.records] == ["delivered-before", "lost", "preserved"], [
        r["reason"] for r in res.records
    ]
    assert res.records[0]["accel"] in ("tcg", "kvm")
