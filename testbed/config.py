"""vm_configs and playbooks: pydantic models loaded from YAML with line numbers.

Every bad value in a user's YAML becomes a ``ConfigError`` that names the file,
the line, what is wrong and what is allowed, because a lab engineer editing a
playbook at 2 a.m. needs ``playbooks/x.yaml:12`` and not a traceback.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

Strategy = Literal["none", "mask", "mask-async", "pause-resume"]
STRATEGIES: tuple[str, ...] = ("none", "mask", "mask-async", "pause-resume")
PARAVISOR_IMAGES: tuple[str, ...] = ("v1", "v2", "v2-replay", "v2-panic", "v2-hang", "v2-crash")


class ConfigError(Exception):
    """A user-facing configuration error: ``file:line: message``."""

    def __init__(self, path: Path | str, line: int | None, message: str) -> None:
        self.path = Path(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line else str(self.path)
        super().__init__(f"{where}: {message}")


class Strict(BaseModel):
    """Base: unknown keys are an error, never silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class KernelSpec(Strict):
    package: str = Field(
        "linux-image-cloud-amd64",
        description="Debian kernel package or metapackage, resolved with apt at build time",
    )
    version: str | None = Field(
        None, description="pin the package version; null = what the metapackage resolves to today"
    )


class LabKnobs(Strict):
    """Timing of the reference paravisor: they place the vulnerable window."""

    save_ms: int = Field(300, ge=0, le=60_000)
    restore_ms: int = Field(100, ge=0, le=60_000)
    blackout_ms: int = Field(0, ge=0, le=10_000)
    vtl0_shutdown_ms: int = Field(100, ge=0, le=10_000)
    servicing_timeout_ms: int = Field(8000, ge=100, le=600_000)


class ParavisorSpec(Strict):
    version: str = "v2"

    @field_validator("version")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in PARAVISOR_IMAGES:
            raise ValueError(f"unknown paravisor image {v!r}; allowed: {', '.join(PARAVISOR_IMAGES)}")
        return v


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

    @property
    def file_name(self) -> str:
        src = self.path or self.url or self.share or ""
        return re.split(r"[\\/]", src.rstrip("/\\"))[-1] or "artifact"


class NestedSpec(Strict):
    """Nested Hyper-V: an L1 Windows VM (virtualization extensions exposed) on the L0
    host; the L2 OpenHCL VM is driven inside it through PowerShell Direct."""

    l1_vhd: Artifact
    user: str = "Administrator"
    password_env: str = Field(description="env var on the controller holding the L1 password")
    memory_mb: int = Field(8192, ge=2048)
    processors: int = Field(4, ge=1, le=240)
    heartbeat_timeout_s: int = Field(600, ge=10)
    host_dir: str = Field(r"C:\testbed", description="testbed's folder on the L0 host (the L1 VM, its disk)")


class HyperVSpec(Strict):
    """A Gen2 VM with OpenHCL on a Hyper-V host (facts in CONTEXT.md)."""

    igvm: Artifact
    vtl0_vhd: Artifact
    vtl0_image: str = Field(
        "Linux VHDX, kernel console=ttyS0 with hv_utils (logs the shutdown request on COM1)",
        description="what the VTL0 image must be for COM1 evidence to exist",
    )
    firmware_cmdline: str = ""
    memory_mb: int = Field(2048, ge=256)
    processors: int = Field(2, ge=1, le=240)
    override_version_checks: bool = True
    disable_nvme_keepalive: bool = False
    timeout_hint_secs: int = Field(60, ge=1, le=3600)
    ic_ready_timeout_s: int = Field(300, ge=1)
    com1: bool = True
    com3: Literal["auto", "off"] = "auto"
    vtl0_shutdown_pattern: str = Field(
        "Shutdown request received", description="regex of the VTL0 line on COM1 that shows delivery"
    )
    com3_servicing_start_pattern: str | None = Field(
        None, description="regex of OpenHCL's COM3 line that marks the start of its save (guest anchor)"
    )
    host_dir: str = Field(
        r"C:\testbed", description="testbed's folder on the Hyper-V host (inside L1 when nested)"
    )
    nested: NestedSpec | None = None

    @field_validator("vtl0_shutdown_pattern", "com3_servicing_start_pattern")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"not a regular expression: {e}") from None
        return v


