"""Clean Debian hosts for the tests: a freshly unpacked root with its own sshd on loopback.

Debian 12 for the Ansible tests: the root comes from the same cached debootstrap
tarball as ../shared/tools/fresh-debian, or from one this module builds once. It gets
only what any Debian server has (openssh-server) and this machine's CA bundle; the
kvm-host playbook must bring everything else. Debian 11 (Python 3.9, QEMU 5.2) as an
older lab host: its root, with the packages asked for, is built once and cached.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from sshd import Sshd, free_port, keygen  # type: ignore[import-not-found]

TARBALL = Path("/var/cache/fresh-debian/bookworm.tar")
MOUNTS = ("proc", "sys", "dev", "dev/pts")


OWN_DIR = Path.home() / ".cache" / "testbed" / "fresh-debian"
OWN_TARBALL = OWN_DIR / "bookworm.tar"


def _mirror() -> str:
    for src in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")):
        if src.exists():
            for line in src.read_text().splitlines():
                parts = line.split()
                if parts[:1] == ["URIs:"] and len(parts) > 1:
                    return parts[1]
                if parts[:1] == ["deb"] and len(parts) > 1:
                    return parts[1] if not parts[1].startswith("[") else parts[2]
    return "http://deb.debian.org/debian"


def ensure_tarball(suite: str = "bookworm", packages: tuple[str, ...] = ()) -> Path | None:
    """A root of ``suite`` with ``packages`` installed: the shared tool's cached bookworm
    root, else our own, built once with debootstrap (a few minutes) and cached."""
    own = OWN_DIR / (f"{suite}.tar" if not packages else f"{suite}+{','.join(sorted(packages))}.tar")
    for t in (TARBALL, own) if suite == "bookworm" and not packages else (own,):
        if t.exists():
            return t
    if shutil.which("debootstrap") is None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "debootstrap"], capture_output=True)
    own.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix="debootstrap-", dir="/var/tmp"))
    mounted: list[Path] = []
    try:
        r = subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,ca-certificates",
                            suite, str(build), _mirror()], capture_output=True, text=True, timeout=1500)  # fmt: skip
        if r.returncode != 0:
            return None
        if packages:
            shutil.copyfile("/etc/resolv.conf", build / "etc/resolv.conf")
            for m in MOUNTS:
                subprocess.run(["mount", "--bind", f"/{m}", str(build / m)], check=True)
                mounted.append(build / m)
            r2 = chroot(build, "sh", "-c", f"apt-get update -qq && apt-get install -y -qq --no-install-recommends "
                        f"{' '.join(packages)} >/dev/null", timeout=1500)  # fmt: skip
            for m in reversed(mounted):
                subprocess.run(["umount", "-l", str(m)], capture_output=True)
            mounted.clear()
            if r2.returncode != 0:
                return None
        with tarfile.open(own.with_suffix(".part"), "w") as tar:
            tar.add(build, arcname=".")
        own.with_suffix(".part").replace(own)
        return own
    finally:
        for m in reversed(mounted):
            subprocess.run(["umount", "-l", str(m)], capture_output=True)
        shutil.rmtree(build, ignore_errors=True)


def chroot(root: Path, *argv: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["chroot", str(root), *argv], capture_output=True, text=True, timeout=timeout,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive",
                               "HOME": "/root", "LANG": "C.UTF-8"})  # fmt: skip


@contextlib.contextmanager
def fresh_debian_host(
    workdir: Path, suite: str = "bookworm", packages: tuple[str, ...] = ()
) -> Iterator[Sshd]:
    """``packages`` are baked into the cached root (openssh-server is installed anyway)."""
    tar = ensure_tarball(suite, tuple(sorted({*packages, "openssh-server"})) if packages else ())
    if tar is None:
        raise RuntimeError(f"no Debian {suite} root: debootstrap failed (see the mirror in /etc/apt)")
    root = Path(tempfile.mkdtemp(prefix="freshroot-", dir="/var/tmp"))
    mounted: list[Path] = []
    proc: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(
            ["tar", "-C", str(root), "-xf", str(tar)], check=True
        )  # device nodes, owners: tar's job
        shutil.copyfile("/etc/resolv.conf", root / "etc/resolv.conf")
        shutil.copyfile("/etc/ssl/certs/ca-certificates.crt", root / "etc/ssl/certs/ca-certificates.crt")
        for m in MOUNTS:
            (root / m).mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "--bind", f"/{m}", str(root / m)], check=True)
            mounted.append(root / m)
        if not (root / "usr/sbin/sshd").exists():
            r = chroot(
                root, "sh", "-c", "apt-get update -qq && apt-get install -y -qq openssh-server >/dev/null"
            )
            if r.returncode != 0:
                raise RuntimeError(f"openssh-server did not install in the fresh root: {r.stderr[-800:]}")
        keys = workdir / "keys"
        keys.mkdir(parents=True, exist_ok=True)
        keygen(keys / "client_ed25519")
        (root / "root/.ssh").mkdir(mode=0o700, exist_ok=True)
        (root / "root/.ssh/authorized_keys").write_text((keys / "client_ed25519.pub").read_text())
        port = free_port()
        (root / "etc/ssh/sshd_config.d/testbed.conf").write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        )
        (root / "run/sshd").mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(["chroot", str(root), "/usr/sbin/sshd", "-D", "-e"],
                                stderr=open(workdir / "sshd.log", "wb"))  # fmt: skip
        host_pub = " ".join((root / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()[:2])
        (workdir / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub}\n")
        import socket

        end = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(
                        f"sshd in the fresh root did not start: {(workdir / 'sshd.log').read_text()}"
                    ) from None
                time.sleep(0.1)
        yield Sshd("127.0.0.1", port, keys / "client_ed25519", workdir / "known_hosts", host_pub, root / "root/.cache",
                   proc)  # fmt: skip
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        # Anything the host left running inside the root (none expected) goes with it.
        subprocess.run(["fuser", "-k", "-M", str(root)], capture_output=True)
        for m in reversed(mounted):
            subprocess.run(["umount", "-l", str(m)], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
