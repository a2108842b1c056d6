"""QEMU lifecycle on the host: launch (own process group, lease, guest slot, SIGKILL
with the agent), QMP and the virtio-serial sockets, readiness, snapshots, the KVM
probe, and destroy (quit -> SIGTERM -> SIGKILL). The command line is ``argv``'s.

Stdlib + qemu.qmp, valid on Python 3.9: this runs on lab hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from testbed.backends.qemu.agent.argv import qemu_argv
from testbed.backends.qemu.agent.qemu_process import boot_once, die_with_parent, probe_cpu_models
from testbed.core.paths import shared_dir
from testbed.hostprog import leases
from testbed.hostprog.rpc import AgentError
from testbed.hostprog.slots import GuestSlot
from testbed.lab.relay import Relay

SLOT_WAIT_S = 3600.0  # how long a launch waits for another run's guest to end


class LineSocket:
    """A connected chardev socket: raw non-blocking send, line-split receive."""

    def __init__(self, loop: asyncio.AbstractEventLoop, path: Path, on_line: Any) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.setblocking(False)
        self.buf = b""
        self.on_line = on_line
        self.loop = loop
        self.closed = False
        loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            self.on_line(line.decode(errors="replace"))

    def send(self, line: str) -> None:
        """Send a line; a peer that went away (QEMU exited) closes the socket
        instead of raising, and the caller sees the VM's end in its events."""
        if self.closed:
            return
        try:
            self.sock.sendall((line + "\n").encode())
        except OSError:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.sock.fileno())
            self.sock.close()


class Vm:
    """One QEMU and everything attached to it."""

    def __init__(self, name: str, workdir: Path, lease_dir: Path) -> None:
        self.name = name
        self.workdir = workdir
        self.lease_dir = lease_dir
        self.proc: asyncio.subprocess.Process | None = None
        self.qemu_start: int | None = None
        self.qmp = QMPClient(name)
        self.events: list[dict[str, Any]] = []
        self.shutdown: asyncio.Future[dict[str, Any]] | None = None
        self.relay: Relay | None = None
        self.ports: dict[str, LineSocket] = {}
        self.event_task: asyncio.Task[None] | None = None
        self.exit_task: asyncio.Task[None] | None = None
        self.lease_path: Path | None = None
        self.uname: asyncio.Future[str] | None = None
        self.slot: GuestSlot | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


