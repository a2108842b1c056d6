"""vm_configs and playbooks: pydantic models loaded from YAML with line numbers.

Every bad value in a user's YAML becomes a ``ConfigError`` that names the file,
the line, what is wrong and what is allowed, because a lab engineer editing a
playbook at 2 a.m. needs ``playbooks/x.yaml:12`` and not a traceback.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
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

from testbed.redact import redact

Strategy = Literal["none", "mask", "mask-async", "pause-resume"]
STRATEGIES: tuple[str, ...] = ("none", "mask", "mask-async", "pause-resume")
DEFAULT_BACKEND = "qemu"  # a vm_config or inventory entry that names no backend


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

    def with_lab(self, over: LabOverrides) -> Self:
        """A playbook's ``lab:`` knobs applied; they shape the reference lab only."""
        return self

    def anchored(self, base: Path) -> Self:
        """Relative file paths in the config made relative to the config file's folder."""
        return self

    def with_paravisor(self, version: str) -> Self:
        """The reference lab's paravisor image ``version`` instead of the configured one."""
        raise ValueError(f"backend {self.backend} has no lab paravisor images to choose from")


# ---- loading -----------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)


def _node_line(root: Any, loc: tuple[int | str, ...]) -> int | None:
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
        line = _node_line(data, tuple(first["loc"]))
        more = f" (and {len(e.errors()) - 1} more problem(s))" if len(e.errors()) > 1 else ""
        raise ConfigError(path, line, _describe(dict(first)) + more) from None


def load_model(path: Path | str, model: type[M]) -> M:
    p = Path(path)
    return parse_model(p, load_yaml(p), model)


def load_vm_config(path: Path | str) -> VmConfig:
    """A vm_config, validated by the model of its backend kind; relative file paths
    in it are made relative to the file itself."""
    from testbed.backends import registry

    p = Path(path)
    data = load_yaml(p)
    if not isinstance(data, dict):
        raise ConfigError(p, 1, "expected a mapping of keys for a vm_config")
    kind = data.get("backend", DEFAULT_BACKEND)
    if not isinstance(kind, str) or kind not in registry.names():
        raise ConfigError(p, _node_line(data, ("backend",)),
                          f"backend: unknown kind {kind!r}; allowed: {', '.join(registry.names())}")  # fmt: skip
    return parse_model(p, data, registry.get(kind).vm_config).anchored(p.resolve().parent)


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ---- playbooks -----------------------------------------------------------------

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


class ScheduleSpec(Strict):
    kind: Literal["fixed", "linear", "random", "adaptive", "phases", "flaky"]
    offsets_ms: list[float] | None = Field(None, min_length=1, max_length=100_000)
    start_ms: float | None = None
    stop_ms: float | None = None
    count: int | None = Field(None, ge=1, le=100_000)
    lo_ms: float | None = None
    hi_ms: float | None = None
    resolution_ms: float = Field(2.0, gt=0)
    coarse: int = Field(8, ge=2, le=1000)
    # kind: phases. Fire on servicing phases (the backend names what it can observe):
    # every phase (or these) at each delay, plus the midpoint to the next phase when
    # `midpoint`, `repeat` times each cell, in a seeded order.
    phases: list[str] | None = Field(None, min_length=1)
    delays_ms: list[Annotated[float, Field(ge=0, le=60_000)]] = Field([0.0, 2.0], min_length=1)
    midpoint: bool = True
    repeat: int = Field(3, ge=1, le=10_000)
    # kind: flaky. A budgeted search for a window that loses only some of its tries:
    # [lo_ms, hi_ms] cut into `buckets` (random offsets in each) plus every servicing
    # phase the backend observes (or `phases`) at delay 0; tries go where the loss rate
    # could be highest (the largest Wilson upper bound); it stops when every arm's bound
    # is below `target_rate`, or once an arm has lost and had `confirm` tries.
    buckets: int = Field(8, ge=1, le=1000)
    target_rate: float = Field(0.1, gt=0, lt=1)
    confirm: int = Field(20, ge=1, le=100_000)

    @property
    def points(self) -> int | None:
        """How many offsets the schedule names (None: the adaptive search decides)."""
        if self.kind in ("phases", "flaky"):
            return None  # the backend's phases (and the search) decide
        return (
            len(self.offsets_ms or [])
            if self.kind == "fixed"
            else self.count
            if self.kind != "adaptive"
            else None
        )

    @model_validator(mode="after")
    def _fields_for_kind(self) -> ScheduleSpec:
        need = {
            "fixed": ("offsets_ms",),
            "linear": ("start_ms", "stop_ms", "count"),
            "random": ("lo_ms", "hi_ms"),
            "adaptive": ("lo_ms", "hi_ms"),
            "phases": (),
            "flaky": ("lo_ms", "hi_ms"),
        }[self.kind]
        missing = [k for k in need if getattr(self, k) is None]
        if missing:
            raise ValueError(f"schedule kind {self.kind!r} needs {', '.join(missing)}")
        return self


