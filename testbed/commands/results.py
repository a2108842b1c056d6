"""``testbed compare`` and ``testbed repro``: reading run folders back.

``repro`` reopens the host a run used (its URI or inventory name and kind, from
run.json), with the vm_config it really used (``--vm-config`` is recorded), and replays
one iteration's plan: the same offset or phase, mode, build and strategy.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from testbed.backends.commands import exit_codes, fail, out
from testbed.core.config import ConfigError, VmConfig
from testbed.core.evidence import RacePlan
from testbed.core.runfolder import read_results
from testbed.engine.playbook import Playbook, load_playbook, load_vm_config
from testbed.engine.stats import fisher_exact, summarize
from testbed.hosts import lookup_entry, open_backend


def compare(run_a: str, run_b: str, html_out: Path | None) -> None:
    """Loss rates side by side with Fisher's exact test (two matrix runs: cell by cell;
    ``RUN@HOST``: one host's tries of a fleet run)."""
    from testbed.engine.matrix import compare_cells, is_matrix_run

    if is_matrix_run(Path(run_a)) and is_matrix_run(Path(run_b)):
        t = Table("cell", "A lost/n", "B lost/n", "Fisher p")
        for c in compare_cells(Path(run_a), Path(run_b)):
            t.add_row(c["cell"], f"{c['a'][0]}/{c['a'][1]}", f"{c['b'][0]}/{c['b'][1]}", f"{c['p']:.4g}")
        out.print(t)
        return
    rows = []
    for d in (run_a, run_b):
        recs = _records(d)
        if not recs:
            fail(2, f"{d}: no results.jsonl with iterations")
        rows.append(summarize(recs))
    a, b = rows
    la, na, lb, nb = (
        a["counts"]["lost"],
        a["product_iterations"],
        b["counts"]["lost"],
        b["product_iterations"],
    )
    p = fisher_exact(la, na - la, lb, nb - lb)
    t = Table("run", "lost", "n", "loss rate", "Wilson 95%")
    for d, s in ((run_a, a), (run_b, b)):
        ci = s["loss_ci95"]
        t.add_row(str(d), str(s["counts"]["lost"]), str(s["product_iterations"]),
                  f"{100 * (s['loss_rate'] or 0):.1f}%", f"{100 * ci[0]:.1f}% to {100 * ci[1]:.1f}%")  # fmt: skip
    out.print(t)
    verdict = "the difference is significant" if p < 0.05 else "no significant difference"
    out.print(f"Fisher exact test (two-sided): p = {p:.4g}: {verdict} at 5%")
    if html_out is not None:
        from testbed.report.html import render_compare

        try:
            html_out.write_text(
                render_compare([str(run_a), str(run_b)], [a, b], p, verdict), encoding="utf-8"
            )
        except OSError as e:
            fail(3, f"cannot write {html_out}: {e.strerror or e}")
        out.print(f"comparison page: {html_out}")


def _records(arg: str) -> list[dict[str, Any]]:
    """A run folder's records, or with ``RUN@HOST`` one host's records of a fleet run."""
    if not Path(arg).exists() and "@" in arg:
        folder, host = arg.split("@", 1)
        recs = [r for r in read_results(Path(folder) / "results.jsonl") if r.get("host") == host]
        if not recs:
            fail(2, f"{folder}: no iterations on host {host!r}")
        return recs
    return read_results(Path(arg) / "results.jsonl")


def _reload(run_dir: Path, run: dict[str, Any]) -> tuple[Playbook, VmConfig]:
    """The run's playbook and the vm_config it used (its --vm-config when it had one)."""
    try:
        pb, cfg = load_playbook(Path(run["playbook_path"]))
        if run.get("vm_config_path"):
            cfg = load_vm_config(run["vm_config_path"])
    except (ConfigError, TypeError) as e:
        raise ConfigError(
            run_dir / "run.json", None, f"cannot reload the playbook of this run: {e}"
        ) from None
    return pb, cfg.with_lab(pb.lab)


def _plan(pb: Playbook, rec: dict[str, Any], iteration: int) -> RacePlan:
    """The recorded iteration's plan: its offset (or phase and delay), mode and build."""
    case = next((c for c in pb.resolved_cases() if c.name == rec.get("case")), None)
    mode = rec.get("shutdown_mode") or (case.shutdown if case else "offset")
    return RacePlan(iteration, rec["planned_offset_ms"], case.servicing if case else True,
                    mode != "none" if case else rec["decision"] is not None, mode, rec.get("image"),
                    phase=rec.get("phase"))  # fmt: skip


def repro(run_dir: Path, iteration: int, keep: bool) -> None:
    """Replay one iteration on the host the run used; ``keep`` leaves the VM for inspection."""
    from testbed.engine.iterate import iterate

    if not (run_dir / "run.json").exists():
        fail(2, f"{run_dir}: no run.json here; pass a run folder")
    run = json.loads((run_dir / "run.json").read_text())
    rec = next((r for r in read_results(run_dir / "results.jsonl") if r["iteration"] == iteration), None)
    if rec is None:
        fail(2, f"{run_dir}: no iteration {iteration} in results.jsonl")
    with exit_codes():
        pb, cfg = _reload(run_dir, run)
        inv = Path(run["inventory"]) if run.get("inventory") else None
        entry = lookup_entry(run.get("host_spec") or "local", inv, kind=run.get("host_kind") or cfg.backend)
        backend = open_backend(entry, cfg.backend)
    plan = _plan(pb, rec, iteration)
    with exit_codes(), contextlib.closing(backend):
        vm = backend.provision(cfg, rec["strategy"])
        try:
            r = iterate(backend, vm, plan, run["grace_ms"], reset=run.get("reset", "snapshot"), keep_vm=keep)
            v = r.verdict
            out.print(
                f"iteration {iteration}: was [bold]{rec['verdict']}[/], now [bold]{v.kind}[/]: {v.reason}"
            )
            for line in v.evidence:
                out.print("  " + line, highlight=False)
            out.print(f"replayed on {backend.host} ({backend.kind})", highlight=False)
            if keep and not r.evidence.ended:
                out.print(f"VM {vm.name} kept on {backend.host}: {vm.record()}. Ctrl-C to destroy it.")
                while True:
                    time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            backend.destroy(vm)
