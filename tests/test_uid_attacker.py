"""The threat model's own attacker (issue 20): code running as the VM user's
uid, free to replace any file in its own VM directory and to run kvmshell
and the network helper with any arguments.  Each test stands for one kind
of fault and fails on the code before the fix:

1. running state and the VM lock in files the user can delete;
2. root opening user files the way the user chooses;
3. ``kvmadm remove --purge`` walking a tree the user controls;
4. the root helper blocking on descriptors the caller hands it;
5. ``--config`` from argv picking the limits;
6. the size count skipping what it cannot read;
7. QEMU opening a backing file named by a header rewritten after the check.

What runs "as the user" here runs through setpriv with the user's uid, as
the user's own code would (a compromised QEMU has the same rights).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest

import test_network
from conftest import (CGROUPHELPER, KVMADM, KVMSHELL, NETHELPER, Host, User, grab_fd, kill_all,
                      wait_for)
from test_network import Net, _sudo_env
from test_security import kill_and_wait, lock_free, own_host, put, started_pid

pytestmark = pytest.mark.security
net = test_network.net    # the network fixture: a namespace, users in a sudoers group

# Every command of root's must answer within this (a subprocess timeout: a
# hang or a walk through a huge file fails the test, not a slow machine's
# clock).
ANSWER_SECONDS = 1.0
DEVICE = "/dev/full"      # a device a symlink points to: root must never open it
LIB = str(Path(KVMSHELL).parents[1] / "lib")   # this checkout's package, as installed


@pytest.fixture(autouse=True)
def _leave_no_vm(host: Host) -> Iterator[None]:
    """The shared tree as each test found it: VMs a test made there are
    purged after it (other tests rely on the caller's only VM)."""
    before = set(os.listdir(host.vmdir)) if host.vmdir.exists() else set()
    yield
    for name in sorted(set(os.listdir(host.vmdir) if host.vmdir.exists() else []) - before):
        if os.path.islink(host.vmdir / name):
            host.kvmadm("remove", name, "--purge", check=False)


def as_user_py(user: User, code: str, *args: str) -> list[str]:
    return user.argv("/usr/bin/python3", "-I", "-c", code, *args)


def fd_paths(trace: str) -> list[str]:
    """The path of every descriptor a traced process got (strace -y)."""
    return [path for _, path in fd_lines(trace)]


def fd_lines(trace: str) -> list[tuple[str, str]]:
    """(the call, the path of the descriptor it got) for every call of a
    traced process that returned a descriptor (strace -y)."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^(.*) = \d+<([^>]*)>$", trace, re.M)]


def strace(argv: list[str], log: Path, timeout: float = 20, **kw: object
           ) -> subprocess.CompletedProcess[str]:
    assert shutil.which("strace"), "strace is needed (Makefile: APT_TEST)"
    return subprocess.run(["strace", "-f", "-qq", "-y", "-e", "trace=%file,%desc", "-o", str(log),
                           *argv], capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]


def fd_of(pid: int, target: Path) -> int:
    """The number of a descriptor of *pid* open on *target*."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(target):
                return int(fd)
        except OSError:
            continue
    raise AssertionError(f"{pid} has no descriptor on {target}")


def ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


# ---- 1. running state and the VM lock ------------------------------------------

def test_deleting_lock_and_pid_files_changes_nothing(host: Host, alice: User) -> None:
    """With max_running = 1 the user deletes the files a running VM kept
    (qemu.pid, lock), as its own code may: the same VM does not start twice,
    another VM does not start, and kvmadm set/remove refuse, as before."""
    h = own_host(host, f"u1-{secrets.token_hex(2)}", max_running="1")
    u = User(alice.name, h)
    pa = h.create_vm("u1a", u, "-m", "32")
    h.create_vm("u1b", u, "-m", "32")
    pid = started_pid(u.ssh_command("start u1a"))
    try:
        subprocess.run(u.argv("rm", "-f", str(pa / "qemu.pid"), str(pa / "lock")), check=True)
        r = u.ssh_command("start u1a")
        assert r.returncode == 1 and "already running" in r.stderr, r.stderr
        r = u.ssh_command("start u1b")
        assert r.returncode == 1 and "the limit is 1" in r.stderr, r.stderr
        assert u.qemu_pids() == [pid]
        assert u.status("u1a")["pid"] == pid
        for args in (("set", "u1a", "--", "-m", "48"), ("remove", "u1a"),
                     ("remove", "u1a", "--purge")):
            r = h.kvmadm(*args, check=False)
            assert r.returncode == 1 and "refused while the VM runs" in r.stderr, (args, r.stderr)
        assert h.vm_path("u1a") == pa and pa.is_dir()
        line = next(l for l in h.kvmadm("list").stdout.splitlines() if l.startswith("u1a "))
        assert f"running (pid {pid})" in line and line.endswith("-m 32"), line
    finally:
        kill_and_wait(u, pa)


def test_a_lock_holder_that_is_not_qemu_is_not_running(host: Host, alice: User) -> None:
    """The user's own process holding the VM directory's lock cannot pass
    for QEMU (its executable is not the configured QEMU): 'busy', no pid,
    and the VM neither starts nor is signalled."""
    path = host.create_vm("u1busy", alice, "-m", "32")
    holder = subprocess.Popen(as_user_py(alice, "import fcntl, os, sys, time\n"
                                         "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)\n"
                                         "fcntl.flock(fd, fcntl.LOCK_SH)\n"
                                         "print('held', flush=True)\n"
                                         "time.sleep(120)\n", str(path)),
                              env=alice.env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        doc = alice.status("u1busy")
        assert (doc["state"], doc["pid"]) == ("busy", None), doc
        r = alice.ssh_command("start u1busy")
        assert r.returncode == 1 and "already running" in r.stderr, r.stderr
        r = alice.ssh_command("kill u1busy")
        assert r.returncode == 1 and "being started or stopped" in r.stderr, r.stderr
        assert holder.poll() is None and alice.qemu_pids() == []
    finally:
        holder.kill()
        holder.wait()
    assert alice.status("u1busy")["state"] == "stopped"


def test_a_qemu_that_drops_its_lock_still_counts(host: Host, alice: User) -> None:
    """A compromised QEMU may give up its share of the lock (it holds the
    descriptor) and kill its supervisor: the VM then looks stopped, but its
    QEMU still counts against max_running (its executable gives it away)."""
    h = own_host(host, f"u1q-{secrets.token_hex(2)}", max_running="1")
    u = User(alice.name, h)
    pa = h.create_vm("u1c", u, "-m", "32")
    pb = h.create_vm("u1d", u, "-m", "32")
    pid = started_pid(u.ssh_command("start u1c"))
    try:
        stolen = grab_fd(pid, fd_of(pid, pa))
        fcntl.flock(stolen, fcntl.LOCK_UN)          # QEMU's own share, dropped
        os.close(stolen)
        os.kill(ppid(pid), signal.SIGKILL)          # and the supervisor's with it
        wait_for(lambda: lock_free(pa), 10, "the lock to be free")
        assert u.status("u1c")["state"] == "stopped"
        r = u.ssh_command("start u1d")
        assert r.returncode == 1 and f"QEMU pid {pid}" in r.stderr, r.stderr
        assert u.qemu_pids() == [pid]
    finally:
        kill_all(u)
        wait_for(lambda: u.qemu_pids() == [], 30, "QEMU to exit")
        wait_for(lambda: lock_free(pb), 10, "no lock")


# ---- 2. root opens nothing of the user's ----------------------------------------

# Every file kvmshell ever kept in a VM directory.
USER_LEAVES = ("lock", "qemu.pid", "qmp.sock", "vnc.sock", "console.sock", "serial.in",
               "serial.out", "console.log", "console.log.1", "qemu.log", "start-options")
# The one file of the user's root reads (autostart's options, for a VM
# whose owner marked it): carefully, see common/autostart.py.
READ_BY_ROOT = "start-options"
KINDS = ("fifo", "device-link", "huge")


def plant(path: Path, kind: str, user: User) -> None:
    if path.name == READ_BY_ROOT:            # marked for autostart, so that root reads it
        put(path.parent / "autostart", user, b"")
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path, 0o600)
    elif kind == "device-link":
        path.symlink_to(DEVICE)
    else:
        with open(path, "wb") as f:
            f.truncate(1 << 40)      # 1 TiB, sparse
    os.lchown(path, user.uid, user.gid)


def root_commands(host: Host, name: str) -> list[tuple[str, list[str]]]:
    """Every root command that names a VM, or lists them (the network
    helper as sudo runs it: root, SUDO_UID forged by the test)."""
    kvmadm = [KVMADM, "--config", str(host.conf)]
    return [("list", kvmadm + ["list"]), ("list --json", kvmadm + ["list", "--json"]),
            ("show", kvmadm + ["show", name]), ("usage", kvmadm + ["usage"]),
            ("autostart", kvmadm + ["autostart"]),
            ("helper up", [NETHELPER, "up", name]), ("helper down", [NETHELPER, "down", name]),
            ("cgroup helper", [CGROUPHELPER, "attach", name]),
            ("set", kvmadm + ["set", name, "--", "-m", "48"]),
            ("remove", kvmadm + ["remove", name]),
            ("remove --purge", kvmadm + ["remove", name, "--purge"])]


def expected_status(what: str, leaf: str) -> int:
    """Every command succeeds whatever the user's files are, but for the
    two that say no: autostart, when the options of a marked VM are not a
    file kvmshell made (exit 1, that VM 'failed'), and the cgroup helper,
    which the test runs without the caller's socket on stdin (refused, 2)."""
    if what == "autostart" and leaf == READ_BY_ROOT:
        return 1
    return 2 if what == "cgroup helper" else 0


def run_root(host: Host, user: User, what: str, argv: list[str], timeout: float,
             trace: Path | None = None) -> subprocess.CompletedProcess[str]:
    mine, theirs = socket.socketpair()
    try:
        kw: dict[str, object] = {"stdin": subprocess.DEVNULL, "stdout": theirs.fileno()}
        if "helper" in what:
            kw["env"] = _sudo_env(str(user.uid))
        if trace is None:
            r = subprocess.run(argv, stderr=subprocess.PIPE, text=True, timeout=timeout,
                               **kw)  # type: ignore[call-overload]
        else:
            r = subprocess.run(["strace", "-f", "-qq", "-y", "-e", "trace=%file,%desc", "-o",
                                str(trace), *argv], stderr=subprocess.PIPE, text=True,
                               timeout=timeout, **kw)  # type: ignore[call-overload]
    finally:
        mine.close()
        theirs.close()
    return r


def vm_for(host: Host, user: User, tag: str) -> tuple[str, Path]:
    name = f"u2{tag}{secrets.token_hex(2)}"
    return name, host.create_vm(name, user, "-m", "32")


@pytest.mark.parametrize("kind", KINDS)
def test_root_commands_ignore_user_files(host: Host, alice: User, kind: str) -> None:
    """Each user file in turn as a FIFO, a symlink to a device, a 1 TiB
    file: every root command answers at once and succeeds (nothing there is
    read), and the purge deletes it."""
    for leaf in USER_LEAVES:
        name, path = vm_for(host, alice, "t")
        plant(path / leaf, kind, alice)
        for what, argv in root_commands(host, name):
            if what == "remove --purge":            # on a second VM: 'remove' moved the first
                name2, path2 = vm_for(host, alice, "p")
                plant(path2 / leaf, kind, alice)
                argv = argv[:-2] + [name2, "--purge"]
            r = run_root(host, alice, what, argv, ANSWER_SECONDS)
            assert r.returncode == expected_status(what, leaf), (leaf, what, r.stderr)
            assert r.stderr.count("\n") <= 1 and "Traceback" not in r.stderr, r.stderr
        assert not os.path.lexists(host.vmdir / name) and not os.path.lexists(host.vmdir / name2)
        assert not path2.exists() and left_in_holding(host, name2) == []
        drop_kept(host, name)


def drop_kept(host: Host, name: str) -> None:
    """Delete what 'kvmadm remove' (without --purge) kept of *name* (the
    session's tree snapshots would read a 1 TiB file whole)."""
    for leaf in left_in_holding(host, name):
        shutil.rmtree(host.vmdir / ".removed" / leaf)


@pytest.mark.parametrize("kind", KINDS)
def test_root_commands_open_nothing_in_the_vm_directory(host: Host, alice: User,
                                                        tmp_path: Path, kind: str) -> None:
    """The same commands with every user file planted at once, under strace:
    no descriptor of root's (or of the purge's child) ever refers to a file
    inside a VM directory (but autostart's options, opened beneath the
    directory's descriptor with O_NOFOLLOW|O_NONBLOCK), to the device, or
    to anything the links name."""
    name, path = vm_for(host, alice, "s")
    name2, path2 = vm_for(host, alice, "q")
    for p in (path, path2):
        for leaf in USER_LEAVES:
            plant(p / leaf, kind, alice)
        (p / "sub").mkdir()                  # a subdirectory, with one of each inside
        os.chown(p / "sub", alice.uid, alice.gid)
        plant(p / "sub" / USER_LEAVES[0], kind, alice)
    for i, (what, argv) in enumerate(root_commands(host, name)):
        if what == "remove --purge":
            argv = argv[:-2] + [name2, "--purge"]
        log = tmp_path / f"{i}.strace"
        r = run_root(host, alice, what, argv, 20, trace=log)
        assert r.returncode == expected_status(what, READ_BY_ROOT), (what, r.stderr)
        for call, got in fd_lines(log.read_text()):
            assert got != DEVICE, (what, got)
            if got.startswith(str(host.vmdir) + "/"):
                rel = got[len(str(host.vmdir)) + 1:].split("/")
                if rel[-1] == READ_BY_ROOT:
                    assert "AT_FDCWD" not in call and "O_NOFOLLOW" in call \
                        and "O_NONBLOCK" in call, (what, call)
                    continue
                # the top's own entries (VM directories, .removed, .owners),
                # the directories held in .removed and root's per-owner
                # directories in .owners; deeper only a directory that the
                # usage walk opens as one, never following a link (other
                # modules' VMs in the session's tree may hold subdirectories):
                # never a file inside
                # The VM's lease (issue 16): the user's file, but in root's
                # .leases/, made by kvmadm and never replaceable by the user
                # (a regular file, whatever the user does to it); root locks
                # it and reads at most its 256-byte record.
                if rel[0] == ".leases" and len(rel) == 2:
                    assert "O_NOFOLLOW" in call and "O_NONBLOCK" in call, (what, call)
                    assert os.path.isfile(got) or not os.path.lexists(got), (what, got)
                    continue
                assert len(rel) == 1 or (rel[0] in (".removed", ".owners") and len(rel) == 2) \
                    or ("O_DIRECTORY" in call and "O_NOFOLLOW" in call) or "F_DUPFD" in call, \
                    (what, call)
                assert os.path.isdir(got) or not os.path.lexists(got), (what, got)
    drop_kept(host, name)


# ---- 3. remove --purge ---------------------------------------------------------------

def nest(top: Path, user: User, depth: int, leaf: str = "f") -> None:
    """*depth* nested directories under *top*, a file at the bottom, all the user's."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", 0o700, dir_fd=fd)
            sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
            os.fchown(fd, user.uid, user.gid)
        f = os.open(leaf, os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd)
        os.fchown(f, user.uid, user.gid)
        os.close(f)
    finally:
        os.close(fd)


def left_in_holding(host: Host, name: str) -> list[str]:
    return [p for p in os.listdir(host.vmdir / ".removed") if p.startswith(name + ".")]


def test_purge_of_a_very_deep_tree(host: Host, alice: User) -> None:
    name, path = vm_for(host, alice, "deep")
    nest(path, alice, 1500)
    r = host.kvmadm("remove", name, "--purge", check=False)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert not os.path.lexists(host.vmdir / name) and not path.exists()
    assert left_in_holding(host, name) == []


def test_half_done_purge_is_finished_later(host: Host, alice: User) -> None:
    """The contents are deleted with the user's rights: a directory of
    root's inside stops the purge, reported in one line; the rest waits in
    .removed/ and a later 'remove --purge' finishes it."""
    name, path = vm_for(host, alice, "half")
    put(path / "disk.img", alice, b"x" * 4096)
    (path / "roots").mkdir(mode=0o755)
    (path / "roots" / "f").write_bytes(b"root's")
    r = host.kvmadm("remove", name, "--purge", check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"kvmadm: {name}: purge incomplete") and "Traceback" not in r.stderr
    assert f"'kvmadm remove {name} --purge' finishes it" in r.stderr
    assert not os.path.lexists(host.vmdir / name)
    (held,) = left_in_holding(host, name)
    assert held.endswith(".purge")
    assert sorted(os.listdir(host.vmdir / ".removed" / held)) == ["roots"]
    assert name not in host.kvmadm("list").stdout
    for p in (host.vmdir / ".removed" / held / "roots", host.vmdir / ".removed" / held / "roots" / "f"):
        os.chown(p, alice.uid, alice.gid)
    r = host.kvmadm("remove", name, "--purge", check=False)
    assert r.returncode == 0 and "an earlier purge finished" in r.stdout, r.stderr
    assert left_in_holding(host, name) == []


def test_purge_while_the_user_swaps_a_directory_for_a_fifo_link(host: Host, alice: User,
                                                                  tmp_path: Path) -> None:
    """The user's code exchanges a directory and a symlink to a FIFO
    (renameat2 RENAME_EXCHANGE, through a descriptor it opened before the
    purge) for as long as the purge runs: root answers, never opens the
    FIFO, and whatever is left a second run removes."""
    name, path = vm_for(host, alice, "swap")
    fifo = host.root / f"fifo-{name}"
    os.mkfifo(fifo, 0o600)
    os.chown(fifo, alice.uid, alice.gid)
    for i in range(50):
        nest(path / "d" if i else path, alice, 0 if i else 1, leaf=f"f{i}")
    (path / "l").symlink_to(fifo)
    os.lchown(path / "l", alice.uid, alice.gid)
    swapper = subprocess.Popen(as_user_py(alice, "import ctypes, os, sys\n"
                                          "libc = ctypes.CDLL(None, use_errno=True)\n"
                                          "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)\n"
                                          "print('ready', flush=True)\n"
                                          "while True:\n"
                                          "    libc.renameat2(fd, b'd', fd, b'l', 2)\n", str(path)),
                               env=alice.env(), stdout=subprocess.PIPE, text=True)
    try:
        assert swapper.stdout is not None and swapper.stdout.readline() == "ready\n"
        log = tmp_path / "purge.strace"
        r = strace([KVMADM, "--config", str(host.conf), "remove", name, "--purge"], log)
        assert r.returncode in (0, 1) and "Traceback" not in r.stderr, r.stderr
        if r.returncode:
            assert r.stderr.count("\n") == 1 and "purge incomplete" in r.stderr, r.stderr
        assert str(fifo) not in fd_paths(log.read_text())
    finally:
        swapper.kill()
        swapper.wait()
    if left_in_holding(host, name):
        r = host.kvmadm("remove", name, "--purge", check=False)
        assert r.returncode == 0, r.stderr
    assert left_in_holding(host, name) == [] and not os.path.lexists(host.vmdir / name)
    assert fifo.exists()


# The user's code keeps filling a directory of its VM through a descriptor
# it opened before the remove: a new subdirectory with a file in it, as
# fast as it can.
REFILL = """import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
print('ready', flush=True)
i = 0
while True:
    i += 1
    try:
        os.mkdir(f'n{i}', 0o700, dir_fd=fd)
        sub = os.open(f'n{i}', os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(os.open('f', os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=sub))
        os.close(sub)
    except OSError:
        pass
"""


def test_purge_of_a_directory_the_user_keeps_filling_ends(host: Host, alice: User) -> None:
    """The user's code refills a subdirectory of its VM through a
    descriptor it kept, with new directories as fast as the purge deletes
    them, with a head start (the walk went on for ever: down into each, up,
    a fresh listing of a directory that only grew).  The purge must end; if it gives up, it says so in one
    line, and a later 'remove --purge' finishes it once the refilling
    stops."""
    name, path = vm_for(host, alice, "r")
    (path / "sub").mkdir()
    os.chown(path / "sub", alice.uid, alice.gid)
    p = subprocess.Popen(as_user_py(alice, REFILL, str(path / "sub")), env=alice.env(),
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
        wait_for(lambda: len(os.listdir(path / "sub")) >= 2000, 30, "a head start")
        r = host.kvmadm("remove", name, "--purge", check=False)    # 60 s at most
    finally:
        p.kill()
        p.wait()
    assert r.returncode in (0, 1) and "Traceback" not in r.stderr, r.stderr
    if r.returncode:                    # the usual case: the user is faster
        assert r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith(f"kvmadm: {name}: purge incomplete: the directory kept "
                                   "changing"), r.stderr
        assert f"'kvmadm remove {name} --purge' finishes it" in r.stderr
        r = host.kvmadm("remove", name, "--purge", check=False)
        assert r.returncode == 0 and "an earlier purge finished" in r.stdout, r.stderr
    assert left_in_holding(host, name) == [] and not os.path.lexists(host.vmdir / name)


def test_purge_stops_at_its_deadline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The walk's last bound, for refills no other check sees (a chain of
    directories made deeper as fast as the walk goes down): past
    MAX_SECONDS it stops and leaves the rest, which a later run deletes.
    In this process, with a deadline of 0 so that no race is needed."""
    from kvmshell.admin import purge
    top = tmp_path / "vm"
    top.mkdir()
    for i in range(3):
        (top / f"d{i}").mkdir()
        (top / f"d{i}" / "f").write_bytes(b"x")
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        monkeypatch.setattr(purge, "MAX_SECONDS", 0.0)
        with pytest.raises(purge._Changed, match="still not empty after 0 seconds"):
            purge.empty(fd)
        assert os.listdir(top)
        monkeypatch.undo()
        purge.empty(fd)
        assert os.listdir(top) == []
    finally:
        os.close(fd)


# ---- 4. the root helper and the caller's descriptors ------------------------------------

def full_pipe() -> tuple[int, int]:
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, b"x" * 65536)
    except BlockingIOError:
        pass
    os.set_blocking(w, True)
    return r, w


def status_with_full_stderr(argv: list[str], env: dict[str, str], timeout: float = 5) -> int:
    """*argv*'s exit status, run with its stderr a full pipe (no line can
    be written); subprocess.TimeoutExpired if it is still running after
    *timeout* seconds (then it is killed)."""
    r, w = full_pipe()
    try:
        p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=w)
        try:
            return p.wait(timeout=timeout)
        finally:
            p.kill()
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.network
def test_helper_refusal_with_a_full_stderr_returns(net: Net, alice: User) -> None:
    """The refusal's line cannot be written (stderr is a full pipe): the
    helper exits at once anyway, instead of waiting as root for ever."""
    assert status_with_full_stderr(net.as_user(alice, "/usr/bin/sudo", "-n", "--", NETHELPER,
                                               "up", "nosuchvm"), alice.env()) == 2