# When the shutdown is fired: at a schedule offset from the servicing request
# ("offset"), once the IC is back after servicing (the seed test's "after-ready"), at a
# schedule delay after the IC's re-offer ("ic-ready": how long must the host wait after
# "ready"?), or not at all.
ShutdownMode = Literal["offset", "after-ready", "ic-ready", "none"]


class StreamSpec(Strict):
    """Messages under traffic: besides the shutdown, the host streams sequence-numbered
    ``hb`` messages to the guest every ``interval_ms`` from ``from_ms`` before to
    ``until_ms`` after the servicing request, each acknowledged by VTL0, and VTL0 sends
    ``TX`` lines the other way every ``guest_interval_ms`` (null: none). Every message
    is accounted for: delivered once, lost, duplicated, reordered, or refused."""

    interval_ms: float = Field(5.0, ge=0.5, le=10_000)
    from_ms: float = Field(-50.0, ge=-10_000, le=0)
    until_ms: float = Field(700.0, gt=0, le=60_000)
    guest_interval_ms: float | None = Field(10.0, ge=0.5, le=10_000)


class LabOverrides(Strict):
    save_ms: int | None = Field(None, ge=0, le=60_000)
    restore_ms: int | None = Field(None, ge=0, le=60_000)
    blackout_ms: int | None = Field(None, ge=0, le=10_000)
    vtl0_shutdown_ms: int | None = Field(None, ge=0, le=10_000)
    vtl0_attach_ms: int | None = Field(None, ge=0, le=60_000)
    servicing_timeout_ms: int | None = Field(None, ge=100, le=600_000)


class Case(Strict):
    """One kind of iteration. A playbook is one case, or a list of them (baselines)."""

    name: str = "race"
    iterations: int | None = Field(None, ge=1, le=1_000_000)
    servicing: bool = True
    shutdown: ShutdownMode = "offset"
    image: str | None = None  # any name: servicing into a missing image must fail cleanly
    schedule: ScheduleSpec | None = None
    expect: dict[str, ExpectValue] | None = None
    stream: StreamSpec | None = None  # traffic during servicing (None: the playbook's)

    @field_validator("expect")
    @classmethod
    def _expect(cls, v: dict[str, ExpectValue] | None) -> dict[str, ExpectValue] | None:
        return _validate_expect(v)


def _validate_expect(v: dict[str, ExpectValue] | None) -> dict[str, ExpectValue] | None:
    from testbed.verdicts import VERDICTS

    for k, spec in (v or {}).items():
        if k not in VERDICTS:
            raise ValueError(f"expect: unknown verdict {k!r}; allowed: {', '.join(VERDICTS)}")
        if isinstance(spec, bool) or (isinstance(spec, int) and spec < 0):
            raise ValueError(f"expect.{k}: {spec!r} is not a count (0 or more)")
        if isinstance(spec, str) and not _EXPECT.match(spec):
            raise ValueError(f"expect.{k}: {spec!r} is not a count or a comparison like '>0' or '<=2'")
    return v


