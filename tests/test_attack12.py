"""Attacks on issue 12 (cloud-init seed, connect, kvmshell-ssh-config).

Each test is one attack that broke kvmshell before its fix; they reuse
test_cloudinit.py's users, keys and VMs (its module fixtures).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Host, User, assert_refused, kill_all

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from kvmshell.shell.monitor import Session
from test_cloudinit import VM, alice, bob, keyed, pair  # noqa: F401 -- module fixtures


# module_vms_removed: other modules expect the session's users to own a known set
pytestmark = [pytest.mark.security, pytest.mark.usefixtures("module_vms_removed")]


def _refused_user_data(host: Host, user: User, content: bytes, token: str) -> float:
    """``start VM -cloud-init -user-data ud.yaml`` with *content* is refused
    naming the file and *token*; returns how long the refusal took."""
    path = host.vm_path(VM) / "ud.yaml"
    path.write_bytes(content)
    os.chown(path, user.uid, user.gid)
    t0 = time.monotonic()
    try:
        msg = assert_refused(host, user, f"start {VM} -cloud-init -user-data ud.yaml", token)
        assert "ud.yaml" in msg
        return time.monotonic() - t0
    finally:
        path.unlink()
        kill_all(user)   # only if the refusal failed


# ---- cloud-init user-data ------------------------------------------------------------

def _merge_bomb(levels: int) -> bytes:
    lines = ["#cloud-config", "a0: &a0 {k: v}"]
    lines += [f"a{i}: &a{i} {{<<: [*a{i - 1}, *a{i - 1}]}}" for i in range(1, levels)]
    return ("\n".join(lines) + "\n").encode()


@pytest.mark.parametrize("content", [
    # An alias of a scalar is written out again in full by safe_dump: 16 KB
    # named 600 times is a 10 MB seed (64 KB of input made a 198 MB seed,
    # 122 s of CPU and 580 MB of kvmshell's memory).
    b"#cloud-config\na: &x " + b"A" * 16000 + b"\nb: [" + b",".join([b"*x"] * 600) + b"]\n",
    # Merge keys copy the merged mapping's pairs: the work doubles with each
    # line (18 lines: 0.6 s; 30 lines, 832 bytes: hours and gigabytes).
    _merge_bomb(18),
], ids=["scalar-alias-expansion", "merge-key-bomb"])
def test_user_data_alias_bombs_refused(keyed: tuple[Host, list[str]], alice: User,
                                       content: bytes) -> None:
    _refused_user_data(keyed[0], alice, content, "alias")


@pytest.mark.parametrize("content", [
    b"#cloud-config\nx: " + b"1" * 5000 + b"\n",                 # int > Python's 4300 digits
    b"#cloud-config\nx: 0x" + b"f" * 5000 + b"\n",               # fine to read, not to write
    b"#cloud-config\nx: 2001-13-45\n",                           # YAML date, no such month
    b"#cloud-config\nx: 2001-12-14 21:59:43.10 +99:99\n",        # timestamp, no such offset
], ids=["long-int", "long-hex", "bad-date", "bad-offset"])
def test_user_data_values_not_representable_refused(keyed: tuple[Host, list[str]], alice: User,
                                                    content: bytes) -> None:
    """These gave 'kvmshell: internal error (ValueError: ...)'."""
    _refused_user_data(keyed[0], alice, content, "ud.yaml")


def test_user_data_written_out_bounded(keyed: tuple[Host, list[str]], alice: User) -> None:
    """No aliases, yet 64 KB of nested flow mappings were written out as 3.9 MB
    of block YAML (indentation grows with depth; 60 deep: 780 KB)."""
    one = "{a: " * 60 + "1" + "}" * 60
    text = "#cloud-config\n" + "".join(f"k{i}: {one}\n" for i in range(65000 // (len(one) + 6)))
    _refused_user_data(keyed[0], alice, text.encode(), "written out")


def test_user_data_deep_nesting_refused(keyed: tuple[Host, list[str]], alice: User) -> None:
    """30000 nested flow sequences: 8 s of libyaml, then a refusal that did
    not name the file."""
    took = _refused_user_data(keyed[0], alice,
                              b"#cloud-config\nx: " + b"[" * 30000 + b"]" * 30000 + b"\n", "nested")
    assert took < 4, took


# ---- connect on user-mode networking ---------------------------------------------------

def _time_wait_on(port: int) -> None:
    """A TCP connection to 127.0.0.1:*port*, closed by its client: its row
    (client -> port) stays in /proc/net/tcp as TIME_WAIT for a minute."""
    import socket
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("127.0.0.1", port))
    lst.listen(1)
    cli = socket.create_connection(("127.0.0.1", port))
    srv, _ = lst.accept()
    lst.close()
    cli.close()
    srv.close()


def _start_user_mode_vm(host: Host, alice: User, guest: Path, name: str) -> int:
    """Make and start alice's VM *name* on user-mode networking (the test
    guest, its address set on the kernel command line); return its QEMU's pid."""
    host.create_vm(name, alice, "-m", "128", "-net", "nic,model=virtio", "-net", "user",
                   guest=guest)
    r = alice.ssh_command(f"start {name} -kernel vmlinuz -initrd initrd.img "
                          "-append 'console=ttyS0 kvmshell.ip=10.0.2.15/24'")
    assert r.returncode == 0, r.stderr
    return alice.qemu_pids()[0]


