"""The bad-input suite: security-cases.md sections 1, 2, 3 and 6, through
the real entry point (kvmshell run as the user, as sshd's ForceCommand
would run it), on top of the cases already in test_core_refusals.py.

Every refusal asserts (conftest.assert_refused): one ``kvmshell: ...`` line
naming the offending token, the exit status, no QEMU process of the user,
and a VM tree byte-for-byte the same.  Section 6 (load and faults) starts
real QEMUs; most need no guest OS: SeaBIOS idles, or a tiny multiboot
"guest" of a few x86 instructions floods the serial port or powers off.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import (KVMSHELL, MARKER, REPO, Host, User, assert_refused, console_log,
                      kill_all, lock_holders, wait_for)
from test_core_refusals import _bad_tree, _rename_to

pytestmark = pytest.mark.security


# ---- helpers -------------------------------------------------------------------

def own_host(host: Host, tag: str, **conf: str) -> Host:
    """A VM tree and config of this test's own (for limits and log sizes)."""
    root = host.root / f"sec-{tag}"
    root.mkdir(mode=0o755)
    h = Host.__new__(Host)
    h.root, h.vmdir, h.images, h.conf = root, root / "vms", root / "img", root / "k.conf"
    h.images.mkdir(mode=0o755)
    h.write_conf(**conf)
    return h


def put(path: Path, user: User, data: bytes) -> Path:
    path.write_bytes(data)
    os.chown(path, user.uid, user.gid)
    return path


def started_pid(r: subprocess.CompletedProcess[str]) -> int:
    assert r.returncode == 0, r.stderr
    m = re.search(r"\(pid (\d+)\)", r.stdout)
    assert m, r.stdout
    return int(m.group(1))


def lock_free(vm_path: Path) -> bool:
    """Nobody holds the VM lock (an flock on the VM directory)."""
    return lock_holders(vm_path) == []


LEAVES = ("qmp.sock", "serial.sock", "vnc.sock", "qemu.pid", "console.sock", "serial.in",
          "serial.out")


def assert_clean(vm_path: Path) -> None:
    """After QEMU is gone: no leaked lock, sockets or pid file."""
    wait_for(lambda: lock_free(vm_path), 30, "the VM lock to be released")
    left = [leaf for leaf in LEAVES if os.path.lexists(vm_path / leaf)]
    assert left == [], left


def kill_and_wait(user: User, vm_path: Path) -> None:
    kill_all(user)
    wait_for(lambda: user.qemu_pids() == [], 30, "QEMU to exit")
    assert_clean(vm_path)


def multiboot(code: bytes) -> bytes:
    """A multiboot (v1, a.out kludge) kernel: QEMU's -kernel loads it at 1 MiB
    and jumps to *code* in 32-bit protected mode."""
    magic, flags, load = 0x1BADB002, 0x00010000, 0x100000
    header = struct.pack("<III", magic, flags, (-(magic + flags)) & 0xFFFFFFFF)
    header += struct.pack("<IIIII", load, load, 0, 0, load + 32)
    return header + code


# mov dx,0x3f8; mov al,'A'; 1: out dx,al; jmp 1b
FLOOD = multiboot(bytes.fromhex("66baf803" "b041" "ee" "ebfd"))
# print 'X'; spin ~2^28 times (seconds under TCG); ACPI S5 through PM1a_CNT
# at 0x604 (SeaBIOS puts the PIIX4 PM block at 0x600); hlt
POWEROFF = multiboot(bytes.fromhex("66baf803" "b058" "ee"
                                   "b900000010" "49" "75fd"
                                   "66ba0406" "66b80020" "66ef" "f4" "ebfd"))


# ---- fixtures ------------------------------------------------------------------

@pytest.fixture(scope="module")
def sec_vm(host: Host, alice: User) -> Path:
    path = host.create_vm("sec", alice, "-m", "64")
    put(path / "x.iso", alice, b"\0" * 4096)
    put(path / "disk.img", alice, b"\0" * 65536)
    return path


