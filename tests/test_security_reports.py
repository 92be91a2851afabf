"""Faults found by trying public bug reports of similar tools (issue 18).

Each section is one kind of fault, tested through the real entry points
(kvmshell run as the VM user, kvmadm as root) on a tree of the test's own:

  1. one user's broken VM entry breaks or leaks to other users;
  2. max_image_bytes exceeded by a growing image or an unseen overlay;
  3. terminal escapes from names and QEMU's words reach a terminal;
  4. names 'images' lists that no verb accepts;
  5. stdin/stdout kinds that end in "internal error";
  6. the wrong line of QEMU's failure reported;
  7. over-long names: "internal error", or legal names that fail;
  and: the same image given twice, --force announced to spies.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import KVMSHELL, REPO, Host, User, wait_for
from test_security import (kill_and_wait, lock_free, multiboot, own_host, put,
                           started_pid)

pytestmark = pytest.mark.security

ESC = "\x1b"
# mov dx,0x3f8; "HELLO\r\n" out to COM1, one mov al/out each; then hlt forever.
HELLO = multiboot(bytes.fromhex("66baf803") + b"".join(b"\xb0" + bytes([c]) + b"\xee"
                                                      for c in b"HELLO\r\n")
                  + bytes.fromhex("f4ebfd"))
# Fill 4 MiB at 2 MiB with 0x5a (mov edi; mov ecx; mov eax; rep stosd), then HELLO:
# a guest whose saved state is megabytes (zero pages are not saved).
DIRTY = multiboot(bytes.fromhex("bf00002000" "b900001000" "b85a5a5a5a" "f3ab")
                  + HELLO[32:])   # HELLO past its 32-byte multiboot header


def as_user(user: User, *argv: str) -> None:
    """Run a plain command as *user*: what the user's own (compromised) QEMU
    could do with its uid."""
    subprocess.run(user.argv(*argv), check=True, env=user.env())


def run(user: User, *args: str, stdin: object = subprocess.DEVNULL, timeout: float = 60,
        **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(user.argv(KVMSHELL, "--config", str(user.host.conf), *args),
                          env=user.env(), capture_output=True, text=True, timeout=timeout,
                          stdin=stdin, **kw)  # type: ignore[call-overload]


def one_line(r: subprocess.CompletedProcess[str], status: int, *tokens: str) -> str:
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("kvmshell: ") and r.stderr.count("\n") == 1, r.stderr
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr
    for t in tokens:
        assert t in r.stderr, (t, r.stderr)
    return r.stderr


# ---- 1. one user's broken entry must not touch anyone else -------------------------

def test_other_users_broken_vm_is_not_my_problem(host: Host, alice: User, bob: User) -> None:
    """Bob (or his QEMU) runs 'chmod 750' on his own VM directory: Alice's
    nameless verbs and list keep working and learn nothing of Bob's VM;
    Bob is told the fix; kvmadm list lists the healthy VMs, flags the broken
    one with the reason and exits 1."""
    h = own_host(host, "r1-broken")
    a, b = User(alice.name, h), User(bob.name, h)
    apath = h.create_vm("alicevm", a, "-m", "32")
    bpath = h.create_vm("bobvm", b, "-m", "32", "-usb")
    put(apath / "x.iso", a, b"\0" * 4096)
    as_user(b, "chmod", "750", str(bpath))
    secret = bpath.name.split(".")[1]               # the encoded admin options
    for args, status, want in ((["list"], 0, "alicevm"), (["status"], 0, "alicevm: stopped"),
                               (["images"], 0, "x.iso"), (["kill"], 1, "not running"),
                               (["start", "-cdrom", "missing.iso"], 2, "missing.iso")):
        r = run(a, *args)
        assert r.returncode == status, (args, r.stdout, r.stderr)
        assert want in r.stdout + r.stderr, (args, r.stdout, r.stderr)
        assert "bobvm" not in r.stdout + r.stderr and secret not in r.stdout + r.stderr
        assert "internal error" not in r.stderr
    # Root sees everything: the healthy VM listed, the broken one flagged.
    r = h.kvmadm("list", check=False)
    assert r.returncode == 1, (r.stdout, r.stderr)
    rows = {line.split()[0]: line for line in r.stdout.splitlines()}
    assert "stopped" in rows["alicevm"]
    assert "BROKEN" in rows["bobvm"] and "chmod 700" in rows["bobvm"], rows
    assert "1 broken entry" in r.stderr
    # Bob: his own broken VM, reported with the fix, on list and on any verb.
    r = run(b, "list")
    assert r.returncode == 1 and "bobvm" in r.stdout and "broken" in r.stdout
    assert "chmod 700" in r.stdout
    one_line(run(b, "status"), 1, "bobvm", "mode 0750", "chmod 700")
    one_line(run(b, "status", "bobvm"), 1, "mode 0700", "chmod 700")
    # Named: Alice is told it is not hers, and nothing about its state.
    r = run(a, "status", "bobvm")
    one_line(r, 2, "'bobvm' is not yours")
    assert secret not in r.stderr and "mode" not in r.stderr
    os.chmod(bpath, 0o700)
    assert h.kvmadm("list").returncode == 0


def test_root_made_breakage_touches_no_user(host: Host, alice: User) -> None:
    """Entries no user owns (a dangling symlink, a stray file, a root-owned
    directory, a name with terminal escapes) are root's to fix: users'
    verbs ignore them; kvmadm list names each, escaped."""
    h = own_host(host, "r1-stray")
    a = User(alice.name, h)
    h.create_vm("only", a, "-m", "32")
    h.create_vm("gone", a)
    gone = h.vm_path("gone")
    os.rename(gone, h.vmdir / ".elsewhere")       # dangling link
    (h.vmdir / f"junk{ESC}[31m").write_text("x")  # a stray file with an escape
    os.mkdir(h.vmdir / "rooty.cm9vdHk")             # a directory owned by root
    for args, want in ((["list"], "only"), (["status"], "only: stopped")):
        r = run(a, *args)
        assert r.returncode == 0 and want in r.stdout, (args, r.stdout, r.stderr)
    r = h.kvmadm("list", check=False)
    assert r.returncode == 1
    assert ESC not in r.stdout + r.stderr and "junk\\x1b[31m" in r.stdout, r.stdout
    flagged = [line.split()[0] for line in r.stdout.splitlines() if "BROKEN" in line]
    assert sorted(flagged) == ["gone", "junk\\x1b[31m", "rooty"], r.stdout
    assert "owned by root" in r.stdout and "missing" in r.stdout


# ---- 2. the image quota holds for a whole start --------------------------------------

def _dir_bytes(path: Path) -> int:
    return sum(p.lstat().st_blocks * 512 for p in path.iterdir() if p.is_file())


def _qemu_io(vm_path: Path, device: str, command: str) -> str:
    """Write through QEMU's block layer as a guest would (the test is root
    and reaches QMP directly; users never do)."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    qmp = QEMUMonitorProtocol(str(vm_path / "qmp.sock"))
    qmp.connect(negotiate=True)
    try:
        # -d: *device* is the guest device's id (hda), whose BlockBackend writes.
        r = qmp.cmd("human-monitor-command", **{"command-line": f"qemu-io -d {device} \"{command}\""})
    finally:
        qmp.close()
    return str(r)


