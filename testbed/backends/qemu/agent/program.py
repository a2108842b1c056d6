"""The QEMU host agent: everything that must run next to QEMU, behind JSON lines
on stdin/stdout (``testbed.hostprog.rpc``).

It launches QEMU and owns QMP and the chardev sockets (``testbed.backends.qemu.agent.lifecycle``),
runs the lab relay, fires the race with a monotonic clock and returns host
timestamps (``Race`` below), and answers the host's preflight
(``testbed.backends.qemu.agent.preflight``).  When its stdin closes (the testbed process died,
or an SSH channel dropped) it destroys its QEMU: the dead-man switch.

Dependencies: stdlib, qemu.qmp, and stdlib-only testbed modules, so the agent
ships as a zipapp (``testbed.hostprog.bundle``) to a host with only Python 3.9+.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from testbed.backends.qemu.agent.lifecycle import QemuLifecycle, Vm
from testbed.backends.qemu.agent.preflight import HostInfo
from testbed.hostprog import rpc
from testbed.hostprog.timing import sleep_until_ns, wait_for
from testbed.lab.relay import Relay


def _shutdown_firer(relay: Relay, shutdown: dict[str, Any] | None, out: dict[str, Any]) -> Callable[[], None]:
    """``fire()``: the shutdown request, now, with the relay's decision and stamp put in
    ``out``. A closure, so the timed paths call it with nothing between wake-up and request."""

    def fire() -> None:
        assert shutdown is not None
        decision, t = relay.request_shutdown(str(shutdown["id"]), shutdown.get("reason", "testbed"))
        out["fire_ns"] = t
        out["decision"] = decision
        out["ic_at_fire"] = relay.ic if decision != "rejected" else relay.log[-1].get("ic")

    return fire


class _RaceRun:
    """One ``op_race`` call: the VM, the two requests, and ``out``, the evidence each
    step below adds to, in the order the steps run (which is the order of its keys).

    The steps take what they use into locals first, so their timed paths and polling
    loops run the same code as when the race was one function."""

    def __init__(self, vm: Vm, service: dict[str, Any] | None, shutdown: dict[str, Any] | None) -> None:
        relay = vm.relay
        assert relay is not None and vm.shutdown is not None
        self.vm = vm
        self.relay = relay
        self.ended = vm.shutdown
        self.log_start = len(relay.log)
        self.ev_start = len(vm.events)
        self.out: dict[str, Any] = {"ic_before": relay.ic}
        self.service = service  # None once a shutdown fired first has ended the VM
        self.shutdown = shutdown
        self.mode = shutdown.get("mode", "offset") if shutdown is not None else None
        self.offset_ns = (
            int(float(shutdown["offset_ms"]) * 1e6) if shutdown and self.mode == "offset" else None
        )
        self.fire = _shutdown_firer(relay, shutdown, self.out)
        self.t_begin = time.monotonic_ns()
        self.triggered = asyncio.Event()
        self.pending: list[asyncio.Future[None]] = []

    def arm_trigger(self) -> None:
        """Fire on a phase's arrival (delay 0: inside the line's handling, before the next
        line is read) or a delay after it. The IC's re-offer is a phase too (announced
        as the restarted paravisor's first HELLO is read), so ``ic-ready`` fires from
        the same trigger instead of polling for it."""
        relay, shutdown, mode = self.relay, self.shutdown, self.mode
        relay.on_phase = None
        want = None
        if shutdown is not None and mode == "phase":
            want = str(shutdown["phase"])
        elif shutdown is not None and mode == "ic-ready" and self.service is not None:
            want = "ic-reoffered"
        if want is None:
            return
        assert shutdown is not None
        delay_ns = int(float(shutdown["offset_ms"]) * 1e6)
        out, fire, triggered, pending = self.out, self.fire, self.triggered, self.pending

        async def fire_at(t_ns: int) -> None:
            await sleep_until_ns(t_ns)
            fire()

        def on_phase(name: str, t_ns: int) -> None:
            if name != want or "trigger_ns" in out:
                return
            out["trigger_ns"] = t_ns
            if mode == "phase":
                out["phase_ns"] = t_ns
            out["fire_planned_ns"] = t_ns + delay_ns
            if delay_ns == 0:
                fire()
            else:  # its own task: it starts at once, and spins the last 2 ms
                pending.append(asyncio.ensure_future(fire_at(t_ns + delay_ns)))
            triggered.set()

        relay.on_phase = on_phase

    async def fire_requests(self) -> None:
        """Servicing at t = 0 and, in offset mode, the shutdown at t0 + offset (fired
        first, that long before, for a negative offset); without servicing, the
        shutdown alone, at once."""
        relay, out, fire, offset_ns, service = self.relay, self.out, self.fire, self.offset_ns, self.service
        if service is not None:
            if offset_ns is not None and offset_ns < 0:
                fire()
                await sleep_until_ns(out["fire_ns"] - offset_ns)
            if self.ended.done():
                # The shutdown fired first already ended the VM: nothing to service.
                out["servicing_skipped"] = "the VM ended before the servicing request was due"
                self.service = None
            else:
                t0 = relay.start_servicing(int(service["id"]), service["image"], service["knobs"])
                out["t0_ns"] = t0
                if offset_ns is not None and offset_ns >= 0:
                    await sleep_until_ns(t0 + offset_ns)
                    fire()
        elif self.shutdown is not None and offset_ns is not None:
            out["t0_ns"] = self.t_begin
            fire()

    async def wait_trigger(self, deadline: int) -> None:
        """Until the phase trigger fired (or servicing ended, the VM ended, the deadline
        passed); then disarm it, let a delayed fire land, and say why it never fired."""
        relay, ended, triggered, out = self.relay, self.ended, self.triggered, self.out
        shutdown = self.shutdown
        assert shutdown is not None
        while not triggered.is_set() and "done_ns" not in relay.svc and not ended.done():
            if time.monotonic_ns() > deadline:
                break
            await asyncio.sleep(0.001)
        relay.on_phase = None
        for task in self.pending:
            await task
        if not triggered.is_set() and self.mode == "phase":
            out["phase_missing"] = f"phase {shutdown['phase']} never came in this servicing"
        elif not triggered.is_set():  # ic-ready without a re-offer: fired at once, and said
            out["no_reoffer"] = "the IC was never re-offered after the request: fired at once"
            self.fire()

    async def wait_servicing(self, deadline: int) -> None:
        """Until the guest reports the end of servicing or the VM ends; past the deadline,
        record the timeout."""
        relay, ended = self.relay, self.ended
        while "done_ns" not in relay.svc and not ended.done():
            if time.monotonic_ns() > deadline:
                self.out["servicing_timeout"] = True
                break
            await asyncio.sleep(0.002)

    async def fire_after_ready(self, deadline: int) -> None:
        """The seed test's order: wait for the IC to be ready again, then fire."""
        relay, ended = self.relay, self.ended
        while relay.ic != "ready" and not ended.done():
            if time.monotonic_ns() > deadline:
                break
            await asyncio.sleep(0.002)
        self.out["t0_ns"] = self.out.get("t0_ns", self.t_begin)
        self.fire()

    async def grace(self, grace_ms: float) -> None:
        """Grace: enough for a delivered message to power the guest off. A refused request
        posted nothing, so nothing can arrive: once servicing is over (its outcome is
        recorded either way) the iteration is decided, and waiting would only cost time."""
        out = self.out
        refused = out.get("decision") == "rejected"
        if refused and (self.service is None or "done_ns" in self.relay.svc or out.get("servicing_timeout")):
            out["grace_skipped"] = "the request was refused: nothing was posted"
        else:
            await wait_for(self.ended, grace_ms / 1000)

    async def stop_stream(self, streaming: asyncio.Future[None]) -> None:
        """Stop the stream and wait for it; a VM still up gets a moment for the last
        acknowledgements, which are on their way."""
        self.out["stream_stop"] = True
        await streaming
        if not self.ended.done():
            await wait_for(self.ended, 0.2)


