"""vm_configs and playbooks: pydantic models loaded from YAML with line numbers.

Every bad value in a user's YAML becomes a ``ConfigError`` that names the file,
the line, what is wrong and what is allowed, because a lab engineer editing a
playbook at 2 a.m. needs ``playbooks/x.yaml:12`` and not a traceback.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
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


class VmConfig(Strict):
    name: str
    backend: Literal["qemu"] = "qemu"
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
    msg = err["msg"]
    ctx = err.get("ctx") or {}
    if "expected" in ctx:
        msg = f"{msg}"
    return f"{loc}: {msg} (got {err.get('input')!r})"


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
    return load_model(path, VmConfig)


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