class BisectSpec(Strict):
    """``testbed bisect``: which of an ordered list of builds (good first, bad last)
    broke it, each judged by an SPRT of loss rate p0 (good) against p1 (bad)."""

    builds: list[str] = Field(min_length=2, max_length=10_000)
    p0: float = Field(0.01, gt=0, lt=1, description="a good build's loss rate at most")
    p1: float = Field(0.15, gt=0, lt=1, description="a bad build's loss rate at least")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="chance of calling a good build bad")
    beta: float = Field(0.05, gt=0, lt=0.5, description="chance of calling a bad build good")
    max_per_build: int = Field(200, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _sane(self) -> Self:
        if self.p0 >= self.p1:
            raise ValueError(f"p0 ({self.p0:g}) must be below p1 ({self.p1:g})")
        dup = sorted({b for b in self.builds if self.builds.count(b) > 1})
        if dup:
            raise ValueError(f"builds listed twice: {', '.join(dup)}")
        return self


MATRIX_DIMENSIONS = ("strategy", "paravisor", "shutdown")  # and lab.<knob>, one per LabOverrides field


class MatrixExpect(Strict):
    """Expectations for the cells whose values include every ``where`` pair."""

    where: dict[str, str | int | float] = {}
    expect: dict[str, ExpectValue]


class MatrixSpec(Strict):
    """Cases expanded over dimensions: every combination is a cell, run as a playbook
    of its own (its loss rate, Wilson interval and verdict counts). ``paravisor`` values
    are ``from->to`` (boot ``from``, service into ``to``) or one image for both."""

    dimensions: dict[str, list[str | int | float]] = Field(min_length=1)
    expect: list[MatrixExpect] = []

    @model_validator(mode="after")
    def _known(self) -> Self:
        knobs = set(LabOverrides.model_fields)
        for k, vals in self.dimensions.items():
            if k not in MATRIX_DIMENSIONS and not (k.startswith("lab.") and k[4:] in knobs):
                raise ValueError(f"matrix dimension {k!r}: allowed: {', '.join(MATRIX_DIMENSIONS)}, "
                                 f"lab.<{'|'.join(sorted(knobs))}>")  # fmt: skip
            if not vals or len(set(map(str, vals))) != len(vals):
                raise ValueError(f"matrix dimension {k!r}: give distinct values, at least one")
        cells = math.prod(len(v) for v in self.dimensions.values())
        if cells > 256:
            raise ValueError(f"the matrix has {cells} cells; at most 256")
        for e in self.expect:
            unknown = [k for k in e.where if k not in self.dimensions]
            if unknown:
                raise ValueError(
                    f"matrix expect: where names {', '.join(unknown)}, not a dimension of the matrix"
                )
        return self


class Playbook(Strict):
    name: str
    description: str = ""
    vm_config: str
    host: str = "local"
    strategy: Strategy = "none"
    iterations: int = Field(16, ge=1, le=1_000_000)
    schedule: ScheduleSpec = ScheduleSpec(kind="fixed", offsets_ms=[100.0])
    servicing: bool = True
    shutdown: ShutdownMode = "offset"
    image: str | None = None
    cases: list[Case] | None = None
    reset: Literal["cold", "snapshot"] = "snapshot"
    grace_ms: Annotated[float, Field(ge=0, le=600_000)] | Literal["auto"] = "auto"
    lab: LabOverrides = LabOverrides()
    expect: dict[str, ExpectValue] = Field(
        default_factory=lambda: dict[str, ExpectValue](lost=0, duplicated=0)
    )
    max_infra_errors: int = Field(0, ge=0)
    max_infra_errors_in_a_row: int = Field(
        5, ge=1, le=1_000_000, description="stop the run after this many, the host being broken"
    )
    on_infra_error: Literal["continue", "stop"] = "continue"
    stop_on_loss: bool = False
    calibrate: bool = False
    seed: int = 0
    parallel: int = Field(
        1, ge=1, le=256, description="guests racing at once on the host, capped by its max_guests"
    )
    bisect: BisectSpec | None = None  # iterations is then the budget over all builds
    stream: StreamSpec | None = None  # messages under traffic, for every case that names none
    matrix: MatrixSpec | None = None  # every cell is this playbook with the cell's values
    collect: list[Literal["serial", "timeline", "qemu"]] = ["serial", "timeline"]

    @field_validator("expect")
    @classmethod
    def _expect(cls, v: dict[str, ExpectValue]) -> dict[str, ExpectValue]:
        _validate_expect(v)
        return v

    @model_validator(mode="after")
    def _bisect_one_case(self) -> Self:
        if self.bisect is not None and self.cases and len(self.cases) > 1:
            raise ValueError("bisect: a bisection runs one case (its schedule and servicing) over the builds; "
                             f"this playbook has {len(self.cases)}")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _ic_ready_delays(self) -> Self:
        for c in self.resolved_cases():
            if c.shutdown != "ic-ready":
                continue
            if not c.servicing:
                raise ValueError(f"case {c.name}: shutdown ic-ready waits for the IC's re-offer after servicing: "
                                 "it needs servicing: true")  # fmt: skip
            if c.schedule is None:
                continue
            s = c.schedule
            low = [v for v in (*(s.offsets_ms or []), s.start_ms, s.stop_ms, s.lo_ms) if v is not None]
            if low and min(low) < 0:
                raise ValueError(
                    f"case {c.name}: shutdown ic-ready fires a delay after the IC's re-offer, so the schedule's "
                    f"offsets must be >= 0 (got {min(low):g} ms)"
                )
        return self

    def resolved_cases(self) -> list[Case]:
        """The playbook's cases with top-level defaults filled in."""
        if not self.cases:
            return [
                Case(
                    name=self.name,
                    iterations=self.iterations,
                    servicing=self.servicing,
                    shutdown=self.shutdown,
                    image=self.image,
                    schedule=self.schedule,
                    expect=self.expect,
                )
            ]
        return [
            c.model_copy(
                update={
                    "iterations": c.iterations or self.iterations,
                    "schedule": c.schedule or self.schedule,
                    "image": c.image or self.image,
                    "expect": c.expect if c.expect is not None else self.expect,
                }
            )
            for c in self.cases
        ]


def load_playbook(path: Path | str) -> tuple[Playbook, VmConfig]:
    """Load a playbook and the vm_config it names (relative to the playbook file)."""
    p = Path(path)
    pb = load_model(p, Playbook)
    cfg_path = (p.parent / pb.vm_config).resolve()
    problem = ("is empty: name a vm_config file" if not pb.vm_config.strip() else
               f"{pb.vm_config!r} not found at {cfg_path}" if not cfg_path.exists() else
               f"{pb.vm_config!r} is a folder ({cfg_path}): name the vm_config file" if cfg_path.is_dir() else None)  # fmt: skip
    if problem is not None:
        raise ConfigError(p, _node_line(load_yaml(p), ("vm_config",)), f"vm_config {problem}")
    return pb, load_vm_config(cfg_path)


# ---- host inventory ------------------------------------------------------------


class HostEntry(Strict):
    """One lab host. Credentials only by reference: a key file, the ssh-agent, or
    the name of an environment variable that holds a password."""

    name: str
    uri: str
    kind: str = Field(DEFAULT_BACKEND, description="the backend kind (testbed.backends entry points)")
    labels: list[str] = []
    identity_file: str | None = None
    password_env: str | None = Field(None, description="name of an env var holding the password")
    known_hosts: str | None = None
    insecure_accept_new: bool = False
    winrm_auth: Literal["ntlm", "kerberos", "credssp", "basic"] = "ntlm"
    verify_tls: bool = Field(True, description="WinRM over HTTPS: validate the host's certificate")
    ca_bundle: str | None = Field(None, description="CA file that signed the host's WinRM certificate")
    qemu_binary: str | None = Field(
        None,
        description="QEMU on this host (default: qemu-system-x86_64 on PATH, else /usr/libexec/qemu-kvm)",
    )
    max_guests: int | None = Field(
        None,
        ge=1,
        le=256,
        description="guests this host runs at once (a run's parallel lanes are capped by it; "
        "default: the host's TESTBED_MAX_GUESTS, 2)",
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        from testbed.backends import registry

        if re.match(r"^\w+://[^/@]*:[^/@]*@", v):
            raise ValueError("no passwords in URIs: use password_env (an environment variable name)")
        if registry.scheme_of(v) not in registry.all_schemes() or (v != "local" and "://" not in v):
            raise ValueError("uri must be 'local' or one of " + ", ".join(
                f"{s}://user@host[:port]" for s in registry.all_schemes() if s != "local"))  # fmt: skip
        return v

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        from testbed.backends import registry

        if v not in registry.names():
            raise ValueError(f"unknown host kind {v!r}; allowed: {', '.join(registry.names())}")
        return v

    @model_validator(mode="after")
    def _scheme_fits_kind(self) -> HostEntry:
        from testbed.backends import registry

        k, s = registry.get(self.kind), registry.scheme_of(self.uri)
        if s not in k.schemes:
            raise ValueError(f"a host of kind {self.kind} is reached by {', '.join(k.schemes)}, not {s}")
        return self


class Inventory(Strict):
    hosts: list[HostEntry]

    @model_validator(mode="after")
    def _unique(self) -> Inventory:
        names = [h.name for h in self.hosts]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate host names: {', '.join(sorted(dup))}")
        return self

    def find(self, name: str) -> HostEntry | None:
        return next((h for h in self.hosts if h.name == name), None)


def load_inventory(path: Path | str) -> Inventory:
    return load_model(path, Inventory)