@pytest.fixture(scope="module")
def sec_traps(host: Host, alice: User, bob: User, sec_vm: Path) -> Path:
    p = sec_vm
    (p / "sub").mkdir()
    os.chown(p / "sub", alice.uid, alice.gid)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(p / "sock.iso"))
    sock.close()
    os.chown(p / "sock.iso", alice.uid, alice.gid)
    (p / "ownlink.iso").symlink_to("x.iso")
    os.lchown(p / "ownlink.iso", alice.uid, alice.gid)
    put(p / "bobs.img", bob, b"\0" * 4096)
    put(p / "roots.img", alice, b"\0" * 4096)
    os.chown(p / "roots.img", 0, 0)
    for leaf in ("bobs.img", "roots.img"):  # writable by all: only the owner check refuses
        os.chmod(p / leaf, 0o666)
    put(p / "disk2.img", alice, b"\0" * 4096)
    os.link(p / "disk2.img", p / "disk2-link.img")
    os.mkfifo(p / "fifo.state")
    os.chown(p / "fifo.state", alice.uid, alice.gid)
    os.mknod(p / "dev.rom", 0o600 | 0o020000, os.makedev(1, 5))   # /dev/zero
    os.chown(p / "dev.rom", alice.uid, alice.gid)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(p / "base.qcow2"), "1M"],
                   check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                    str(p / "own-backing.qcow2")], check=True, cwd=p)
    # A backing name outside the allowed places (qemu-img -u: not opened here).
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "/etc/hostname",
                    "-F", "raw", str(p / "evil-backing.qcow2"), "1M"], check=True, cwd=p)
    for leaf in ("base.qcow2", "own-backing.qcow2", "evil-backing.qcow2"):
        os.chown(p / leaf, alice.uid, alice.gid)
    v4 = bytearray((p / "base.qcow2").read_bytes())
    v4[4:8] = (4).to_bytes(4, "big")
    put(p / "v4.qcow2", alice, bytes(v4))
    put(p / "notq.qcow2", alice, b"\0" * 4096)
    (host.images / "evil.iso").symlink_to("/etc/shadow")
    return p


# ---- 1. command-line parsing (beyond test_core_refusals) -----------------------

PARSING = [
    # shell metacharacters inside quoted words are still plain text
    ("start sec -cdrom 'x.iso;sh'", "x.iso;sh"),
    ("start sec -cdrom 'x.iso sh'", "x.iso sh"),
    ("start sec -cdrom \"$(id)\"", "$(id)"),
    ("start sec -cdrom x.iso || reboot", "||"),
    ("start sec -cdrom x.iso > /etc/passwd", ">"),
    ("start sec -append `reboot`", "needs -kernel"),
    ("help $(id)", "$(id)"),
    # control characters and look-alikes
    ("start sec\x7f", "control character"),
    ("start sec\t\x07", "control character"),
    ("start sec \u2028", "non-ASCII"),
    ("start sec \x85", "non-ASCII"),
    ("start sec \uff0dcdrom x.iso", "non-ASCII"),
    # admin-only options, every one, and through QEMU's '--' spelling
    *[(f"start sec {o}", o.split()[0] + ":") for o in (
        "-usb", "-win2k-hack", "-balloon virtio", "-redir tcp:2222::22", "-tftp /srv",
        "-smb /srv", "-parallel none", "-vmchannel di:1,pty", "-no-rtc", "--net user",
        "--monitor stdio", "--serial stdio", "--pidfile x", "--m 1", "--smp 2", "-cpu max",
        "-M q35", "-firmware efi")],
    # unused options
    *[(f"start sec {o}", o.split()[0] + ":") for o in (
        "-k en-us", "-soundhw all", "-p 1234", "-no-kvm", "-std-vga", "-full-screen",
        "-no-quit", "-audio-help", "-no-fd-bootchk", "-hdd x.iso", "--daemonize")],
    # QEMU options in no table
    *[(f"start sec {o} x", o + ":") for o in (
        "-mon", "-fw_cfg", "-trace", "-D", "-enable-kvm", "-machine", "-spice", "-numa",
        "-mem-path", "-nic", "-watchdog-action", "-semihosting", "-msg", "-overcommit",
        "-nodefaults", "-no-user-config", "-name", "-uuid", "-icount", "-rtc", "-display",
        "-compat", "-action", "-loadvm-snapshot", "-preconfig", "-only-migratable")],
    # spelling tricks
    ("start sec -m64", "-m64"),
    ("start sec -snapshot=on", "-snapshot=on"),
    ("start sec -hda,file=x", "-hda,file=x"),
    ("start sec -", "-: unexpected word"),
    ("start sec --", "--: unexpected word"),
    ("start sec ---", "---"),
    ("start sec -cdrom x.iso --cdrom x.iso", "--cdrom: given twice"),
    ("start sec -kernel x.iso --kernel x.iso", "--kernel: given twice"),
    ("start sec -Snapshot", "-Snapshot"),
    ("start sec '-cdrom x.iso'", "-cdrom x.iso"),
    # arity and values starting with '-'
    ("start sec -kernel x.iso -append", "-append: missing value"),
    ("start sec -vnc", "-vnc: missing value"),
    ("start sec -hda -hdb disk.img", "-hda: missing value (got -hdb)"),
    ("start sec -cdrom ''", "-cdrom: invalid file name"),
    ("start sec -cdrom -", "-cdrom: missing value (got -)"),
    ("start sec -kernel x.iso -append '-init=/bin/sh'", "-init=/bin/sh"),
    ("start sec -hdachs 1,16,63 -hda -x", "-x"),
    # bad values, parsed not filtered
    ("start sec -boot dd", "'dd'"),
    ("start sec -boot d,menu=on", "d,menu=on"),
    ("start sec -boot once=d", "once=d"),
    ("start sec -vnc unix:/tmp/s", "unix:/tmp/s"),
    ("start sec -vnc :99999", ":99999"),
    ("start sec -hdachs 1,16,63,lba,x -hda disk.img", "1,16,63,lba,x"),
    ("start sec -hdachs 99999,16,63 -hda disk.img", "99999,16,63"),
    ("start sec -hdachs 1,16,63,bogus -hda disk.img", "'bogus'"),
    ("start sec -hdachs 1,16,63", "-hdachs: needs -hda"),
    ("start sec -initrd x.iso", "-initrd: needs -kernel"),
    # oversized values
    ("start sec -cdrom " + "a" * 1500, "-cdrom: file name too long"),
    ("start sec -kernel x.iso -append " + "a" * 2048, "kernel command line too long"),
    ("start sec " + " ".join(["-snapshot"] * 65), "too many words"),
    ("start sec -cdrom " + "a" * 2049, "word too long"),
    # verbs
    ("list -a", "-a"),
    ("help nosuchverb", "nosuchverb"),
    ("kill sec now", "now"),
    ("--config /tmp/x status", "--config"),
    ("-c status", "-c"),
]


