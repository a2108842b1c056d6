"""What a kind's own CLI commands share with ``testbed``'s: the two consoles, ``fail``
and the one mapping from errors to exit codes (a user's mistake is 2, the host's 3).

It sits with the backend API so that a kind's commands (``BackendKind.commands``)
need nothing from the application above them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from testbed.core.config import ConfigError
from testbed.core.errors import InfraError
from testbed.core.redact import redact
from testbed.transport import TransportError

console = Console(stderr=True)
out = Console()


def fail(code: int, message: str) -> NoReturn:
    console.print(f"[bold red]error:[/] {escape(redact(message))}", highlight=False)
    raise typer.Exit(code)


# The one place where errors become exit codes: a user's mistake is 2, the host's is 3.
USAGE_ERRORS: tuple[type[Exception], ...] = (ConfigError, ValueError)
INFRA_ERRORS: tuple[type[Exception], ...] = (InfraError, TransportError)


@contextlib.contextmanager
def exit_codes(*, usage: bool = True) -> Iterator[None]:
    """Every command body runs in this: known failures end as a message and their code.
    ``usage=False`` once the input was accepted: a ValueError from inside a run is a bug
    to see in full, not the user's mistake."""
    try:
        yield
    except USAGE_ERRORS as e:
        if not usage:
            raise
        fail(2, str(e))
    except INFRA_ERRORS as e:  # ImageBuildError is an InfraError too
        fail(3, str(e))
