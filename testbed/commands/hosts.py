"""``testbed gc`` and ``testbed host check|prepare``: what the host commands do."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import typer
from rich.table import Table

from testbed.backends import registry
from testbed.backends.commands import console, exit_codes, fail, out
from testbed.core.config import HostOptions
from testbed.core.errors import InfraError
from testbed.core.paths import runtime_dir
from testbed.engine.playbook import load_vm_config
from testbed.hostprog import leases
from testbed.hosts import load_inventory, lookup_entry, open_backend
from testbed.transport import TransportError


def gc(host: str, inventory: Path | None, opts: HostOptions) -> list[str]:
    """Locally: this machine's leases, then every kind reachable here reaps its own (one that
    cannot run here is skipped, logged at -v). With a host: that host's backend reaps."""
    if host != "local":
        with exit_codes():
            backend = open_backend(lookup_entry(host, inventory), opts=opts)
            with contextlib.closing(backend):
                return backend.gc_host()
    actions = leases.gc(runtime_dir() / "leases")
    for kind in registry.kinds().values():
        if "local" not in kind.schemes or not kind.capabilities.has("gc"):
            continue
        try:
            backend = kind.open(kind.host_entry(name="local", uri="local", kind=kind.kind), HostOptions())
            with contextlib.closing(backend):
                actions += [a for a in backend.gc_host() if a not in actions]
        except (InfraError, TransportError, OSError) as e:
            logging.getLogger("testbed.gc").info("%s: nothing reaped here: %s", kind.kind, e)
    return actions


def check(
    host: str, inventory: Path | None, opts: HostOptions, config: Path, default: Path, probe: bool
) -> None:
    """The host's preflight as a table; exit 3 when anything is missing."""
    with exit_codes():
        cfg = load_vm_config(config) if config.exists() or config != default else None
        entry = lookup_entry(host, inventory, kind=cfg.backend if cfg else None)
        if cfg is not None and cfg.backend != entry.kind:
            cfg = None  # the default vm_config is for another kind of host
        backend = open_backend(entry, opts=opts)
        with contextlib.closing(backend):
            rep = backend.preflight(cfg, deep=probe)
    t = Table("check", "ok", "detail", "fix")
    for c in rep.checks:
        t.add_row(c.name, "yes" if c.ok else "NO", c.detail, "" if c.ok else c.fix)
    out.print(t)
    raise typer.Exit(0 if rep.ok else 3)


def prepare(host: str, inventory: Path) -> None:
    """Ansible over the inventory's hosts (or one), its tasks shown as they run."""
    from testbed.ansible import AnsibleMissing
    from testbed.ansible import prepare as run_ansible

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
            recap = run_ansible(inv, targets, on_line)
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