@pytest.mark.parametrize("command,token", PARSING, ids=[repr(c[0][:40]) for c in PARSING])
def test_parsing_refused(host: Host, alice: User, sec_vm: Path, command: str, token: str) -> None:
    assert_refused(host, alice, command, token)


@pytest.mark.parametrize("text", ["start sec\0-snapshot", "\0", "sec\0"])
def test_nul_refused(text: str) -> None:
    """NUL cannot reach kvmshell through SSH_ORIGINAL_COMMAND, -c or argv (the
    kernel ends each string at NUL), so the lexer and name checks are tested
    in-process: a NUL is refused, never truncated."""
    from kvmshell.shell import lexer
    from kvmshell.common import vmid
    from kvmshell.common.errors import UsageError
    with pytest.raises(UsageError, match="control character"):
        lexer.split(text)
    with pytest.raises(UsageError):
        vmid.check_name(text)


# ---- 2. files the user names -----------------------------------------------------

FILES = [
    ("-cdrom sub", "sub is not a regular file"),
    ("-cdrom sock.iso", "sock.iso"),
    ("-cdrom ownlink.iso", "ownlink.iso"),
    ("-hda bobs.img", "bobs.img is not owned by you"),
    ("-hda roots.img", "roots.img is not owned by you"),
    ("-cdrom roots.img", "roots.img is not owned by you"),
    ("-hda disk2.img", "disk2.img has other hard links"),
    ("-loadvm fifo.state", "fifo.state is not a regular file"),
    ("-option-rom dev.rom", "dev.rom is not a regular file"),
    ("-kernel /dev/zero", "/dev/zero is outside"),
    ("-cdrom /proc/1/root/etc/shadow", "outside"),
    ("-cdrom /proc/self/fd/0", "outside"),
    ("-cdrom IMAGES/evil.iso", "evil.iso"),
    ("-cdrom 'IMAGES/../../etc/passwd'", "../../etc/passwd"),
    ("-hda evil-backing.qcow2", "backing file '/etc/hostname' is outside"),
    ("-hda v4.qcow2", "unsupported qcow2 version 4"),
    ("-hda notq.qcow2", "notq.qcow2 is not a qcow2 image"),
    ("-cdrom x.iso:", "x.iso:"),
    ("-hda fat:rw:sub", "fat:rw:sub"),
    ("-cdrom 'x.iso,readonly=off'", "x.iso,readonly=off"),
    ("-cdrom https://example.invalid/x.iso", "https://example.invalid/x.iso"),
    ("-cdrom .hidden.iso", ".hidden.iso"),
    ("-cdrom x.iso/", "x.iso/"),
    ("-cdrom sub//x.iso", "sub//x.iso"),
    ("-kernel 'vmlinuz,if=none'", "vmlinuz,if=none"),
    ("-hda /dev/fdset/1", "/dev/fdset/1"),
]