def test_growing_image_stays_within_the_room_left(host: Host, alice: User) -> None:
    """Usage just under max_image_bytes, then a tiny qcow2 with a 64 TiB
    virtual size: its start is refused (a qcow2 counts its virtual size, the
    disks issue's worst case).  A qcow2 whose virtual size fits, written by
    the guest past the room: the directory never passes the quota (each
    file QEMU writes is capped at the room left, not at the whole quota),
    and QEMU survives the refused writes."""
    mib = 1 << 20
    quota = 48 * mib
    h = own_host(host, "r2-grow", max_image_bytes=str(quota))
    u = User(alice.name, h)
    path = h.create_vm("g", u, "-m", "32")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path / "big.qcow2"), "64T"],
                   check=True)
    os.chown(path / "big.qcow2", u.uid, u.gid)
    base = _dir_bytes(path)
    put(path / "filler.img", u, os.urandom(quota - base - 8 * mib))
    # 'images': bytes on disk beside the virtual size.
    r = run(u, "images")
    assert r.returncode == 0, r.stderr
    row = [line.split() for line in r.stdout.splitlines() if line.endswith("big.qcow2")][0]
    assert int(row[1]) == 64 << 40 and int(row[0]) < 4 * mib, r.stdout
    r = u.ssh_command("start g -hda big.qcow2")
    assert r.returncode != 0 and "limit" in r.stderr, r.stderr
    assert u.qemu_pids() == []
    (path / "big.qcow2").unlink()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path / "big.qcow2"), "6M"],
                   check=True)
    os.chown(path / "big.qcow2", u.uid, u.gid)
    pid = started_pid(u.ssh_command("start g -hda big.qcow2"))
    try:
        limits = Path(f"/proc/{pid}/limits").read_text()
        m = re.search(r"Max file size\s+(\d+)\s+(\d+)", limits)
        assert m and int(m.group(1)) < 16 * mib and int(m.group(2)) == quota, limits
        for i in range(6):                       # the whole 6 MiB disk, past the room
            _qemu_io(path, "hda", f"write -P 0x5a {i}M 1M")
        assert u.qemu_pids() == [pid]            # EFBIG for the guest, not SIGXFSZ for QEMU
        assert b"Input/output error" in (path / "qemu.log").read_bytes() \
            or b"File too large" in (path / "qemu.log").read_bytes()
        used = _dir_bytes(path)
        assert used <= quota + 256 * 1024, (used, quota)
    finally:
        kill_and_wait(u, path)


