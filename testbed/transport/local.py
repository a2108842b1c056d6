"""This machine: subprocesses, shutil, the local clock."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from testbed.transport.base import CommandResult, OutputCollector, TransportError


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class LocalTransport:
    name = "local"
    is_local = True

    def run(
        self,
        argv: list[str],
        *,
        input: bytes | None = None,
        timeout: float | None = 120,
        on_output: Callable[[str, str], None] | None = None,
    ) -> CommandResult:
        try:
            p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except FileNotFoundError as e:
            return CommandResult(argv, 127, "", str(e))
        out = OutputCollector(on_output)

        def decoded(f: IO[bytes]) -> Iterator[str]:
            return (raw.decode(errors="replace") for raw in f)

        threads = [
            threading.Thread(target=out.pump, args=(n, decoded(f)))
            for n, f in (("stdout", p.stdout), ("stderr", p.stderr))
            if f is not None
        ]
        for t in threads:
            t.start()
        assert p.stdin is not None
        if input:
            p.stdin.write(input)
        p.stdin.close()
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise TransportError(f"{argv[0]} did not finish within {timeout} s") from None
        for t in threads:
            t.join()
        return out.result(argv, rc)

    def put(self, local: Path, remote: str) -> bool:
        dest = Path(remote)
        if dest.exists() and sha256_file(dest) == sha256_file(local):
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        shutil.copyfile(local, tmp)
        tmp.replace(dest)
        return True

    def get(self, remote: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(remote, local)

    def open_agent(self, argv: list[str]) -> tuple[IO[bytes], IO[bytes], Callable[[], None]]:
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert p.stdin is not None and p.stdout is not None

        def close() -> None:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

        return p.stdin, p.stdout, close

    def clock_ns(self) -> int:
        return time.monotonic_ns()

    def close(self) -> None:
        pass