class QemuLifecycle:
    """The ops that start, watch and end QEMU guests (a mixin of the agent)."""

    loop: asyncio.AbstractEventLoop

    def __init__(self) -> None:
        self.vms: dict[str, Vm] = {}

    def vm(self, name: str) -> Vm:
        if name not in self.vms:
            raise AgentError("no-such-vm", f"no VM named {name!r} in this agent")
        return self.vms[name]

    async def op_launch(
        self,
        name: str,
        workdir: str,
        lease_dir: str,
        spec: dict[str, Any],
        owner_pid: int,
        max_guests: int | None = None,
    ) -> dict[str, Any]:
        """Start QEMU for a lab VM: a guest slot, the process, its lease, QMP, then the
        relay on the chardev sockets. Returns once the VM can be talked to, not booted."""
        if name in self.vms:
            raise AgentError("exists", f"VM {name!r} already running in this agent")
        wd = Path(workdir)
        shared_dir(wd.parent)
        wd.mkdir(exist_ok=True)
        vm = Vm(name, wd, Path(lease_dir))
        vm.slot, waited_s = await _acquire_slot(name, max_guests)
        argv = qemu_argv(spec, wd)
        await _spawn(vm, argv)
        _write_lease(vm, owner_pid)
        self.vms[name] = vm
        vm.shutdown = self.loop.create_future()
        await self._connect_qmp(vm)
        self._attach_relay(vm, spec)
        return {"pid": vm.pid, "argv": argv, "slot_wait_s": waited_s}

    async def _connect_qmp(self, vm: Vm) -> None:
        """QMP and the chardev sockets appear once QEMU has parsed its arguments; a QEMU
        that exits first (or never opens them) is destroyed and its stderr reported."""
        assert vm.proc is not None
        wd = vm.workdir
        deadline = time.monotonic() + 20
        while True:
            await asyncio.sleep(0)  # let the child watcher record an early exit
            if vm.proc.returncode is not None:
                err = (wd / "qemu.stderr").read_text(errors="replace")[-2000:]
                await self.destroy_vm(vm)
                raise AgentError("qemu-failed", f"QEMU exited at start: {err.strip()}")
            if all((wd / f"{p}.sock").exists() for p in ("qmp", "vmbus", "get")):
                try:
                    await vm.qmp.connect(str(wd / "qmp.sock"))
                    break
                except Exception:
                    pass
            if time.monotonic() > deadline:
                await self.destroy_vm(vm)
                raise AgentError("qemu-failed", "QMP socket did not come up in 20 s")
            await asyncio.sleep(0.01)

    def _attach_relay(self, vm: Vm, spec: dict[str, Any]) -> None:
        """Watch QMP's events and QEMU's exit, and put the lab relay between the chardev
        sockets (the paravisor's vmbus and get ports)."""
        wd = vm.workdir
        vm.event_task = asyncio.create_task(self._events(vm))
        relay = Relay(
            send_vmbus=lambda s: vm.ports["vmbus"].send(s),
            send_get=lambda s: vm.ports["get"].send(s),
            strategy=spec.get("strategy", "none"),
        )
        vm.relay = relay
        vm.ports["vmbus"] = LineSocket(self.loop, wd / "vmbus.sock", relay.on_vmbus)
        vm.ports["get"] = LineSocket(self.loop, wd / "get.sock", lambda line: self._on_get(vm, line))
        vm.exit_task = asyncio.create_task(self._watch_exit(vm))  # keep a reference: tasks are weakly held

    def _on_get(self, vm: Vm, line: str) -> None:
        if line.startswith("UNAME") and vm.uname is not None and not vm.uname.done():
            vm.uname.set_result(line)
        assert vm.relay is not None
        vm.relay.on_get(line)

    async def _events(self, vm: Vm) -> None:
        with contextlib.suppress(Exception):
            async for ev in vm.qmp.events:
                entry = {
                    "t_ns": time.monotonic_ns(),
                    "event": ev["event"],
                    "data": ev.get("data", {}),
                }
                vm.events.append(entry)
                raw = ev.get("data")
                data: dict[str, Any] = dict(raw) if isinstance(raw, dict) else {}
                if ev["event"] == "VSERPORT_CHANGE" and vm.relay is not None:
                    port = str(data.get("id", "")).removeprefix("port-")
                    vm.relay.on_port_change(port, bool(data.get("open")))
                if ev["event"] == "SHUTDOWN" and vm.shutdown and not vm.shutdown.done():
                    vm.shutdown.set_result(entry)
                if ev["event"] == "GUEST_PANICKED" and data.get("action") == "pause":
                    # QEMU < 6.0 (no -action): the guest stays paused; it ended all the same.
                    if vm.shutdown and not vm.shutdown.done():
                        vm.shutdown.set_result(
                            {**entry, "event": "SHUTDOWN", "data": {"guest": True, "reason": "guest-panic"}}
                        )

    async def _watch_exit(self, vm: Vm) -> None:
        assert vm.proc is not None
        rc = await vm.proc.wait()
        vm.events.append({"t_ns": time.monotonic_ns(), "event": "QEMU_EXIT", "data": {"rc": rc}})
        if vm.shutdown and not vm.shutdown.done():
            vm.shutdown.set_result(vm.events[-1])

    def _serial_lines(self, vm: Vm) -> list[str]:
        try:
            text = (vm.workdir / "serial.log").read_text(errors="replace")
        except OSError:
            return []
        return [ln.strip() for ln in text.splitlines() if ln.strip()]

    async def op_wait_ready(self, name: str, timeout_s: float, incoming: bool = False) -> dict[str, Any]:
        """Cold boot: wait for the READY marker on serial. Restore: wait for the
        migration, then continue. Both: renegotiate with the paravisor (SYNC)
        and wait until the shutdown IC is offered."""
        vm = self.vm(name)
        assert vm.relay is not None
        t_start = time.monotonic()
        timeout = timeout_s
        end = t_start + timeout
        if incoming:
            while True:
                st = await _migrate_status(vm)
                if st.get("status") == "completed":
                    break
                if st.get("status") == "failed" or time.monotonic() > end:
                    raise AgentError("restore-failed", f"incoming migration: {st}")
                await asyncio.sleep(0.01)
            await vm.qmp.execute("cont")
        else:
            # Tail the serial log (read only what is new) for the READY marker.
            seen = b""
            with (vm.workdir / "serial.log").open("rb") as ser:
                while b"TB t=" not in seen or b" READY" not in seen:
                    seen = seen[-64:] + ser.read()
                    if vm.shutdown and vm.shutdown.done():
                        raise AgentError("guest-died", f"VM ended before READY: {vm.shutdown.result()}")
                    if time.monotonic() > end:
                        raise AgentError("boot-timeout", f"no READY marker on serial after {timeout:.0f} s")
                    await asyncio.sleep(0.003)
        t_marker = time.monotonic()
        offers = vm.relay.hellos
        vm.relay.sync()
        # The offer that answers this SYNC, not one the paravisor made at boot: a late
        # answer would otherwise arrive during the race.
        while vm.relay.ic != "ready" or vm.relay.hellos == offers:
            if time.monotonic() > end:
                raise AgentError("boot-timeout", f"shutdown IC not offered (ic={vm.relay.ic})")
            await asyncio.sleep(0.005)
        return {
            "seconds": time.monotonic() - t_start,
            "marker_s": t_marker - t_start,
            "guest_image": vm.relay.guest_image,
            "features": sorted(vm.relay.features),
        }

    async def op_uname(self, name: str, timeout_s: float = 10) -> dict[str, Any]:
        vm = self.vm(name)
        vm.uname = self.loop.create_future()
        vm.ports["get"].send("UNAME")
        try:
            line = await asyncio.wait_for(vm.uname, timeout_s)
        except asyncio.TimeoutError:
            raise AgentError("guest-timeout", "no UNAME reply from the guest") from None
        return {"line": line, **dict(t.split("=", 1) for t in line.split()[1:] if "=" in t)}

    async def op_powerdown(self, name: str) -> dict[str, Any]:
        """ACPI power button (the host-initiated poweroff, not the shutdown IC)."""
        await self.vm(name).qmp.execute("system_powerdown")
        return {}

    async def op_wait_outcome(self, name: str, timeout_s: float) -> dict[str, Any]:
        vm = self.vm(name)
        assert vm.shutdown is not None
        try:
            ev = await asyncio.wait_for(asyncio.shield(vm.shutdown), timeout_s)
        except asyncio.TimeoutError:
            return {"ended": False, "reason": None, "serial": self._serial_lines(vm)}
        reason = ev["data"].get("reason") if ev["event"] == "SHUTDOWN" else "qemu-exit"
        return {"ended": True, "reason": reason, "event": ev, "serial": self._serial_lines(vm)}

    async def op_snapshot(self, name: str, path: str) -> dict[str, Any]:
        """Save the running VM (at READY) to ``path``; the VM stays paused."""
        vm = self.vm(name)
        t = time.monotonic()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        await vm.qmp.execute("stop")
        tmp = f"{path}.{os.getpid()}.{name}.part"  # two lanes may make the same snapshot at once
        await vm.qmp.execute("migrate", {"uri": f"exec:cat > {tmp}"})
        while True:
            st = await _migrate_status(vm)
            if st.get("status") == "completed":
                break
            if st.get("status") in ("failed", "cancelled"):
                raise AgentError("snapshot-failed", f"migration: {st}")
            await asyncio.sleep(0.02)
        os.replace(tmp, path)
        return {"seconds": time.monotonic() - t, "bytes": os.path.getsize(path)}

    async def op_destroy(self, name: str, remove_workdir: bool = False) -> dict[str, Any]:
        vm = self.vms.get(name)
        res = {"destroyed": False} if vm is None else await self.destroy_vm(vm)
        if remove_workdir and vm is not None:
            shutil.rmtree(vm.workdir, ignore_errors=True)
        return res

    async def destroy_vm(self, vm: Vm) -> dict[str, Any]:
        """QMP quit, then SIGTERM, then SIGKILL; lease removed only when the process is gone."""
        how = "already-exited"
        self.vms.pop(vm.name, None)
        for p in vm.ports.values():
            p.close()
        if vm.proc is not None and vm.proc.returncode is None:
            how = "quit"
            with contextlib.suppress(Exception):
                await asyncio.wait_for(vm.qmp.execute("quit"), 1.0)
            if not await _wait_proc(vm.proc, 2.0):
                how = "sigterm"
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(vm.proc.pid, signal.SIGTERM)
                if not await _wait_proc(vm.proc, 2.0):
                    how = "sigkill"
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(vm.proc.pid, signal.SIGKILL)
                    await _wait_proc(vm.proc, 5.0)
        with contextlib.suppress(Exception):
            await vm.qmp.disconnect()
        if vm.event_task:
            vm.event_task.cancel()
        if vm.lease_path is not None and (vm.proc is None or vm.proc.returncode is not None):
            vm.lease_path.unlink(missing_ok=True)
        if vm.slot is not None:
            vm.slot.release()
            vm.slot = None
        return {"destroyed": True, "how": how, "pid": vm.proc.pid if vm.proc else None}

    async def op_probe_kvm(self, spec: dict[str, Any], workdir: str, timeout_s: float) -> dict[str, Any]:
        """Boot the reference guest under KVM with a short timeout, CPU model by CPU model.

        /dev/kvm existing is not enough: KVM has aborted guests on MSR access and hung
        at "Booting from ROM" on such machines. Success means the guest's init printed
        its first line within ``timeout_s``. ``-cpu host`` first; where QEMU aborts
        setting IA32_ARCH_CAPABILITIES (MSR 0x10a, a nested-virtualisation quirk), the
        same without that feature; every attempt's outcome is returned."""
        if not os.path.exists("/dev/kvm"):
            return {"ok": False, "reason": "/dev/kvm does not exist", "attempts": []}
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return {
                "ok": False,
                "reason": "/dev/kvm is not readable and writable by this user",
                "attempts": [],
            }

        async def boot(model: str) -> dict[str, Any]:
            return await boot_once({**spec, "accel": "kvm", "cpu_model": model}, Path(workdir), timeout_s)

        return await probe_cpu_models(boot)

    async def close_all(self) -> None:
        """The controller is gone (stdin closed): nobody will collect these guests'
        files, so their work dirs go with them."""
        for vm in list(self.vms.values()):
            await self.destroy_vm(vm)
            shutil.rmtree(vm.workdir, ignore_errors=True)