class Race(QemuLifecycle):
    """The race: servicing at t = 0 and the shutdown at the planned offset, both
    fired here, then the VM's fate and the evidence."""

    async def op_race(
        self,
        name: str,
        service: dict[str, Any] | None,
        shutdown: dict[str, Any] | None,
        grace_ms: float,
        servicing_timeout_ms: float,
        stream: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One iteration: servicing request at t=0, shutdown IC request at the
        planned offset, both fired here with the monotonic clock; then wait for
        the VM's fate and return the evidence. With ``stream``, traffic runs
        beside them (``_stream``)."""
        run = _RaceRun(self.vm(name), service, shutdown)
        run.arm_trigger()
        streaming = await self._start_stream(run, stream)
        await run.fire_requests()
        # Wait for the end of servicing (guest report) or its timeout.
        svc_deadline = time.monotonic_ns() + int(servicing_timeout_ms * 1e6)
        if run.relay.on_phase is not None:
            await run.wait_trigger(svc_deadline)
        if run.service is not None:
            await run.wait_servicing(svc_deadline)
        if shutdown is not None and run.mode == "after-ready":
            await run.fire_after_ready(svc_deadline)
        await run.grace(grace_ms)
        if streaming is not None:
            await run.stop_stream(streaming)
        return self._race_evidence(run)

    async def _start_stream(
        self, run: _RaceRun, stream: dict[str, Any] | None
    ) -> asyncio.Future[None] | None:
        """Start ``_stream`` beside the race; a negative ``from_ms`` starts it that long
        before the servicing request, so that lead is waited here."""
        if stream is None:
            return None
        streaming = asyncio.ensure_future(self._stream(run.vm, stream, run.out))
        lead_s = -float(stream.get("from_ms", 0.0)) / 1000
        if lead_s > 0 and run.service is not None:
            await asyncio.sleep(lead_s)  # the stream starts before the servicing request
        return streaming

    def _race_evidence(self, run: _RaceRun) -> dict[str, Any]:
        """The VM's fate, and what the race left: the relay's log and the QMP events since
        it began, the serial lines, the servicing record, the phases seen."""
        vm, relay, out = run.vm, run.relay, run.out
        out["end_ns"] = time.monotonic_ns()
        out["ended"] = run.ended.done()
        out["shutdown"] = run.ended.result() if run.ended.done() else None
        out["svc"] = dict(relay.svc)
        out["ic_after"] = relay.ic
        out["host_log"] = relay.log[run.log_start :]
        out["qmp_events"] = vm.events[run.ev_start :]
        out["acks"] = list(relay.acks)
        out["serial"] = self._serial_lines(vm)
        out["strategy"] = relay.strategy
        out["features"] = sorted(relay.features)
        out["phases"] = dict(relay.phases)
        return out

    async def _stream(self, vm: Any, spec: dict[str, Any], out: dict[str, Any]) -> None:
        """Host -> guest: an ``hb`` message every ``interval_ms`` until ``until_ms`` after
        the servicing request (or the race's end), under the IC's rules like any message;
        guest -> host: one ``stream`` message asks VTL0 for its ``TX`` lines. Plain
        sleeps, no spin: each message's time is the relay's stamp of its decision."""
        relay = vm.relay
        span_ms = float(spec["until_ms"]) - float(spec.get("from_ms", 0.0))
        gi = spec.get("guest_interval_ms")
        if gi:
            relay.request_message(
                "stream", "tx", f"interval_us={int(float(gi) * 1000)} count={int(span_ms / float(gi))}"
            )
        interval_ns = int(float(spec["interval_ms"]) * 1e6)
        t, k = time.monotonic_ns(), 0
        while not vm.shutdown.done() and not out.get("stream_stop"):
            t0 = out.get("t0_ns")
            if t0 is not None and t >= t0 + int(float(spec["until_ms"]) * 1e6):
                break
            await asyncio.sleep(max(0.0, (t - time.monotonic_ns()) / 1e9))
            relay.request_message("hb", f"hb{k}")
            k += 1
            t += interval_ns
        out["stream_sent"] = k


class Agent(Race, HostInfo, rpc.RpcServer):
    def __init__(self) -> None:
        rpc.RpcServer.__init__(self)
        QemuLifecycle.__init__(self)


def main() -> None:
    rpc.run(Agent)


if __name__ == "__main__":
    main()
