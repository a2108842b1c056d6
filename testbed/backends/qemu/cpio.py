"""A minimal newc cpio writer, so building an initramfs needs no cpio binary and no root.

Entries are written in sorted order with fixed mtimes and owner root, so the
same tree always gives the same bytes (the image cache relies on that).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO


def _header(f: BinaryIO, name: str, mode: int, size: int, ino: int, rdev: tuple[int, int] = (0, 0)) -> None:
    nb = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, size, 0, 0, rdev[0], rdev[1], len(nb), 0]
    f.write(b"070701" + b"".join(b"%08X" % v for v in fields) + nb)
    f.write(b"\0" * ((4 - (110 + len(nb)) % 4) % 4))


def _pad(f: BinaryIO, size: int) -> None:
    f.write(b"\0" * ((4 - size % 4) % 4))


def write_newc(root: Path, dest: Path, devices: dict[str, tuple[int, int]] | None = None) -> None:
    """Archive the tree under ``root`` into ``dest``; ``devices`` adds char nodes by path."""
    ino = 1
    with dest.open("wb") as f:
        paths = sorted(p for p in root.rglob("*"))
        for p in paths:
            rel = p.relative_to(root).as_posix()
            st = p.lstat()
            ino += 1
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(p).encode()
                _header(f, rel, stat.S_IFLNK | 0o777, len(target), ino)
                f.write(target)
                _pad(f, len(target))
            elif stat.S_ISDIR(st.st_mode):
                _header(f, rel, stat.S_IFDIR | 0o755, 0, ino)
            else:
                data = p.read_bytes()
                perm = 0o755 if st.st_mode & 0o111 else 0o644
                _header(f, rel, stat.S_IFREG | perm, len(data), ino)
                f.write(data)
                _pad(f, len(data))
        for rel, (major, minor) in sorted((devices or {}).items()):
            ino += 1
            _header(f, rel, stat.S_IFCHR | 0o600, 0, ino, (major, minor))
        _header(f, "TRAILER!!!", 0, 0, 0)