@pytest.mark.parametrize("helper", ["nethelper", "cgrouphelper", "pamhelper"])
def test_every_helper_refuses_at_once_with_a_full_stderr(alice: User, helper: str) -> None:
    """Each root helper, run as sudo runs it (root, SUDO_UID), refusing a
    request whose line cannot be written: it exits at once all the same."""
    code = (f"import sys; sys.path.insert(0, {LIB!r})\n"
            f"from kvmshell.privileged.{helper} import main\n"
            "sys.exit(main())\n")
    assert status_with_full_stderr(["/usr/bin/python3", "-I", "-c", code, "x"],
                                   _sudo_env(str(alice.uid))) == 2


@pytest.mark.network
def test_helper_with_a_full_stdout_deletes_its_taps(net: Net, host: Host, bob: User) -> None:
    """stdout is a unix socket with no room during 'up': the reply with the
    taps cannot go, so the helper deletes the tap (and its address) and
    exits at once, instead of holding them as root."""
    name = f"u4{secrets.token_hex(2)}"
    host.create_vm(name, bob, "-net", "nic", "-net", "tap,ip=10.79.0.1/24")
    links, addrs = net.links(), net.addrs()
    mine, theirs = socket.socketpair()
    theirs.setblocking(False)
    try:
        while True:
            theirs.send(b"x" * 65536)
    except BlockingIOError:
        pass
    theirs.setblocking(True)                 # as a caller would leave it: the helper's choice
    try:
        p = subprocess.run(net.as_user(bob, "/usr/bin/sudo", "-n", "--", NETHELPER, "up", name),
                           env=bob.env(), stdin=subprocess.DEVNULL, stdout=theirs.fileno(),
                           stderr=subprocess.PIPE, text=True, timeout=5)
        assert p.returncode == 1 and "socket is full" in p.stderr, p.stderr
        assert (net.links(), net.addrs()) == (links, addrs)
    finally:
        mine.close()
        theirs.close()


