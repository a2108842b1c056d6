"""The models every layer shares, loaded from YAML with line numbers: the base of a
vm_config, a host entry, an artifact, and the loader that turns every bad value into a
``ConfigError`` naming the file, the line, what is wrong and what is allowed (a lab
engineer editing a playbook at 2 a.m. needs ``playbooks/x.yaml:12``, not a traceback).

Nothing here knows which backend kinds exist: resolving a vm_config or a host entry
against the registered kinds happens above (``testbed.engine.playbook``,
``testbed.hosts``), so this module imports nothing of testbed but the core.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from testbed.core.redact import redact
from testbed.core.verdicts import VERDICTS

# The preservation strategies a paravisor may use while servicing (README: the reference lab).
Strategy = Literal["none", "mask", "mask-async", "pause-resume"]
STRATEGIES: tuple[str, ...] = ("none", "mask", "mask-async", "pause-resume")
DEFAULT_BACKEND = "qemu"  # the documented default of a vm_config or host entry that names no backend


class ConfigError(Exception):
    """A user-facing configuration error: ``file:line: message``."""

    def __init__(self, path: Path | str, line: int | None, message: str) -> None:
        self.path = Path(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line else str(self.path)
        super().__init__(f"{where}: {message}")


class Strict(BaseModel):
    """Base: unknown keys are an error, never silently ignored; NaN and infinities
    (``.nan``, ``.inf``, ``1e999``) are no number a timing or a count can be."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _regex(v: str) -> str:
    if not v:
        raise ValueError("an empty pattern matches every line: give what the line says")
    try:
        re.compile(v)
    except re.error as e:
        raise ValueError(f"not a regular expression: {e}") from None
    return v


Pattern = Annotated[str, AfterValidator(_regex)]  # a regex a vm_config keys evidence on


