"""The SSH transport against a real sshd on loopback."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from testbed.transport.ssh import HostKeyError, SshTransport


def transport(sshd, **kw) -> SshTransport:  # type: ignore[no-untyped-def]
    kw.setdefault("known_hosts", str(sshd.known_hosts))
    return SshTransport(sshd.host, sshd.port, "root", identity=str(sshd.key), **kw)


def test_connect_with_strict_known_hosts(sshd) -> None:  # type: ignore[no-untyped-def]
    t = transport(sshd)
    try:
        r = t.run(["uname", "-s"]).check()
        assert r.stdout.strip() == "Linux"
        assert t.clock_ns() > 0
    finally:
        t.close()


def test_wrong_host_key_is_refused_with_a_clear_message(sshd, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    other = " ".join((tmp_path / "other.pub").read_text().split()[:2])
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[{sshd.host}]:{sshd.port} {other}\n")
    with pytest.raises(HostKeyError, match="host key mismatch.*intercepting"):
        transport(sshd, known_hosts=str(kh)).run(["true"])


def test_unknown_host_needs_insecure_accept_new(sshd, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    kh = tmp_path / "known_hosts"
    with pytest.raises(HostKeyError, match="not in .*--insecure-accept-new"):
        transport(sshd, known_hosts=str(kh)).run(["true"])
    t = transport(sshd, known_hosts=str(kh), insecure_accept_new=True)
    t.run(["true"]).check()
    t.close()
    assert sshd.host_pub.split()[1] in kh.read_text()  # trusted on first use, then strict
    t2 = transport(sshd, known_hosts=str(kh))
    t2.run(["true"]).check()
    t2.close()


def test_awkward_arguments_arrive_verbatim(sshd, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    canary = tmp_path / "pwned"
    args = [
        "a b",
        "it's",
        '"q"',
        f"$(touch {canary})",
        "line1\nline2",
        "`id`",
        "*",
        "",
        "; rm -rf /nope",
        "\\",
    ]
    t = transport(sshd)
    try:
        r = t.run(["printf", "%s\\0", *args]).check()
    finally:
        t.close()
    assert r.stdout.split("\0")[:-1] == args
    assert not canary.exists()


def test_put_skips_when_hash_matches_and_get_round_trips(sshd, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "blob"
    src.write_bytes(bytes(range(256)) * 4096)
    remote = str(sshd.remote_cache / "x" / "blob")
    t = transport(sshd)
    try:
        assert t.put(src, remote) is True
        assert t.put(src, remote) is False  # same sha256 on the host: skipped
        src.write_bytes(b"changed")
        assert t.put(src, remote) is True
        t.get(remote, tmp_path / "back")
    finally:
        t.close()
    assert hashlib.sha256((tmp_path / "back").read_bytes()).digest() == hashlib.sha256(b"changed").digest()


def test_a_wait_paramiko_would_never_end_is_cut_at_its_deadline(sshd, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A program that closes its output and keeps running: its output ends at once, its exit
    status would come only when it exits. Past the deadline the connection is dropped and the
    call fails as a transport error; the next call works on a new connection."""
    import time

    from testbed.transport import ssh

    monkeypatch.setattr(ssh, "REQUEST_DEADLINE_S", 1.0)
    t = transport(sshd)
    t0 = time.monotonic()
    with pytest.raises(ssh.TransportError, match="got no answer within 2 s"):
        t.run(["sh", "-c", "exec >&- 2>&-; sleep 30"], timeout=1)
    assert time.monotonic() - t0 < 10
    assert t.run(["echo", "back"]).check().stdout.strip() == "back"
    t.close()
