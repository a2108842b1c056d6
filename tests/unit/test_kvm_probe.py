"""The KVM probe's order: -cpu host, then (only on the MSR 0x10a abort, a known
nested-virtualisation quirk) -cpu host,-arch-capabilities, then TCG; each attempt's
reason kept. Driven with QEMU outputs recorded on real machines."""

from __future__ import annotations

import asyncio
from typing import Any

from testbed.backends.qemu.agent.argv import qemu_argv
from testbed.backends.qemu.agent.qemu_process import CPU_MODELS, probe_cpu_models

# Recorded on this project's CI machine (QEMU 7.2, Debian 12, nested KVM).
MSR_ABORT = ("qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\nqemu-system-x86_64: "
             "../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: Assertion `ret == cpu->kvm_msr_buf->nmsrs' "
             "failed.")  # fmt: skip
HUNG = {"ok": False, "reason": "guest did not reach init within 15 s (hung)"}
BOOTED = {"ok": True, "reason": "guest reached init in 1.9 s"}
BAD_ARG = "qemu-system-x86_64: -cpu host,-arch-capabilities: Parameter 'cpu' expects a CPU model"


def probe(outcomes: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    tried: list[str] = []

    async def boot(model: str) -> dict[str, Any]:
        tried.append(model)
        return outcomes[model]

    return asyncio.run(probe_cpu_models(boot)), tried


def test_host_boots_first_time() -> None:
    res, tried = probe({"host": BOOTED})
    assert tried == ["host"] and res["ok"] and res["cpu"] == "host"


def test_the_msr_abort_moves_to_the_model_without_arch_capabilities() -> None:
    res, tried = probe(
        {"host": {"ok": False, "exit": -6, "stderr": MSR_ABORT}, "host,-arch-capabilities": BOOTED}
    )
    assert tried == list(CPU_MODELS) and res["ok"] and res["cpu"] == "host,-arch-capabilities"
    assert "MSR 0x10a" in res["reason"] and "reached init" in res["reason"]


def test_this_machine_ends_in_tcg_with_both_reasons() -> None:
    res, tried = probe(
        {"host": {"ok": False, "exit": -6, "stderr": MSR_ABORT}, "host,-arch-capabilities": HUNG}
    )
    assert tried == list(CPU_MODELS) and not res["ok"] and res.get("cpu") is None
    assert [a["cpu"] for a in res["attempts"]] == list(CPU_MODELS)
    assert "IA32_ARCH_CAPABILITIES" in res["attempts"][0]["reason"] and "hung" in res["attempts"][1]["reason"]
    assert "-cpu host:" in res["reason"] and "-cpu host,-arch-capabilities:" in res["reason"]


def test_a_hang_under_host_does_not_try_another_model() -> None:
    res, tried = probe({"host": HUNG})
    assert tried == ["host"] and not res["ok"] and "hung" in res["reason"]


def test_qemu_refusing_its_arguments_is_not_blamed_on_kvm() -> None:
    res, _ = probe({"host": {"ok": False, "exit": -6, "stderr": MSR_ABORT},
                    "host,-arch-capabilities": {"ok": False, "exit": 1, "stderr": BAD_ARG}})  # fmt: skip
    assert res["kind"] == "qemu-args" and "not a KVM problem" in res["reason"]


def test_the_model_that_won_reaches_the_command_line(tmp_path: Any) -> None:
    spec = {"machine": "q35", "accel": "kvm", "memory_mib": 128, "cpus": 1, "kernel": "k", "initrd": "i",
            "cmdline": "c", "cpu_model": "host,-arch-capabilities"}  # fmt: skip
    argv = qemu_argv(spec, tmp_path)
    assert argv[argv.index("-cpu") + 1] == "host,-arch-capabilities"
    assert "-cpu" not in qemu_argv({**spec, "accel": "tcg"}, tmp_path)
