"""The ``testbed`` command line: the commands and their options, declared here; what
they do is in ``testbed.commands`` (and, for a backend kind's own commands such as
QEMU's ``image`` and ``vm``, in the kind's package, mounted through the registry)."""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from testbed.backends import registry
from testbed.backends.commands import exit_codes, fail, out
from testbed.commands import hosts as host_commands
from testbed.commands import results
from testbed.commands.run import RunArgs, execute, print_summary
from testbed.core.config import STRATEGIES, HostOptions
from testbed.engine.playbook import load_playbook
from testbed.report import finish_run

# Kept as a table in --help: "\b" stops click from re-wrapping the lines.
EXIT_CODES = """\b
Exit codes (every command):
  0    no expectation violated (run: no unexpected loss or duplicate)
  1    an expectation of the playbook was violated (e.g. a lost shutdown)
  2    usage or configuration error (the message names file:line)
  3    infrastructure failure (host, QEMU, image build), never a product verdict
  130  interrupted (Ctrl-C / SIGTERM): finished iterations and reports are kept"""

app = typer.Typer(
    help="Race tests of paravisor servicing against vmbus messages, on real virtual hardware.\n\n"
    "\b\nStart here:\n"
    "  testbed host check                                 what this machine lacks, with the fix\n"
    "  testbed run playbooks/quick.yaml                   a short race on the local reference lab\n"
    "  testbed run playbooks/flaky-window.yaml --dry-run  what a run would do; nothing started\n\n"
    + EXIT_CODES,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
host_app = typer.Typer(help="Check and prepare hosts before running suites on them.", no_args_is_help=True)
app.add_typer(host_app, name="host")
for _kind in registry.kinds().values():  # a kind's own commands (QEMU: image, vm)
    for _name, _sub in (_kind.commands() if _kind.commands else {}).items():
        app.add_typer(_sub, name=_name)

HostOpt = Annotated[
    str,
    typer.Option(
        "--host",
        help="local | ssh://user@host[:port] | winrms://user@host (Hyper-V) | mock://x "
        "| an inventory name (default: the playbook's host)",
    ),  # fmt: skip
]
InventoryOpt = Annotated[
    Path | None, typer.Option("--inventory", help="host inventory YAML (or $TESTBED_INVENTORY)")
]
InsecureOpt = Annotated[bool, typer.Option("--insecure-accept-new",
                                           help="SSH: trust an unknown host key on first use (default: strict)")]  # fmt: skip
IdentityOpt = Annotated[
    str | None, typer.Option("--identity", help="SSH private key file (default: agent, ~/.ssh)")
]
VmConfigOpt = Annotated[
    Path | None, typer.Option(help="use this vm_config instead of the playbook's (recorded)")
]
StrategyOpt = Annotated[str | None, typer.Option(help=f"override: {' | '.join(STRATEGIES)}")]
IterationsOpt = Annotated[int | None, typer.Option(min=1, max=1_000_000, help="override the number of "
                                                   "iterations, 1..1000000 (wins over the count of --offsets)")]  # fmt: skip
OffsetsOpt = Annotated[str | None, typer.Option(
    help="override the schedule: 10,50,90 | linear:START:STOP:COUNT | random:LO:HI:COUNT | adaptive:LO:HI;"
    " its number of offsets sets the iterations unless --iterations is given (then cycled or cut)")]  # fmt: skip
SeedOpt = Annotated[
    int | None, typer.Option(min=0, max=2**63 - 1, help="seed of random and adaptive schedules")
]
OutOpt = Annotated[Path | None, typer.Option("--out", help="run folder (default runs/<time>-<playbook>)")]
StopOpt = Annotated[bool, typer.Option("--stop-on-loss", help="stop at the first lost message")]
KeepOpt = Annotated[bool, typer.Option("--keep-failed", help="keep everything of a failed iteration in its "
                                       "folder, also the snapshot it was restored from")]  # fmt: skip
ResetOpt = Annotated[str | None, typer.Option(help="cold | snapshot: how each iteration gets a fresh VM")]
DurationOpt = Annotated[float | None, typer.Option(min=1, max=30 * 86400,
                                                   help="stop starting iterations after N seconds (1..2592000)")]  # fmt: skip
ResumeOpt = Annotated[Path | None, typer.Option(help="continue an interrupted run folder")]
ParallelOpt = Annotated[int | None, typer.Option(min=1, max=256, help="guests racing at once on the host "
                        "(1..256), capped by its max_guests (inventory) or TESTBED_MAX_GUESTS (2)")]  # fmt: skip
BuildsOpt = Annotated[str | None, typer.Option(help="bisect across these paravisor builds, comma-separated, "
                                               "good first and bad last (replaces the playbook's bisect builds)")]  # fmt: skip
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="validate and print the plan and its estimated "
                                         "duration; start nothing, reach no host")]  # fmt: skip
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
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    _sigterm_as_interrupt()