def test_helper_gives_up_at_its_deadline(alice: User) -> None:
    """Whatever the helper waits on, it exits at its deadline.  Nothing of
    the caller's can make it wait any more (the tests above), so the wait
    is simulated: run() replaced by a sleep, the deadline set to 1 s."""
    code = ("import sys, time\n"
            f"sys.path.insert(0, {LIB!r})\n"
            "from kvmshell.privileged import guard, nethelper as h\n"
            "guard.DEADLINE = 1\n"
            "h.run = lambda *a, **k: time.sleep(60)\n"
            "sys.exit(h.main())\n")
    r = subprocess.run(["/usr/bin/python3", "-I", "-c", code, "up", "x"],
                       env=_sudo_env(str(alice.uid)), capture_output=True, text=True, timeout=5)
    assert r.returncode == 1 and "gave up after 1 seconds" in r.stderr, r.stderr


def test_the_guard_ends_at_the_exec() -> None:
    """A verb that ends by becoming another program (the relay helper's
    kvmshell, which may stream a console for hours) leaves the guard at
    the exec: the program outlives the deadline (1 s here; a pending alarm
    would kill it) and writes to the caller's own stdout and stderr."""
    code = ("import sys\n"
            f"sys.path.insert(0, {LIB!r})\n"
            "from kvmshell.privileged import guard\n"
            "guard.DEADLINE = 1\n"
            "prog = ['/bin/sh', '-c', 'sleep 2; echo out; echo err >&2']\n"
            "sys.exit(guard.main('kvmshell-test', lambda out: guard.Exec(prog[0], prog,"
            " {'PATH': '/usr/bin:/bin'})))\n")
    r = subprocess.run(["/usr/bin/python3", "-I", "-c", code], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=20)
    assert (r.returncode, r.stdout, r.stderr) == (0, "out\n", "err\n"), r