def test_snapshot_overlay_counts(host: Host, alice: User) -> None:
    """A -snapshot overlay (an unlinked file QEMU holds in the VM directory)
    counts against max_image_bytes: an upload gets only what is left."""
    mib = 1 << 20
    quota = 64 * mib
    h = own_host(host, "r2-overlay", max_image_bytes=str(quota), upload_max_bytes="0")
    u = User(alice.name, h)
    path = h.create_vm("o", u, "-m", "32")
    put(path / "disk.img", u, os.urandom(16 * mib))
    pid = started_pid(u.ssh_command("start o -hda disk.img -snapshot"))
    try:
        limits = Path(f"/proc/{pid}/limits").read_text()
        m = re.search(r"Max file size\s+(\d+)", limits)
        assert m and int(m.group(1)) <= quota - 16 * mib, limits
        _qemu_io(path, "hda", "write -P 0x33 0 16M")
        wait_for(lambda: b"wrote 16777216" in (path / "qemu.log").read_bytes(), 20, "the write")
        r = run(u, "upload", "up.img", "--size", str(quota - 24 * mib), stdin=subprocess.DEVNULL)
        one_line(r, 2, "exceeds the limit", "max_image_bytes")
        room = int(re.search(r"limit of (\d+) bytes", r.stderr).group(1))  # type: ignore[union-attr]
        assert room < quota - 32 * mib, (room, r.stderr)
    finally:
        kill_and_wait(u, path)


def test_save_writes_past_the_cap_while_paused(host: Host, alice: User) -> None:
    """The state 'save' writes is a file QEMU writes: the cap (here the raw
    disk's size, 1 MiB) is lifted to max_image_bytes while the guest is
    paused, after save counted the room; the state is whole."""
    mib = 1 << 20
    h = own_host(host, "r2-save", max_image_bytes=str(256 * mib))
    u = User(alice.name, h)
    path = h.create_vm("v", u, "-m", "32")
    put(path / "disk.img", u, os.urandom(mib))
    put(path / "dirty.bin", u, DIRTY)
    pid = started_pid(u.ssh_command("start v -hda disk.img -kernel dirty.bin"))
    try:
        m = re.search(r"Max file size\s+(\d+)", Path(f"/proc/{pid}/limits").read_text())
        assert m and int(m.group(1)) == mib, m
        wait_for(lambda: b"HELLO" in (path / "console.log").read_bytes(), 30, "the guest")
        r = u.ssh_command("save v st")
        assert r.returncode == 0, r.stderr
        assert (path / "st").stat().st_size > 2 * mib
        wait_for(lambda: lock_free(path), 30, "the lock")
        r = u.ssh_command("start v -hda disk.img -kernel dirty.bin -loadvm st")
        assert r.returncode == 0, r.stderr
    finally:
        kill_and_wait(u, path)


