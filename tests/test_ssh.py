"""The forced-command front door through a real sshd on 127.0.0.1, and PAM.

The sshd (tests/sshrig.py) runs the shipped drop-in behind a deliberately
careless main config; the VM user is made with ``kvmadm adduser --key``;
every request goes through the real OpenSSH client.  Nothing is mocked.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from conftest import KVMSHELL, MARKER, REPO, Host, User, _drop_user, console_log, \
    kill_all, ssh_front_door, wait_for
from sshrig import Sshd

pytestmark = pytest.mark.ssh

UPLOAD_MAX = 4 << 20
VM = "web"
HAVE_CONSOLE = importlib.util.find_spec("kvmshell.shell.console") is not None
HAVE_INTERACTIVE = importlib.util.find_spec("kvmshell.shell.interactive") is not None


class Rig:
    def __init__(self, host: Host, sshd: Sshd, group: str, user: User, key: Path,
                 home: Path) -> None:
        self.host, self.sshd, self.group, self.user, self.key, self.home = \
            host, sshd, group, user, key, home

    def ssh(self, *args: str, opts: tuple[str, ...] = (), timeout: float = 60,
            input: bytes | None = None, stdin: int | None = subprocess.DEVNULL
            ) -> subprocess.CompletedProcess[bytes]:
        argv = self.sshd.ssh_argv(self.user.name, self.key, *opts) + list(args)
        return subprocess.run(argv, capture_output=True, timeout=timeout, input=input,
                              stdin=None if input is not None else stdin)


@pytest.fixture(scope="module")
def rig(guest: Path) -> Iterator[Rig]:
    with ssh_front_door("kvmshell-sshtest-", "s",
                        upload_max_bytes=str(UPLOAD_MAX)) as (root, host, sshd, group, name):
        key = sshd.client_key(name)
        # The admin flow, exactly as documented: one command.
        out = host.kvmadm("adduser", name, "--key", f"{key}.pub").stdout
        assert f"created VM user {name}" in out
        user = User(name, host)
        # A home the user owns, holding ~/.ssh/rc and ~/.ssh/environment traps.
        home = root / "home"
        home.mkdir(mode=0o755)
        os.chown(home, user.uid, user.gid)
        subprocess.run(["usermod", "-d", str(home), name], check=True)
        host.create_vm(VM, user, "-m", "128", guest=guest)
        yield Rig(host, sshd, group, user, key, home)


# ---- the "nothing changed" checker (security-cases.md section 5) -----------------

def _ifaces() -> list[str]:
    """Tunnel-like interfaces of this network namespace (sshd's -w would add
    a tun here; the filter keeps other test sessions' unrelated links out)."""
    return sorted(n for _, n in socket.if_nameindex() if n.startswith(("tun", "tap", "kvs")))


@contextlib.contextmanager
def nothing_changed(rig: Rig) -> Iterator[None]:
    """Around one case: no QEMU of the VM user, no new interface, and the
    VM tree byte-for-byte the same afterwards."""
    assert rig.user.qemu_pids() == []
    before = (_ifaces(), rig.host.snapshot())
    yield
    assert rig.user.qemu_pids() == []
    assert (_ifaces(), rig.host.snapshot()) == before


def unchanged(fn: Callable[..., None]) -> Callable[..., None]:
    """Mark a test a security case and run it inside :func:`nothing_changed`."""
    @functools.wraps(fn)
    def wrapper(**kw: Any) -> None:
        with nothing_changed(kw["rig"]):
            fn(**kw)
    return pytest.mark.security(wrapper)


# ---- the drop-in, as sshd reads it --------------------------------------------

def test_dropin_passes_sshd_t_in_debian_layout(tmp_path: Path) -> None:
    """The file exactly as `make install` ships it, in Debian's layout."""
    d = tmp_path / "sshd_config.d"
    d.mkdir()
    shutil.copy(REPO / "sshd_config.d" / "kvmshell.conf", d / "kvmshell.conf")
    main = Path("/etc/ssh/sshd_config").read_text().replace(
        "Include /etc/ssh/sshd_config.d/*.conf", f"Include {d}/*.conf")
    assert f"Include {d}/*.conf" in main
    conf = tmp_path / "sshd_config"
    conf.write_text(main + f"HostKey {tmp_path}/hk\n")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "hk")],
                   check=True)
    r = subprocess.run(["/usr/sbin/sshd", "-t", "-f", str(conf)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_dropin_wins_over_careless_main_config(rig: Rig) -> None:
    eff = rig.sshd.effective(rig.user.name).splitlines()
    want = {
        "forcecommand": f"{KVMSHELL} --config {rig.host.conf}",
        "authorizedkeysfile": f"{rig.sshd.keys}/%u",
        "disableforwarding": "yes", "allowtcpforwarding": "no", "permittunnel": "no",
        "permituserrc": "no", "permituserenvironment": "no", "permittty": "yes",
        "x11forwarding": "no", "allowagentforwarding": "no", "gatewayports": "no",
        "allowstreamlocalforwarding": "no", "passwordauthentication": "no",
        "authenticationmethods": "publickey", "acceptenv": "-NONE-",
    }
    got = {}
    for line in eff:
        k, _, v = line.partition(" ")
        got.setdefault(k, v)
    for k, v in want.items():
        assert got.get(k) == v, (k, got.get(k))
    assert [line for line in eff if line.startswith("acceptenv")] == ["acceptenv -NONE-"]
    # Everyone else keeps the main config: the Match block ends with the file.
    other = rig.sshd.effective("root")
    assert "permittunnel yes" in other and "forcecommand none" in other


def test_adduser_made_a_confined_account(rig: Rig) -> None:
    import grp
    import pwd
    pw = pwd.getpwnam(rig.user.name)
    assert pw.pw_shell == str(rig.host.root / "kvmshell-login-test")
    assert rig.user.name in grp.getgrnam(rig.group).gr_mem
    keyfile = rig.sshd.keys / rig.user.name
    st = keyfile.stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o644)
    pub = Path(f"{rig.key}.pub").read_text().split()
    assert keyfile.read_text() == f"restrict,pty {pub[0]} {pub[1]} {pub[2]}\n"
    # Existing users, bad names and non-keys are refused, naming the token.
    r = rig.host.kvmadm("adduser", rig.user.name, check=False)
    assert r.returncode == 2 and "exists" in r.stderr
    r = rig.host.kvmadm("adduser", "Bad/Name", check=False)
    assert r.returncode == 2 and "Bad/Name" in r.stderr
    bad = rig.host.root / "bad.pub"
    bad.write_text(f'command="sh" {pub[0]} {pub[1]}\n')
    r = rig.host.kvmadm("setkey", rig.user.name, str(bad), check=False)
    assert r.returncode == 2 and "not a public key" in r.stderr
    assert keyfile.read_text().startswith("restrict,pty ")


# ---- the used-by lines ----------------------------------------------------------

def test_upload_start_status_kill(rig: Rig) -> None:
    iso = os.urandom(1 << 20)
    r = rig.ssh("upload", "x.iso", input=iso)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == f"{VM}: stored x.iso (1048576 bytes)\n"
    stored = rig.host.vm_path(VM) / "x.iso"
    assert stored.read_bytes() == iso
    st = stored.stat()
    assert (st.st_uid, st.st_mode & 0o777, st.st_nlink) == (rig.user.uid, 0o600, 1)
    r = rig.ssh("images")
    assert r.returncode == 0 and b"x.iso" in r.stdout and b"lock" not in r.stdout
    try:
        r = rig.ssh("start", "-cdrom", "x.iso")          # the used-by line, as written
        assert r.returncode == 0, r.stderr
        assert b"started" in r.stdout
        r = rig.ssh("status", "--json")
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["name"] == VM and doc["state"] == "running"
        assert doc["pid"] in rig.user.qemu_pids()
        # In use by the running VM: not removable, not replaceable.
        r = rig.ssh("rm", "x.iso")
        assert r.returncode == 2 and b"in use" in r.stderr
        r = rig.ssh("upload", "x.iso", input=b"other")
        assert r.returncode == 2 and b"exists" in r.stderr
        assert stored.read_bytes() == iso
        r = rig.ssh("kill")
        assert r.returncode == 0, r.stderr
        assert json.loads(rig.ssh("status", "--json").stdout)["state"] == "stopped"
    finally:
        kill_all(rig.user)


def test_upload_limit_and_names(rig: Rig) -> None:
    before = sorted(os.listdir(rig.host.vm_path(VM)))
    r = rig.ssh("upload", "big.img", input=b"\0" * (UPLOAD_MAX + 1))
    assert r.returncode == 2
    assert r.stderr.decode() == (f"kvmshell: upload: big.img exceeds the limit of {UPLOAD_MAX} "
                                 "bytes (upload_max_bytes)\n")
    assert sorted(os.listdir(rig.host.vm_path(VM))) == before    # nothing left behind
    for name, why in (("../x.img", "without '/'"), ("lock", "kvmshell uses"),
                      (".hidden", "invalid file name"), ("a,b", "invalid file name"),
                      ("qmp.sock", "kvmshell uses")):
        r = rig.ssh("upload", name, input=b"x")
        assert r.returncode == 2 and why in r.stderr.decode(), (name, r.stderr)
        r = rig.ssh("rm", name)
        assert r.returncode == 2, name
    assert sorted(os.listdir(rig.host.vm_path(VM))) == before
    # max_image_bytes counts all of the user's images (a second, root-owned config).
    conf = rig.host.root / "quota.conf"
    conf.write_text(rig.host.conf.read_text() + "max_image_bytes = 100\n")
    os.chmod(conf, 0o644)
    used = sum(p.stat().st_size for p in rig.host.vm_path(VM).iterdir() if p.is_file())
    r = subprocess.run(rig.user.argv(KVMSHELL, "--config", str(conf), "upload", "q.img"),
                       env=rig.user.env(), input=b"x", capture_output=True)
    assert r.returncode == 2 and b"exceeds the limit of 0 bytes (max_image_bytes" in r.stderr, \
        (used, r.stderr)
    # --size: a short stream (a dropped connection) stores nothing; too big is refused early.
    r = rig.ssh("upload", "short.img", "--size", "10", input=b"12345")
    assert r.returncode == 2 and b"got 5 bytes, expected 10" in r.stderr
    r = rig.ssh("upload", "huge.img", "--size", str(UPLOAD_MAX + 1), input=b"")
    assert r.returncode == 2 and b"exceeds the limit" in r.stderr
    assert sorted(os.listdir(rig.host.vm_path(VM))) == before
    r = rig.ssh("upload", "exact.img", "--size", "5", input=b"12345")
    assert r.returncode == 0 and (rig.host.vm_path(VM) / "exact.img").read_bytes() == b"12345"
    assert rig.ssh("rm", "exact.img").returncode == 0
    # rm works on a file of one's own, and the image is gone.
    assert rig.ssh("upload", "tmp.img", input=b"abc").returncode == 0
    r = rig.ssh("rm", "tmp.img")
    assert r.returncode == 0 and r.stdout == f"{VM}: removed tmp.img\n".encode()
    assert not (rig.host.vm_path(VM) / "tmp.img").exists()


def test_concurrent_uploads_share_the_quota(rig: Rig) -> None:
    """Two uploads that each fit the room left, but not together: the one that
    crosses a recount point while the other's data is on disk is refused."""
    from kvmshell.shell import images
    from kvmshell.shell import limits
    from kvmshell.common import vmtree
    from kvmshell.common.config import load
    vmdir = rig.host.vm_path(VM)
    used = limits.image_bytes(vmtree.owned(load(str(rig.host.conf)), rig.user.uid))
    mib = 1 << 20
    conf = rig.host.root / "quota2.conf"
    conf.write_text(rig.host.conf.read_text().replace(f"upload_max_bytes = {UPLOAD_MAX}",
                                                      "upload_max_bytes = 0")
                    + f"max_image_bytes = {used + 28 * mib}\n")
    os.chmod(conf, 0o644)
    assert images.RECHECK == 16 * mib
    procs = {n: subprocess.Popen(rig.user.argv(KVMSHELL, "--config", str(conf), "upload", n),
                                 env=rig.user.env(), stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for n in ("a.img", "b.img")}
    a, b = procs["a.img"], procs["b.img"]
    try:
        assert a.stdin is not None and b.stdin is not None
        # Each counts the room before it makes its temp file: wait for both,
        # so both saw the same room.
        wait_for(lambda: sum(p.startswith(".upload.") for p in os.listdir(vmdir)) == 2, 30,
                 "both uploads to begin")
        a.stdin.write(b"a" * 15 * mib)
        a.stdin.flush()
        try:
            b.stdin.write(b"b" * 15 * mib)
            b.stdin.flush()
        except BrokenPipeError:
            b.wait(10)
            pytest.fail("b refused early: " + repr(b.stderr.read() if b.stderr else b""))
        time.sleep(0.5)                           # both have written ~15 MiB to disk
        try:
            a.stdin.write(b"a" * 2 * mib)         # a crosses 16 MiB: a + b > room
            a.stdin.close()
        except BrokenPipeError:                   # a refused, and stopped reading
            pass
        a.wait(30)
        assert a.stderr is not None
        err = a.stderr.read()
        assert a.returncode == 2 and b"exceeds the limit" in err, err
        b.stdin.write(b"b" * 5 * mib)             # alone now: b fits
        b.stdin.close()
        b.wait(30)
        assert b.returncode == 0, b.stderr.read() if b.stderr else b""
        assert (vmdir / "b.img").stat().st_size == 20 * mib
        assert not (vmdir / "a.img").exists()
        assert not [p for p in os.listdir(vmdir) if p.startswith(".upload")]
    finally:
        for p in (a, b):
            p.kill()
            p.wait()
        (vmdir / "b.img").unlink(missing_ok=True)


@pytest.mark.skipif(not HAVE_CONSOLE, reason="kvmshell.console (issue 4) is not on this branch yet")
def test_console_over_ssh_tty(rig: Rig) -> None:
    import pexpect
    r = rig.ssh("start", "-kernel", "vmlinuz", "-initrd", "initrd.img", "-append",
                "console=ttyS0")
    assert r.returncode == 0, r.stderr
    try:
        wait_for(lambda: MARKER in console_log(rig.host.vm_path(VM)), 180, "guest boot")
        argv = rig.sshd.ssh_argv(rig.user.name, rig.key, "-tt") + ["console"]
        c = pexpect.spawn(argv[0], argv[1:], timeout=60, env={"TERM": "vt100", "PATH": "/usr/bin:/bin"})
        c.expect_exact("Escape character is ^]")
        c.send("\r")
        c.expect_exact("guest# ")
        c.send("echo $((6*7))x\r")
        c.expect_exact("42x")
        c.send("\x1d")
        c.expect_exact("Detached from")
        c.expect(pexpect.EOF)
        c.close()
        assert c.exitstatus == 0
        assert json.loads(rig.ssh("status", "--json").stdout)["state"] == "running"
    finally:
        rig.ssh("kill")
        kill_all(rig.user)


# ---- nothing beyond the command set ---------------------------------------------

@unchanged
def test_no_command_without_tty_is_refused(rig: Rig) -> None:
    r = rig.ssh(opts=("-T",))
    assert r.returncode == 2
    assert r.stdout == b""
    assert r.stderr.decode() == "kvmshell: no command given and no terminal (try 'help')\n"


@pytest.mark.skipif(not HAVE_INTERACTIVE,
                    reason="kvmshell.interactive (issue 4) is not on this branch yet")
def test_no_command_with_tty_gets_the_prompt(rig: Rig) -> None:
    import pexpect
    argv = rig.sshd.ssh_argv(rig.user.name, rig.key, "-tt")
    c = pexpect.spawn(argv[0], argv[1:], timeout=30, env={"TERM": "vt100", "PATH": "/usr/bin:/bin"})
    c.expect_exact("kvmshell> ")
    c.send("sh -c id\r")                         # words, never a shell
    c.expect_exact("kvmshell: sh: unknown verb")
    c.expect_exact("kvmshell> ")
    c.send("status\r")
    c.expect_exact(f"{VM}: stopped")
    c.expect_exact("kvmshell> ")
    c.send("exit\r")
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0


@unchanged
def test_shell_metacharacters_are_words(rig: Rig) -> None:
    marker = rig.host.root / "pwned"
    for cmd in (f"status; touch {marker}", f"status && touch {marker}", f"$(touch {marker})",
                f"`touch {marker}`", f"status | touch {marker}", "/bin/sh", "bash -i"):
        r = rig.ssh(cmd)
        assert r.returncode == 2, (cmd, r.stderr)
        assert r.stderr.startswith(b"kvmshell: ") and r.stderr.count(b"\n") == 1, cmd
    assert not marker.exists()


@unchanged
def test_sftp_and_scp_get_nothing(rig: Rig, tmp_path: Path) -> None:
    src = tmp_path / "f.img"
    src.write_bytes(b"data")
    before = sorted(os.listdir(rig.host.vm_path(VM)))
    base = ["-P", str(rig.sshd.port), "-i", str(rig.key), "-F", "/dev/null",
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
    target = f"{rig.user.name}@127.0.0.1"
    r = subprocess.run(["sftp", "-b", "-", *base, target], input=b"ls /\nget /etc/passwd\n",
                       capture_output=True, timeout=60, cwd=tmp_path)
    assert r.returncode != 0 and b"passwd" not in r.stdout
    for argv in (["scp", *base, str(src), f"{target}:f.img"],          # scp over sftp
                 ["scp", "-O", *base, str(src), f"{target}:f.img"],    # legacy scp -t
                 ["scp", "-O", *base, f"{target}:/etc/passwd", str(tmp_path / "p")],
                 ["scp", *base, f"{target}:/etc/passwd", str(tmp_path / "p")]):
        r = subprocess.run(argv, capture_output=True, timeout=60)
        assert r.returncode != 0, argv
    assert not (tmp_path / "p").exists()
    assert sorted(os.listdir(rig.host.vm_path(VM))) == before
    log = rig.sshd.log.read_text(errors="replace")
    assert "subsystem request for sftp" in log


def _no_ssh_banner(port: int) -> bool:
    """Connect to a forwarded port: a working forward would reach sshd's banner."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.settimeout(5)
            return b"SSH-" not in s.recv(64)
    except OSError:
        return True


def _wait_listening(port: int) -> None:
    wait_for(lambda: subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                                    text=True).stdout.strip() != "", 20, f"port {port}")


@unchanged
def test_local_and_dynamic_forwarding_refused(rig: Rig) -> None:
    for kind in ("L", "D"):
        lport = _port()
        spec = f"127.0.0.1:{lport}:127.0.0.1:{rig.sshd.port}" if kind == "L" else f"127.0.0.1:{lport}"
        argv = rig.sshd.ssh_argv(rig.user.name, rig.key, "-N", f"-{kind}", spec)
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_listening(lport)          # the client listens; sshd must refuse the channel
            if kind == "L":
                assert _no_ssh_banner(lport)
            else:
                with socket.create_connection(("127.0.0.1", lport), timeout=5) as s:
                    s.settimeout(5)
                    s.sendall(b"\x05\x01\x00")                      # SOCKS5, no auth
                    assert s.recv(2) == b"\x05\x00"
                    s.sendall(b"\x05\x01\x00\x01\x7f\x00\x00\x01"
                              + rig.sshd.port.to_bytes(2, "big"))     # CONNECT to sshd
                    reply = s.recv(64)
                    assert reply[:2] != b"\x05\x00" and b"SSH-" not in reply
        finally:
            p.kill()            # our own client (it may sit in a SOCKS exchange)
            p.wait(10)
    log = rig.sshd.log.read_text(errors="replace")
    assert "refused local port forward" in log or "administratively prohibited" in log \
        or "port forwarding disabled" in log.lower() or "forwarding disabled" in log


def _port() -> int:
    from sshrig import free_port
    return free_port()


@unchanged
def test_remote_forwarding_refused(rig: Rig) -> None:
    rport = _port()
    r = rig.ssh("status", opts=("-o", "ExitOnForwardFailure=yes", "-R",
                                f"127.0.0.1:{rport}:127.0.0.1:{rig.sshd.port}"))
    assert r.returncode == 255 and b"remote port forwarding failed" in r.stderr
    assert _no_ssh_banner(rport)


@unchanged
def test_tunnel_refused(rig: Rig) -> None:
    """-w: the client opens a tun device of its own before asking, so it runs
    in a throwaway network namespace and reaches sshd through socat in ours."""
    me = f"/proc/{os.getpid()}/ns/net"
    proxy = f"nsenter --net={me} socat - TCP:127.0.0.1:{rig.sshd.port}"
    argv = ["unshare", "--net", "--"] + rig.sshd.ssh_argv(
        rig.user.name, rig.key, "-o", f"ProxyCommand={proxy}", "-o", "ExitOnForwardFailure=yes",
        "-o", "Tunnel=point-to-point", "-w", "any:any") + ["status"]
    r = subprocess.run(argv, capture_output=True, timeout=60)
    assert r.returncode == 255 and b"unnel forwarding failed" in r.stderr, r.stderr


@unchanged
def test_user_rc_and_environment_files_ignored(rig: Rig) -> None:
    ssh_dir = rig.home / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    marker = rig.home / "rc-ran"
    (ssh_dir / "rc").write_text(f"touch {marker}\n")
    (ssh_dir / "environment").write_text("LD_PRELOAD=/nonexistent/kvt-env.so\n")
    for p in (ssh_dir, ssh_dir / "rc", ssh_dir / "environment"):
        os.chown(p, rig.user.uid, rig.user.gid)
    try:
        r = rig.ssh("status")
        assert r.returncode == 0 and r.stdout == f"{VM}: stopped\n".encode(), r.stderr
        assert b"ld.so" not in r.stderr and r.stderr == b""
        assert not marker.exists()
    finally:
        shutil.rmtree(ssh_dir)


@unchanged
def test_client_environment_not_accepted(rig: Rig) -> None:
    env = ["LD_PRELOAD=/nonexistent/kvt-setenv.so", "PYTHONINSPECT=1", "PYTHONVERBOSE=1",
           "PYTHONPATH=/nonexistent", "LC_ALL=C"]
    r = rig.ssh("status", opts=("-o", "SetEnv=" + " ".join(env)))
    assert r.returncode == 0 and r.stdout == f"{VM}: stopped\n".encode()
    assert r.stderr == b""                  # no ld.so complaint, no Python verbosity
    # SendEnv from the client's own environment, too.
    argv = rig.sshd.ssh_argv(rig.user.name, rig.key, "-o", "SendEnv=LD_* PYTHON*") + ["status"]
    r = subprocess.run(argv, capture_output=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "LD_PRELOAD_X": "1",
                            "PYTHONVERBOSE": "1", "PYTHONWARNINGS": "error"})
    assert r.returncode == 0 and r.stderr == b"" and r.stdout == f"{VM}: stopped\n".encode()
    log = rig.sshd.log.read_text(errors="replace")
    assert "Ignoring env request LD_PRELOAD: disallowed name" in log
    assert "Ignoring env request PYTHONVERBOSE: disallowed name" in log


@unchanged
def test_other_keys_and_passwords_get_nothing(rig: Rig) -> None:
    """Only the root-owned key file counts: a key in ~/.ssh/authorized_keys does not."""
    other = rig.sshd.client_key("other")
    ssh_dir = rig.home / ".ssh"
    ssh_dir.mkdir(mode=0o700)
    (ssh_dir / "authorized_keys").write_text(Path(f"{other}.pub").read_text())
    for p in (ssh_dir, ssh_dir / "authorized_keys"):
        os.chown(p, rig.user.uid, rig.user.gid)
    try:
        argv = rig.sshd.ssh_argv(rig.user.name, other) + ["status"]
        r = subprocess.run(argv, capture_output=True, timeout=60)
        assert r.returncode == 255 and b"Permission denied (publickey)" in r.stderr
    finally:
        shutil.rmtree(ssh_dir)


# ---- agent and X11 forwarding: what the session process actually gets ----------

def _session_probe(rig: Rig, opts: tuple[str, ...], env: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Open an interactive session (``ssh -tt`` + *opts*, client environment
    *env*), and while kvmshell sits at its prompt read its environment from
    /proc and list what sshd made for the user under /tmp (agent sockets
    live in /tmp/ssh-XXXX/agent.N) and the listening X11 ports (6010+)."""
    import pexpect
    argv = rig.sshd.ssh_argv(rig.user.name, rig.key, "-tt", *opts)
    c = pexpect.spawn(argv[0], argv[1:], timeout=30,
                      env={"TERM": "vt100", "PATH": "/usr/bin:/bin", **env})
    try:
        c.expect_exact("kvmshell> ")
        pids = subprocess.run(["pgrep", "-u", str(rig.user.uid)], capture_output=True,
                              text=True).stdout.split()
        environ: dict[str, str] = {}
        for pid in pids:
            try:
                raw = Path(f"/proc/{pid}/environ").read_bytes()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if KVMSHELL.encode() in cmd:
                environ = dict(kv.split("=", 1) for kv in raw.decode().split("\0") if "=" in kv)
        assert environ, "no kvmshell process of the user found"
        made = [str(p) for p in Path("/tmp").glob("ssh-*") if p.lstat().st_uid == rig.user.uid]
        x11 = subprocess.run(["ss", "-Hltn", "sport >= :6010 and sport <= :6099"],
                             capture_output=True, text=True).stdout
        made += [l for l in x11.splitlines() if l.strip()]
        c.send("exit\r")
        c.expect(pexpect.EOF)
    finally:
        c.close(force=True)
    return environ, made


@pytest.mark.skipif(not HAVE_INTERACTIVE, reason="needs the interactive prompt")
@unchanged
def test_agent_forwarding_refused(rig: Rig, tmp_path: Path) -> None:
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for(sock.exists, 10, "ssh-agent")
        environ, made = _session_probe(rig, ("-A",), {"SSH_AUTH_SOCK": str(sock)})
    finally:
        agent.terminate()
        agent.wait(10)
    assert "SSH_AUTH_SOCK" not in environ, environ
    assert made == [], made
    log = rig.sshd.log.read_text(errors="replace")
    assert "auth-agent-req@openssh.com" in log          # the client did ask


@pytest.mark.skipif(not HAVE_INTERACTIVE, reason="needs the interactive prompt")
@unchanged
def test_x11_forwarding_refused(rig: Rig) -> None:
    environ, made = _session_probe(rig, ("-Y",),
                                   {"DISPLAY": ":97"})
    assert "DISPLAY" not in environ, environ
    assert made == [], made
    log = rig.sshd.log.read_text(errors="replace")
    assert "x11-req" in log                               # the client did ask


# ---- every way in reaches the same validator -----------------------------------

FORBIDDEN = ["start -monitor stdio", "start -cdrom ../../etc/shadow"]


def _via_command(rig: Rig, cmd: str) -> str:
    r = rig.ssh(cmd, opts=("-T",))
    return r.stderr.decode()


def _via_command_tty(rig: Rig, cmd: str) -> str:
    return _pexpect_run(rig.sshd.ssh_argv(rig.user.name, rig.key, "-tt") + [cmd], None)


def _via_prompt(*opts: str) -> Callable[[Rig, str], str]:
    def run(rig: Rig, cmd: str) -> str:
        return _pexpect_run(rig.sshd.ssh_argv(rig.user.name, rig.key, *opts), cmd)
    return run


def _via_su_login(rig: Rig, cmd: str) -> str:
    # The local tty login: root's `su -` runs the user's login shell on a tty.
    return _pexpect_run(["su", "-", rig.user.name], cmd)


def _via_su_c(rig: Rig, cmd: str) -> str:
    return _pexpect_run(["su", "-", rig.user.name, "-c", cmd], None)


def _pexpect_run(argv: list[str], typed: str | None) -> str:
    """Run *argv* on a pty; if *typed*, send it at the prompt, then leave."""
    import pexpect
    c = pexpect.spawn(argv[0], argv[1:], timeout=30, env={"TERM": "vt100", "PATH": "/usr/bin:/bin"},
                      encoding="utf-8", codec_errors="replace")
    try:
        if typed is None:
            c.expect(pexpect.EOF)
            return str(c.before)
        c.expect_exact("kvmshell> ")
        c.send(typed + "\r")
        c.expect_exact("kvmshell> ")
        out = str(c.before)
        c.send("exit\r")
        c.expect(pexpect.EOF)
        return out
    finally:
        c.close(force=True)


ENTRIES: dict[str, Callable[[Rig, str], str]] = {
    "ssh-cmd": _via_command,
    "ssh-t-cmd": _via_command_tty,
    "ssh-nocmd": _via_prompt(),            # a tty on the client side: ssh asks for one
    "ssh-t-nocmd": _via_prompt("-tt"),
    "su-login": _via_su_login,
    "su-c": _via_su_c,
}


@pytest.mark.skipif(not HAVE_INTERACTIVE, reason="needs the interactive prompt")
@pytest.mark.parametrize("cmd", FORBIDDEN, ids=["monitor", "cdrom-dotdot"])
@pytest.mark.parametrize("entry", list(ENTRIES))
@unchanged
def test_every_way_in_same_validator(rig: Rig, entry: str, cmd: str) -> None:
    """The reference answer is kvmshell's, run as sshd's ForceCommand would;
    every way in must print that same one line."""
    want = rig.user.ssh_command(cmd).stderr
    assert want.startswith("kvmshell: ") and want.count("\n") == 1, want
    token = cmd.split()[1]
    assert token in want
    got = ENTRIES[entry](rig, cmd).replace("\r\n", "\n")
    assert want.strip() in got.splitlines(), (entry, want, got)
    assert "Traceback" not in got


@unchanged
def test_no_command_no_tty_same_answer_everywhere(rig: Rig) -> None:
    """Without a terminal and without a command there is nothing to validate:
    `ssh -T host` and `su - USER` from a script both get the same refusal."""
    want = "kvmshell: no command given and no terminal (try 'help')\n"
    assert rig.ssh(opts=("-T",)).stderr.decode() == want
    r = subprocess.run(["su", "-", rig.user.name], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=30)
    assert (r.returncode, r.stderr) == (2, want)


# ---- children get a clean environment -------------------------------------------

QEMU_ENV = {"PATH", "HOME", "TMPDIR", "LC_ALL", "MALLOC_ARENA_MAX"}
LIBC = "/lib/x86_64-linux-gnu/libc.so.6"   # a real library: preloading it is silent


def _qemu_environ(rig: Rig) -> dict[str, str]:
    (pid,) = rig.user.qemu_pids()
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(kv.split("=", 1) for kv in raw.decode().split("\0") if "=" in kv)


def _check_clean(rig: Rig, environ: dict[str, str]) -> None:
    assert set(environ) <= QEMU_ENV, sorted(set(environ) - QEMU_ENV)
    assert environ["TMPDIR"] == str(rig.host.vm_path(VM))
    assert not any(k.startswith(("LD_", "PYTHON", "SSH_")) for k in environ)


@pytest.mark.security
def test_qemu_started_over_ssh_gets_clean_environment(rig: Rig) -> None:
    ssh_dir = rig.home / ".ssh"
    ssh_dir.mkdir(mode=0o700)
    (ssh_dir / "environment").write_text(f"LD_PRELOAD={LIBC}\nTMPDIR=/tmp\nPYTHONPATH=/tmp\n")
    for p in (ssh_dir, ssh_dir / "environment"):
        os.chown(p, rig.user.uid, rig.user.gid)
    env = [f"LD_PRELOAD={LIBC}", "LD_LIBRARY_PATH=/tmp", "PYTHONPATH=/tmp", "PYTHONINSPECT=1",
           "PYTHONHOME=/tmp", "TMPDIR=/tmp", "LC_ALL=C"]
    try:
        r = rig.ssh("start", opts=("-o", "SetEnv=" + " ".join(env), "-o", "SendEnv=LD_* PYTHON*"))
        assert r.returncode == 0, r.stderr
        _check_clean(rig, _qemu_environ(rig))
    finally:
        shutil.rmtree(ssh_dir)
        rig.ssh("kill")
        kill_all(rig.user)
        wait_for(lambda: not rig.user.qemu_pids(), 30, "QEMU to exit")


@pytest.mark.security
def test_qemu_gets_clean_environment_even_if_sshd_let_it_through(rig: Rig) -> None:
    """Defence in depth: a sshd that passed the variables on (no drop-in) still
    gives QEMU none of them (kvmshell run with them set, as such a sshd would)."""
    try:
        r = rig.user.ssh_command("start", LD_PRELOAD=LIBC, LD_LIBRARY_PATH="/tmp",
                                 PYTHONPATH="/tmp", PYTHONINSPECT="1", PYTHONHOME="/tmp",
                                 TMPDIR="/tmp", SSH_AUTH_SOCK="/tmp/x", DISPLAY=":0")
        assert r.returncode == 0, r.stderr
        _check_clean(rig, _qemu_environ(rig))
    finally:
        rig.ssh("kill")
        kill_all(rig.user)
        wait_for(lambda: not rig.user.qemu_pids(), 30, "QEMU to exit")


# ---- PAM: the shipped service file, against real local users --------------------

@pytest.fixture(scope="module")
def pam_users() -> Iterator[tuple[str, str, str, str]]:
    """(service, member, outsider, password): the service is pam/kvmshell with
    the group name replaced, installed under a name of the test's own."""
    group = f"kvt{secrets.token_hex(3)}p"
    service = f"kvmshell-test-{secrets.token_hex(3)}"
    member, outsider = f"kvt{secrets.token_hex(3)}m", f"kvt{secrets.token_hex(3)}o"
    password = "Pw-" + secrets.token_hex(8)
    path = Path("/etc/pam.d") / service
    try:
        subprocess.run(["groupadd", group], check=True)
        for name in (member, outsider):
            subprocess.run(["useradd", "-M", "-N", "-d", "/", "-s", KVMSHELL, name], check=True)
            subprocess.run(["chpasswd"], input=f"{name}:{password}\n", text=True, check=True)
        subprocess.run(["usermod", "-aG", group, member], check=True)
        text = (REPO / "pam" / "kvmshell").read_text()
        assert text.count("ingroup kvmusers") == 2
        path.write_text(text.replace("ingroup kvmusers", f"ingroup {group}"))
        yield service, member, outsider, password
    finally:
        path.unlink(missing_ok=True)
        for name in (member, outsider):
            _drop_user(name)
        subprocess.run(["groupdel", group], capture_output=True)


def _pamtester(service: str, user: str, password: str, *ops: str,
               items: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    argv = ["pamtester", "-v"] + [a for i in items for a in ("-I", i)] + [service, user, *ops]
    return subprocess.run(argv, input=password + "\n", capture_output=True, text=True,
                          timeout=30)


def test_pam_service_with_pamtester(pam_users: tuple[str, str, str, str]) -> None:
    service, member, outsider, password = pam_users
    r = _pamtester(service, member, password, "authenticate", "acct_mgmt")
    assert r.returncode == 0, r.stderr
    assert "successfully authenticated" in r.stdout + r.stderr
    r = _pamtester(service, member, password + "x", "authenticate")
    assert r.returncode != 0 and "Authentication failure" in r.stdout + r.stderr
    # Right password, wrong group: refused, with the same message as a wrong password.
    r = _pamtester(service, outsider, password, "authenticate")
    assert r.returncode != 0 and "Authentication failure" in r.stdout + r.stderr
    r = _pamtester(service, outsider, password, "acct_mgmt")
    assert r.returncode != 0
    r = _pamtester(service, member, password, "chauthtok")
    assert r.returncode != 0                           # passwords are the admin's job
    r = _pamtester(service, member, password, "open_session", "close_session")
    assert r.returncode == 0, r.stderr


def test_pam_service_with_python_pam(pam_users: tuple[str, str, str, str]) -> None:
    from kvmshell.common import auth
    service, member, outsider, password = pam_users
    assert auth.check_password(member, password, service=service)
    assert not auth.check_password(member, "wrong", service=service)
    assert not auth.check_password(outsider, password, service=service)
    assert not auth.check_password("kvt-no-such-user", password, service=service)


def test_pam_access_and_limits_snippets(pam_users: tuple[str, str, str, str],
                                        tmp_path: Path) -> None:
    """The documented pam_access and pam_limits snippets (pam/*.example), in a
    service of their own, against the same real users."""
    service, member, outsider, password = pam_users
    group = subprocess.run(["id", "-gn", member], capture_output=True, text=True).stdout.strip()
    groups = subprocess.run(["id", "-Gn", member], capture_output=True, text=True).stdout.split()
    vmgroup = [g for g in groups if g != group][0]
    access = tmp_path / "access.conf"
    access.write_text((REPO / "pam" / "access-kvmshell.conf.example").read_text()
                      .replace("kvmusers", vmgroup))
    limits = tmp_path / "limits.conf"
    limits.write_text((REPO / "pam" / "limits-kvmshell.conf.example").read_text()
                      .replace("kvmusers", vmgroup))
    name = f"kvmshell-snip-{secrets.token_hex(3)}"
    path = Path("/etc/pam.d") / name
    path.write_text(f"account required pam_access.so accessfile={access}\n"
                    "account required pam_permit.so\n"
                    f"session required pam_limits.so conf={limits}\n"
                    "session required pam_permit.so\n")
    try:
        ok = _pamtester(name, member, "", "acct_mgmt", items=("rhost=127.0.0.1",))
        assert ok.returncode == 0, ok.stderr
        far = _pamtester(name, member, "", "acct_mgmt", items=("rhost=203.0.113.7",))
        assert far.returncode != 0
        # The snippet restricts only the VM users' group.
        assert _pamtester(name, outsider, "", "acct_mgmt",
                          items=("rhost=203.0.113.7",)).returncode == 0
        assert _pamtester(name, member, "", "open_session", "close_session").returncode == 0
    finally:
        path.unlink()