@pytest.mark.network
def test_helper_runs_per_user_are_bounded(net: Net, host: Host, alice: User) -> None:
    """With MAX_RUNS helper runs of the user already going (their slots held
    here), one more is refused at once; with one slot free it runs."""
    from kvmshell.privileged import guard, nethelper
    name = f"u4b{secrets.token_hex(2)}"
    host.create_vm(name, alice, "-m", "32")
    os.makedirs(guard.RUNS_DIR, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(guard.RUNS_DIR, f"{nethelper.PROG}.{alice.uid}"),
                 os.O_RDWR | os.O_CREAT, 0o600)

    def up() -> subprocess.CompletedProcess[str]:
        mine, theirs = socket.socketpair()
        try:
            return subprocess.run(net.as_user(alice, "/usr/bin/sudo", "-n", "--", NETHELPER,
                                              "up", name),
                                  env=alice.env(), stdin=subprocess.DEVNULL,
                                  stdout=theirs.fileno(), stderr=subprocess.PIPE, text=True,
                                  timeout=30)
        finally:
            mine.close()
            theirs.close()
    try:
        for slot in range(guard.MAX_RUNS):
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, slot)
        r = up()
        assert r.returncode == 2 and f"already {guard.MAX_RUNS} runs" in r.stderr, r.stderr
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, 2)
        r = up()
        assert r.returncode == 0, r.stderr
    finally:
        os.close(fd)