class VmConfig(Strict):
    name: str
    backend: Literal["qemu", "hyperv"] = "qemu"
    hyperv: HyperVSpec | None = None
    kernel: KernelSpec = KernelSpec()
    busybox_package: str = "busybox-static"
    cmdline: str = "console=ttyS0 quiet loglevel=1 panic=-1"
    memory_mib: int = Field(256, ge=64, le=65536)
    cpus: int = Field(1, ge=1, le=64)
    machine: Literal["q35", "pc"] = "q35"
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    boot_timeout_s: float = Field(90.0, gt=0, le=3600)
    paravisor: ParavisorSpec = ParavisorSpec()
    lab: LabKnobs = LabKnobs()

    @model_validator(mode="after")
    def _backend_section(self) -> VmConfig:
        if self.backend == "hyperv" and self.hyperv is None:
            raise ValueError("backend hyperv needs a 'hyperv:' section (igvm, vtl0_vhd, ...)")
        return self

    def digest(self) -> str:
        """Stable hash of everything in the config (for run manifests)."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]


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
    return f"{loc}: {err['msg']} (got {err.get('input')!r})"


def load_yaml(path: Path) -> Any:
    """Parse YAML keeping line numbers; syntax errors become ConfigError."""
    if not path.exists():
        raise ConfigError(path, None, "file not found")
    yaml = YAML(typ="rt")
    try:
        return yaml.load(path.read_text())
    except MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else None
        raise ConfigError(path, line, f"YAML syntax: {e.problem}") from None


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
    """A vm_config; Hyper-V artifact paths are made relative to the file itself."""
    cfg = load_model(path, VmConfig)
    if cfg.hyperv is None:
        return cfg
    base = Path(path).resolve().parent

    def anchored(a: Artifact) -> Artifact:
        if a.path and not Path(a.path).is_absolute():
            return a.model_copy(update={"path": str((base / a.path).resolve())})
        return a

    hv = cfg.hyperv
    update: dict[str, Any] = {"igvm": anchored(hv.igvm), "vtl0_vhd": anchored(hv.vtl0_vhd)}
    if hv.nested is not None:
        update["nested"] = hv.nested.model_copy(update={"l1_vhd": anchored(hv.nested.l1_vhd)})
    return cfg.model_copy(update={"hyperv": hv.model_copy(update=update)})


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
    kind: Literal["fixed", "linear", "random", "adaptive"]
    offsets_ms: list[float] | None = None
    start_ms: float | None = None
    stop_ms: float | None = None
    count: int | None = Field(None, ge=1, le=100_000)
    lo_ms: float | None = None
    hi_ms: float | None = None
    resolution_ms: float = Field(2.0, gt=0)
    coarse: int = Field(8, ge=2, le=1000)

    @model_validator(mode="after")
    def _fields_for_kind(self) -> ScheduleSpec:
        need = {
            "fixed": ("offsets_ms",),
            "linear": ("start_ms", "stop_ms", "count"),
            "random": ("lo_ms", "hi_ms"),
            "adaptive": ("lo_ms", "hi_ms"),
        }[self.kind]
        missing = [k for k in need if getattr(self, k) is None]
        if missing:
            raise ValueError(f"schedule kind {self.kind!r} needs {', '.join(missing)}")
        return self


class LabOverrides(Strict):
    save_ms: int | None = Field(None, ge=0, le=60_000)
    restore_ms: int | None = Field(None, ge=0, le=60_000)
    blackout_ms: int | None = Field(None, ge=0, le=10_000)
    vtl0_shutdown_ms: int | None = Field(None, ge=0, le=10_000)
    servicing_timeout_ms: int | None = Field(None, ge=100, le=600_000)


class Case(Strict):
    """One kind of iteration. A playbook is one case, or a list of them (baselines)."""

    name: str = "race"
    iterations: int | None = Field(None, ge=1, le=1_000_000)
    servicing: bool = True
    shutdown: Literal["offset", "after-ready", "none"] = "offset"
    image: str | None = None  # any name: servicing into a missing image must fail cleanly
    schedule: ScheduleSpec | None = None
    expect: dict[str, ExpectValue] | None = None

    @field_validator("expect")
    @classmethod
    def _expect(cls, v: dict[str, ExpectValue] | None) -> dict[str, ExpectValue] | None:
        return _validate_expect(v)


def _validate_expect(v: dict[str, ExpectValue] | None) -> dict[str, ExpectValue] | None:
    from testbed.engine.verdict import VERDICTS

    for k, spec in (v or {}).items():
        if k not in VERDICTS:
            raise ValueError(f"expect: unknown verdict {k!r}; allowed: {', '.join(VERDICTS)}")
        if isinstance(spec, str) and not _EXPECT.match(spec):
            raise ValueError(f"expect.{k}: {spec!r} is not a count or a comparison like '>0' or '<=2'")
    return v


class Playbook(Strict):
    name: str
    description: str = ""
    vm_config: str
    host: str = "local"
    strategy: Strategy = "none"
    iterations: int = Field(16, ge=1, le=1_000_000)
    schedule: ScheduleSpec = ScheduleSpec(kind="fixed", offsets_ms=[100.0])
    servicing: bool = True
    shutdown: Literal["offset", "after-ready", "none"] = "offset"
    image: str | None = None
    cases: list[Case] | None = None
    reset: Literal["cold", "snapshot"] = "snapshot"
    grace_ms: float | Literal["auto"] = "auto"
    lab: LabOverrides = LabOverrides()
    expect: dict[str, ExpectValue] = Field(
        default_factory=lambda: dict[str, ExpectValue](lost=0, duplicated=0)
    )
    max_infra_errors: int = Field(0, ge=0)
    on_infra_error: Literal["continue", "stop"] = "continue"
    stop_on_loss: bool = False
    calibrate: bool = False
    seed: int = 0
    collect: list[Literal["serial", "timeline", "qemu"]] = ["serial", "timeline"]

    @field_validator("expect")
    @classmethod
    def _expect(cls, v: dict[str, ExpectValue]) -> dict[str, ExpectValue]:
        _validate_expect(v)
        return v

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
    if not cfg_path.exists():
        data = load_yaml(p)
        raise ConfigError(
            p,
            _node_line(data, ("vm_config",)),
            f"vm_config {pb.vm_config!r} not found at {cfg_path}",
        )
    return pb, load_vm_config(cfg_path)


def apply_lab_overrides(cfg: VmConfig, over: LabOverrides) -> VmConfig:
    changes = {k: v for k, v in over.model_dump().items() if v is not None}
    return cfg.model_copy(update={"lab": cfg.lab.model_copy(update=changes)}) if changes else cfg


# ---- host inventory ------------------------------------------------------------


class HostEntry(Strict):
    """One lab host. Credentials only by reference: a key file, the ssh-agent, or
    the name of an environment variable that holds a password."""

    name: str
    uri: str
    kind: Literal["qemu", "hyperv", "openvmm"] = "qemu"
    labels: list[str] = []
    identity_file: str | None = None
    password_env: str | None = Field(None, description="name of an env var holding the password")
    known_hosts: str | None = None
    insecure_accept_new: bool = False
    winrm_auth: Literal["ntlm", "kerberos", "credssp", "basic"] = "ntlm"
    verify_tls: bool = Field(True, description="WinRM over HTTPS: validate the host's certificate")
    ca_bundle: str | None = Field(None, description="CA file that signed the host's WinRM certificate")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        if not (v == "local" or v.startswith(("ssh://", "winrm://", "winrms://"))):
            raise ValueError("uri must be 'local', ssh://user@host[:port] or winrm(s)://user@host[:port]")
        if re.match(r"^\w+://[^/@]*:[^/@]*@", v):
            raise ValueError("no passwords in URIs: use password_env (an environment variable name)")
        return v


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
