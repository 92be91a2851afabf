"""The real Debian guest with ``start -cloud-init``, reached through the real
sshd front door (tests/sshrig.py) and ``connect`` as the OpenSSH client's
ProxyCommand: the user's kvmshell key logs into the guest.

One module, one VM (user-mode networking), booted three times: first boot,
a restart (same instance-id: same host keys), ``-cloud-init new`` (first
boot again: new host keys).  Each boot takes 1-3 minutes under TCG.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import KVMSHELL, Host, User, ssh_front_door
import debianrig
import guestrig
from sshrig import Sshd

pytestmark = pytest.mark.guest

VM = "web"
ADMIN = ["-m", "1024", "-net", "nic,model=virtio", "-net", "user"]


class Rig:
    def __init__(self, host: Host, sshd: Sshd, user: User, key: Path, debian: Path,
                 known: Path) -> None:
        self.host, self.sshd, self.user, self.key, self.debian = host, sshd, user, key, debian
        self.known = known
        self.path = host.vm_path(VM)

    def ssh(self, command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``ssh vmuser@127.0.0.1 COMMAND`` through the front door."""
        return subprocess.run(self.sshd.ssh_argv(self.user.name, self.key) + [command],
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def proxy(self) -> list[str]:
        return self.sshd.ssh_argv(self.user.name, self.key) + ["connect", VM, "%p"]

    def guest(self, *command: str, strict: str = "accept-new", known: Path | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
        argv = guestrig.guest_ssh_argv(self.proxy(), self.key, known or self.known, VM, strict,
                                       *command)
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def boot(self, *extra: str) -> float:
        guestrig.forget_console(self.path)
        r = self.ssh(guestrig.start_words(VM, self.debian, ADMIN, *extra))
        assert r.returncode == 0, r.stderr
        return guestrig.wait_ready(self.path, lambda: bool(self.user.qemu_pids()))

    def stop(self) -> None:
        r = self.ssh(f"stop {VM}", timeout=200)
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 60
        while self.user.qemu_pids() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not self.user.qemu_pids()


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    debian = debianrig.debian_guest()
    with ssh_front_door("kvmshell-guesttest-", "g", loglevel="INFO", image_dirs=str(debian),
                        stop_timeout="150") as (root, host, sshd, group, name):
        key = sshd.client_key(name)
        host.kvmadm("adduser", name, "--key", f"{key}.pub")
        user = User(name, host)
        host.create_vm(VM, user, *ADMIN)
        guestrig.put_user_data(host.vm_path(VM), user)
        rig = Rig(host, sshd, user, key, debian, root / "known_hosts")
        r = rig.ssh(guestrig.clone_words(VM, debian))   # through the front door too
        assert r.returncode == 0, r.stderr
        yield rig


def _host_key_line(known: Path) -> str:
    lines = [l for l in known.read_text().splitlines() if l.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_first_boot_key_reaches_guest(rig: Rig) -> None:
    took = rig.boot("-cloud-init", "-user-data", "ud.yaml")
    print(f"first boot: READY after {took:.0f} s")
    iid = (rig.path / "cloud-init.instance-id").read_text().strip()
    assert iid.startswith("iid-")
    r = rig.guest("hostname")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == VM
    # The user's key and nothing else in the default user's authorized_keys.
    r = rig.guest("cat", ".ssh/authorized_keys")
    assert r.returncode == 0, r.stderr
    want = " ".join(Path(f"{rig.key}.pub").read_text().split()[:2])
    assert [" ".join(l.split()[:2]) for l in r.stdout.splitlines() if l.strip()] == [want]
    r = rig.guest("cat", "/var/lib/cloud/data/instance-id")
    assert r.stdout.strip() == iid
    _host_key_line(rig.known)


def test_no_exposure_while_connected(rig: Rig, bob: User) -> None:
    """SECURITY.md: while a connect session is open, QEMU listens on no TCP
    port (the temporary forward is gone once the connection is accepted),
    and another local user reaches neither the VM's sockets nor its VM."""
    pid = rig.user.qemu_pids()[0]
    session = subprocess.Popen(guestrig.guest_ssh_argv(
        rig.proxy(), rig.key, rig.known, VM, "yes", "echo", "up;", "sleep", "20"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        assert session.stdout is not None and session.stderr is not None
        line = session.stdout.readline()
        if line.strip() != "up":
            session.kill()
            raise AssertionError(f"no session: {line!r} {session.stderr.read()!r}")
        assert guestrig.qemu_listeners(pid) == []
        # Nothing of the user's listens on TCP at all (relay included).
        for table in ("tcp", "tcp6"):
            for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
                w = line.split()
                assert not (w[3] == "0A" and int(w[7]) == rig.user.uid), line
        # bob: the VM directory (QMP, console, VNC sockets) is closed to him...
        probe = ("import os,sys\n"
                 "try:\n    os.stat(sys.argv[1]); print('reachable')\n"
                 "except OSError as e:\n    print(e.errno)\n")
        r = subprocess.run(bob.argv(sys.executable, "-c", probe, str(rig.path / "qmp.sock")),
                           capture_output=True, text=True)
        assert r.stdout.strip() == "13", r   # EACCES
        # ...and kvmshell refuses him the VM.
        r = subprocess.run(bob.argv(KVMSHELL, "--config", str(rig.host.conf)),
                           env=bob.env(SSH_ORIGINAL_COMMAND=f"connect {VM} 22"),
                           capture_output=True, text=True, stdin=subprocess.DEVNULL)
        assert r.returncode == 2 and "not yours" in r.stderr, r.stderr
    finally:
        session.kill()
        session.wait()


RACER = r"""
import json, socket, sys, time
uid, end = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
seen, held = set(), []
while time.monotonic() < end:
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        w = line.split()
        if w[3] != "0A" or int(w[7]) != uid or w[1] in seen:
            continue
        seen.add(w[1])
        port = int(w[1].split(":")[1], 16)
        s = socket.socket()
        try:
            s.connect(("127.0.0.1", port))
            held.append((port, s))
        except OSError:
            s.close()
# Reached the guest = bytes from it (sshd's banner, or its MaxStartups
# refusal).  A handshake alone is not: a connection still queued when the
# forward goes is reset, and never reaches the guest.
got = []
for port, s in held:
    s.settimeout(20)
    try:
        if s.recv(64):
            got.append(port)
    except OSError:
        pass
print(json.dumps({"seen": len(seen), "handshakes": len(held), "got": got}))
"""


def test_racing_local_user_is_detected(rig: Rig, bob: User) -> None:
    """bob watches /proc/net/tcp for the user's forward and connects at once.
    Whatever the race gives, every connection through which bob reached the
    guest made one of the user's connects fail, naming that port (and
    logged); the user's other connects succeed."""
    racer = subprocess.Popen(bob.argv(sys.executable, "-c", RACER, str(rig.user.uid), "22"),
                             stdout=subprocess.PIPE, text=True)
    failures, ok = [], 0
    t_end = time.monotonic() + 20
    while time.monotonic() < t_end:
        r = rig.user.ssh_command(f"connect {VM} 22", timeout=60)
        if r.returncode == 0:
            ok += 1
            # The guest's sshd answered: its banner, or (this many pre-auth
            # connections at once, on a slow guest) its MaxStartups refusal.
            assert r.stdout.startswith(("SSH-2.0-", "Exceeded MaxStartups")) or r.stdout == "", \
                r.stdout
        else:
            assert "came through the VM's temporary forward" in r.stderr, r.stderr
            failures.append(r.stderr)
        time.sleep(0.1)
    out, _ = racer.communicate(timeout=120)
    result = json.loads(out)
    print(f"connects: {ok} clean, {len(failures)} raced; bob saw {result['seen']} forwards, "
          f"completed {result['handshakes']} handshakes, reached the guest {len(result['got'])} times")
    assert ok + len(failures) >= 5
    for port in result["got"]:
        assert any(f"127.0.0.1:{port};" in f for f in failures), (port, failures)
    # Each refusal names a forward bob came through (a handshake at least).
    assert len(failures) <= result["handshakes"]


def test_restart_keeps_instance(rig: Rig) -> None:
    iid = (rig.path / "cloud-init.instance-id").read_text()
    line = _host_key_line(rig.known)
    rig.stop()
    took = rig.boot("-cloud-init", "-user-data", "ud.yaml")
    print(f"restart: READY after {took:.0f} s")
    assert (rig.path / "cloud-init.instance-id").read_text() == iid
    # StrictHostKeyChecking=yes: the key recorded at first boot must match.
    r = rig.guest("hostname", strict="yes")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == VM
    assert _host_key_line(rig.known) == line


def test_cloud_init_new_is_a_first_boot(rig: Rig) -> None:
    iid = (rig.path / "cloud-init.instance-id").read_text()
    rig.stop()
    took = rig.boot("-cloud-init", "new", "-user-data", "ud.yaml")
    print(f"-cloud-init new: READY after {took:.0f} s")
    new = (rig.path / "cloud-init.instance-id").read_text()
    assert new != iid
    r = rig.guest("hostname", strict="yes")
    assert r.returncode != 0 and "HOST IDENTIFICATION HAS CHANGED" in r.stderr, r.stderr
    fresh = rig.known.with_name("known_hosts.new")
    r = rig.guest("cat", "/var/lib/cloud/data/instance-id", known=fresh)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == new.strip()
    rig.stop()
