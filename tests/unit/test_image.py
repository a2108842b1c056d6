from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest

from testbed.backends.qemu.cpio import write_newc
from testbed.backends.qemu.image import ImageInputs, _modinfo_depends

BASE = ImageInputs(
    "linux-image-6.1.0-56-cloud-amd64", "6.1.192-2", "1:1.35.0-4", "12.2.0", "console=ttyS0", "abc"
)


def test_same_inputs_same_key() -> None:
    assert BASE.key() == dataclasses.replace(BASE).key()


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(ImageInputs)])
def test_every_input_changes_the_key(field: str) -> None:
    changed = dataclasses.replace(BASE, **{field: getattr(BASE, field) + "x"})
    assert changed.key() != BASE.key()


def test_cpio_is_deterministic_and_readable(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "init").write_text("#!/bin/sh\necho hi\n")
    (root / "init").chmod(0o755)
    (root / "bin" / "data").write_bytes(b"x" * 13)
    (root / "bin" / "link").symlink_to("data")
    write_newc(root, tmp_path / "a.cpio", devices={"dev/console": (5, 1)})
    write_newc(root, tmp_path / "b.cpio", devices={"dev/console": (5, 1)})
    assert (tmp_path / "a.cpio").read_bytes() == (tmp_path / "b.cpio").read_bytes()
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox not installed (CI installs busybox-static)")
    listing = subprocess.run(
        [busybox, "cpio", "-tv"], input=(tmp_path / "a.cpio").read_bytes(), capture_output=True, check=True
    ).stdout.decode()
    assert "bin/link -> data" in listing
    assert "init" in listing and "dev/console" in listing
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(
        [busybox, "cpio", "-id"],
        input=(tmp_path / "a.cpio").read_bytes(),
        cwd=out,
        check=True,
        capture_output=True,
    )
    assert (out / "bin" / "data").read_bytes() == b"x" * 13
    assert (out / "init").stat().st_mode & 0o111


def test_modinfo_depends(tmp_path: Path) -> None:
    ko = tmp_path / "m.ko"
    ko.write_bytes(b"\x7fELF junk\x00license=GPL\x00depends=virtio,virtio_ring\x00vermagic=6.1\x00")
    assert _modinfo_depends(ko) == ["virtio", "virtio_ring"]
    ko.write_bytes(b"\x00depends=\x00")
    assert _modinfo_depends(ko) == []
