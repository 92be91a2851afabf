"""Several hosts, one VM tree: the rig (tests/multihostrig.py), the per-VM
lease, routing over SSH with MUNGE, the host pin and placement.

The hosts are namespaces of this machine (network, mount, UTS, PID), each
with its own sshd (the shipped drop-in) and munged (one shared key); the
VM tree is one directory all of them see.  Nothing is mocked.  Guests are
booted only where the guest itself is looked at (the console); elsewhere a
VM is a QEMU with no boot device, which answers QMP at once.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import KVMSHELL, MARKER, User, config_place, console_log, wait_for
from multihostrig import NAMES, Cluster, Rig, ofd_lock

pytestmark = pytest.mark.multihost



def test_rig_hosts_and_cleanup() -> None:
    """Three hosts: own hostnames and addresses on one bridge, own munged
    with the shared key (a credential made on A decodes on B, once: B's
    munged refuses the replay), and stop() leaves nothing behind."""
    rig = Rig(NAMES, config_place())
    try:
        a, b, c = rig.hosts
        assert [h.run("hostname").stdout.strip() for h in rig.hosts] == list(NAMES)
        assert a.run("ping", "-c1", "-W5", c.address).returncode == 0
        # The PID namespaces: each host sees only its own processes.
        assert len(a.run("ps", "-e", "-o", "pid=").stdout.split()) < 10
        cred = a.run("munge", "-s", "hello").stdout
        r = b.run("unmunge", input=cred)
        assert "hello" in r.stdout
        assert b.run("unmunge", input=cred, check=False).returncode == 17   # EMUNGE_CRED_REPLAYED
        pids = [p for h in rig.hosts for p in h.pids()]
        assert pids
    finally:
        left = rig.stop()
    assert left == []
    for p in pids:
        assert not os.path.exists(f"/proc/{p}")
    assert not rig.dir.exists()


# cluster (one per module) and bare_vm: tests/conftest.py


# ---- one owner per VM ---------------------------------------------------------

def test_double_start_from_three_hosts(cluster: Cluster, bare_vm: str) -> None:
    """Starts of one VM from all three hosts at once: exactly one QEMU in
    the whole simulation; the others are refused, and a later start from
    any host is refused naming the host that runs it."""
    procs = [subprocess.Popen(cluster.host(n).nsenter(
                 *cluster.x.argv(KVMSHELL, "--config", str(cluster.tree.conf))),
                 env=cluster.x.env(SSH_ORIGINAL_COMMAND=f"start {bare_vm}"),
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                 stdin=subprocess.DEVNULL) for n in NAMES]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    ok = [r for r in results if r[2] == 0]
    assert len(ok) == 1, results
    for out, err, status in results:
        if status:
            assert err.startswith("kvmshell: ") and "already running" in err, err
    where = cluster.qemu_host(cluster.x)
    assert len(where) == 1, where
    assert cluster.lease_record(bare_vm).startswith(f"host={where[0]} ")
    for n in NAMES:
        r = cluster.kvmshell(n, cluster.x, f"start {bare_vm}")
        assert r.returncode != 0 and f"already running on host {where[0]}" in r.stderr, r.stderr
    assert len(cluster.x.qemu_pids()) == 1


def test_lease_alone_decides(cluster: Cluster, bare_vm: str) -> None:
    """The lease, held by another host (here: a process of the test's,
    with that host's record) refuses a start naming that host, though this
    host's own VM lock is free; a stale record (lease not held) does not
    block.  kvmadm set is refused the same way."""
    path = cluster.tree.vmdir / ".leases" / bare_vm
    st = path.stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (cluster.x.uid, 0o600)
    record = path.parent / f"{bare_vm}.host"
    st = record.stat()
    assert (st.st_uid, st.st_mode & 0o7777, st.st_size) == (cluster.x.uid, 0o644, 0)
    assert path.parent.stat().st_uid == 0
    fd = ofd_lock(path)
    try:
        record.write_bytes(b"host=hostc pid=4242 boot_id=abc started=1".ljust(255) + b"\n")
        r = cluster.kvmshell("hosta", cluster.x, f"start {bare_vm}")
        assert r.returncode != 0 and "already running on host hostc" in r.stderr, r.stderr
        assert cluster.x.qemu_pids() == []
        r2 = cluster.tree.kvmadm("set", bare_vm, "--", "-m", "96", check=False)
        assert r2.returncode != 0 and "runs on host hostc" in r2.stderr, r2.stderr
    finally:
        os.close(fd)
    # The record says hostc, but nobody holds the lease: stale, ignored.
    r = cluster.kvmshell("hosta", cluster.x, f"start {bare_vm}")
    assert r.returncode == 0, r.stderr
    assert cluster.qemu_host(cluster.x) == ["hosta"]
    assert cluster.lease_record(bare_vm).startswith("host=hosta ")


# ---- routing --------------------------------------------------------------------

def test_route_pinned_start_and_status(cluster: Cluster) -> None:
    """A VM pinned to B, started through A's sshd, runs on B; status through
    C says so (the same answer as on B); stop through C stops it."""
    name = f"p{secrets.token_hex(3)}"
    cluster.tree.create_vm(name, cluster.x, "-m", "64", "-host", "hostb")
    try:
        r = cluster.ssh("hosta", cluster.x, "start", name)
        assert r.returncode == 0, r.stderr
        assert cluster.qemu_host(cluster.x) == ["hostb"]
        doc = json.loads(cluster.ssh("hostc", cluster.x, "status", name, "--json").stdout)
        assert doc["state"] == "running" and doc["host"] == "hostb" and doc["pid"]
        direct = json.loads(cluster.kvmshell("hostb", cluster.x, f"status {name} --json").stdout)
        assert doc == direct
        # upload's stream is carried unchanged (every byte value).
        data = bytes(range(256)) * 4096 + os.urandom(4096)
        r = cluster.ssh("hostc", cluster.x, "upload", name, "blob.img", input=data)
        assert r.returncode == 0, r.stderr
        assert (cluster.tree.vm_path(name) / "blob.img").read_bytes() == data
        # list is not carried: C's own view, from the lease.
        listed = cluster.ssh("hostc", cluster.x, "list").stdout.decode()
        assert f"{name:<20} running on host hostb\n" in listed, listed
        r = cluster.ssh("hostc", cluster.x, "stop", name)
        assert r.returncode == 0, r.stderr
        assert cluster.x.qemu_pids() == []
    finally:
        cluster.remove_x_vms(name)


# ---- the pin and placement -------------------------------------------------------

def test_pin_checked_by_kvmadm_and_at_start(cluster: Cluster) -> None:
    """kvmadm refuses a pin naming a host outside the list (the VM is not
    made); a pinned VM started directly on a host outside its pin is
    refused there, naming the pin."""
    r = cluster.tree.kvmadm("create", "nopin", "--owner", cluster.x.name, "--",
                            "-host", "hostb,hostz", check=False)
    assert r.returncode == 2 and "'hostz' is not in the host list" in r.stderr, r.stderr
    assert not (cluster.tree.vmdir / "nopin").exists()
    r = cluster.tree.kvmadm("create", "nopin", "--owner", cluster.x.name, "--",
                            "-host", "Host_B", check=False)
    assert r.returncode == 2 and "not a host name" in r.stderr, r.stderr
    name = f"q{secrets.token_hex(3)}"
    cluster.tree.create_vm(name, cluster.x, "-m", "64", "-host", "hostc")
    try:
        env = {"KVMSHELL_RELAYED": "hosta"}      # as if relayed here: no routing
        h = cluster.host("hosta")
        r = subprocess.run(h.nsenter(*cluster.x.argv(KVMSHELL, "--config", str(cluster.tree.conf))),
                           env=cluster.x.env(SSH_ORIGINAL_COMMAND=f"start {name}", **env),
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode != 0 and "runs only on host hostc (its -host pin)" in r.stderr, r.stderr
        assert cluster.qemu_host(cluster.x) == []
    finally:
        cluster.tree.kvmadm("remove", name, "--purge")


def test_placement_follows_the_rule(cluster: Cluster) -> None:
    """Unpinned VMs, all started through A: the first runs on A (all hosts
    have 0 running VMs: this host wins the tie), the second on B (A has 1;
    B and C tie at 0: by name), the third on C, the fourth on A again; a VM
    pinned to B and C, started through A, goes to B (a tie, by name)."""
    names = [f"u{i}{secrets.token_hex(2)}" for i in range(4)]
    pinned = f"v{secrets.token_hex(3)}"
    for n in names:
        cluster.tree.create_vm(n, cluster.x, "-m", "64")
    cluster.tree.create_vm(pinned, cluster.x, "-m", "64", "-host", "hostb,hostc")
    try:
        placed = []
        for n in names:
            r = cluster.ssh("hosta", cluster.x, "start", n)
            assert r.returncode == 0, r.stderr
            placed.append(cluster.lease_record(n).split()[0])
        assert placed == ["host=hosta", "host=hostb", "host=hostc", "host=hosta"]
        assert sorted(cluster.qemu_host(cluster.x)) == ["hosta", "hosta", "hostb", "hostc"]
        # B and C run one each: a tie; A (the front door) is not allowed: by name, B.
        r = cluster.ssh("hosta", cluster.x, "start", pinned)
        assert r.returncode == 0, r.stderr
        assert cluster.lease_record(pinned).startswith("host=hostb ")
    finally:
        cluster.remove_x_vms(*names, pinned)


@pytest.fixture(scope="module")
def guest_on_b(cluster: Cluster, guest: Path) -> Iterator[str]:
    """X's VM pinned to B, with the test guest, started through A's sshd
    (the only guest this suite boots)."""
    name = f"g{secrets.token_hex(3)}"
    cluster.tree.create_vm(name, cluster.x, "-m", "96", "-host", "hostb", guest=guest)
    try:
        r = cluster.ssh("hosta", cluster.x, "start", name, "-kernel", "vmlinuz", "-initrd",
                        "initrd.img", "-append", "console=ttyS0", "-vnc", ":0")
        assert r.returncode == 0, r.stderr
        assert cluster.qemu_host(cluster.x) == ["hostb"]
        wait_for(lambda: MARKER in console_log(cluster.tree.vm_path(name)), 240, "guest boot")
        yield name
    finally:
        cluster.remove_x_vms(name)


def test_console_and_vnc_through_another_host(cluster: Cluster, guest_on_b: str) -> None:
    """console through C (a terminal end to end: type into the guest, read
    its answer, detach) and vnc through C (the RFB greeting, unchanged)."""
    import pexpect
    argv = cluster.ssh_argv("hostc", cluster.x, "-tt") + ["console", guest_on_b]
    c = pexpect.spawn(argv[0], argv[1:], timeout=60, env={"TERM": "vt100", "PATH": "/usr/bin:/bin"})
    try:
        c.expect_exact("Escape character is ^]")
        c.send("\r")
        c.expect_exact("guest# ")
        c.send("echo $((6*7))x; hostname\r")
        c.expect_exact("42x")
        c.send("\x1d")
        c.expect_exact("Detached from")
        c.expect(pexpect.EOF)
    finally:
        c.close()
    assert c.exitstatus == 0
    p = subprocess.Popen(cluster.ssh_argv("hostc", cluster.x) + ["vnc", guest_on_b],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout is not None
        assert p.stdout.read(12) == b"RFB 003.008\n"
    finally:
        p.kill()
        p.wait()
    assert cluster.qemu_host(cluster.x) == ["hostb"]


# ---- forgery ------------------------------------------------------------------

def _credential(cluster: Cluster, on: str, user: User | None, payload: dict[str, object]) -> str:
    """A real MUNGE credential, made on host *on* by *user* (None: root)."""
    argv = ["munge", "--restrict-uid", "0", "--ttl", "60"]
    h = cluster.host(on)
    r = h.run(*(user.argv(*argv) if user is not None else argv), input=json.dumps(payload))
    return r.stdout.strip()


def _by_hand(cluster: Cluster, to: str, command: str | None, frm: str = "hosta"
             ) -> subprocess.CompletedProcess[str]:
    """The relay key used by hand (root on front door *frm* holds it): ssh
    to *to*'s relay account with *command*."""
    key = cluster.root / "relay" / "key" / "id_ed25519"
    argv = cluster.host(frm).nsenter(
        "ssh", "-F", "/dev/null", "-i", str(key), "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "LogLevel=ERROR", "-T", "-l", cluster.relay, cluster.host(to).address,
        *([command] if command is not None else []), net_only=True)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def _payload(host: str, words: list[str]) -> dict[str, object]:
    return {"v": 1, "host": host, "from": "hosta", "words": words,
            "nonce": secrets.token_hex(16)}


def test_forgery_other_users_credential(cluster: Cluster, guest_on_b: str) -> None:
    """A front door relaying X's command with Y's credential: the far host
    acts as Y, whom the tree refuses; X's VM runs on."""
    for words in (["status", guest_on_b], ["kill", guest_on_b]):
        cred = _credential(cluster, "hosta", cluster.y, _payload("hostb", words))
        r = _by_hand(cluster, "hostb", cred)
        assert r.returncode == 2 and f"VM {guest_on_b!r} is not yours" in r.stderr, r.stderr
        assert r.stdout == ""
    assert cluster.qemu_host(cluster.x) == ["hostb"]


def test_forgery_relay_key_alone(cluster: Cluster, guest_on_b: str) -> None:
    """The relay key by hand, without a valid credential: refused, whatever
    the command; also a credential of root's (no VM user), one for another
    host, and one not from this cluster's MUNGE key."""
    fake = "MUNGE:AwQFAAB7GN9s1Wekx5e8lYxybjmK5nUnkw" + "A" * 40 + ":"
    cases = [(None, "not a MUNGE credential"), ("", "not a MUNGE credential"),
             (f"kill {guest_on_b}", "not a MUNGE credential"),
             ("sh -c id", "not a MUNGE credential"),
             (fake, "credential refused by MUNGE"),
             (_credential(cluster, "hosta", None, _payload("hostb", ["status"])),
              "root is never relayed"),
             (_credential(cluster, "hosta", cluster.x, _payload("hostc", ["kill", guest_on_b])),
              "the credential is for another host")]
    for command, why in cases:
        r = _by_hand(cluster, "hostb", command)
        assert r.returncode == 2 and why in r.stderr, (command, r.stderr)
        assert r.stdout == ""
    # No shell, no forwarding: the key's line forces the helper for everything.
    r = _by_hand(cluster, "hostb", "/bin/sh -c 'echo pwned'")
    assert "pwned" not in r.stdout and r.returncode == 2
    assert cluster.qemu_host(cluster.x) == ["hostb"]
    # A VM user can neither read the relay key nor run the far helper.
    r = subprocess.run(cluster.x.argv("cat", str(cluster.root / "relay" / "key" / "id_ed25519")),
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    helper = str(cluster.root / "libexec" / "kvmshell-relayd")
    r = cluster.host("hostb").run(*cluster.x.argv("sudo", "-n", helper, "MUNGE:x:"), check=False)
    assert r.returncode != 0 and "password is required" in r.stderr


def test_forgery_replayed_credential(cluster: Cluster, guest_on_b: str) -> None:
    """X's own valid credential works once; the same again is a replay,
    refused by B's munged."""
    cred = _credential(cluster, "hosta", cluster.x, _payload("hostb", ["status", guest_on_b]))
    r = _by_hand(cluster, "hostb", cred)
    assert r.returncode == 0 and f"{guest_on_b}: running" in r.stdout, r.stderr
    r = _by_hand(cluster, "hostb", cred)
    assert r.returncode == 2 and "Replayed credential" in r.stderr, r.stderr
    assert r.stdout == ""


def test_kvmadm_check_multihost(cluster: Cluster) -> None:
    """kvmadm check on a host of the list: the multihost item passes, and a
    VM without a lease (made before the host list) is named with the fix;
    kvmadm set makes the lease."""
    import pwd
    from conftest import KVMADM
    name = f"k{secrets.token_hex(3)}"
    cluster.tree.create_vm(name, cluster.x, "-m", "64")
    argv = [KVMADM, "--config", str(cluster.tree.conf), "check", "--json"]
    try:
        def item() -> dict[str, object]:
            r = cluster.host("hosta").run(*argv, check=False)
            doc = json.loads(r.stdout)
            return next(c for c in doc["checks"] if c["id"] == "multihost")
        got = item()
        assert got["status"] == "PASS" and "3 hosts; this is hosta" in str(got["detail"]), got
        (cluster.tree.vmdir / ".leases" / name).unlink()
        got = item()
        assert got["status"] == "FAIL" and f"VM {name} has no lease (kvmadm set {name}" \
            in str(got["items"]), got
        cluster.tree.kvmadm("set", name, "--", "-m", "64")
        st = (cluster.tree.vmdir / ".leases" / name).stat()
        assert st.st_uid == cluster.x.uid and st.st_mode & 0o777 == 0o600
        assert item()["status"] == "PASS"
        assert pwd.getpwuid(st.st_uid).pw_name == cluster.x.name
    finally:
        cluster.tree.kvmadm("remove", name, "--purge")


# ---- host death (last: host B stays dead) ---------------------------------------

def _lease_held(path: Path) -> bool:
    import fcntl
    fd = os.open(path, os.O_RDONLY)
    try:
        got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK,
                          struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
        return bool(struct.unpack("hhqqi4x", got)[0] != fcntl.F_UNLCK)
    finally:
        os.close(fd)


def test_host_death(cluster: Cluster) -> None:
    """B dies with a VM running (every process of B killed).  Its lease is
    released at once (this kernel is the "server"); the owner record still
    names B, stale.  A start through A runs the VM on another allowed host:
    the placement tries B first (a tie, by name), cannot reach it, and goes
    on to C; the stale record does not block."""
    name = f"d{secrets.token_hex(3)}"
    cluster.tree.create_vm(name, cluster.x, "-m", "64", "-host", "hostb,hostc")
    lease = cluster.tree.vmdir / ".leases" / name
    try:
        h = cluster.host("hostb")
        r = subprocess.run(h.nsenter(*cluster.x.argv(KVMSHELL, "--config", str(cluster.tree.conf))),
                           env=cluster.x.env(SSH_ORIGINAL_COMMAND=f"start {name}",
                                             KVMSHELL_RELAYED="hosta"),
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        assert "hostb" in cluster.qemu_host(cluster.x)
        assert _lease_held(lease) and cluster.lease_record(name).startswith("host=hostb ")
        h.kill()
        assert h.pids() == []
        assert "hostb" not in cluster.qemu_host(cluster.x)
        assert not _lease_held(lease)
        assert cluster.lease_record(name).startswith("host=hostb ")       # stale
        r2 = cluster.ssh("hosta", cluster.x, "status", name)
        assert r2.returncode == 0 and b": stopped" in r2.stdout, r2.stderr
        t = time.monotonic()
        r2 = cluster.ssh("hosta", cluster.x, "start", name)
        assert r2.returncode == 0, r2.stderr
        assert b"host hostb cannot be reached; trying hostc" in r2.stderr
        assert time.monotonic() - t < 30
        assert cluster.qemu_host(cluster.x) == ["hostc"]
        assert cluster.lease_record(name).startswith("host=hostc ")
    finally:
        cluster.remove_x_vms(name)
