"""Console, VNC and the interactive login shell, against one real booted guest.

Every session here is a real kvmshell process run as the VM user (through
setpriv, as sshd or login would), driven with pexpect on a real pty.  The
VNC test uses a real VNC client (vncdotool) through a 127.0.0.1 relay whose
connections each run ``kvmshell vnc`` as the user, like the README's
``socat ... EXEC:'ssh user@host vnc'`` one-liner (ssh replaced by setpriv:
the SSH leg is the ssh suite's business).
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import pexpect
import pytest

from conftest import (KVMSHELL, MARKER, Host, User, _drop_user, _make_user, console_log,
                      kill_all, wait_for)

pytestmark = pytest.mark.console

VM = "con"
PROMPT = "guest# "


@pytest.fixture(scope="module")
def carol(host: Host) -> Iterator[User]:
    """A VM user whose login shell runs the test copy of kvmshell.

    Test-only device: kvmshell takes --config only from argv, and a login
    shell gets none, so the login shell is a two-line wrapper that adds
    --config for this session's tree.  Installed, the login shell is
    /usr/local/bin/kvmshell itself with the default config."""
    wrapper = host.root / "bin" / "kvmshell-login-test"
    if not wrapper.exists():
        wrapper.write_text(f"#!/bin/sh\nexec {KVMSHELL} --config {host.conf} \"$@\"\n")
        os.chmod(wrapper, 0o755)
    name = _make_user("c")
    subprocess.run(["usermod", "-s", str(wrapper), name], check=True)
    try:
        yield User(name, host)
    finally:
        _drop_user(name)


@pytest.fixture(scope="module")
def vm(host: Host, carol: User, guest: Path) -> Iterator[Path]:
    path = host.create_vm(VM, carol, "-m", "256", guest=guest)
    r = carol.ssh_command(f"start {VM} -kernel vmlinuz -initrd initrd.img "
                          "-append console=ttyS0 -vnc :0")
    assert r.returncode == 0, r.stderr
    try:
        wait_for(lambda: MARKER in console_log(path), 120, "the guest to boot")
        yield path
    finally:
        kill_all(carol)
        wait_for(lambda: not (path / "console.sock").exists(), 20, "the supervisor to go")
        # Remove the VM: carol's uid is freed at the end of this module and a
        # later test user may get it (and would own a stray VM).
        host.kvmadm("remove", VM, "--purge")


def spawn(user: User, *args: str, timeout: float = 30) -> pexpect.spawn:
    child = pexpect.spawn(user.argv(KVMSHELL, "--config", str(user.host.conf), *args)[0],
                          user.argv(KVMSHELL, "--config", str(user.host.conf), *args)[1:],
                          env=user.env(TERM="vt100"), timeout=timeout)
    return child


def attach(user: User, *args: str) -> pexpect.spawn:
    c = spawn(user, "console", VM, *args)
    c.expect_exact("Escape character is ^]")
    return c


def detach(c: pexpect.spawn) -> None:
    c.send("\x1d")
    c.expect_exact("Detached from")
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0


def run_in_guest(c: pexpect.spawn, command: str, answer: str) -> None:
    """Type *command* at the guest's shell and wait for *answer*, which is
    built so that it appears only in the output, never in the echo."""
    c.send("\r")
    c.expect_exact(PROMPT)
    c.send(command + "\r")
    c.expect_exact(answer)


def test_attach_type_read_detach(carol: User, vm: Path) -> None:
    c = attach(carol)
    run_in_guest(c, "echo attach-$((6*7))", "attach-42")
    detach(c)
    assert carol.status(VM)["state"] == "running"        # detach leaves the VM up


def _supervisor_of(user: User) -> int:
    (qemu,) = user.qemu_pids()
    with open(f"/proc/{qemu}/status") as f:
        return int(next(l.split()[1] for l in f if l.startswith("PPid:")))


def test_supervisor_is_its_own_small_program(carol: User, vm: Path) -> None:
    """QEMU's parent, once the VM runs, is the supervisor's own program (a
    fresh python3 -I -S, not a copy of kvmshell) with a clean environment,
    holding only the lock (on the VM directory), the VM's lease, the serial
    FIFOs and the console socket: none of the files, taps or the monitor
    socket that went to QEMU."""
    sup = _supervisor_of(carol)
    argv = Path(f"/proc/{sup}/cmdline").read_bytes().split(b"\0")
    assert argv[:4] == [b"/usr/bin/python3", b"-I", b"-S", b"-c"], argv
    assert b"kvmshell.shell.supervisor" in argv[4]
    env = Path(f"/proc/{sup}/environ").read_bytes().split(b"\0")
    assert sorted(e for e in env if e) == [b"LC_ALL=C", b"PATH=/usr/bin:/bin"]
    assert os.stat(f"/proc/{sup}").st_uid == carol.uid
    held = sorted(os.readlink(f"/proc/{sup}/fd/{fd}") for fd in os.listdir(f"/proc/{sup}/fd"))
    files = [h for h in held if h.startswith("/")]
    # The lock is the VM directory itself (common/runstate.py); the lease
    # (common/lease.py, issue 16) is the supervisor's for the VM's life.
    assert sorted(files) == sorted(["/dev/null"] * 3 + [str(vm), str(vm.parent / ".leases" / VM)]
                                   + [str(vm / leaf)
                                      for leaf in ("serial.in", "serial.out", "console.log")]), held
    others = [h for h in held if not h.startswith("/")]
    # console.sock (listening), QEMU's pidfd: no client is attached now.
    assert len(others) == 2 and sum(h.startswith("socket:") for h in others) == 1, held
    assert "anon_inode:[pidfd]" in others, held


def test_reattach_replays_and_no_replay_skips(carol: User, vm: Path) -> None:
    c = attach(carol)
    run_in_guest(c, "echo replay-$((1000+234))", "replay-1234")
    detach(c)
    c = attach(carol)
    c.expect_exact("replay-1234")           # before we type anything: the replay
    detach(c)
    c = attach(carol, "--no-replay")
    c.send("\r")
    c.expect_exact(PROMPT)
    assert b"replay-1234" not in (c.before or b"")
    detach(c)


def test_boot_is_replayed(carol: User, vm: Path) -> None:
    """start, then console: the early output (the boot) is there."""
    c = attach(carol)
    c.expect_exact(MARKER.decode())
    detach(c)


def test_ssh_drop_keeps_vm(carol: User, vm: Path) -> None:
    c = attach(carol)
    c.close(force=True)                      # like a dropped SSH connection
    assert carol.status(VM)["state"] == "running"
    c = attach(carol)                        # and the writer slot is free again
    run_in_guest(c, "echo alive-$((3*3))", "alive-9")
    detach(c)


def test_spy_beside_writer(carol: User, vm: Path) -> None:
    w = attach(carol, "--no-replay")
    s = attach(carol, "--spy", "--no-replay")
    run_in_guest(w, "echo spied-$((2+3))", "spied-5")
    s.expect_exact("spied-5")                 # the spy sees the writer's session
    s.send("echo nope-$((1+1))\r")            # and cannot type into it
    time.sleep(1)
    run_in_guest(w, "echo after-$((3+4))", "after-7")
    assert b"nope-2" not in console_log(vm)
    detach(s)
    detach(w)


def test_second_writer_refused_then_force(carol: User, vm: Path) -> None:
    a = attach(carol, "--no-replay")
    b = spawn(carol, "console", VM)
    b.expect(pexpect.EOF)
    b.close()
    assert b.exitstatus == 1
    text = (b.before or b"").decode()
    assert "console is in use by pid" in text and "--force" in text
    f = attach(carol, "--force", "--no-replay")
    a.expect_exact("console taken over by pid")   # the displaced session is told
    a.expect(pexpect.EOF)
    run_in_guest(f, "echo forced-$((4*4))", "forced-16")
    detach(f)


def test_byte_stream_without_tty(carol: User, vm: Path) -> None:
    r = subprocess.run(carol.argv(KVMSHELL, "--config", str(carol.host.conf),
                                  "console", VM, "--no-replay", "--linger", "3"),
                       env=carol.env(), input=b"\necho pipe-$((5*5))\n",
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert b"pipe-25" in r.stdout
    assert b"Escape character" not in r.stdout + r.stderr


def test_flood_is_bounded(host: Host, carol: User, vm: Path) -> None:
    """A flooding guest: a session that never reads does not stall the
    writer, and the log stays within its two bounded files."""
    limit = 1048576                     # kvmshell.conf's default console_log_bytes
    stuck = subprocess.Popen(carol.argv(KVMSHELL, "--config", str(host.conf), "console", VM,
                                        "--spy", "--no-replay"),
                             env=carol.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        w = attach(carol, "--no-replay")
        w.timeout = 300
        run_in_guest(w, "head -c 3000000 /dev/zero | tr '\\0' x; echo; echo flood-$((9*9))",
                     "flood-81")
        t = time.monotonic()
        assert carol.status(VM)["state"] == "running"
        assert time.monotonic() - t < 5
        detach(w)
    finally:
        stuck.kill()
        stuck.wait()
    sizes = [(vm / leaf).stat().st_size for leaf in ("console.log", "console.log.1")]
    assert sum(sizes) > limit            # it did rotate: the flood outgrew one file
    assert all(s <= limit for s in sizes), sizes


def test_console_socket_serves_only_the_owner(vm: Path) -> None:
    """Defence in depth behind the 0700 directory: the multiplexer checks
    the peer's uid, so even root's connection is closed unanswered."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(str(vm / "console.sock"))
        try:
            s.sendall(b"attach spy 100 root\n")
        except (BrokenPipeError, ConnectionResetError):
            return                          # closed before we could even say hello
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass                            # closed unanswered, too
    finally:
        s.close()