@pytest.mark.parametrize("args,token", FILES, ids=[c[0][:40] for c in FILES])
def test_file_refused(host: Host, alice: User, sec_traps: Path, args: str, token: str) -> None:
    assert_refused(host, alice, f"start sec {args.replace('IMAGES', str(host.images))}", token)


# ---- 3. VM names and the tree -------------------------------------------------------

NAMES = [
    ("start -sec", "-sec"),
    ("start sec.x", "'sec.x'"),
    ("status SEC", "'SEC'"),
    ("start " + "n" * 33, "too long"),
    ("stop ..", "'..'"),
    ("kill /", "'/'"),
    ("status ' sec'", "' sec'"),
    ("start sec/", "'sec/'"),
    ("start _sec", "'_sec'"),
    ("start .", "'.'"),
    ("status sec\\/x", "'sec/x'"),
]


@pytest.mark.parametrize("command,token", NAMES, ids=[c[0][:30] for c in NAMES])
def test_vm_name_refused(host: Host, alice: User, sec_vm: Path, command: str, token: str) -> None:
    assert_refused(host, alice, command, token)


def test_other_users_vm_not_listed(host: Host, alice: User, bob: User, sec_vm: Path) -> None:
    if not os.path.lexists(host.vmdir / "bobsec"):
        host.create_vm("bobsec", bob)
    r = alice.ssh_command("list")
    assert r.returncode == 0 and "sec" in r.stdout and "bobsec" not in r.stdout
    assert_refused(host, alice, "status bobsec --json", "'bobsec' is not yours")
    assert_refused(host, alice, "start bobsec -snapshot", "'bobsec' is not yours")


TREES = {
    "dir-0770": (lambda b, p, u: os.chmod(p, 0o770), "mode 0700"),
    "top-0775": (lambda b, p, u: os.chmod(b.vmdir, 0o775), "not group/world-writable"),
    "link-is-file": (lambda b, p, u: (os.unlink(b.vmdir / "t"), (b.vmdir / "t").write_text("x")),
                     "must be a symlink"),
    "dangling-link": (lambda b, p, u: os.rename(p, b.vmdir / "elsewhere"), "missing"),
    "dir-is-symlink": (lambda b, p, u: (os.rename(p, b.vmdir / "real"), os.symlink("real", p)),
                       "not a directory"),
    "b64-plus": (lambda b, p, u: _rename_to(b, p, "t", [], raw=p.name + "+"), "not <name>.<base64>"),
    "user-option-in-id": (lambda b, p, u: _rename_to(b, p, "t", ["-cdrom", "x.iso"]), "-cdrom"),
    "unknown-option-in-id": (lambda b, p, u: _rename_to(b, p, "t", ["-readconfig", "x"]),
                             "-readconfig"),
}


@pytest.mark.parametrize("case", list(TREES))
def test_broken_tree_refused(host: Host, alice: User, case: str) -> None:
    bad, path = _bad_tree(host, alice, "sec-" + case)
    breaker, token = TREES[case]
    breaker(bad, path, alice)
    msg = assert_refused(bad, User(alice.name, bad), "start t -snapshot", token, status=1)
    assert "admin" in msg


# ---- 2 (race) and the same image twice ---------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
RENAME_EXCHANGE = 2
AT_FDCWD = -100


def exchange(a: Path, b: Path) -> None:
    if _libc.renameat2(AT_FDCWD, str(a).encode(), AT_FDCWD, str(b).encode(), RENAME_EXCHANGE):
        raise OSError(ctypes.get_errno(), "renameat2")