# ---- 5. --config -----------------------------------------------------------------------

def test_config_only_from_the_admins_places(host: Host, alice: User) -> None:
    """A root-owned config outside /etc/kvmshell (and the tests' place) is
    refused, even one the user could name because it exists: with it, the
    user's second VM would start past max_running."""
    h = own_host(host, f"u5-{secrets.token_hex(2)}", max_running="1")
    u = User(alice.name, h)
    pa = h.create_vm("u5a", u, "-m", "32")
    h.create_vm("u5b", u, "-m", "32")
    elsewhere = Path(f"/run/kvmshell-elsewhere-{secrets.token_hex(3)}")
    elsewhere.mkdir(mode=0o755)
    (elsewhere / "k.conf").write_text(f"vmdir = {h.vmdir}\naccel = tcg\n")   # no limit
    os.chmod(elsewhere / "k.conf", 0o644)
    writable = h.root / "gw"
    writable.mkdir(mode=0o775)
    os.chmod(writable, 0o775)
    (writable / "k.conf").write_text(f"vmdir = {h.vmdir}\naccel = tcg\n")
    try:
        started_pid(u.ssh_command("start u5a"))
        for conf, why in ((elsewhere / "k.conf", "takes a config only from"),
                          (Path("/dev/null"), "takes a config only from"),
                          # root-owned, config-shaped, but not a host config
                          (Path("/etc/kvmshell/budgets/groups/g.conf"), "takes only a *.conf"),
                          (Path("/etc/kvmshell/kvmshell.conf.d/x.conf"), "takes only a *.conf"),
                          (Path(f"{h.root}/../{h.root.name}/k.conf"), "takes a config only from"),
                          (writable / "k.conf", "must be a directory owned by root and not")):
            r = subprocess.run(u.argv(KVMSHELL, "--config", str(conf), "start", "u5b"),
                               env=u.env(), capture_output=True, text=True, timeout=60,
                               stdin=subprocess.DEVNULL)
            assert r.returncode == 2 and why in r.stderr, (conf, r.stderr)   # a refused word
            assert r.stderr.count("\n") == 1
        assert len(u.qemu_pids()) == 1
    finally:
        shutil.rmtree(elsewhere)
        kill_and_wait(u, pa)