# ---- 3. escapes never reach a terminal -----------------------------------------------

def test_escapes_in_names_and_answers_are_escaped(host: Host, alice: User) -> None:
    h = own_host(host, "r3-esc")
    u = User(alice.name, h)
    path = h.create_vm("e", u, "-m", "32")
    put(path / f"r{ESC}[31mred.img", u, b"x" * 10)
    r = run(u, "images")
    assert r.returncode == 0 and ESC not in r.stdout
    assert "r\\x1b[31mred.img" in r.stdout, r.stdout
    r = run(u, "rm", "r\\x1b[31mred.img")
    assert r.returncode == 0 and ESC not in r.stdout and not list(path.glob("r*red.img")), r
    # What listens on console.sock is the user's own (a compromised QEMU
    # may bind it): its answer reaches the terminal escaped.
    started_pid(u.ssh_command("start e"))
    try:
        os.unlink(path / "console.sock")
        fake = socket.socket(socket.AF_UNIX)
        fake.bind(str(path / "console.sock"))
        os.chown(path / "console.sock", u.uid, u.gid)
        fake.listen(1)

        def answer() -> None:
            conn, _ = fake.accept()
            conn.recv(512)
            conn.sendall(f"busy {ESC}]0;owned{chr(7)}{ESC}[2J\n".encode())
            conn.close()

        t = threading.Thread(target=answer)
        t.start()
        r = run(u, "console")
        t.join(10)
        fake.close()
        one_line(r, 1, "in use by \\x1b]0;owned\\x07\\x1b[2J")
        assert ESC not in r.stderr and "\x07" not in r.stderr
    finally:
        kill_and_wait(u, path)
    # Bytes that are not UTF-8 are shown as the byte, in every message.
    r = subprocess.run(u.argv(KVMSHELL, "--config", str(h.conf)), capture_output=True,
                       env={**u.env(), "SSH_ORIGINAL_COMMAND": "rm bad\udcff.img"}, text=True)
    one_line(r, 2, "non-ASCII character \\xff")
    r = run(u, "help", f"x{ESC}[2J")
    one_line(r, 2, "\\x1b")
    assert ESC not in r.stderr


# ---- 4. every listed name can be named back ------------------------------------------

def test_every_listed_name_can_be_removed(host: Host, alice: User) -> None:
    h = own_host(host, "r4-names")
    u = User(alice.name, h)
    path = h.create_vm("n", u, "-m", "32")
    names = [b"bad\xff.img", "caf\u00e9.img".encode(), b"back\\slash.img", b"sp ace.img",
             b".upload.x.img.1234", b"-dash.img", b"q'uote\".img", b"zero.img"]
    for raw in names:
        fd = os.open(os.fsencode(path) + b"/" + raw, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"data")
        os.close(fd)
        os.chown(os.fsencode(path) + b"/" + raw, u.uid, u.gid)
    os.chmod(path / "zero.img", 0)                  # the user's QEMU may chmod its files
    r = run(u, "images")
    assert r.returncode == 0, r.stderr
    listed = [re.match(r"\s*\S+ +\S+  (.*)$", line).group(1)  # type: ignore[union-attr]
              for line in r.stdout.splitlines()[1:]]
    assert "bad\\xff.img" in listed and "caf\\xc3\\xa9.img" in listed
    assert "back\\\\slash.img" in listed and ".upload.x.img.1234" in listed
    assert len(listed) == len(names), listed
    for shown in listed:
        # Typed back as the user would: single quotes keep backslashes.
        quoted = "'" + shown.replace("'", "'\\''") + "'"
        r = u.ssh_command(f"rm n {quoted}")
        assert r.returncode == 0, (shown, r.stderr)
        assert ESC not in r.stdout
    assert sorted(os.listdir(path)) == []        # (the VM lock is on the directory)
    # A malformed escape is a refusal naming it; upload creates plain names only.
    one_line(run(u, "rm", "bad\\xzz.img"), 2, "\\xNN")
    one_line(run(u, "upload", "bad\\xff.img"), 2, "plain names only")