def test_race_symlink_swap_never_reaches_qemu(host: Host, alice: User) -> None:
    """A loop swaps the user's image for a symlink to a secret (atomically,
    over and over) while 'start' runs many times: QEMU never gets the secret."""
    path = host.create_vm("race", alice, "-m", "32")
    real = put(path / "x.iso", alice, b"R" * 4096)
    real_id = (real.stat().st_dev, real.stat().st_ino)
    secret = host.root / "race-secret.iso"
    secret.write_bytes(b"SECRET" * 1000)
    os.chmod(secret, 0o644)                 # readable by alice: only kvmshell stands between
    secret_id = (secret.stat().st_dev, secret.stat().st_ino)
    (path / "swap.iso").symlink_to(secret)
    os.lchown(path / "swap.iso", alice.uid, alice.gid)
    stop = threading.Event()
    swaps = [0]

    def swapper() -> None:
        while not stop.is_set():
            exchange(path / "x.iso", path / "swap.iso")
            swaps[0] += 1

    t = threading.Thread(target=swapper, daemon=True)
    t.start()
    started = refused = 0
    try:
        for _ in range(100):
            r = alice.ssh_command("start race -cdrom x.iso")
            if r.returncode == 0:
                started += 1
                pid = started_pid(r)
                seen = set()
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    try:
                        st = os.stat(f"/proc/{pid}/fd/{fd}")
                        target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    except FileNotFoundError:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                    assert (st.st_dev, st.st_ino) != secret_id, "the secret reached QEMU"
                    assert target != str(secret)
                assert real_id in seen, "QEMU did not get the user's own image"
                os.kill(pid, signal.SIGKILL)
                wait_for(lambda: alice.qemu_pids() == [] and lock_free(path), 30, "QEMU gone")
            else:
                refused += 1
                assert r.returncode == 2, r.stderr
                assert r.stderr.startswith("kvmshell: -cdrom: x.iso"), r.stderr
                assert r.stderr.count("\n") == 1
    finally:
        stop.set()
        t.join()
        kill_all(alice)
    assert swaps[0] > 100
    assert started > 0 and refused > 0, (started, refused)
    print(f"race: {started} starts with the real file, {refused} refusals, {swaps[0]} swaps")


def test_same_image_two_vms(host: Host, alice: User, sec_vm: Path) -> None:
    """A shared read-only image may serve two VMs at once; a writable image
    is one VM's alone (flock), and no second name for it can be made."""
    other = host.create_vm("sec2", alice, "-m", "32")
    shared = host.images / "both.iso"
    shared.write_bytes(b"\0" * 4096)
    os.chmod(shared, 0o644)
    try:
        a = started_pid(alice.ssh_command(f"start sec -cdrom {shared} -hda disk.img"))
        b = started_pid(alice.ssh_command(f"start sec2 -cdrom {shared}"))
        assert sorted(alice.qemu_pids()) == sorted([a, b])
        # The running VM holds its disk: a second opener is refused, naming it.
        from kvmshell.shell import files
        from kvmshell.common.errors import RefusedFile
        for write in (True, False):
            with pytest.raises(RefusedFile, match="disk.img is in use by another VM"):
                files.open_file("-hda", "disk.img", vmdir=str(sec_vm), image_dirs=[],
                                uid=alice.uid, write=write, image=True)
        # A hard link would be a second name: refused.
        os.link(sec_vm / "disk.img", other / "disk.img")
        try:
            r = alice.ssh_command("kill sec2")
            assert r.returncode == 0, r.stderr
            wait_for(lambda: lock_free(other), 30, "sec2 to stop")
            r = alice.ssh_command("start sec2 -hda disk.img")
            assert r.returncode == 2 and "disk.img has other hard links" in r.stderr, r.stderr
        finally:
            os.unlink(other / "disk.img")
    finally:
        kill_and_wait(alice, sec_vm)
        assert_clean(other)


# ---- 6. load and faults -------------------------------------------------------------

