"""Attacks on issue 16 (several hosts on one tree): a VM user's code on a
host (the threat model's attacker), on the real rig (tests/multihostrig.py).
Nothing mocked."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from conftest import wait_for
from multihostrig import Cluster, ofd_lock

pytestmark = [pytest.mark.multihost, pytest.mark.security]

# Y's code on a front door: watch every process's argv for a MUNGE credential.
_SNIFF = r"""
import os, sys, time
import select
seen = set()
print("ready", flush=True)
while not select.select([0], [], [], 0)[0]:     # until the test closes stdin
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                data = f.read()
        except OSError:
            continue
        for w in data.split(b"\0"):
            if w.startswith(b"MUNGE:") and w not in seen:
                seen.add(w)
                print(w.decode("ascii", "replace"), flush=True)
"""

# Y's code: a read lock (OFD) on a lease Y may only read.
_READLOCK = r"""
import fcntl, os, struct, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_RDLCK, 0, 0, 0, 0))
print("locked", flush=True)
sys.stdin.read()                    # until the test closes stdin
"""


# cluster (one per module) and bare_vm: tests/conftest.py


def _y_code_on_a(cluster: Cluster, code: str, *args: str) -> "subprocess.Popen[str]":
    """Y's Python *code* running on host A, its stdin, stdout and stderr
    pipes (text) to the test; closing stdin ends it."""
    return subprocess.Popen(cluster.host("hosta").nsenter(
                                *cluster.y.argv("/usr/bin/python3", "-I", "-c", code, *args)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cluster.y.env(), stdin=subprocess.PIPE)


def _hold_lease(path: Path, host: str) -> int:
    fd = ofd_lock(path)
    (path.parent / f"{path.name}.host").write_bytes(
        f"host={host} pid=4242 boot_id=abc started=1".encode().ljust(255) + b"\n")
    return fd


def test_credential_not_in_any_argv(cluster: Cluster, bare_vm: str) -> None:
    """X's routed command: X's MUNGE credential is a bearer token until the
    far host decodes it, so it must never be in a process's argv, which
    every user of the front door can read (/proc/PID/cmdline).  Y's code
    on the front door watches for it while X's commands are routed; it
    would otherwise send the credential first (the relay client takes
    anyone's) and get X's command run as X, talking to Y: X's console,
    X's save stream, an upload of Y's bytes into X's disk."""
    fd = _hold_lease(cluster.tree.vmdir / ".leases" / bare_vm, "hostb")
    sniff = _y_code_on_a(cluster, _SNIFF)
    try:
        assert sniff.stdout is not None
        assert sniff.stdout.readline() == "ready\n"
        for _ in range(5):
            r = cluster.kvmshell("hosta", cluster.x, f"status {bare_vm}")
            assert r.returncode == 0 and "on host hostb" in r.stdout, r.stderr
    finally:
        os.close(fd)
        out, err = sniff.communicate(timeout=30)
    assert out == "", out[:300]


def test_other_user_cannot_hold_lease(cluster: Cluster, bare_vm: str) -> None:
    """Y could open a 0644 lease of X's for reading, and a read lock needs
    no more: it would block X's start on every host for as long as Y
    likes.  X's start must not be blocked by another user: the lease is
    0600, and the owner record (which every user's placement reads) is a
    file beside it that Y can read but neither lock-block nor write."""
    path = cluster.tree.vmdir / ".leases" / bare_vm
    record = path.parent / f"{bare_vm}.host"
    assert path.stat().st_mode & 0o777 == 0o600
    assert (record.stat().st_uid, record.stat().st_mode & 0o777) == (cluster.x.uid, 0o644)
    r = cluster.host("hosta").run(*cluster.y.argv(
        "/usr/bin/python3", "-I", "-c",
        "import os, sys\n"
        "for p, m in ((sys.argv[1], os.O_RDONLY), (sys.argv[2], os.O_WRONLY)):\n"
        "    try: os.close(os.open(p, m)); print('opened', p)\n"
        "    except PermissionError: pass\n", str(path), str(record)), check=False)
    assert r.returncode == 0 and r.stdout == "", (r.stdout, r.stderr)
    lock = _y_code_on_a(cluster, _READLOCK, str(path))
    try:
        assert lock.stdout is not None
        got = lock.stdout.readline()
        r = cluster.kvmshell("hosta", cluster.x, f"start {bare_vm}")
        assert got != "locked\n" or r.returncode == 0, r.stderr
        assert r.returncode == 0, r.stderr
    finally:
        lock.communicate(timeout=30)
    assert cluster.lease_record(bare_vm).startswith("host=hosta ")
    # The VM ends: its supervisor empties the record (placement counts it no more).
    r = cluster.kvmshell("hosta", cluster.x, f"kill {bare_vm}")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: not cluster.x.qemu_pids(), 30, "QEMU gone")
    wait_for(lambda: cluster.lease_record(bare_vm) == "", 30, "record emptied")