async def _acquire_slot(name: str, max_guests: int | None) -> tuple[GuestSlot, float]:
    """A guest slot and the seconds waited for it. The machine-wide guest limit is the
    host's (the inventory's max_guests, else the host's default): wait here for a slot."""
    slot = GuestSlot(limit=max_guests)
    t_wait = time.monotonic()
    if not slot.try_acquire():
        # Said where the user sees it (the agent's stderr is the run's, locally) and
        # returned, so a wait never passes for a slow boot.
        sys.stderr.write(f"testbed: all {slot.limit} guest slots of this host are busy (other runs); "
                         f"{name} waits for one\n")  # fmt: skip
        sys.stderr.flush()
        while not slot.try_acquire():
            if time.monotonic() - t_wait > SLOT_WAIT_S:
                raise AgentError("no-slot", f"no free guest slot on this host in {SLOT_WAIT_S:.0f} s")
            await asyncio.sleep(0.1)
    return slot, time.monotonic() - t_wait


async def _spawn(vm: Vm, argv: list[str]) -> None:
    """Start QEMU in its own session (so destroy can signal its whole group), killed with
    the agent, its output in qemu.stderr; the command line is saved beside it."""
    wd = vm.workdir
    (wd / "qemu.argv.json").write_text(json.dumps(argv))
    stderr = (wd / "qemu.stderr").open("wb")
    try:
        vm.proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    except FileNotFoundError:
        raise AgentError("qemu-missing", f"{argv[0]} not found: apt-get install qemu-system-x86") from None
    finally:
        stderr.close()


def _write_lease(vm: Vm, owner_pid: int) -> None:
    """The lease that lets a later run's gc find (and end) this QEMU if its owner dies."""
    vm.qemu_start = leases.start_time(vm.pid)
    owner = owner_pid or os.getpid()  # 0: a remote owner; the agent stands for it
    vm.lease_path = leases.write(
        vm.lease_dir,
        leases.Lease(
            vm.name, vm.pid, vm.qemu_start, owner, leases.start_time(owner), str(vm.workdir), time.time()
        ),
    )


async def _migrate_status(vm: Vm) -> dict[str, Any]:
    res = await vm.qmp.execute("query-migrate")
    return dict(res) if isinstance(res, dict) else {}


async def _wait_proc(proc: asyncio.subprocess.Process, timeout: float) -> bool:
    try:
        await asyncio.wait_for(proc.wait(), timeout)
        return True
    except asyncio.TimeoutError:
        return False