# ---- 5. any stdin, any stdout: no internal error ------------------------------------

# Not "a directory": CPython itself refuses one as stdin before any code
# runs ("Fatal Python error: init_sys_streams"); sshd never passes one.
@pytest.mark.parametrize("stdin", ["devnull", "file", "closed"])
def test_console_and_vnc_with_any_stdin(host: Host, alice: User, tmp_path: Path,
                                        stdin: str) -> None:
    """stdin that cannot be polled (not a tty, pipe or socket) is input that
    has ended: the output lingers, then exit 0."""
    h = own_host(host, f"r5-{stdin}")
    u = User(alice.name, h)
    path = h.create_vm("s", u, "-m", "32")
    put(path / "hello.bin", u, HELLO)
    os.chmod(tmp_path, 0o755)
    (tmp_path / "in").write_bytes(b"typed\n")
    os.chmod(tmp_path / "in", 0o644)
    started_pid(u.ssh_command("start s -kernel hello.bin -vnc :0"))
    try:
        for verb in (["console", "--linger", "1"], ["vnc"]):
            argv = u.argv(KVMSHELL, "--config", str(h.conf), *verb)
            if stdin == "closed":
                argv = ["sh", "-c", 'exec "$@" <&-', "sh", *argv]
                fd_in: object = None
            elif stdin == "dir":
                fd_in = os.open(tmp_path, os.O_RDONLY)
            elif stdin == "file":
                fd_in = os.open(tmp_path / "in", os.O_RDONLY)
            else:
                fd_in = subprocess.DEVNULL
            try:
                r = subprocess.run(argv, env=u.env(), capture_output=True, timeout=60,
                                   stdin=fd_in)  # type: ignore[call-overload]
            finally:
                if stdin in ("dir", "file"):
                    os.close(fd_in)  # type: ignore[arg-type]
            assert r.returncode == 0, (verb, r.stderr)
            assert b"internal error" not in r.stderr
            if verb[0] == "console":
                assert b"HELLO" in r.stdout          # the replay, then the usual linger
    finally:
        kill_and_wait(u, path)


@pytest.mark.parametrize("stdout", ["closed", "full", "devnull"])
def test_any_stdout(host: Host, alice: User, stdout: str) -> None:
    """A stdout that cannot take the output is one line on stderr, never an
    internal error or a traceback (console, and the verbs that print)."""
    h = own_host(host, f"r5o-{stdout}")
    u = User(alice.name, h)
    path = h.create_vm("t", u, "-m", "32")
    put(path / "hello.bin", u, HELLO)
    started_pid(u.ssh_command("start t -kernel hello.bin"))
    try:
        for verb in (["console", "--linger", "1"], ["list"], ["help"], ["status", "--json"],
                     ["images"]):
            argv = u.argv(KVMSHELL, "--config", str(h.conf), *verb)
            out: object = None
            if stdout == "closed":
                argv = ["sh", "-c", 'exec "$@" >&-', "sh", *argv]
            else:
                out = open("/dev/full" if stdout == "full" else "/dev/null", "wb")
            r = subprocess.run(argv, env=u.env(), stdin=subprocess.DEVNULL,
                               stdout=out, stderr=subprocess.PIPE, timeout=60)  # type: ignore[call-overload]
            if out is not None:
                out.close()  # type: ignore[attr-defined]
            err = r.stderr.decode()
            assert "internal error" not in err and "Traceback" not in err and \
                "Exception ignored" not in err, (verb, err)
            if stdout in ("devnull", "closed"):          # closed: /dev/null, as sshd does
                assert r.returncode == 0 and err == "", (verb, err)
            else:
                assert r.returncode == 1 and err.startswith("kvmshell: ") and \
                    err.count("\n") == 1, (verb, err)
    finally:
        kill_and_wait(u, path)


