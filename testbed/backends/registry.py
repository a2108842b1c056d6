"""Backend kinds, found through the ``testbed.backends`` entry point group.

A backend package declares one :class:`BackendKind` and names it in its
distribution's entry points (testbed's own three are in pyproject.toml), the
way pytest finds plugins.  Everything outside the package that needs to know
about kinds (the vm_config loader, host lookup, the CLI, the pytest plugin,
the Ansible inventory) asks this registry, so adding a backend touches no
file outside its own package and its registration.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from testbed.core.capabilities import Capabilities
from testbed.core.config import HostEntry, HostOptions, VmConfig

if TYPE_CHECKING:
    from testbed.backends.base import Backend

__all__ = ["BackendKind", "HostOptions", "claiming", "get", "kinds", "names", "scheme_of"]

log = logging.getLogger(__name__)
GROUP = "testbed.backends"


@dataclass(frozen=True)
class BackendKind:
    """Everything the rest of testbed needs to know about one kind of host.

    ``open`` builds the backend for a host entry (importing the heavy parts
    only then); ``vm_config`` is the model of a vm_config with ``backend:
    <kind>``; ``schemes`` are the URI schemes a host of this kind can be
    reached by, and ``claims`` those that, in a bare URI, mean this kind
    (``winrms://`` is always Hyper-V).  ``labels`` are inventory labels that
    make a host also satisfy a sub-kind marker (``nested``).
    """

    kind: str
    description: str
    vm_config: type[VmConfig]
    open: Callable[[HostEntry, HostOptions], Backend]
    # What its backends can do (the same value as ``Backend.capabilities``), for checks made
    # before a host is reached (``testbed run --dry-run``); nothing is granted by default.
    capabilities: Capabilities = Capabilities()
    # Seconds one iteration typically takes on such a host: a dry run's estimate until a run
    # on the host measured its own rate.
    typical_iteration_s: float = 5.0
    host_entry: type[HostEntry] = HostEntry  # the kind's inventory entry (its own host options)
    # The kind's own CLI commands (name -> typer app), mounted under ``testbed`` (QEMU: image, vm).
    commands: Callable[[], dict[str, Any]] | None = None
    schemes: tuple[str, ...] = ("local", "ssh")
    claims: tuple[str, ...] = ()
    host_playbook: str | None = None  # file under playbooks/hosts/
    host_os: str = "linux"  # how Ansible talks to the host ("windows": PowerShell)
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def marker(self) -> str:
        return f"testbed_{self.kind}"


@functools.cache
def kinds() -> dict[str, BackendKind]:
    """Every registered kind by name (loaded once per process)."""
    found: dict[str, BackendKind] = {}
    for ep in sorted(importlib.metadata.entry_points(group=GROUP), key=lambda e: e.name):
        try:
            kind = ep.load()
        except Exception as e:  # a broken third-party backend must not break the others
            log.warning("backend entry point %s (%s) failed to load: %s", ep.name, ep.value, e)
            continue
        if not isinstance(kind, BackendKind):
            log.warning("backend entry point %s is a %s, not a BackendKind", ep.name, type(kind).__name__)
            continue
        if kind.kind in found:
            log.warning("backend kind %s registered twice; keeping %s", kind.kind, found[kind.kind])
            continue
        found[kind.kind] = kind
    return found


def names() -> tuple[str, ...]:
    return tuple(kinds())


def get(kind: str) -> BackendKind:
    """The kind named ``kind``; KeyError names the kinds there are."""
    try:
        return kinds()[kind]
    except KeyError:
        raise KeyError(f"no backend of kind {kind!r}; registered: {', '.join(names()) or 'none'}") from None


def scheme_of(uri: str) -> str:
    return "local" if uri == "local" else uri.split("://", 1)[0]


def claiming(uri: str) -> BackendKind | None:
    """The kind that a bare URI's scheme alone implies (winrms:// -> Hyper-V)."""
    s = scheme_of(uri)
    return next((k for k in kinds().values() if s in k.claims), None)


def all_schemes() -> tuple[str, ...]:
    return tuple(sorted({s for k in kinds().values() for s in k.schemes}))