# ---- 6. the size count ------------------------------------------------------------------

def test_uncountable_directory_refuses_the_start(host: Host, alice: User) -> None:
    """A directory of the user's that kvmshell cannot read (mode 000, as a
    user's code may flip it during 'start') hides a 2 MiB image under a
    1 MiB limit: the start is refused, naming it, instead of skipping it."""
    h = own_host(host, f"u6-{secrets.token_hex(2)}", max_image_bytes=str(1 << 20))
    u = User(alice.name, h)
    path = h.create_vm("u6", u, "-m", "32")
    (path / "hide").mkdir()
    os.chown(path / "hide", u.uid, u.gid)
    put(path / "hide" / "big.img", u, os.urandom(2 << 20))
    os.chmod(path / "hide", 0)
    before = h.snapshot()
    r = u.ssh_command("start u6")
    assert r.returncode == 1 and "cannot count hide (Permission denied)" in r.stderr, r.stderr
    assert u.qemu_pids() == [] and h.snapshot() == before
    os.chmod(path / "hide", 0o700)
    r = u.ssh_command("start u6")
    assert r.returncode == 1 and "over the limit of 1048576 bytes" in r.stderr, r.stderr


def test_deep_directory_refuses_the_start(host: Host, alice: User) -> None:
    """A tree deeper than kvmshell counts: one line naming the limit, not
    an internal error (a recursive walk would hit Python's recursion limit)."""
    h = own_host(host, f"u6d-{secrets.token_hex(2)}", max_image_bytes=str(1 << 30))
    u = User(alice.name, h)
    path = h.create_vm("u6d", u, "-m", "32")
    nest(path, u, 1100)
    try:
        r = u.ssh_command("start u6d")
        assert r.returncode == 1 and "levels deep" in r.stderr and "internal" not in r.stderr, \
            r.stderr
        assert u.qemu_pids() == []
    finally:
        h.kvmadm("remove", "u6d", "--purge")      # shutil.rmtree would hit the recursion limit


