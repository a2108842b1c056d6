"""Passwords never reach a message, a log line or a report: the one place that hides them.

Stdlib only and imported from every layer (config, transports, the CLI).
"""

from __future__ import annotations

import re

_URI_PASSWORD = re.compile(r"(\w+://[^/@:\s]*):[^/@\s]*@")


def redact(text: str) -> str:
    """A password given inline in a URI, replaced: ``ssh://tester:***@host``."""
    return _URI_PASSWORD.sub(r"\1:***@", text)