def test_old_open_lease_refused_until_kvmadm_set(cluster: Cluster, bare_vm: str) -> None:
    """A lease as made before 0600 leases (0644, no record file): X's
    start is refused, naming the lease and the fix (while Y holds a read
    lock on it, and when nobody does); kvmadm set respects a held lease
    (it may be a VM running elsewhere), and once it is free makes a new
    0600 lease and record file; the start then runs."""
    path = cluster.tree.vmdir / ".leases" / bare_vm
    path.chmod(0o644)
    (path.parent / f"{bare_vm}.host").unlink()
    lock = _y_code_on_a(cluster, _READLOCK, str(path))
    try:
        assert lock.stdout is not None and lock.stdout.readline() == "locked\n"
        r = cluster.kvmshell("hosta", cluster.x, f"start {bare_vm}")
        assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
        assert "can be opened by other users" in r.stderr and "kvmadm set" in r.stderr, r.stderr
        assert cluster.x.qemu_pids() == []
        r = cluster.tree.kvmadm("set", bare_vm, "--", "-m", "64", check=False)
        assert r.returncode != 0 and "refused while the VM runs" in r.stderr, r.stderr
        lock.communicate(timeout=30)
        r = cluster.kvmshell("hosta", cluster.x, f"start {bare_vm}")
        assert r.returncode != 0 and "can be opened by other users" in r.stderr, r.stderr
        cluster.tree.kvmadm("set", bare_vm, "--", "-m", "64")
        assert path.stat().st_mode & 0o777 == 0o600
        assert (path.parent / f"{bare_vm}.host").stat().st_mode & 0o777 == 0o644
        r = cluster.kvmshell("hosta", cluster.x, f"start {bare_vm}")
        assert r.returncode == 0, r.stderr
        assert cluster.lease_record(bare_vm).startswith("host=hosta ")
    finally:
        lock.communicate(timeout=30)


def _x_credential(cluster: Cluster, on: str, payload: dict[str, object]) -> str:
    """A real MUNGE credential of X's, made on host *on* (X's own code can)."""
    import json
    r = cluster.host(on).run(*cluster.x.argv("munge", "--restrict-uid", "0", "--ttl", "60"),
                             input=json.dumps(payload))
    return r.stdout.strip()


def test_relayed_words_are_a_command_not_options(cluster: Cluster, bare_vm: str) -> None:
    """X's code makes X's own credential with words that are kvmshell's own
    options (``--config PATH``) and sends it with the relay client, as it
    may.  A direct login cannot choose the far kvmshell's config (its
    SSH_ORIGINAL_COMMAND is only ever a command); the relay must not allow
    more: refused, and no kvmshell runs with that config."""
    client = str(cluster.root / "libexec" / "kvmshell-relay")
    bogus = str(cluster.tree.conf) + ".none"
    for words in (["--config", bogus, "status", bare_vm], ["-c", f"status {bare_vm}"]):
        cred = _x_credential(cluster, "hosta", {"v": 1, "host": "hostb", "from": "hosta",
                                                "words": words,
                                                "nonce": secrets.token_hex(16)})
        r = cluster.host("hosta").run(
            *cluster.x.argv("sudo", "-n", "-u", cluster.relay, client, "hostb"),
            check=False, env=cluster.x.env(KVMSHELL_CREDENTIAL=cred))
        assert r.returncode == 2 and "not a command" in r.stderr, (words, r.stderr)
        assert bogus not in r.stderr and r.stdout == ""