def test_concurrent_starts_of_one_vm(host: Host, alice: User, sec_vm: Path) -> None:
    procs = [subprocess.Popen(alice.argv(KVMSHELL, "--config", str(host.conf)),
                              env=alice.env(SSH_ORIGINAL_COMMAND="start sec"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL) for _ in range(10)]
    try:
        results = [(p.wait(120), *p.communicate()) for p in procs]
        ok = [r for r in results if r[0] == 0]
        assert len(ok) == 1, results
        for code, out, err in results:
            if code:
                assert code == 1 and "already running" in err, (code, err)
        assert len(alice.qemu_pids()) == 1
    finally:
        kill_and_wait(alice, sec_vm)


def test_many_users_many_vms_limits_hold(host: Host, alice: User, bob: User) -> None:
    """Six starts at once by two users, max_running = 2: each user gets
    exactly two VMs, the third start is refused by the limit."""
    h = own_host(host, "many", max_running="2")
    users = {alice.name: User(alice.name, h), bob.name: User(bob.name, h)}
    vms = {}
    for u in users.values():
        for i in range(3):
            name = f"{u.name[-1]}{i}"
            vms[name] = (u, h.create_vm(name, u, "-m", "32"))
    procs = {name: subprocess.Popen(u.argv(KVMSHELL, "--config", str(h.conf)),
                                    env=u.env(SSH_ORIGINAL_COMMAND=f"start {name}"),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    stdin=subprocess.DEVNULL)
             for name, (u, _) in vms.items()}
    try:
        results = {name: (p.wait(180), *p.communicate()) for name, p in procs.items()}
        for u in users.values():
            mine = {n: r for n, r in results.items() if vms[n][0] is u}
            ok = [n for n, r in mine.items() if r[0] == 0]
            refused = [r for n, r in mine.items() if r[0] != 0]
            assert len(ok) == 2, mine
            assert len(refused) == 1 and refused[0][0] == 1, mine
            assert "the limit is 2" in refused[0][2], refused
            assert len(u.qemu_pids()) == 2
    finally:
        for u in users.values():
            kill_all(u)
        for u, path in vms.values():
            wait_for(lambda: lock_free(path), 30, "locks")


def test_image_bytes_limit(host: Host, alice: User) -> None:
    h = own_host(host, "bytes", max_image_bytes=str(1 << 20))
    u = User(alice.name, h)
    path = h.create_vm("b", u, "-m", "32")
    big = put(path / "big.img", u, os.urandom(2 << 20))
    assert_refused(h, u, "start b", "over the limit of 1048576 bytes", status=1)
    big.unlink()
    put(path / "disk.img", u, os.urandom(256 << 10))
    pid = started_pid(u.ssh_command("start b -hda disk.img"))
    try:
        limits = Path(f"/proc/{pid}/limits").read_text()
        # Files QEMU writes are capped at the room left (here the raw disk
        # is written only within its size: the cap is that size), and never
        # past the whole budget (the hard limit).
        assert re.search(r"Max file size\s+262144\s+1048576", limits), limits
        # 'save' counts the state (about the guest's RAM) before QEMU writes any.
        r = u.ssh_command("save b st")
        assert r.returncode == 2 and "no room for the state of a 48 MiB guest" in r.stderr, r.stderr
        assert u.qemu_pids() == [pid] and not [p for p in os.listdir(path) if "st" in p.split(".")]
    finally:
        kill_and_wait(u, path)


def test_memory_capped_outside_qemu(host: Host, alice: User, guest: Path) -> None:
    """-m 128: the guest sees at most 128 MiB, and the QEMU process is capped
    (RLIMIT_AS, set before exec), so asking QEMU for more RAM gets none."""
    from kvmshell.shell import limits
    from qemu.qmp import QMPError
    from qemu.qmp.legacy import QEMUMonitorProtocol

    path = host.create_vm("mem", alice, "-m", "128", guest=guest)
    pid = started_pid(alice.ssh_command(
        "start mem -kernel vmlinuz -initrd initrd.img -append console=ttyS0"))
    try:
        cap = limits.address_space_bytes(128)
        text = Path(f"/proc/{pid}/limits").read_text()
        assert re.search(rf"Max address space\s+{cap}\s+{cap}", text), text
        wait_for(lambda: MARKER in console_log(path), 180, "the guest's marker")
        m = re.search(rb"Memory: \d+K/(\d+)K available", console_log(path))
        assert m and int(m.group(1)) <= 128 * 1024, m
        qmp = QEMUMonitorProtocol(str(path / "qmp.sock"))
        qmp.connect(negotiate=True)
        try:
            r = qmp.cmd("object-add", **{"qom-type": "memory-backend-ram", "id": "more",
                                         "size": 1 << 30})
        except QMPError as exc:
            r = {"error": str(exc)}
        finally:
            qmp.close()
        assert "error" in r and "allocate" in str(r["error"]).lower(), r
        assert alice.qemu_pids() == [pid]      # refused, still running
    finally:
        kill_and_wait(alice, path)


def test_qemu_crash_leaks_nothing(host: Host, alice: User, sec_vm: Path) -> None:
    pid = started_pid(alice.ssh_command("start sec -cdrom x.iso"))
    assert (sec_vm / "qmp.sock").exists() and not lock_free(sec_vm)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: alice.qemu_pids() == [], 30, "QEMU to die")
    assert_clean(sec_vm)
    assert alice.status("sec")["state"] == "stopped"
    pid = started_pid(alice.ssh_command("start sec -cdrom x.iso"))   # the next start works
    kill_and_wait(alice, sec_vm)