def test_connect_forward_only_on_an_unused_port(host: Host, alice: User, bob: User,
                                                guest: Path) -> None:
    """The intruder check leaves out the (local, remote) pairs that were on
    the forward's port before (an earlier connection's TIME_WAIT).  bob,
    another local user, can make such pairs on any port beforehand, then
    come through the forward from the same client port (the kernel reuses
    a TIME_WAIT 4-tuple on loopback, net.ipv4.tcp_tw_reuse) and close
    before the check: unseen, unlogged.  So no forward may be made on a
    port with any socket on it.  The port choice is steered (randbelow);
    QEMU, slirp and the sockets are real."""
    from kvmshell.shell import connect
    from kvmshell.shell.monitor import Session

    busy = 20000 + 4321
    # Ports without even a TIME_WAIT (an earlier run's connection leaves one).
    # More than one: under load QEMU may reset a connection before its accept,
    # and connect then tries a new forward (FWD_TRIES); each try takes a pick.
    free = [p for p in range(busy + 1, busy + 200) if not connect.port_rows(p)]
    assert len(free) >= connect.FWD_TRIES
    qpid = _start_user_mode_vm(host, alice, guest, "cw")
    try:
        for user, job in ((bob, lambda: _time_wait_on(busy)), (alice, None)):
            child = os.fork()
            if child == 0:
                code = 1
                try:
                    os.setgid(user.gid)
                    os.setuid(user.uid)
                    if job is not None:
                        job()
                        code = 0
                    else:   # as connect runs, as alice
                        assert connect.port_rows(busy), "bob's TIME_WAIT is gone"
                        vm = type("V", (), {"name": "cw", "path": str(host.vm_path("cw"))})()
                        qmp = Session(vm)   # type: ignore[arg-type]
                        picks = iter([busy - 20000] + [p - 20000 for p in free])
                        try:
                            sock = connect._through_forward(
                                vm, qpid, "net0", 22, qmp,  # type: ignore[arg-type]
                                lambda n: next(picks))
                        finally:
                            qmp.close()
                        code = 0 if sock.getpeername()[1] in free else 3
                        sock.close()
                except BaseException:
                    import traceback
                    traceback.print_exc()
                    raise
                finally:
                    os._exit(code)
            _, status = os.waitpid(child, 0)
            assert os.waitstatus_to_exitcode(status) == 0, (user.name, status)
    finally:
        alice.ssh_command("kill cw")


# ---- connect on a tap: the admin's guest= address ---------------------------------------

@pytest.mark.parametrize("addr", ["::ffff:127.0.0.1", "::ffff:0.0.0.0", "::ffff:10.79.0.1",
                                  "255.255.255.255"])