def test_files_given_to_qemu_count_by_descriptor(host: Host, alice: User) -> None:
    """A file QEMU gets is counted from its descriptor, whether or not the
    walk finds it under a name (here: it has none left), and only once."""
    from kvmshell.common import config, vmtree
    from kvmshell.shell import limits
    path = host.create_vm("u6f", alice, "-m", "32")
    vm = vmtree.resolve(config.load(str(host.conf)), "u6f")
    put(path / "named.img", alice, os.urandom(1 << 20))
    put(path / "gone.img", alice, os.urandom(1 << 20))
    named = os.open(path / "named.img", os.O_RDONLY)
    gone = os.open(path / "gone.img", os.O_RDONLY)
    os.unlink(path / "gone.img")
    try:
        base = limits.image_bytes([vm])
        assert limits.image_bytes([vm], [named], alice.uid) == base
        st = os.fstat(gone)
        assert limits.image_bytes([vm], [named, gone], alice.uid) == \
            base + max(st.st_size, st.st_blocks * 512)
    finally:
        os.close(named)
        os.close(gone)


def usage_of(host: Host, user: User, files: int = 256) -> tuple[subprocess.CompletedProcess[str],
                                                                   dict[str, object]]:
    """'kvmadm usage --json' run with *files* descriptors at most (the
    admin's shell has 1024 as a rule; fewer keep the tree small), and
    *user*'s document in it."""
    import json
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))
    r = subprocess.run([KVMADM, "--config", str(host.conf), "usage", "--json"],
                       capture_output=True, text=True, timeout=60, preexec_fn=limit)
    (doc,) = [d for d in json.loads(r.stdout) if d["user"] == user.name]
    return r, doc


