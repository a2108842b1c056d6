"""The transport interface shared by local and SSH (and, later, WinRM)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol


class TransportError(Exception):
    """The host could not be reached or the channel broke: an infrastructure failure."""


@dataclass
class CommandResult:
    argv: list[str]
    rc: int
    stdout: str
    stderr: str

    def check(self) -> CommandResult:
        if self.rc != 0:
            raise TransportError(f"{self.argv[0]} exited {self.rc}: {self.stderr.strip()[-500:]}")
        return self


class AgentPipes(Protocol):
    stdin: IO[bytes]
    stdout: IO[bytes]

    def close(self) -> None: ...


class Transport(Protocol):
    name: str
    is_local: bool

    def run(
        self,
        argv: list[str],
        *,
        input: bytes | None = None,
        timeout: float | None = 120,
        on_output: Callable[[str, str], None] | None = None,
    ) -> CommandResult:
        """Run argv on the host; ``on_output(stream, line)`` sees lines as they come."""
        ...

    def put(self, local: Path, remote: str) -> bool:
        """Upload; returns False when the remote file already has the same sha256."""
        ...

    def get(self, remote: str, local: Path) -> None: ...

    def open_agent(self, argv: list[str]) -> tuple[IO[bytes], IO[bytes], Callable[[], None]]:
        """Start a long-running process; returns (stdin, stdout, close)."""
        ...

    def clock_ns(self) -> int:
        """The host's CLOCK_MONOTONIC, in ns."""
        ...

    def close(self) -> None: ...