def test_guest_poweroff_leaks_nothing(host: Host, alice: User) -> None:
    path = host.create_vm("off", alice, "-m", "32")
    put(path / "off.bin", alice, POWEROFF)
    started_pid(alice.ssh_command("start off -kernel off.bin"))
    try:
        wait_for(lambda: alice.qemu_pids() == [], 120, "the guest to power off")
        assert_clean(path)
        assert b"X" in console_log(path)
        assert alice.status("off")["state"] == "stopped"
        started_pid(alice.ssh_command("start off -kernel off.bin"))  # the next start works
    finally:
        kill_and_wait(alice, path)


def test_kvmshell_killed_during_start(host: Host, alice: User, sec_vm: Path) -> None:
    """kvmshell (the SSH session) dies while QEMU comes up: the VM keeps
    running, fully managed (monitor, console log, stop), nothing leaks."""
    p = subprocess.Popen(alice.argv(KVMSHELL, "--config", str(host.conf)),
                         env=alice.env(SSH_ORIGINAL_COMMAND="start sec -cdrom x.iso"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         stdin=subprocess.DEVNULL)
    try:
        # Kill kvmshell as soon as it has forked the supervisor: before QEMU
        # is ready, so the supervisor's readiness report finds no reader.
        deadline = time.monotonic() + 60
        while not subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True).stdout:
            assert time.monotonic() < deadline and p.poll() is None, "no supervisor"
            time.sleep(0.005)
        p.kill()
        p.wait()
        wait_for(lambda: alice.status("sec")["state"] == "running", 60, "the VM to run")
        time.sleep(2)                                        # the supervisor has reported by now
        assert alice.status("sec")["state"] == "running"
        assert (sec_vm / "qmp.sock").exists() and (sec_vm / "console.sock").exists()
        r = alice.ssh_command("kill sec")
        assert r.returncode == 0, r.stderr
        assert_clean(sec_vm)
    finally:
        kill_and_wait(alice, sec_vm)


def test_console_flood_is_bounded(host: Host, alice: User) -> None:
    limit = 65536
    h = own_host(host, "flood", console_log_bytes=str(limit))
    u = User(alice.name, h)
    path = h.create_vm("flood", u, "-m", "32")
    put(path / "flood.bin", u, FLOOD)
    started_pid(u.ssh_command("start flood -kernel flood.bin"))
    try:
        wait_for(lambda: (path / "console.log.1").exists(), 60, "the log to rotate")
        for _ in range(20):
            sizes = [os.path.getsize(path / leaf) for leaf in ("console.log", "console.log.1")
                     if (path / leaf).exists()]
            assert all(s <= limit for s in sizes) and sum(sizes) <= 2 * limit, sizes
            time.sleep(0.25)
        assert u.status("flood")["state"] == "running"
        assert (path / "console.log.1").read_bytes().count(b"A") > limit // 2
    finally:
        kill_and_wait(u, path)


# ---- fuzzing, briefly ----------------------------------------------------------------

def test_fuzz_parser_briefly(tmp_path: Path) -> None:
    """A short atheris run (the full one is 'make fuzz'): no finding."""
    pytest.importorskip("atheris")
    r = subprocess.run(["/usr/bin/python3", str(REPO / "tests/fuzz/fuzz_parser.py"),
                        "-max_total_time=15", "-print_final_stats=1",
                        f"-dict={REPO / 'tests/fuzz/parser.dict'}", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"stat::number_of_executed_units:\s+(\d+)", r.stderr)
    assert m and int(m.group(1)) > 1000, r.stderr[-2000:]
    print(f"fuzz: {m.group(1)} executions, no finding")
