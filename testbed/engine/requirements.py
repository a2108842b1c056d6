"""What a playbook asks of a backend, checked against the backend's declared
``Capabilities`` before anything boots.

Every ask carries the key path that made it (``cases[1].shutdown``, ``bisect``,
``matrix.dimensions.paravisor``), so a refusal names the playbook's ``file:line`` of
that key and quotes the backend's own reason. The runner, the matrix, the bisection
and the CLI's dry run all call ``refuse_missing``; none reads a backend attribute.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from testbed.core.capabilities import CAPABILITIES, Capabilities
from testbed.core.config import ConfigError, load_yaml, node_line
from testbed.engine.playbook import Case, Playbook

Keys = tuple[int | str, ...]


@dataclass(frozen=True)
class Ask:
    """One capability a playbook (or the command line) needs, and where it asked."""

    capability: str
    keys: tuple[Keys, ...]  # candidate key paths in the playbook, most specific first
    what: str  # the playbook's words: "case race: shutdown 'ic-ready'"


def asks(pb: Playbook, cases: list[Case], *, parallel: int = 1, builds: bool = False) -> list[Ask]:
    """Every capability the playbook's cases (with the command line's overrides) need."""
    out: list[Ask] = []
    own = pb.cases or []

    def at(i: int, key: str) -> tuple[Keys, ...]:
        return (("cases", i, key), (key,)) if own else ((key,),)

    for i, c in enumerate(cases):
        out.append(
            Ask(f"shutdown:{c.shutdown}", at(i, "shutdown"), f"case {c.name}: shutdown {c.shutdown!r}")
        )
        s = c.schedule or pb.schedule
        if s.kind == "phases" or (s.kind == "flaky" and s.phases):
            out.append(
                Ask("phases", (*at(i, "schedule"),), f"case {c.name}: schedule kind {s.kind} on phases")
            )
        if c.stream or pb.stream:
            out.append(Ask("stream", (*at(i, "stream"),), f"case {c.name}: stream"))
        if c.image:
            out.append(Ask("images", (*at(i, "image"),), f"case {c.name}: image {c.image!r}"))
    if pb.bisect is not None or builds:
        out.append(Ask("images", (("bisect",),), "bisect over builds"))
    if pb.matrix is not None and "paravisor" in pb.matrix.dimensions:
        out.append(Ask("images", (("matrix", "dimensions", "paravisor"),), "matrix dimension paravisor"))
    if parallel > 1:
        out.append(Ask("parallel", (("parallel",),), f"parallel {parallel}"))
    return out


def line_of(path: Path | None, candidates: tuple[Keys, ...]) -> int | None:
    """The line of the first candidate key path present in the YAML file (None: no file,
    or the command line asked)."""
    if path is None or not path.is_file():
        return None
    try:
        data = load_yaml(path)
    except ConfigError:
        return None
    for keys in candidates:
        node = data
        for k in keys:
            if isinstance(node, dict) and k in node:
                node = node[k]
            elif isinstance(node, list) and isinstance(k, int) and k < len(node):
                node = node[k]
            else:
                break
        else:
            return node_line(data, keys)
    return None


def refuse_missing(asked: list[Ask], caps: Capabilities, kind: str, path: Path | None) -> None:
    """ConfigError at the asking key's ``file:line`` for the first capability the backend
    lacks, with the backend's reason and what it can do instead."""
    for a in asked:
        if caps.has(a.capability):
            continue
        can = ", ".join(caps.granted()) or "nothing declared"
        raise ConfigError(
            path or Path("<playbook>"),
            line_of(path, a.keys),
            f"{a.what}: the {kind} backend cannot {CAPABILITIES[a.capability]}: {caps.why_not(a.capability)} "
            f"(it can: {can})",
        )


def check_images(
    asked_builds: list[str], known: tuple[str, ...] | None, kind: str, path: Path | None
) -> None:
    """Builds a bisection names, against the builds the backend or the vm_config lists
    (nothing to check when neither lists them)."""
    if not known:
        return
    unknown = [b for b in asked_builds if b not in known]
    if unknown:
        raise ConfigError(
            path or Path("<playbook>"),
            line_of(path, (("bisect", "builds"), ("bisect",))),
            f"builds {', '.join(unknown)} are not builds the {kind} backend has here; it has: {', '.join(known)}",
        )