def test_console_refusals(carol: User, vm: Path) -> None:
    r = carol.ssh_command(f"console {VM} --bogus")
    assert r.returncode == 2 and "--bogus" in r.stderr
    r = carol.ssh_command(f"console {VM} --escape x")
    assert r.returncode == 2 and "--escape" in r.stderr


# ---- VNC -------------------------------------------------------------------

class Relay:
    """127.0.0.1-only TCP relay: each connection runs ``kvmshell vnc`` as the user."""

    def __init__(self, user: User) -> None:
        self.user = user
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.procs: list[subprocess.Popen[bytes]] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.procs.append(subprocess.Popen(
                self.user.argv(KVMSHELL, "--config", str(self.user.host.conf), "vnc", VM),
                env=self.user.env(), stdin=conn, stdout=conn))
            conn.close()

    def close(self) -> None:
        self.sock.close()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_vnc_screenshot_not_blank(carol: User, vm: Path) -> None:
    from PIL import Image

    c = attach(carol, "--no-replay")          # put text on the VGA console too
    run_in_guest(c, "echo VNC-TEST-PATTERN > /dev/tty1; echo vt-$((8*8))", "vt-64")
    detach(c)
    relay = Relay(carol)
    try:
        with tempfile.TemporaryDirectory() as d:
            shot = os.path.join(d, "shot.png")
            r = subprocess.run(["vncdo", "-s", f"127.0.0.1::{relay.port}", "capture", shot],
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            img = Image.open(shot).convert("L")
            lo, hi = img.getextrema()
            assert img.size[0] >= 320 and hi > lo, (img.size, lo, hi)
    finally:
        relay.close()


def test_vncviewer_helper(carol: User, vm: Path) -> None:
    """bin/kvmshell-vncviewer, the client-side helper, end to end.  Test-only
    devices: `ssh` is a stand-in on PATH that runs the remote command as the
    user with setpriv (no sshd here: that is the ssh suite's), and the
    "viewer" is vncdotool taking a screenshot."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)
        shot = os.path.join(d, "shot.png")
        fake_ssh = os.path.join(d, "ssh")
        with open(fake_ssh, "w") as f:    # ssh -T -o BatchMode=no TARGET vnc VM
            f.write("#!/bin/sh\nshift 4\nexec " + " ".join(carol.argv(KVMSHELL)) +
                    f" --config {carol.host.conf} \"$@\"\n")
        viewer = os.path.join(d, "viewer")
        with open(viewer, "w") as f:
            f.write(f"#!/bin/sh\nexec vncdo -s \"$1\" capture {shot}\n")
        os.chmod(fake_ssh, 0o755)
        os.chmod(viewer, 0o755)
        helper = Path(__file__).resolve().parents[1] / "bin" / "kvmshell-vncviewer"
        r = subprocess.run([str(helper), f"{carol.name}@localhost", VM], capture_output=True,
                           text=True, timeout=120,
                           env={"PATH": f"{d}:/usr/local/bin:/usr/bin:/bin", "VNCVIEWER": viewer})
        assert r.returncode == 0, r.stderr
        assert "relay on 127.0.0.1:" in r.stderr
        lo, hi = Image.open(shot).convert("L").getextrema()
        assert hi > lo
    r = subprocess.run([str(helper), "a;b@host"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 2 and "unexpected character" in r.stderr


def test_vnc_only_in_vm_dir(carol: User, vm: Path) -> None:
    """The display is a socket in the 0700 VM directory, never a TCP port."""
    assert (vm / "vnc.sock").is_socket()
    assert os.stat(vm).st_mode & 0o777 == 0o700
    pids = carol.qemu_pids()
    assert pids
    ss = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True).stdout
    assert not any(f"pid={p}," in ss for p in pids), ss
    for bad in ("-vnc :0,password=on", "-vnc 0.0.0.0:0", "-vnc unix:/tmp/x"):
        r = carol.ssh_command(f"start {VM} {bad}")
        assert r.returncode == 2 and "-vnc" in r.stderr, (bad, r.stderr)


# ---- the interactive login shell -----------------------------------------

def test_login_shell_prompt(carol: User, vm: Path) -> None:
    c = pexpect.spawn("login", ["-f", carol.name], env={"TERM": "dumb", "PATH": "/usr/bin:/bin"},
                      timeout=30)
    try:
        c.expect_exact("kvmshell> ")
        c.sendline(f"status {VM}")
        c.expect_exact(f"{VM}: running")
        c.expect_exact("kvmshell> ")
        c.sendline("console")                # the console from the prompt, and back
        c.expect_exact("Escape character is ^]")
        c.send("\r")
        c.expect_exact(PROMPT)
        c.send("\x1d")
        c.expect_exact("Detached from")
        c.expect_exact("kvmshell> ")
        c.sendline(f"start {VM} -m 4096")
        c.expect_exact("kvmshell: -m:")
        c.expect_exact("kvmshell> ")
        c.send("hel\t")                      # completion of verbs ...
        c.expect_exact("help ")
        c.sendline("")
        c.expect_exact("console [VM]")
        c.expect_exact("kvmshell> ")
        c.send(f"status {VM[:2]}\t")          # ... and of VM names
        c.expect_exact(f"status {VM} ")
        c.sendline("")
        c.expect_exact(f"{VM}: running")
        c.expect_exact("kvmshell> ")
        c.sendline("exit")
        c.expect(pexpect.EOF)
    finally:
        c.close(force=True)


def test_su_dash_user(carol: User, vm: Path) -> None:
    """su - user -c CMD runs the login shell with -c; plain su - user gets the prompt."""
    r = subprocess.run(["su", "-", carol.name, "-c", f"status {VM}"], capture_output=True,
                       text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and f"{VM}: running" in r.stdout, r.stderr
    r = subprocess.run(["su", "-", carol.name, "-c", f"start {VM} -monitor stdio"],
                       capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines()[-1].startswith("kvmshell: -monitor:"), r.stderr  # after su's warning
    c = pexpect.spawn("su", ["-", carol.name], env={"TERM": "dumb", "PATH": "/usr/bin:/bin"},
                      timeout=30)
    try:
        c.expect_exact("kvmshell> ")
        c.sendline("list")
        c.expect_exact("running")
        c.expect_exact("kvmshell> ")         # an EOF typed before readline reads is lost
        c.sendeof()
        c.expect(pexpect.EOF)
    finally:
        c.close(force=True)


def test_no_command_no_terminal_refused(carol: User) -> None:
    r = subprocess.run(carol.argv(KVMSHELL, "--config", str(carol.host.conf)),
                       env=carol.env(), capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=30)
    assert r.returncode == 2
    assert r.stderr.startswith("kvmshell: no command given and no terminal")
