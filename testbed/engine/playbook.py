"""Playbooks: what a run does (cases, schedules, expectations, bisections, matrices),
validated from YAML with line numbers, and the loader that pairs a playbook with its
vm_config, resolved against the registered backend kinds.

The engine reads these; which knobs a ``lab:`` section or a matrix's ``lab.<knob>``
may set is the vm_config kind's to say (``VmConfig.knob_names``), checked here with the
playbook's ``file:line``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import Field, field_validator, model_validator

from testbed.backends import registry
from testbed.core.config import (
    DEFAULT_BACKEND,
    ConfigError,
    ExpectValue,
    Strategy,
    Strict,
    VmConfig,
    load_model,
    load_yaml,
    node_line,
    parse_model,
    validate_expect,
)


def load_vm_config(path: Path | str) -> VmConfig:
    """A vm_config, validated by the model of its backend kind; relative file paths
    in it are made relative to the file itself."""
    p = Path(path)
    data = load_yaml(p)
    if not isinstance(data, dict):
        raise ConfigError(p, 1, "expected a mapping of keys for a vm_config")
    kind = data.get("backend", DEFAULT_BACKEND)
    if not isinstance(kind, str) or kind not in registry.names():
        raise ConfigError(p, node_line(data, ("backend",)),
                          f"backend: unknown kind {kind!r}; allowed: {', '.join(registry.names())}")  # fmt: skip
    return parse_model(p, data, registry.get(kind).vm_config).anchored(p.resolve().parent)


# An offset from the servicing request (or a delay after a phase or the IC's re-offer):
# within ten minutes either side, far beyond any servicing a host does.
OffsetMs = Annotated[float, Field(ge=-600_000, le=600_000)]


class ScheduleSpec(Strict):
    kind: Literal["fixed", "linear", "random", "adaptive", "phases", "flaky"]
    offsets_ms: list[OffsetMs] | None = Field(None, min_length=1, max_length=100_000)
    start_ms: OffsetMs | None = None
    stop_ms: OffsetMs | None = None
    count: int | None = Field(None, ge=1, le=100_000)
    lo_ms: OffsetMs | None = None
    hi_ms: OffsetMs | None = None
    resolution_ms: float = Field(2.0, gt=0, le=60_000)
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
        return validate_expect(v)


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


MATRIX_DIMENSIONS = (
    "strategy",
    "paravisor",
    "shutdown",
)  # and lab.<knob>, one per knob of the vm_config's kind


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
        for k, vals in self.dimensions.items():
            if k not in MATRIX_DIMENSIONS and not k.startswith("lab."):
                raise ValueError(
                    f"matrix dimension {k!r}: allowed: {', '.join(MATRIX_DIMENSIONS)}, lab.<knob>"
                )
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
    lab: dict[str, int | float | None] = {}  # the vm_config kind's knobs (VmConfig.knob_names)
    expect: dict[str, ExpectValue] = Field(
        default_factory=lambda: dict[str, ExpectValue](lost=0, duplicated=0)
    )
    max_infra_errors: int = Field(0, ge=0, le=1_000_000)
    max_infra_errors_in_a_row: int = Field(
        5, ge=1, le=1_000_000, description="stop the run after this many, the host being broken"
    )
    on_infra_error: Literal["continue", "stop"] = "continue"
    stop_on_loss: bool = False
    calibrate: bool = False
    seed: int = Field(0, ge=0, le=2**63 - 1)
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
        validate_expect(v)
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
        raise ConfigError(p, node_line(load_yaml(p), ("vm_config",)), f"vm_config {problem}")
    cfg = load_vm_config(cfg_path)
    check_knobs(p, pb, cfg)
    return pb, cfg


def check_knobs(path: Path, pb: Playbook, cfg: VmConfig) -> None:
    """The playbook's ``lab:`` knobs and ``lab.<knob>`` matrix dimensions against what the
    vm_config's kind has, with the line of the key that asked."""
    knobs = cfg.knob_names()
    allowed = (
        f"allowed for backend {cfg.backend}: {', '.join(knobs)}"
        if knobs
        else f"backend {cfg.backend} has none"
    )
    for k in pb.lab:
        if k not in knobs:
            raise ConfigError(
                path, node_line(load_yaml(path), ("lab", k)), f"lab.{k}: unknown knob; {allowed}"
            )
    try:
        cfg.with_lab(pb.lab)
    except ValueError as e:
        raise ConfigError(path, node_line(load_yaml(path), ("lab",)), f"lab: {_first(e)}") from None
    for dim in pb.matrix.dimensions if pb.matrix else {}:
        if dim.startswith("lab.") and dim[4:] not in knobs:
            raise ConfigError(path, node_line(load_yaml(path), ("matrix", "dimensions", dim)),
                              f"matrix dimension {dim!r}: unknown knob; {allowed}")  # fmt: skip


def _first(e: ValueError) -> str:
    errors: Any = getattr(e, "errors", None)
    if callable(errors):
        err = errors()[0]
        return f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
    return str(e)
