"""Fixtures for the OpenVMM backend: the stand-in openvmm (tests/openvmm_standin.py)
on a PATH of its own, lab "IGVM" files, and vm_configs that point at them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from openvmm_standin import igvm_file as igvm  # type: ignore[import-not-found]

ROOT = Path(__file__).resolve().parents[2]
STANDIN = ROOT / "tests" / "openvmm_standin.py"


@pytest.fixture
def standin_bin(tmp_path: Path) -> Path:
    """A folder with an ``openvmm`` that runs the stand-in."""
    d = tmp_path / "bin"
    d.mkdir()
    exe = d / "openvmm"
    exe.write_text(f'#!/bin/sh\nexec {sys.executable} {STANDIN} "$@"\n')
    exe.chmod(0o755)
    return d


@pytest.fixture
def ov_config(tmp_path: Path, standin_bin: Path):  # type: ignore[no-untyped-def]
    """Write a vm_config for the stand-in; keyword arguments override openvmm: keys."""

    def make(name: str = "ov", binary: str | None = None, **spec: object) -> Path:
        import json

        base = {"binary": binary or str(standin_bin / "openvmm"), "igvm": str(igvm(tmp_path, "v2")),
                "images": {"v1": str(igvm(tmp_path, "v1"))}, "memory": "256MB", "memory_mb": 256,
                "boot_timeout_s": 90, "servicing_timeout_s": 6, "shutdown_grace_ms": 1500}  # fmt: skip
        base.update(spec)
        p = tmp_path / f"{name}.yaml"
        p.write_text(json.dumps({"name": name, "backend": "openvmm", "openvmm": base}))  # JSON is YAML
        return p

    return make
