"""From what the user typed (a URI or an inventory name) to a host entry and its backend.

Which kind a host is comes from the registry (``testbed.backends.registry``):
an inventory entry says it; a bare URI gets the kind its scheme implies
(``winrms://`` is Hyper-V), else the kind of the vm_config in use, else the
default. Each entry is validated by its kind's own model (``BackendKind.host_entry``:
QEMU's ``qemu_binary``, Hyper-V's WinRM settings), so a key another kind owns is a
``file:line`` error, and the scheme is checked against the schemes the kind is reached by.
This is the application layer: the core knows no kinds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from testbed.backends import registry
from testbed.core.config import (
    DEFAULT_BACKEND,
    ConfigError,
    HostEntry,
    HostOptions,
    load_yaml,
    node_line,
    parse_model,
)
from testbed.core.redact import redact

if TYPE_CHECKING:
    from testbed.backends.base import Backend

DEFAULT_INVENTORY = "TESTBED_INVENTORY"
DIRECT = HostOptions()  # no command-line additions


@dataclass(frozen=True)
class Inventory:
    """The hosts of an inventory file, each validated by its kind's entry model."""

    hosts: list[HostEntry]

    def find(self, name: str) -> HostEntry | None:
        return next((h for h in self.hosts if h.name == name), None)

    def as_dict(self) -> dict[str, Any]:
        return {"hosts": [h.model_dump() for h in self.hosts]}


def _scheme_problem(entry: HostEntry) -> str | None:
    """Why the entry's URI cannot reach a host of its kind (None: it can)."""
    schemes = registry.all_schemes()
    s = registry.scheme_of(entry.uri)
    if s not in schemes or (entry.uri != "local" and "://" not in entry.uri):
        return "uri must be 'local' or one of " + ", ".join(
            f"{x}://user@host[:port]" for x in schemes if x != "local"
        )
    kind = registry.get(entry.kind)
    if s not in kind.schemes:
        return f"a host of kind {entry.kind} is reached by {', '.join(kind.schemes)}, not {s}"
    return None


def parse_entry(path: Path, data: Any, where: tuple[int | str, ...] = ()) -> HostEntry:
    """One host entry (a mapping from YAML) by its kind's model, errors at ``path:line``."""
    root = data
    for k in where:
        data = data[k]
    if not isinstance(data, dict):
        raise ConfigError(
            path, node_line(root, where), "a host entry is a mapping of keys (name, uri, kind, ...)"
        )
    kind = data.get("kind", DEFAULT_BACKEND)
    if not isinstance(kind, str) or kind not in registry.names():
        raise ConfigError(path, node_line(root, (*where, "kind")),
                          f"unknown host kind {kind!r}; allowed: {', '.join(registry.names())}")  # fmt: skip
    entry = parse_model(path, data, registry.get(kind).host_entry)
    if entry.vm_config is not None and not os.path.isabs(entry.vm_config):
        entry = entry.model_copy(update={"vm_config": str((path.parent / entry.vm_config).resolve())})
    problem = _scheme_problem(entry)
    if problem:
        raise ConfigError(path, node_line(root, (*where, "uri")), f"uri: {problem}")
    return entry


def load_inventory(path: Path | str) -> Inventory:
    """An inventory file: ``hosts:``, a list of entries with unique names."""
    p = Path(path)
    data = load_yaml(p)
    if not isinstance(data, dict) or not isinstance(data.get("hosts"), list):
        raise ConfigError(p, 1, "an inventory is a mapping with 'hosts:', a list of host entries")
    unknown = [k for k in data if k != "hosts"]
    if unknown:
        raise ConfigError(
            p, node_line(data, (unknown[0],)), f"unknown key {unknown[0]!r}; an inventory has 'hosts:'"
        )
    hosts = [parse_entry(p, data, ("hosts", i)) for i in range(len(data["hosts"]))]
    seen: set[str] = set()
    for i, h in enumerate(hosts):
        if h.name in seen:
            raise ConfigError(p, node_line(data, ("hosts", i, "name")), f"duplicate host name {h.name!r}")
        seen.add(h.name)
    return Inventory(hosts)


def entry_for_uri(uri: str, kind: str) -> HostEntry:
    """A bare URI as an entry of ``kind`` (ValueError says why it cannot be one)."""
    if kind not in registry.names():
        raise ValueError(f"unknown host kind {kind!r}; allowed: {', '.join(registry.names())}")
    try:
        entry = registry.get(kind).host_entry(name=uri, uri=uri, kind=kind)
    except ValidationError as e:
        raise ValueError(str(e.errors()[0]["msg"])) from None
    problem = _scheme_problem(entry)
    if problem:
        raise ValueError(problem)
    return entry


def lookup_entry(host: str, inventory: Path | None = None, *, kind: str | None = None) -> HostEntry:
    """``local``, a URI, or the name of an inventory entry -> its entry.

    ``kind`` (the backend of the vm_config in use) decides a bare URI whose
    scheme more than one kind accepts (``ssh://`` to a Linux QEMU host or to
    Windows OpenSSH on a Hyper-V host)."""
    inv_path = inventory or (
        Path(os.environ[DEFAULT_INVENTORY]) if os.environ.get(DEFAULT_INVENTORY) else None
    )
    if "://" in host or host == "local":
        claimed = registry.claiming(host)
        chosen = claimed.kind if claimed else (kind or DEFAULT_BACKEND)
        try:
            return entry_for_uri(host, chosen)
        except ValueError as e:
            raise ConfigError(Path("--host"), None, f"{redact(host)}: {e}") from None
    if inv_path is None:
        raise ConfigError(Path("--host"), None, f"{host!r} is not a URI and no --inventory was given")
    entry = load_inventory(inv_path).find(host)
    if entry is None:
        raise ConfigError(inv_path, None, f"no host named {host!r} in the inventory")
    return entry


def open_backend(entry: HostEntry, cfg_backend: str | None = None, opts: HostOptions = DIRECT) -> Backend:
    """The backend of the host's kind; refused when the vm_config is for another kind."""
    if cfg_backend is not None and cfg_backend != entry.kind:
        raise ConfigError(Path("--host"), None,
                          f"the vm_config is for backend {cfg_backend}, but host {entry.name!r} is {entry.kind}")  # fmt: skip
    return registry.get(entry.kind).open(entry, opts)
