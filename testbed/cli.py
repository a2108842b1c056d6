"""The ``testbed`` command line.

Exit codes (every command):
  0  no expectation violated (for run: no unexpected loss or duplicate)
  1  an expectation of the playbook was violated (e.g. a lost shutdown)
  2  usage or configuration error (the message names file:line)
  3  infrastructure failure (host, QEMU, image build), never a product verdict
  130 interrupted (Ctrl-C / SIGTERM): finished iterations and reports are kept
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from testbed.backends import registry
from testbed.backends.commands import console, exit_codes, fail, out
from testbed.core.config import STRATEGIES, ConfigError, HostOptions
from testbed.core.errors import InfraError
from testbed.core.paths import runtime_dir
from testbed.engine.playbook import load_playbook, load_vm_config
from testbed.hostprog import leases
from testbed.hosts import lookup_entry, open_backend
from testbed.report import finish_run
from testbed.transport import TransportError

HELP = __doc__ or ""
app = typer.Typer(
    help="Race tests of paravisor servicing vs. vmbus messages.\n\n" + HELP,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
host_app = typer.Typer(help="Check a host before running suites on it.", no_args_is_help=True)
app.add_typer(host_app, name="host")
for _kind in registry.kinds().values():  # a kind's own commands (QEMU: image, vm), mounted as its
    for _name, _sub in (_kind.commands() if _kind.commands else {}).items():
        app.add_typer(_sub, name=_name)

HostOpt = Annotated[
    str,
    typer.Option(
        "--host", help="local | ssh://user@host[:port] | winrms://user@host (Hyper-V) | an inventory name"
    ),
]
InventoryOpt = Annotated[
    Path | None, typer.Option("--inventory", help="host inventory YAML (or $TESTBED_INVENTORY)")
]
InsecureOpt = Annotated[
    bool,
    typer.Option(
        "--insecure-accept-new",
        help="SSH: trust an unknown host key on first use (default: strict known_hosts)",
    ),
]
IdentityOpt = Annotated[
    str | None, typer.Option("--identity", help="SSH private key file (default: agent, ~/.ssh)")
]

DEFAULT_CONFIG = Path("vm_configs/reference-linux.yaml")


def _sigterm_as_interrupt() -> None:
    """SIGINT and SIGTERM both stop a run cleanly (VMs destroyed, reports written).

    SIGINT is installed explicitly: a process started in the background by a
    non-interactive shell (CI, nohup) inherits SIGINT as ignored, and Python
    then never raises KeyboardInterrupt for it.
    """

    def handler(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    _sigterm_as_interrupt()


# ---- run -------------------------------------------------------------------------


@app.command()
def run(
    playbook: Annotated[Path, typer.Argument(help="playbook YAML, e.g. playbooks/quick.yaml")],
    host: HostOpt = "",
    inventory: InventoryOpt = None,
    insecure_accept_new: InsecureOpt = False,
    identity: IdentityOpt = None,
    vm_config: Annotated[Path | None, typer.Option(help="override the playbook's vm_config")] = None,
    strategy: Annotated[str | None, typer.Option(help=f"override: {' | '.join(STRATEGIES)}")] = None,
    iterations: Annotated[
        int | None,
        typer.Option(min=1, help="override the number of iterations (wins over the count of --offsets)"),
    ] = None,
    offsets: Annotated[
        str | None,
        typer.Option(
            help="override the schedule: 10,50,90 | linear:START:STOP:COUNT | random:LO:HI:COUNT | adaptive:LO:HI;"
            " its number of offsets sets the iterations unless --iterations is given (then cycled or cut)"
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="seed of random/adaptive schedules and jitter")] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="run folder (default runs/<time>-<playbook>)")
    ] = None,
    stop_on_loss: Annotated[
        bool, typer.Option("--stop-on-loss", help="stop at the first lost message")
    ] = False,
    keep_failed: Annotated[
        bool,
        typer.Option(
            "--keep-failed",
            help="keep everything of a failed iteration in its folder, also the snapshot it was restored from",
        ),
    ] = False,
    reset: Annotated[
        str | None, typer.Option(help="cold | snapshot: how each iteration gets a fresh VM")
    ] = None,
    max_duration: Annotated[
        float | None, typer.Option(help="stop starting iterations after N seconds")
    ] = None,
    resume: Annotated[Path | None, typer.Option(help="continue an interrupted run folder")] = None,
    parallel: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="guests racing at once on the host (each with its own agent and guest slot), capped by the "
            "host's max_guests (inventory) or TESTBED_MAX_GUESTS (2); overrides the playbook's parallel",
        ),
    ] = None,
    builds: Annotated[
        str | None,
        typer.Option(
            help="bisect across these paravisor builds, comma-separated, good first and bad last "
            "(replaces the playbook's bisect builds; see testbed bisect --help)"
        ),
    ] = None,
) -> None:
    """Run a playbook: fire the shutdown IC at offsets across paravisor servicing, many times.

    Writes results.jsonl (as each iteration ends), summary.json, junit.xml,
    summary.md and report.html into the run folder.  Exit code 1 means an
    expectation of the playbook was violated, 3 an infrastructure failure.
    """
    from testbed.engine.runner import Runner, RunOptions
    from testbed.engine.schedule import parse_schedule

    if strategy is not None and strategy not in STRATEGIES:
        fail(2, f"--strategy {strategy!r}: allowed: {', '.join(STRATEGIES)}")
    if reset is not None and reset not in ("cold", "snapshot"):
        fail(2, f"--reset {reset!r}: allowed: cold, snapshot")
    with exit_codes():
        pb, cfg = load_playbook(playbook)
        if vm_config is not None:
            cfg = load_vm_config(vm_config)
        sched = parse_schedule(offsets) if offsets else None
        host_spec = host or pb.host
        entry = lookup_entry(host_spec, inventory, kind=cfg.backend)
        host_opts = HostOptions(insecure_accept_new, identity)
        backend = open_backend(entry, cfg.backend, host_opts)
    opts = RunOptions(
        backend=backend,
        host_spec=host_spec,
        inventory=inventory,
        strategy=strategy,
        iterations=iterations,
        offsets=sched,
        seed=seed,
        out=out_dir,
        stop_on_loss=stop_on_loss or None,
        keep_failed=keep_failed,
        max_duration_s=max_duration,
        resume=resume,
        reset=reset,
        parallel=parallel,
        builds=[b.strip() for b in builds.split(",") if b.strip()] if builds else None,
        max_guests=entry.max_guests,
        open_backend=lambda: open_backend(entry, cfg.backend, host_opts),
        finish=finish_run,
    )
    with exit_codes():
        if pb.matrix is not None:
            from testbed.engine.matrix import MatrixRunner

            runner: Any = MatrixRunner(pb, cfg, opts, playbook_path=playbook)
        else:
            runner = Runner(pb, cfg, opts, playbook_path=playbook)
    console.print(f"{pb.name} on {backend.host} ({backend.kind}): {runner.describe()}", highlight=False)
    counts: Counter[str] = Counter()
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[counts]}"),
        console=console,
        transient=False,
    )
    task = progress.add_task(pb.name, total=None, counts="booting / building the image...")

    def on_event(ev: dict[str, Any]) -> None:
        if ev["event"] == "start":
            progress.update(
                task,
                total=ev["total"],
                completed=ev["done"],
                counts=f"accel {ev['accel']}, grace {ev['grace_ms']:.0f} ms",
            )
        elif ev["event"] == "cell":  # a matrix: one bar per cell, in turn
            counts.clear()
            progress.update(task, description=f"cell {ev['index'] + 1}/{ev['cells']}: {ev['cell']}", completed=0,
                            total=None, counts="")  # fmt: skip
        elif ev["event"] == "iteration":
            counts[ev["record"]["verdict"]] += 1
            progress.update(task, advance=1, counts=" ".join(f"{k}={v}" for k, v in sorted(counts.items())))

    runner.progress = on_event
    with exit_codes(usage=False), progress:
        result = runner.run()
    _print_summary(result.run_dir, result.summary)
    if result.stopped:
        console.print(f"[bold red]stopped early:[/] {result.stopped}", highlight=False)
    raise typer.Exit(result.exit_code)


@app.command()
def bisect(
    playbook: Annotated[Path, typer.Argument(help="playbook YAML, e.g. playbooks/bisect.yaml")],
    builds: Annotated[
        str | None, typer.Option(help="builds in order, comma-separated: good first, bad last")
    ] = None,
    host: HostOpt = "",
    inventory: InventoryOpt = None,
    parallel: Annotated[int | None, typer.Option(min=1, help="guests racing at once")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="run folder")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of the schedule")] = None,
) -> None:
    """Which build broke it: bisect an ordered list of paravisor builds (lab images, IGVM
    files) from a good one to a bad one.

    A flaky race makes a one-shot bisection lie, so every build tested gets a sequential
    test (Wald's SPRT: loss rate p0 = good against p1 = bad, with error rates alpha and
    beta, from the playbook's bisect section): tries continue until the evidence decides,
    or max_per_build leaves it undecided and the bisection says so. The first build must
    test good and the last bad. Each try services the guest into the build and fires the
    shutdown at the playbook's schedule offsets; the answer ("first bad build: ...") is in
    summary.md and report.html with the table of builds.

    \b
    testbed bisect playbooks/bisect.yaml
    testbed bisect playbooks/bisect.yaml --builds v2-r4,v2-r5,v2-r6,v2-r7 --parallel 2
    """
    with exit_codes():
        pb, _cfg = load_playbook(playbook)
    if pb.bisect is None and not builds:
        fail(2, f"{playbook}: no bisect section and no --builds: say which builds to bisect")
    run(
        playbook, host=host, inventory=inventory, out_dir=out_dir, seed=seed, parallel=parallel, builds=builds
    )


def _print_summary(run_dir: Path, s: dict[str, Any]) -> None:
    print((run_dir / "summary.md").read_text())
    print(f"reports: {run_dir}/report.html, junit.xml, summary.json")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a run folder with results.jsonl")],
) -> None:
    """Rebuild summary.json, junit.xml, summary.md and report.html from results.jsonl alone."""

    if not (run_dir / "results.jsonl").exists():
        fail(2, f"{run_dir}: no results.jsonl here; pass a run folder")
    summary, code = finish_run(run_dir)
    _print_summary(run_dir, summary)
    raise typer.Exit(code)


@app.command()
def compare(
    run_a: Annotated[Path, typer.Argument(help="run folder A (e.g. before the fix)")],
    run_b: Annotated[Path, typer.Argument(help="run folder B (e.g. after the fix)")],
    html_out: Annotated[
        Path | None,
        typer.Option(
            "--html", help="also write a self-contained page: both loss curves on one plot, the table"
        ),
    ] = None,
) -> None:
    """Did the fix work? Loss rates side by side with Fisher's exact test of the difference
    (two matrix runs: cell by cell)."""
    from testbed.core.runfolder import read_results
    from testbed.engine.matrix import compare_cells, is_matrix_run
    from testbed.engine.stats import fisher_exact, summarize

    if is_matrix_run(run_a) and is_matrix_run(run_b):
        t = Table("cell", "A lost/n", "B lost/n", "Fisher p")
        for c in compare_cells(run_a, run_b):
            t.add_row(c["cell"], f"{c['a'][0]}/{c['a'][1]}", f"{c['b'][0]}/{c['b'][1]}", f"{c['p']:.4g}")
        out.print(t)
        return

    rows = []
    for d in (run_a, run_b):
        recs = read_results(d / "results.jsonl")
        if not recs:
            fail(2, f"{d}: no results.jsonl with iterations")
        rows.append(summarize(recs))
    (a, b) = rows
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
        t.add_row(
            str(d),
            str(s["counts"]["lost"]),
            str(s["product_iterations"]),
            f"{100 * (s['loss_rate'] or 0):.1f}%",
            f"{100 * ci[0]:.1f}% to {100 * ci[1]:.1f}%",
        )
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


@app.command()
def repro(
    run_dir: Annotated[Path, typer.Argument(help="run folder")],
    iteration: Annotated[int, typer.Option(help="iteration number to replay")],
    keep: Annotated[
        bool, typer.Option("--keep", help="keep the VM running for inspection until Ctrl-C")
    ] = False,
) -> None:
    """Replay one iteration with the same offset, strategy and config, on the host the
    run used (its URI or inventory name and kind are in run.json; SSH and WinRM hosts
    are reopened the same way)."""
    from testbed.core.evidence import RacePlan
    from testbed.core.runfolder import read_results
    from testbed.engine.iterate import iterate

    if not (run_dir / "run.json").exists():
        fail(2, f"{run_dir}: no run.json here; pass a run folder")
    run = json.loads((run_dir / "run.json").read_text())
    rec = next((r for r in read_results(run_dir / "results.jsonl") if r["iteration"] == iteration), None)
    if rec is None:
        fail(2, f"{run_dir}: no iteration {iteration} in results.jsonl")
    with exit_codes():
        try:
            pb, cfg = load_playbook(Path(run["playbook_path"]))
        except (ConfigError, TypeError) as e:
            raise ConfigError(
                run_dir / "run.json", None, f"cannot reload the playbook of this run: {e}"
            ) from None
        cfg = cfg.with_lab(pb.lab)
        inv = Path(run["inventory"]) if run.get("inventory") else None
        entry = lookup_entry(run.get("host_spec") or "local", inv, kind=run.get("host_kind") or cfg.backend)
        backend = open_backend(entry, cfg.backend)
    case = next((c for c in pb.resolved_cases() if c.name == rec.get("case")), None)
    plan = RacePlan(iteration, rec["planned_offset_ms"], case.servicing if case else True,
                    case.shutdown != "none" if case else rec["decision"] is not None,
                    case.shutdown if case else "offset", rec.get("image"))  # fmt: skip
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


@app.command()
def gc(
    host: HostOpt = "local",
    inventory: InventoryOpt = None,
    insecure_accept_new: InsecureOpt = False,
    identity: IdentityOpt = None,
) -> None:
    """Kill every VM whose owning testbed process is gone, and remove its lease and work dir.

    Locally: this machine's leases, then every backend kind reachable here asked to
    reap its own (a kind that cannot run here is skipped, and said so with -v). With
    --host, on that host (through its agent or module): what a dead run left there.

    Example: testbed gc --host lab1 --inventory hosts.yaml
    """
    if host == "local":
        actions = leases.gc(runtime_dir() / "leases")
        for kind in registry.kinds().values():
            if "local" not in kind.schemes:
                continue
            try:
                backend = kind.open(kind.host_entry(name="local", uri="local", kind=kind.kind), HostOptions())
                with contextlib.closing(backend):
                    actions += [a for a in backend.gc_host() if a not in actions]
            except (InfraError, TransportError, OSError) as e:
                logging.getLogger("testbed.gc").info("%s: nothing reaped here: %s", kind.kind, e)
    else:
        with exit_codes():
            backend = open_backend(
                lookup_entry(host, inventory), opts=HostOptions(insecure_accept_new, identity)
            )
            with contextlib.closing(backend):
                actions = backend.gc_host()
    for a in actions:
        out.print(a)
    if not actions:
        out.print("nothing to clean")


# ---- host --------------------------------------------------------------------------


@host_app.command("check")
def host_check(
    host: Annotated[
        str, typer.Argument(help="local | ssh://user@host[:port] | winrms://user@host | an inventory name")
    ] = "local",
    inventory: InventoryOpt = None,
    insecure_accept_new: InsecureOpt = False,
    identity: IdentityOpt = None,
    config: Annotated[Path, typer.Option(help="vm_config to check the host against")] = DEFAULT_CONFIG,
    probe: Annotated[
        bool, typer.Option(help="run the deep checks now (QEMU: the KVM probe, which boots a tiny guest)")
    ] = False,
) -> None:
    """Preflight: each problem with the command that fixes it.

    A QEMU host: QEMU, the KVM probe, build tools, kernel package, disk (remote hosts
    are checked on the host itself, through the host agent over SSH). A Hyper-V host
    (winrm(s)://, or an inventory entry of kind hyperv; password in
    TESTBED_WINRM_PASSWORD or the entry's password_env): WinRM reachable and
    credentials accepted, Hyper-V enabled, AllowFirmwareLoadFromFile, OS build, COM3,
    free memory.
    """
    with exit_codes():
        cfg = load_vm_config(config) if config.exists() or config != DEFAULT_CONFIG else None
        entry = lookup_entry(host, inventory, kind=cfg.backend if cfg else None)
        if cfg is not None and cfg.backend != entry.kind:
            cfg = None  # the default vm_config is for another kind of host
        backend = open_backend(entry, opts=HostOptions(insecure_accept_new, identity))
        with contextlib.closing(backend):
            rep = backend.preflight(cfg, deep=probe)
    t = Table("check", "ok", "detail", "fix")
    for c in rep.checks:
        t.add_row(c.name, "yes" if c.ok else "NO", c.detail, "" if c.ok else c.fix)
    out.print(t)
    raise typer.Exit(0 if rep.ok else 3)


@host_app.command("inventory")
def host_inventory(
    inventory: Annotated[Path, typer.Option("--inventory", help="testbed host inventory YAML")],
    fmt: Annotated[str, typer.Option("--format", help="ansible (YAML inventory) | yaml")] = "ansible",
) -> None:
    """Render the host inventory, e.g. as an Ansible inventory (groups testbed_<kind>; never secrets)."""
    from testbed.ansible import dump_yaml, render_inventory
    from testbed.hosts import load_inventory

    with exit_codes():
        inv = load_inventory(inventory)
    if fmt == "ansible":
        print(dump_yaml(render_inventory(inv)), end="")
    elif fmt == "yaml":
        print(dump_yaml(inv.as_dict()), end="")
    else:
        fail(2, f"--format {fmt!r}: allowed: ansible, yaml")


@host_app.command("prepare")
def host_prepare(
    host: Annotated[str, typer.Argument(help="an inventory host name, or 'all'")],
    inventory: Annotated[Path, typer.Option("--inventory", help="testbed host inventory YAML")],
) -> None:
    """Prepare lab hosts with Ansible (playbooks/hosts/): packages, the testbed user and venv,
    the reference image, then 'testbed host check' on the host. Needs pip install 'testbed[hosts]'."""
    from testbed.ansible import AnsibleMissing, prepare
    from testbed.hosts import load_inventory

    with exit_codes():
        inv = load_inventory(inventory)
    targets = inv.hosts if host == "all" else [h for h in inv.hosts if h.name == host]
    if not targets:
        fail(2, f"no host named {host!r} in {inventory}")
    status = console.status("starting ansible-playbook...")
    log_lines: list[str] = []

    def on_line(line: str) -> None:
        log_lines.append(line)
        if line.startswith(("TASK [", "PLAY [")):
            status.update(line.strip(" *"))
        elif line.startswith(("fatal:", "failed:")) or "UNREACHABLE" in line:
            console.print(line, highlight=False)

    t = time.monotonic()
    try:
        with status:
            recap = prepare(inv, targets, on_line)
    except AnsibleMissing as e:
        fail(2, str(e))
    table = Table("host", "ok", "changed", "unreachable", "failed")
    bad = False
    for h in targets:
        r = recap.get(h.name)
        if r is None:
            table.add_row(h.name, "-", "-", "-", "no result")
            bad = True
            continue
        bad = bad or bool(r["failed"] or r["unreachable"])
        table.add_row(h.name, str(r["ok"]), str(r["changed"]), str(r["unreachable"]), str(r["failed"]))
    out.print(table)
    out.print(f"prepared in {time.monotonic() - t:.0f} s")
    if bad:
        console.print("\n".join(log_lines[-40:]), highlight=False)
        raise typer.Exit(3)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