def test_guest_address_spellings_refused(addr: str) -> None:
    """IPv4-mapped IPv6 spellings passed the loopback and unspecified checks
    (Python 3.11's ipaddress looks at the IPv6 value), and connect bound to
    a bridge reached the host itself through them: ::ffff:0.0.0.0 connected
    to a wildcard listener of the host's."""
    from kvmshell.common import adminopts
    from kvmshell.common.errors import RefusedOption
    for cidr in (None, "10.79.0.1/24"):
        with pytest.raises(RefusedOption, match="guest"):
            adminopts.check_guest_addr(addr, cidr)


TAP_PROBE = r"""
import socket, sys
sys.path.insert(0, sys.argv[1])
from kvmshell.common.errors import RuntimeFailure
from kvmshell.shell import connect
lst = socket.socket()
lst.bind(("10.66.0.1", 2223))
lst.listen(5)
lst.setblocking(False)
try:
    connect.tap_connect("10.66.0.1", "kvtbrA", 2223)
    print("connected")
except RuntimeFailure as exc:
    print(exc.message)
try:
    lst.accept()
    print("the host's service saw a connection")
except BlockingIOError:
    pass
"""


def test_tap_connect_never_reaches_the_host_itself() -> None:
    """guest= on a bridged tap is not checked against the bridge's own
    address (the parser cannot know it): connect, bound to the bridge,
    reached any service of the host listening there.  A netns of the
    test's own, with a real bridge."""
    from conftest import REPO
    ns = "kvt-a12"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (["link", "set", "lo", "up"], ["link", "add", "kvtbrA", "type", "bridge"],
                    ["link", "set", "kvtbrA", "up"],
                    ["addr", "add", "10.66.0.1/24", "dev", "kvtbrA"]):
            subprocess.run(["ip", "-n", ns, *cmd], check=True)
        r = subprocess.run(["ip", "netns", "exec", ns, "/usr/bin/python3", "-I", "-c", TAP_PROBE,
                            str(REPO)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "10.66.0.1" in r.stdout and "host's own address" in r.stdout, r.stdout
        assert "saw a connection" not in r.stdout
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)


# ---- kvmshell-ssh-config ----------------------------------------------------------------

@pytest.mark.parametrize("target", ["-Jevil.example", "-vvv", "alice@", "@lab", "a@b@c"])
def test_ssh_config_target_refused(target: str) -> None:
    """USER@HOST starting with '-' became an option of the ProxyCommand's
    ssh (-Jevil.example: a ProxyJump through another machine, 'connect' as
    the host name); an empty user or host or two '@' are no USER@HOST."""
    from conftest import REPO
    r = subprocess.run([str(REPO / "bin" / "kvmshell-ssh-config"), target, "myvm"],
                       capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (2, ""), r
    assert target in r.stderr


def _in_child_as(user: User, body: "Callable[[int], int]") -> tuple[int, int]:
    """Fork a child that drops to *user* and exits with body(w) (1, the
    traceback printed, if it raises), *w* the write end of a pipe; return
    the child's pid and the read end.  A child, since a QMP session moves
    into the VM directory."""
    rfd, wfd = os.pipe()
    child = os.fork()
    if child == 0:
        code = 1
        try:
            os.close(rfd)
            os.setgid(user.gid)
            os.setuid(user.uid)
            code = body(wfd)
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(wfd)
    return child, rfd


def _session_of(host: Host, name: str) -> "tuple[object, Session]":
    from kvmshell.shell.monitor import Session
    vm = type("V", (), {"name": name, "path": str(host.vm_path(name))})()
    return vm, Session(vm)   # type: ignore[arg-type]


def _usernet(qmp: "Session") -> str:
    """QEMU's ``info usernet`` (the session is closed after it)."""
    qmp.send("human-monitor-command", {"command-line": "info usernet"})
    try:
        return str(qmp.result(time.monotonic() + 10))
    finally:
        qmp.close()


def test_a_late_forward_is_removed(host: Host, alice: User, guest: Path) -> None:
    """QEMU carries out hostfwd_add only after connect gave up waiting (QEMU
    stopped, or slow): the forward must not stay, open to every local user
    until the VM stops.  QEMU is stopped (SIGSTOP) while connect adds the
    forward, resumed after connect's wait (shortened to 1 s) ran out; the
    monitor session stays open as long as QEMU takes (the case where QEMU
    had read the command in time).  Then `info usernet` shows no forward and
    nothing listens on the port.  Real QEMU, slirp and sockets."""
    import signal
    import time

    from kvmshell.common.errors import RuntimeFailure
    from kvmshell.shell import connect

    port = next(p for p in range(24600, 24800) if not connect.port_rows(p))
    qpid = _start_user_mode_vm(host, alice, guest, "cl")

    def child(wfd: int) -> int:
        vm, qmp = _session_of(host, "cl")
        connect.CONNECT_TIMEOUT = 1.0
        connect.REMOVE_GRACE = 4.0
        os.write(wfd, b"s")             # the parent stops QEMU now
        time.sleep(0.5)
        code = 1
        try:
            connect._through_forward(vm, qpid, "net0", 22, qmp,  # type: ignore[arg-type]
                                     lambda n: port - 20000)
        except RuntimeFailure:
            code = 0
        time.sleep(4)                   # QEMU resumed meanwhile; session still open
        fwd = connect._hex_v4("127.0.0.1", port)
        listened = [row for row in connect.tcp_table() if row[0] == fwd and row[2] == "0A"]
        usernet = _usernet(qmp)
        if str(port) in usernet or listened:
            print("left behind:", usernet, listened)
            code = 4
        return code

    child_pid, rfd = _in_child_as(alice, child)
    try:
        assert os.read(rfd, 1) == b"s"
        os.kill(qpid, signal.SIGSTOP)
        time.sleep(2.5)                         # past connect's 1 s wait (from 0.5 s)
        os.kill(qpid, signal.SIGCONT)
        _, status = os.waitpid(child_pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
    finally:
        os.kill(qpid, signal.SIGCONT)
        os.close(rfd)
        alice.ssh_command("kill cl")


def test_a_late_remove_waits_only_for_answers_owed(host: Host, alice: User) -> None:
    """connect gave up after QEMU had already answered the add (the forward
    is set): the late remove must wait for the remove's answer only, not
    for a second one that never comes (it waited REMOVE_GRACE, 60 s here,
    on every such failure), and the forward must be gone.  Real QEMU and
    slirp; in a child as the user, since the session moves into the VM
    directory."""
    import time

    from kvmshell.shell import connect

    port = next(p for p in range(24800, 25000) if not connect.port_rows(p))
    host.create_vm("cr", alice, "-m", "32", "-net", "nic,model=virtio", "-net", "user")
    r = alice.ssh_command("start cr")
    assert r.returncode == 0, r.stderr

    def child(wfd: int) -> int:
        _, qmp = _session_of(host, "cr")
        connect.REMOVE_GRACE = 60.0
        hmp = "human-monitor-command"
        qmp.send(hmp, {"command-line": f"hostfwd_add net0 tcp:127.0.0.1:{port}-:22"})
        assert qmp.result(time.monotonic() + 10) == ""     # the add's answer, read
        start = time.monotonic()
        connect._remove_late(qmp, hmp, {"command-line": f"hostfwd_remove net0 tcp:127.0.0.1:{port}"},
                             port)
        took = time.monotonic() - start
        os.write(wfd, f"{took:.1f} {str(port) in _usernet(qmp)}".encode())
        return 0

    child_pid, rfd = _in_child_as(alice, child)
    try:
        _, status = os.waitpid(child_pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        took, left = os.read(rfd, 100).decode().split()
        assert left == "False", "the forward was left behind"
        assert float(took) < 30, f"waited {took} s for an answer nobody owed"
    finally:
        os.close(rfd)
        alice.ssh_command("kill cr")
