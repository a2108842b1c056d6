"""PowerShell's output as the controller reads it: the CLIXML error stream, parsed into
plain messages, and the code page a redirected stdout is written in.

A PowerShell run over WinRM writes its error records to stderr as
``#< CLIXML`` followed by serialized objects; the messages are in ``<S S="Error">``
elements with ``_xHHHH_`` escapes (``_x000D__x000A_`` is CR LF).
"""

from __future__ import annotations

import codecs
import logging
import re
import xml.etree.ElementTree as ET

log = logging.getLogger(__name__)

_ESC = re.compile(r"_x([0-9A-Fa-f]{4})_")
PREFIX = "#< CLIXML"


class ClixmlError(ValueError):
    """The stream claimed to be CLIXML but did not parse."""


def _unescape(s: str) -> str:
    return _ESC.sub(lambda m: chr(int(m.group(1), 16)), s)


def error_messages(stderr: str) -> list[str]:
    """Error records of a CLIXML stderr (or the plain text when it is not CLIXML)."""
    text = stderr.strip()
    if not text.startswith(PREFIX):
        return [text] if text else []
    body = text[len(PREFIX) :].strip()
    try:
        root = ET.fromstring(body)
    except ET.ParseError as e:
        raise ClixmlError(f"malformed CLIXML on stderr ({e}): {body[:200]!r}") from None
    lines: list[str] = []
    for el in root.iter():
        if el.tag.endswith("}S") and el.get("S") == "Error" and el.text:
            lines.append(_unescape(el.text))
    # Records are split over several <S> elements; join, then split on record ends.
    joined = "".join(lines)
    return [m.strip() for m in joined.splitlines() if m.strip()]


def output_codec(codepage: str) -> str:
    """Python's codec for the code page a host reported (``[Console]::OutputEncoding``):
    Windows PowerShell 5.1 writes a redirected stdout in it, the OEM one (437, 850, 932,
    ...) unless something set it; 65001 is UTF-8."""
    name = "utf-8" if codepage.strip() == "65001" else f"cp{codepage.strip()}"
    try:
        return codecs.lookup(name).name
    except LookupError:
        log.warning("the host writes in code page %r, which Python has no codec for: read as UTF-8", codepage)
        return "utf-8"