@app.command()
def run(
    playbook: Annotated[Path, typer.Argument(help="playbook YAML, e.g. playbooks/quick.yaml")],
    host: HostOpt = "",
    inventory: InventoryOpt = None,
    insecure_accept_new: InsecureOpt = False,
    identity: IdentityOpt = None,
    vm_config: VmConfigOpt = None,
    strategy: StrategyOpt = None,
    iterations: IterationsOpt = None,
    offsets: OffsetsOpt = None,
    seed: SeedOpt = None,
    out_dir: OutOpt = None,
    stop_on_loss: StopOpt = False,
    keep_failed: KeepOpt = False,
    reset: ResetOpt = None,
    max_duration: DurationOpt = None,
    resume: ResumeOpt = None,
    parallel: ParallelOpt = None,
    builds: BuildsOpt = None,
    dry_run: DryRunOpt = False,
) -> None:
    """Run a playbook: fire the shutdown IC at offsets across paravisor servicing, many times.

    Writes results.jsonl (as each iteration ends), summary.json, junit.xml, summary.md and
    report.html into the run folder. Everything is validated, and checked against what the
    host's kind can do, before a host is reached.

    \b
    testbed run playbooks/quick.yaml
    testbed run playbooks/window-hunt.yaml --host lab1 --inventory hosts.yaml --parallel 2
    testbed run playbooks/flaky-window.yaml --dry-run
    """
    execute(RunArgs(**{k: v for k, v in locals().items()}))


@app.command()
def bisect(
    playbook: Annotated[Path, typer.Argument(help="playbook YAML, e.g. playbooks/bisect.yaml")],
    builds: BuildsOpt = None,
    host: HostOpt = "",
    inventory: InventoryOpt = None,
    vm_config: VmConfigOpt = None,
    parallel: ParallelOpt = None,
    out_dir: OutOpt = None,
    seed: SeedOpt = None,
    dry_run: DryRunOpt = False,
) -> None:
    """Which build broke it: bisect an ordered list of paravisor builds (lab images, IGVM
    files) from a good one to a bad one.

    A flaky race makes a one-shot bisection lie, so every build tested gets a sequential
    test (Wald's SPRT: loss rate p0 = good against p1 = bad, with error rates alpha and
    beta, from the playbook's bisect section): tries continue until the evidence decides,
    or max_per_build leaves it undecided and the bisection says so. The first build must
    test good and the last bad. The answer ("first bad build: ...") is in summary.md and
    report.html with the table of builds.

    \b
    testbed bisect playbooks/bisect.yaml
    testbed bisect playbooks/bisect.yaml --builds v2-r4,v2-r5,v2-r6,v2-r7 --parallel 2
    """
    with exit_codes():
        pb, _cfg = load_playbook(playbook)
    if pb.bisect is None and not builds:
        fail(2, f"{playbook}: no bisect section and no --builds: say which builds to bisect")
    execute(RunArgs(**{k: v for k, v in locals().items() if k not in ("pb", "_cfg")}))


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run folder with results.jsonl")]) -> None:
    """Rebuild summary.json, junit.xml, summary.md and report.html from results.jsonl alone.

    \b
    testbed report runs/20261205-031500-quick
    """
    if not (run_dir / "results.jsonl").exists():
        fail(2, f"{run_dir}: no results.jsonl here; pass a run folder")
    _summary, code = finish_run(run_dir)
    print_summary(run_dir)
    raise typer.Exit(code)


@app.command()
def compare(
    run_a: Annotated[str, typer.Argument(help="run folder A (e.g. before the fix), or RUN@HOST")],
    run_b: Annotated[str, typer.Argument(help="run folder B (e.g. after the fix), or RUN@HOST")],
    html_out: Annotated[
        Path | None,
        typer.Option(
            "--html", help="also write a self-contained page: both loss curves on one plot, the table"
        ),
    ] = None,  # fmt: skip
) -> None:
    """Did the fix work? Loss rates side by side with Fisher's exact test of the difference
    (two matrix runs: cell by cell; RUN@HOST: one host's tries of a fleet run).

    \b
    testbed compare runs/before runs/after --html compare.html
    testbed compare runs/fleet@lab1 runs/fleet@lab2
    """
    results.compare(run_a, run_b, html_out)


