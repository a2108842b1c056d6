"""The mock backend kind (entry point ``testbed.backends``): ``--host mock://anything``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from testbed.backends.mock.capabilities import CAPABILITIES
from testbed.backends.mock.config import MockVmConfig
from testbed.backends.registry import BackendKind
from testbed.core.config import HostEntry, HostOptions

if TYPE_CHECKING:
    from testbed.backends.base import Backend


def open_backend(entry: HostEntry, opts: HostOptions) -> Backend:
    from testbed.backends.mock.backend import MockBackend

    return MockBackend(entry.uri)


KIND = BackendKind(
    kind="mock",
    description="an in-process fake VM (tests, dry runs, benches of the controller)",
    vm_config=MockVmConfig,
    open=open_backend,
    schemes=("local", "mock"),
    claims=("mock",),
    capabilities=CAPABILITIES,
    typical_iteration_s=0.01,
)
