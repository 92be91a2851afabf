"""Attacks on today's walks (session 3's second review): the shared count
of a VM directory (budgets.files_below: kvmadm usage and kvmshell's
start-time count), as the VM user's own code would make them.  Real
kvmadm, real kvmshell, real ext4; nothing mocked."""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import pytest

from conftest import KVMADM, Host, User, kill_all, wait_for
from test_security import own_host

pytestmark = pytest.mark.security

# The user's code: one empty file and LINKS hard links to it under long
# names in one directory.  No file bytes and no new inode, but the
# directory's own blocks grow (ext4: about 260 bytes per 240-character name).
LINKS = 16000
_MAKE = ("import os; os.mkdir('d'); open('f', 'w').close()\n"
         f"for i in range({LINKS}): os.link('f', 'd/%05d' % i + 'x' * 240)\n")


def test_directory_blocks_count_against_the_disk_budget(host: Host, alice: User) -> None:
    """A directory takes disk too: one of the user's holding 16000 long
    names (hard links of one empty file) takes about 4 MiB, which a count of
    regular files only left out: 'kvmadm usage' showed less than du, and a
    start under a 1 MiB max_image_bytes was admitted."""
    import json
    h = own_host(host, f"s3b-{secrets.token_hex(2)}", max_image_bytes=str(1 << 20))
    u = User(alice.name, h)
    path = h.create_vm("s3b", u, "-m", "32")
    subprocess.run(u.argv("/usr/bin/python3", "-c", _MAKE), cwd=path, check=True, timeout=120)
    held = os.lstat(path / "d").st_blocks * 512
    assert held > 2 << 20, held
    try:
        r = subprocess.run([KVMADM, "--config", str(h.conf), "usage", "--json"],
                           capture_output=True, text=True, timeout=120)
        (doc,) = [d for d in json.loads(r.stdout) if d["user"] == u.name]
        assert doc["budgets"]["image_bytes"]["used"] >= held, (doc, held)
        r2 = u.ssh_command("start s3b")
        assert r2.returncode == 1 and "over the limit of 1048576 bytes" in r2.stderr, r2.stderr
        assert u.qemu_pids() == []
    finally:
        if u.qemu_pids():
            kill_all(u)
            wait_for(lambda: u.qemu_pids() == [], 30, "QEMU to exit")
        h.kvmadm("remove", "s3b", "--purge", check=False)


def test_every_purge_run_deletes_part_of_a_deep_chain(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A chain of directories deeper than one purge run can walk down in
    MAX_SECONDS (a few hundred thousand levels, which the user's code
    makes in seconds): the walk deletes nothing before it reaches the
    bottom, so every run stopped at its deadline with nothing done and
    'remove --purge' never finished.  Each run must delete part of it.
    In this process, with a clock that ticks once per look (MAX_SECONDS
    of them per run) and a chain scaled down with MAX_HELD_DEPTH, so
    that nothing depends on this machine's speed."""
    import time
    from kvmshell.admin import purge
    top = tmp_path / "vm"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    at = os.dup(fd)
    for _ in range(800):     # under Python's recursion limit: pytest's rmtree
        os.mkdir("d", dir_fd=at)
        sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=at)
        os.close(at)
        at = sub
    os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=at))
    os.close(at)

    def dirs() -> int:      # find, not os.walk: Python 3.11's recurses
        out = subprocess.run(["find", str(top), "-type", "d"], capture_output=True, check=True)
        return out.stdout.count(b"\n")
    ticks = iter(range(10 ** 9))
    monkeypatch.setattr(purge, "MAX_HELD_DEPTH", 30, raising=False)
    monkeypatch.setattr(purge, "MAX_SECONDS", 300.0)    # looks per run, on this clock
    try:
        left = dirs()
        for run in range(40):
            monkeypatch.setattr(time, "monotonic", lambda: float(next(ticks)))
            try:
                purge.empty(fd)
                break
            except purge._Changed as exc:
                assert "still not empty after 300 seconds" in str(exc), exc
            finally:
                monkeypatch.setattr(time, "monotonic", _MONOTONIC)
            now = dirs()
            assert now < left, f"run {run} deleted nothing ({now} directories left)"
            left = now
        assert os.listdir(top) == []
    finally:
        os.close(fd)
        subprocess.run(["rm", "-rf", str(top)], check=True)


_MONOTONIC = __import__("time").monotonic