# ---- 6. QEMU's fatal line, not its notices -------------------------------------------

def test_reason_is_qemus_fatal_line_not_a_notice(host: Host, alice: User, guest: Path) -> None:
    """QEMU falls back from kvm to tcg (printing three notice lines first),
    then fails on a user option's bad file: the reason shown is QEMU's own
    fatal line, for each option that has one.  The fallback is QEMU's own:
    in a private mount namespace /dev/kvm is the null device, which
    kvmshell (as the user) can open, so it passes '-accel kvm', and QEMU
    cannot initialise KVM on it.  The host's /dev/kvm is untouched, and no
    guest runs: each start fails at QEMU's start-up."""
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm to stand in for")
    h = own_host(host, "r6-reason", accel="kvm tcg")
    u = User(alice.name, h)
    path = h.create_vm("q", u, "-m", "64", guest=guest)
    put(path / "k.bin", u, b"abcdefg")
    put(path / "junk.state", u, os.urandom(4096))
    put(path / "bad.qcow2", u, b"QFI\xfb" + (3).to_bytes(4, "big") + bytes(200))
    with open(path / "huge.initrd", "wb") as f:
        f.truncate(200 << 20)                    # bigger than a 64 MiB guest can take
    os.chown(path / "huge.initrd", u.uid, u.gid)
    cases = [
        ("-kernel k.bin", "qemu: invalid kernel header"),
        ("-kernel vmlinuz -initrd huge.initrd", "qemu: initrd is too large"),
        ("-loadvm junk.state", "Not a migration stream"),
        *[(f"{opt} bad.qcow2", "Unsupported cluster size")
          for opt in ("-hda", "-hdb", "-fda", "-fdb", "-cdrom")],
        ("-hda bad.qcow2 -snapshot", "Unsupported cluster size"),
    ]
    script = 'mount --bind /dev/null /dev/kvm && exec "$@"'
    for args, want in cases:
        r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                            "sh", *u.argv(KVMSHELL, "--config", str(h.conf))],
                           env=u.env(SSH_ORIGINAL_COMMAND=f"start q {args}"),
                           capture_output=True, text=True, timeout=120)
        msg = one_line(r, 1, want)
        assert "falling back" not in msg and "KVM" not in msg and "-accel" not in msg, (args, msg)
        if "qcow2" not in args:      # QEMU opens drives before it sets up the accelerator
            assert b"falling back to tcg" in (path / "qemu.log").read_bytes(), args
        assert u.qemu_pids() == []
    # -option-rom: QEMU 7.2 takes any file as a ROM (none of 0 bytes, 7
    # bytes, 1 MB or 70 MB fails), so it has no reason to report.
    wait_for(lambda: lock_free(path), 30, "the lock")


def test_qemulog_reason_unit() -> None:
    from kvmshell.shell import qemulog
    notice = ["Could not access KVM kernel module: Permission denied",
              "qemu-system-x86_64: -accel kvm: failed to initialize kvm: Permission denied",
              "qemu-system-x86_64: falling back to tcg"]
    assert qemulog.reason(notice + ["qemu: invalid kernel header"]) == \
        "qemu: invalid kernel header"
    assert qemulog.reason(notice) == "QEMU exited"
    assert qemulog.reason(notice[:2]) == notice[0] + "; " + \
        "-accel kvm: failed to initialize kvm: Permission denied"
    assert qemulog.reason(["qemu-system-x86_64: warning: host doesn't support x",
                           "qemu-system-x86_64: Not a migration stream",
                           "qemu-system-x86_64: load of migration failed: Invalid argument"]) == \
        "qemu-system-x86_64: Not a migration stream; load of migration failed: Invalid argument"


# ---- 7. long names -------------------------------------------------------------------

