"""The transport interface shared by local and SSH (and, later, WinRM)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
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


class OutputCollector:
    """Gathers a command's stdout and stderr line by line, passing each line on as it
    comes; ``pump`` is run once per stream (one of them on its own thread)."""

    def __init__(self, on_output: Callable[[str, str], None] | None) -> None:
        self.on_output = on_output
        self.lines: dict[str, list[str]] = {"stdout": [], "stderr": []}

    def pump(self, name: str, lines: Iterable[str]) -> None:
        for line in lines:
            self.lines[name].append(line)
            if self.on_output:
                self.on_output(name, line.rstrip("\n"))

    def result(self, argv: list[str], rc: int) -> CommandResult:
        return CommandResult(argv, rc, "".join(self.lines["stdout"]), "".join(self.lines["stderr"]))


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