@pytest.mark.parametrize("when", ["before the add", "once it listens"])
def test_a_forward_is_not_left_by_a_qemu_stopped_until_connect_is_gone(
        host: Host, alice: User, when: str) -> None:
    """The user stops its QEMU (SIGSTOP) while connect adds the forward
    (before QEMU reads the add, or once QEMU listens on the port, before
    it reads the remove) for longer than connect waits.  No forward may be
    left once QEMU runs again, open to every local user until the VM
    stops: QEMU 7.2 drops the commands it has not carried out when the
    session closes, and connect had closed it, the remove unread, once its
    wait ran out.  Real QEMU, slirp, sockets."""
    import signal
    import time

    from kvmshell.common.errors import RuntimeFailure
    from kvmshell.shell import connect
    from test_attack12 import _in_child_as, _session_of, _usernet

    port = next(p for p in range(24800, 25000) if not connect.port_rows(p))
    host.create_vm("s3bc", alice, "-m", "32", "-net", "nic,model=virtio", "-net", "user")
    r = alice.ssh_command("start s3bc")
    assert r.returncode == 0, r.stderr
    qpid = alice.qemu_pids()[0]
    # connect's wait: long enough for a loaded host's QEMU to listen
    # (the stop comes once it does), short before the add (QEMU is stopped).
    wait = 1.0 if when == "before the add" else 5.0

    def stopped() -> bool:
        return open(f"/proc/{qpid}/stat").read().rsplit(")", 1)[1].split()[0] == "T"

    def child(wfd: int) -> int:
        vm, qmp = _session_of(host, "s3bc")
        connect.CONNECT_TIMEOUT = wait
        connect.REMOVE_GRACE = 1.0
        if when == "before the add":
            os.write(wfd, b"s")         # the parent stops QEMU now
            time.sleep(0.5)
        else:
            listening = connect._connect_as_soon_as_listening

            def then_stop(*args: object) -> object:
                got = listening(*args)      # type: ignore[arg-type]
                os.kill(qpid, signal.SIGSTOP)   # the user's own QEMU
                return got
            connect._connect_as_soon_as_listening = then_stop   # type: ignore[assignment]
            os.write(wfd, b"s")
        try:
            connect._through_forward(vm, qpid, "net0", 22, qmp,  # type: ignore[arg-type]
                                     lambda n: port - 20000)
        except RuntimeFailure:
            pass
        qmp.close()                     # connect is gone
        return 0

    child_pid, rfd = _in_child_as(alice, child)
    try:
        assert os.read(rfd, 1) == b"s"
        if when == "before the add":
            os.kill(qpid, signal.SIGSTOP)
        wait_for(stopped, 30, "QEMU stopped")
        # Past connect's waits: before the fix it had closed its session
        # and gone by now.
        time.sleep(wait + 2)
        assert stopped()
        os.kill(qpid, signal.SIGCONT)
        _, status = os.waitpid(child_pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        time.sleep(1)
        fwd = connect._hex_v4("127.0.0.1", port)
        listened = [row for row in connect.tcp_table() if row[0] == fwd and row[2] == "0A"]

        def look(wfd: int) -> int:
            _, qmp = _session_of(host, "s3bc")
            os.write(wfd, _usernet(qmp).encode())
            return 0
        pid2, rfd2 = _in_child_as(alice, look)
        usernet = os.read(rfd2, 65536).decode()
        os.waitpid(pid2, 0)
        os.close(rfd2)
        forwards = [line for line in usernet.splitlines()
                    if "HOST_FORWARD" in line and f" {port} " in line]
        assert not listened and not forwards, (listened, usernet)
    finally:
        os.kill(qpid, signal.SIGCONT)
        os.close(rfd)
        alice.ssh_command("kill s3bc")
        host.kvmadm("remove", "s3bc", "--purge", check=False)


_HOLD = ("import os, sys\n"
         "fd = os.open('held', os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)\n"
         "os.write(fd, os.urandom(4 << 20)); os.fsync(fd); os.unlink('held')\n"
         "print('ready', flush=True); sys.stdin.read()\n")


@pytest.mark.parametrize("dumpable", [True, False])
def test_usage_counts_the_unlinked_files_the_user_holds(host: Host, alice: User,
                                                        dumpable: bool) -> None:
    """A file in the VM directory that the user's process keeps open after
    unlinking it (as QEMU does with a -snapshot overlay) takes its blocks
    until it is closed; kvmshell's count has them (limits.held_bytes), and
    'kvmadm usage' must too: it showed less than the budget's own count,
    without saying so.  Root sees them also when the process made itself
    non-dumpable (its /proc/PID/fd is then root's: the user's own count
    cannot look there, root's can)."""
    import json
    h = own_host(host, f"s3bh-{secrets.token_hex(2)}")
    u = User(alice.name, h)
    path = h.create_vm("s3bh", u, "-m", "32")

    def used() -> int:
        r = subprocess.run([KVMADM, "--config", str(h.conf), "usage", "--json"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        (doc,) = [d for d in json.loads(r.stdout) if d["user"] == u.name]
        return int(doc["budgets"]["image_bytes"]["used"])
    before = used()
    code = _HOLD if dumpable else \
        "import ctypes; ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)\n" + _HOLD  # PR_SET_DUMPABLE
    p = subprocess.Popen(u.argv("/usr/bin/python3", "-c", code), cwd=path, env=u.env(),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
        assert (os.stat(f"/proc/{p.pid}/fd").st_uid == u.uid) == dumpable
        assert used() >= before + (4 << 20)
    finally:
        p.kill()
        p.wait()
        h.kvmadm("remove", "s3bh", "--purge", check=False)
