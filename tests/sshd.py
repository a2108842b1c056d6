"""A real OpenSSH server for the tests: loopback on a free port, or inside a network namespace.

Generated host and user keys, root login by key only, SFTP. The remote side
keeps its own cache dir (SetEnv), so uploads really happen.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Sshd:
    host: str
    port: int
    key: Path  # the client's private key
    known_hosts: Path
    host_pub: str
    remote_cache: Path
    proc: subprocess.Popen[bytes]
    netns: str | None = None

    @property
    def uri(self) -> str:
        return f"ssh://root@{self.host}:{self.port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


@contextlib.contextmanager
def run_sshd(
    d: Path, host: str = "127.0.0.1", netns: str | None = None, env: dict[str, str] | None = None
) -> Iterator[Sshd]:
    """``env``: more variables for sessions (sshd takes only its first SetEnv line: one line)."""
    d.mkdir(parents=True, exist_ok=True)
    keygen(d / "host_ed25519")
    keygen(d / "client_ed25519")
    (d / "authorized_keys").write_text((d / "client_ed25519.pub").read_text())
    remote_cache = d / "remote-cache"
    setenv = " ".join(f"{k}={v}" for k, v in {"TESTBED_CACHE_DIR": str(remote_cache), **(env or {})}.items())
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress {host}\nHostKey {d}/host_ed25519\nPidFile {d}/sshd.pid\n"
        f"AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        f"Subsystem sftp internal-sftp\nSetEnv {setenv}\nLogLevel ERROR\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    argv = ["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    proc = subprocess.Popen(argv, stderr=open(d / "sshd.log", "wb"))
    host_pub = " ".join((d / "host_ed25519.pub").read_text().split()[:2])
    (d / "known_hosts").write_text(f"[{host}]:{port} {host_pub}\n")
    end = time.monotonic() + 10
    while True:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"sshd did not start: {(d / 'sshd.log').read_text()}") from None
            time.sleep(0.05)
    try:
        yield Sshd(host, port, d / "client_ed25519", d / "known_hosts", host_pub, remote_cache, proc, netns)
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def netns_pair(name: str, delay_ms: float = 0, jitter_ms: float = 0) -> Iterator[tuple[str, str]]:
    """A network namespace joined to this one by a veth pair (10.213.7.1 <-> 10.213.7.2),
    with optional netem delay and jitter on both ends. Yields (host ip, namespace ip)."""
    a, b = f"{name[:8]}-h", f"{name[:8]}-n"
    cmds = [
        ["ip", "netns", "add", name],
        ["ip", "link", "add", a, "type", "veth", "peer", "name", b],
        ["ip", "link", "set", b, "netns", name],
        ["ip", "addr", "add", "10.213.7.1/30", "dev", a],
        ["ip", "link", "set", a, "up"],
        ["ip", "netns", "exec", name, "ip", "addr", "add", "10.213.7.2/30", "dev", b],
        ["ip", "netns", "exec", name, "ip", "link", "set", b, "up"],
        ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
    ]
    if delay_ms:
        netem = ["netem", "delay", f"{delay_ms}ms", f"{jitter_ms}ms"]
        cmds += [["tc", "qdisc", "add", "dev", a, "root", *netem],
                 ["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", b, "root", *netem]]  # fmt: skip
    try:
        for c in cmds:
            subprocess.run(c, check=True, capture_output=True)
        yield "10.213.7.1", "10.213.7.2"
    finally:
        subprocess.run(["ip", "link", "del", a], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        _release_netns_mount()


def _release_netns_mount() -> None:
    """ip netns mounts /run/netns on first use; with no namespace left, undo it so
    nothing of ours stays mounted (a chroot's temp root must stay removable)."""
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.strip()
    if not left:
        subprocess.run(["umount", "/run/netns"], capture_output=True)


def can_netns() -> bool:
    """Whether a namespace can really be made and entered here (not inside every chroot)."""
    if os.geteuid() != 0:
        return False
    name = f"tbprobe{os.getpid()}"
    try:
        ok = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
        return (
            ok and subprocess.run(["ip", "netns", "exec", name, "true"], capture_output=True).returncode == 0
        )
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        _release_netns_mount()


def netem_available() -> bool:
    """Whether this kernel has the netem qdisc (some sandboxes' kernels do not)."""
    if not can_netns():
        return False
    with netns_pair("tbprobe") as _ips:
        r = subprocess.run(["tc", "qdisc", "add", "dev", "tbprobe-h", "root", "netem", "delay", "1ms"],
                           capture_output=True)  # fmt: skip
    return r.returncode == 0


@contextlib.contextmanager
def delay_proxy(target: tuple[str, int], delay_ms: float, jitter_ms: float, seed: int = 1) -> Iterator[int]:
    """A TCP relay on loopback that delays every chunk by delay +- jitter (order kept):
    the stand-in for netem where the kernel lacks it. Yields the listening port."""
    import random
    import threading

    rng = random.Random(seed)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    stop = threading.Event()

    def pump(src: socket.socket, dst: socket.socket) -> None:
        release = 0.0
        try:
            while not stop.is_set():
                data = src.recv(65536)
                if not data:
                    break
                release = max(
                    release, time.monotonic() + (delay_ms + rng.uniform(-jitter_ms, jitter_ms)) / 1000
                )
                time.sleep(max(0.0, release - time.monotonic()))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def accept() -> None:
        while not stop.is_set():
            try:
                c, _ = lsock.accept()
            except OSError:
                return
            u = socket.create_connection(target)
            threading.Thread(target=pump, args=(c, u), daemon=True).start()
            threading.Thread(target=pump, args=(u, c), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield int(lsock.getsockname()[1])
    finally:
        stop.set()
        lsock.close()