def test_usage_counts_a_wide_directory(host: Host, alice: User) -> None:
    """More subdirectories side by side than kvmadm has descriptors, each
    with a file: 'kvmadm usage' counts every file (a walk that keeps a
    descriptor for every directory still to visit ran out of them and
    silently left the rest out)."""
    name, path = vm_for(host, alice, "w")
    r, doc = usage_of(host, alice)
    assert r.returncode == 0 and doc.get("unmeasured") in (None, {}), r.stderr
    before = doc["budgets"]["image_bytes"]["used"]           # type: ignore[index]
    added = 0
    for i in range(300):
        sub = path / f"d{i}"
        sub.mkdir()
        os.chown(sub, alice.uid, alice.gid)
        added += os.lstat(sub).st_blocks * 512      # a directory takes its blocks too
        added += os.lstat(put(sub / "f", alice, b"x" * 8192)).st_blocks * 512
    r, doc = usage_of(host, alice)
    assert r.returncode == 0 and r.stderr == "" and doc.get("unmeasured") in (None, {}), r.stderr
    assert doc["budgets"]["image_bytes"]["used"] == before + added   # type: ignore[index]


def test_usage_names_a_vm_it_cannot_measure(host: Host, alice: User) -> None:
    """A tree deeper than the walk goes: 'kvmadm usage' says which VM it
    could not measure, in one line and in the JSON, marks the table's
    count as a lower bound and exits 1, as du does; never a smaller
    number in silence."""
    name, path = vm_for(host, alice, "n")
    nest(path, alice, 70)
    r, doc = usage_of(host, alice)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"kvmadm: {name} ({alice.name}): disk use not measured in full: "
                               "cannot count d/d/"), r.stderr
    assert "more than 64 levels deep" in r.stderr and "Traceback" not in r.stderr
    assert list(doc["unmeasured"]) == [name], doc                    # type: ignore[call-overload]
    table = host.kvmadm("usage", check=False)
    assert table.returncode == 1
    assert re.search(rf"^{alice.name}\s.*\s>=\d+/", table.stdout, re.M), table.stdout


# ---- 7. no backing file from a header --------------------------------------------------

def test_a_header_rewritten_after_the_check_opens_no_backing_file(host: Host, alice: User
                                                                   ) -> None:
    """The qcow2 has no backing file when kvmshell checks it; after
    kvmshell's last look at it, when its supervisor creates qemu.log just
    before it runs QEMU (inotify), the header is rewritten to name a file
    the user may read, outside the places it may use.  QEMU must not open
    that file."""
    path = host.create_vm("u7", alice, "-m", "32")
    secret = host.root / "u7-secret.raw"
    secret.write_bytes(b"SECRET" * 100)
    os.chmod(secret, 0o644)
    img = path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw",
                    str(img), "1M"], check=True)
    os.chown(img, alice.uid, alice.gid)
    with open(img, "r+b") as f:
        pointer = f.read(20)[8:20]           # backing file offset and size
        f.seek(8)
        f.write(bytes(12))                   # no backing file, for the check
    libc = ctypes.CDLL(None, use_errno=True)
    ino = libc.inotify_init1(os.O_CLOEXEC)
    assert ino >= 0 and libc.inotify_add_watch(ino, str(path).encode(), 0x100) >= 0  # IN_CREATE

    def rewrite() -> None:
        while True:                          # struct inotify_event: wd, mask, cookie, len, name
            buf = os.read(ino, 4096)
            names, i = [], 0
            while i < len(buf):
                n = int.from_bytes(buf[i + 12:i + 16], "little")
                names.append(buf[i + 16:i + 16 + n].rstrip(b"\0"))
                i += 16 + n
            if b"qemu.log" in names:         # the supervisor, just before QEMU
                break
        fd = os.open(img, os.O_WRONLY)
        os.pwrite(fd, pointer, 8)
        os.close(fd)
    t = threading.Thread(target=rewrite, daemon=True)
    t.start()
    try:
        r = alice.ssh_command("start u7 -hda d.qcow2")
        t.join(5)
        assert not t.is_alive()
        assert img.read_bytes()[8:20] == pointer     # QEMU saw the backing file's name
        if r.returncode == 0:
            pid = started_pid(r)
            held = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            assert str(secret) not in held, held
        else:                                        # kvmshell saw it after all: refused
            assert r.stderr.startswith("kvmshell: ") and r.stderr.count("\n") == 1, r.stderr
    finally:
        os.close(ino)
        kill_and_wait(alice, path)