def test_long_names_refused_up_front_and_legal_ones_work(host: Host, alice: User) -> None:
    from kvmshell.shell.images import NAME_MAX
    h = own_host(host, "r7-long")
    u = User(alice.name, h)
    path = h.create_vm("l", u, "-m", "32")
    r = run(u, "help")
    assert f"at most\n  {NAME_MAX} characters" in r.stdout or f"{NAME_MAX} characters" in r.stdout
    longest = "a" * (NAME_MAX - 4) + ".img"
    r = run(u, "upload", longest, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert (path / longest).exists()
    r = run(u, "rm", longest)
    assert r.returncode == 0, r.stderr
    for n in (NAME_MAX + 1, 250, 255, 256, 300, 2000):
        name = "b" * (n - 4) + ".img"
        for verb in ("upload", "save"):
            one_line(run(u, verb, name), 2, f"at most {NAME_MAX}")
        one_line(run(u, "start", "-hda", name), 2 if n > 255 else 2)
    one_line(run(u, "rm", "c" * 256), 2, "at most 255")
    one_line(run(u, "start", "-hda", "d" * 256), 2, "at most 255")
    one_line(run(u, "start", "-kernel", "/".join(["e"] * 600)), 2, "at most 1024")
    assert sorted(os.listdir(path)) == []        # (the VM lock is on the directory)


# ---- also: the same image twice; --force seen by spies -----------------------------

def test_same_image_twice_in_one_start(host: Host, alice: User) -> None:
    h = own_host(host, "r8-twice")
    u = User(alice.name, h)
    path = h.create_vm("w", u, "-m", "32")
    put(path / "d.img", u, b"\0" * 65536)
    for args in ("-hda d.img -hdb d.img", "-fda d.img -hda d.img", "-hda d.img -cdrom d.img"):
        msg = one_line(u.ssh_command(f"start w {args}"), 2, "given twice")
        assert "another VM" not in msg
    assert u.qemu_pids() == []


def test_force_takeover_is_announced_to_spies(host: Host, alice: User) -> None:
    import pexpect
    h = own_host(host, "r8-force")
    u = User(alice.name, h)
    path = h.create_vm("f", u, "-m", "32")
    put(path / "hello.bin", u, HELLO)
    started_pid(u.ssh_command("start f -kernel hello.bin"))
    argv = u.argv(KVMSHELL, "--config", str(h.conf), "console")
    try:
        w = pexpect.spawn(argv[0], argv[1:] + ["--no-replay"], env=u.env(TERM="vt100"), timeout=20)
        w.expect_exact("Escape character")
        s = pexpect.spawn(argv[0], argv[1:] + ["--spy", "--no-replay"], env=u.env(TERM="vt100"),
                          timeout=20)
        s.expect_exact("Escape character")
        f = pexpect.spawn(argv[0], argv[1:] + ["--force", "--no-replay"], env=u.env(TERM="vt100"),
                          timeout=20)
        f.expect_exact("Escape character")
        w.expect_exact("console taken over by pid")
        s.expect_exact("console taken over by pid")
        s.expect_exact("from pid")
        for c in (f, s):
            c.send("\x1d")
            c.expect(pexpect.EOF)
            c.close()
        w.close(force=True)
    finally:
        kill_and_wait(u, path)


# ---- make fuzz: every verb's arguments ---------------------------------------------

def test_fuzz_verbs_briefly() -> None:
    """A short run of the verb fuzzer (the full one is 'make fuzz'): every
    verb's arguments through run_words on a real tree, no internal error."""
    import shutil
    import tempfile
    pytest.importorskip("atheris")
    corpus = tempfile.mkdtemp(prefix="kvmshell-fuzz-corpus-")   # the fuzzer (nobody) writes it
    try:
        r = subprocess.run(["/usr/bin/python3", str(REPO / "tests/fuzz/fuzz_verbs.py"),
                            "-max_total_time=20", "-print_final_stats=1",
                            f"-dict={REPO / 'tests/fuzz/verbs.dict'}", corpus],
                           capture_output=True, text=True, timeout=180)
    finally:
        shutil.rmtree(corpus, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"stat::number_of_executed_units:\s+(\d+)", r.stderr)
    assert m and int(m.group(1)) > 500, r.stderr[-2000:]