class Artifact(Strict):
    """A file the Hyper-V host needs (IGVM, VHDX): uploaded from ``path`` in hash-checked
    chunks (fine for small files), or pulled by the host from ``url`` or ``share``
    into its cache, keyed by ``sha256`` (required then, so the host can verify it)."""

    path: str | None = None
    url: str | None = None
    share: str | None = None
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")

    @model_validator(mode="after")
    def _one_source(self) -> Artifact:
        given = [k for k in ("path", "url", "share") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of path (upload), url or share (the host pulls it)")
        if given[0] != "path" and not self.sha256:
            raise ValueError(f"{given[0]} needs sha256, so the host can verify what it pulled")
        return self

    def anchored(self, base: Path) -> Artifact:
        """A relative ``path`` made relative to ``base`` (the folder of the file naming it)."""
        if self.path and not Path(self.path).is_absolute():
            return self.model_copy(update={"path": str((base / self.path).resolve())})
        return self

    @property
    def file_name(self) -> str:
        src = self.path or self.url or self.share or ""
        return re.split(r"[\\/]", src.rstrip("/\\"))[-1] or "artifact"


class VmConfig(Strict):
    """What every vm_config has. Each backend kind extends it with its own model
    (``BackendKind.vm_config``, with ``backend: Literal[<kind>]``); the loader
    picks the model by ``backend``, so an unknown key is a ``file:line`` error
    for every backend alike."""

    name: str
    backend: str = DEFAULT_BACKEND

    @property
    def shutdown_allowance_ms(self) -> float:
        """How long the guest takes to power off once it handled the shutdown (grace)."""
        return 0.0

    @classmethod
    def knob_names(cls) -> tuple[str, ...]:
        """The knobs a playbook's ``lab:`` section (and a matrix's ``lab.<knob>``) may set
        for this kind; none unless the kind has them."""
        return ()

    def with_lab(self, over: Mapping[str, Any]) -> Self:
        """A playbook's ``lab:`` knobs applied (ValueError names a bad one). A kind without
        knobs ignores them: a playbook written for the reference lab (ic-ready-delay's VTL0
        attach gap) still runs on it with ``--vm-config``; a playbook whose own vm_config
        has no knobs is refused at its ``lab:`` line when it is loaded."""
        return self

    def anchored(self, base: Path) -> Self:
        """Relative file paths in the config made relative to the config file's folder."""
        return self

    def build_names(self) -> tuple[str, ...] | None:
        """The paravisor builds this config can service into by name (``image:``, a
        bisection's builds, a matrix's paravisor), when it can list them; None: not listed
        (the backend takes what it is given, such as a path on the host)."""
        return None

    def with_paravisor(self, version: str) -> Self:
        """The reference lab's paravisor image ``version`` instead of the configured one."""
        raise ValueError(f"backend {self.backend} has no lab paravisor images to choose from")


# ---- loading -----------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)


def node_line(root: Any, loc: tuple[int | str, ...]) -> int | None:
    """1-based line of the YAML node at ``loc`` (or of its nearest parent)."""
    node = root
    line: int | None = getattr(getattr(root, "lc", None), "line", None)
    line = line + 1 if line is not None else None
    for key in loc:
        if isinstance(node, CommentedMap) and key in node:
            kl = node.lc.key(key)
            line = kl[0] + 1
            node = node[key]
        elif isinstance(node, CommentedSeq) and isinstance(key, int) and key < len(node):
            line = node.lc.item(key)[0] + 1
            node = node[key]
        else:
            break
    return line


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"unknown key {loc!r}; check its spelling against the documented keys"
    if kind == "missing":
        return f"missing required key {loc!r}"
    return redact(f"{loc}: {err['msg']} (got {err.get('input')!r})")


def load_yaml(path: Path) -> Any:
    """Parse YAML keeping line numbers; every way a file can be unreadable (missing, a
    folder, not UTF-8, a NUL byte, bad syntax) becomes a ConfigError with its line."""
    if not path.exists():
        raise ConfigError(path, None, "file not found")
    if path.is_dir():
        raise ConfigError(path, None, "is a folder, not a YAML file: name the file itself")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(path, None, f"cannot read it: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(
            path, line, f"not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}): save it as UTF-8"
        ) from None
    if "\x00" in text:
        raise ConfigError(
            path, text[: text.index("\x00")].count("\n") + 1, "a NUL byte: this is not a text file"
        )
    yaml = YAML(typ="rt")
    try:
        return yaml.load(text)
    except MarkedYAMLError as e:
        at = e.problem_mark.line + 1 if e.problem_mark else None
        raise ConfigError(path, at, f"YAML syntax: {e.problem}") from None
    except YAMLError as e:  # the reader's own errors (control characters) carry a position, not a mark
        pos = getattr(e, "position", None)
        at = text[:pos].count("\n") + 1 if isinstance(pos, int) else None
        raise ConfigError(
            path, at, f"YAML cannot read it: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None


def _plain(data: Any) -> Any:
    """ruamel containers -> plain dicts/lists for pydantic."""
    if isinstance(data, dict):
        return {str(k): _plain(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_plain(v) for v in data]
    return data


def parse_model(path: Path, data: Any, model: type[M]) -> M:
    if not isinstance(data, dict):
        raise ConfigError(path, 1, f"expected a mapping of keys for a {model.__name__}")
    try:
        return model.model_validate(_plain(data))
    except ValidationError as e:
        first = e.errors()[0]
        line = node_line(data, tuple(first["loc"]))
        more = f" (and {len(e.errors()) - 1} more problem(s))" if len(e.errors()) > 1 else ""
        raise ConfigError(path, line, _describe(dict(first)) + more) from None


def load_model(path: Path | str, model: type[M]) -> M:
    p = Path(path)
    return parse_model(p, load_yaml(p), model)


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


ExpectValue = int | str
_EXPECT = re.compile(r"^\s*(==|>=|<=|>|<)?\s*(\d+)\s*$")


def check_expectation(spec: ExpectValue, value: int) -> bool:
    """``0`` / ``">0"`` / ``"<=2"`` against a count."""
    if isinstance(spec, int):
        return value == spec
    m = _EXPECT.match(spec)
    if not m:
        raise ValueError(f"bad expectation {spec!r}")
    op, n = m.group(1) or "==", int(m.group(2))
    return {"==": value == n, ">=": value >= n, "<=": value <= n, ">": value > n, "<": value < n}[op]


def validate_expect(v: dict[str, ExpectValue] | None) -> dict[str, ExpectValue] | None:
    for k, spec in (v or {}).items():
        if k not in VERDICTS:
            raise ValueError(f"expect: unknown verdict {k!r}; allowed: {', '.join(VERDICTS)}")
        if isinstance(spec, bool) or (isinstance(spec, int) and spec < 0):
            raise ValueError(f"expect.{k}: {spec!r} is not a count (0 or more)")
        if isinstance(spec, str) and not _EXPECT.match(spec):
            raise ValueError(f"expect.{k}: {spec!r} is not a count or a comparison like '>0' or '<=2'")
    return v


class HostEntry(Strict):
    """One lab host: what every kind has. A kind with options of its own (QEMU's binary,
    WinRM's authentication) extends it (``BackendKind.host_entry``), so an unknown key
    stays a ``file:line`` error for every kind alike. Credentials only by reference: a
    key file, the ssh-agent, or the name of an environment variable that holds a
    password."""

    name: str
    uri: str
    kind: str = Field(DEFAULT_BACKEND, description="the backend kind (testbed.backends entry points)")
    labels: list[str] = []
    identity_file: str | None = None
    password_env: str | None = Field(None, description="name of an env var holding the password")
    known_hosts: str | None = None
    insecure_accept_new: bool = False
    max_guests: int | None = Field(
        None,
        ge=1,
        le=256,
        description="guests this host runs at once (a run's parallel lanes are capped by it; "
        "default: the host's TESTBED_MAX_GUESTS, 2)",
    )
    vm_config: str | None = Field(
        None,
        description="the vm_config this host runs in a fleet (relative to the inventory file): how one "
        "playbook runs on hosts of different kinds, each with a vm_config of its own kind",
    )

    @field_validator("uri")
    @classmethod
    def _no_password(cls, v: str) -> str:
        if re.match(r"^\w+://[^/@]*:[^/@]*@", v):
            raise ValueError("no passwords in URIs: use password_env (an environment variable name)")
        return v

    @property
    def scheme(self) -> str:
        return "local" if self.uri == "local" else self.uri.split("://", 1)[0]


@dataclass(frozen=True)
class HostOptions:
    """How to reach a host, beyond its entry: what the command line adds."""

    insecure_accept_new: bool = False
    identity: str | None = None