@app.command()
def repro(
    run_dir: Annotated[Path, typer.Argument(help="run folder")],
    iteration: Annotated[int, typer.Option(min=0, help="iteration number to replay")],
    keep: Annotated[
        bool, typer.Option("--keep", help="keep the VM running for inspection until Ctrl-C")
    ] = False,
) -> None:
    """Replay one iteration with the same offset (or phase), strategy, build and vm_config,
    on the host the run used (its URI or inventory name and kind are in run.json).

    \b
    testbed repro runs/20261205-031500-quick --iteration 7 --keep
    """
    results.repro(run_dir, iteration, keep)


@app.command()
def gc(
    host: HostOpt = "local",
    inventory: InventoryOpt = None,
    insecure_accept_new: InsecureOpt = False,
    identity: IdentityOpt = None,
) -> None:
    """Kill every VM whose owning testbed process is gone, and remove its lease and work dir.

    Locally: this machine's leases, then every backend kind reachable here reaps its own.
    With --host, on that host (through its agent or module): what a dead run left there.

    \b
    testbed gc
    testbed gc --host lab1 --inventory hosts.yaml
    """
    actions = host_commands.gc(host, inventory, HostOptions(insecure_accept_new, identity))
    for a in actions:
        out.print(a)
    if not actions:
        out.print("nothing to clean")


@host_app.command("check")
def host_check(
    host: Annotated[
        str, typer.Argument(help="local | ssh://user@host[:port] | winrms://user@host | an inventory name")
    ] = "local",  # fmt: skip
    inventory: InventoryOpt = None,
    insecure_accept_new: InsecureOpt = False,
    identity: IdentityOpt = None,
    config: Annotated[Path, typer.Option(help="vm_config to check the host against")] = DEFAULT_CONFIG,
    probe: Annotated[
        bool, typer.Option(help="run the deep checks now (QEMU: the KVM probe boots a tiny guest)")
    ] = False,  # fmt: skip
) -> None:
    """Preflight: each problem with the command that fixes it.

    A QEMU host: QEMU, the KVM probe, build tools, kernel package, disk (remote hosts are
    checked on the host itself, through the host agent over SSH). A Hyper-V host
    (winrm(s)://, or an inventory entry of kind hyperv; password in TESTBED_WINRM_PASSWORD
    or the entry's password_env): WinRM, credentials, Hyper-V, AllowFirmwareLoadFromFile,
    OS build, COM3, free memory.

    \b
    testbed host check
    testbed host check lab1 --inventory hosts.yaml --probe
    """
    host_commands.check(
        host, inventory, HostOptions(insecure_accept_new, identity), config, DEFAULT_CONFIG, probe
    )


@host_app.command("inventory")
def host_inventory(
    inventory: Annotated[Path, typer.Option("--inventory", help="testbed host inventory YAML")],
    fmt: Annotated[str, typer.Option("--format", help="ansible (YAML inventory) | yaml")] = "ansible",
) -> None:
    """Render the host inventory, e.g. as an Ansible inventory (groups testbed_<kind>; never secrets).

    \b
    testbed host inventory --inventory hosts.yaml > ansible-inventory.yml
    """
    from testbed.ansible import dump_yaml, render_inventory
    from testbed.hosts import load_inventory

    with exit_codes():
        inv = load_inventory(inventory)
    if fmt not in ("ansible", "yaml"):
        fail(2, f"--format {fmt!r}: allowed: ansible, yaml")
    print(dump_yaml(render_inventory(inv) if fmt == "ansible" else inv.as_dict()), end="")


@host_app.command("prepare")
def host_prepare(
    host: Annotated[str, typer.Argument(help="an inventory host name, or 'all'")],
    inventory: Annotated[Path, typer.Option("--inventory", help="testbed host inventory YAML")],
) -> None:
    """Prepare lab hosts with Ansible (playbooks/hosts/): packages, the testbed user and venv,
    the reference image, then 'testbed host check' on the host. Needs pip install 'testbed[hosts]'.

    \b
    testbed host prepare all --inventory hosts.yaml
    """
    host_commands.prepare(host, inventory)


def main() -> None:
    """The entry point. ``kill -USR1 <pid>`` prints every thread's stack to stderr and the
    run goes on: a run that seems hung can say where it waits (the tests do this before
    killing a command that overran its timeout)."""
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
