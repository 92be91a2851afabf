"""Network: the privileged helper, for real, inside network namespaces that
these tests create (bridges, taps and addresses never touch the host's own
namespace).  kvmshell, the helper (through a real sudo and a real sudoers
drop-in naming this session's helper copy) and QEMU all run inside the
namespace via ``ip netns exec``."""

from __future__ import annotations

import re
import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import KVMSHELL, MARKER, NETHELPER, Host, User, console_log, kill_all, wait_for
from kvmshell import helper, options
from kvmshell.errors import RefusedOption

pytestmark = pytest.mark.network

BRIDGE = "kvtbr0"
HOST_IP = "10.77.0.1"
GUEST_IP = "10.77.0.2"


# ---- rig: namespace, sudoers drop-in, users in the sudoers group ------------

class Net:
    def __init__(self, ns: str, group: str) -> None:
        self.ns = ns
        self.group = group

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "-n", self.ns, *args], capture_output=True, text=True,
                              check=check)

    # The checks read the namespace through pyroute2: a netlink implementation
    # independent of the helper's own, so the helper does not grade itself.
    def _ipr(self) -> Any:
        from pyroute2 import NetNS
        return NetNS(self.ns)

    def links(self) -> list[str]:
        with self._ipr() as ipr:
            return sorted(l.get_attr("IFLA_IFNAME") for l in ipr.get_links())

    def taps(self) -> list[str]:
        return [l for l in self.links() if l.startswith("kvs")]

    def bridge_ports(self, bridge: str) -> list[str]:
        with self._ipr() as ipr:
            (br,) = ipr.link_lookup(ifname=bridge)
            return sorted(l.get_attr("IFLA_IFNAME") for l in ipr.get_links()
                          if l.get_attr("IFLA_MASTER") == br)

    def addrs(self) -> list[str]:
        with self._ipr() as ipr:
            names = {l["index"]: l.get_attr("IFLA_IFNAME") for l in ipr.get_links()}
            return sorted(f"{a.get_attr('IFA_LOCAL') or a.get_attr('IFA_ADDRESS')}/"
                          f"{a['prefixlen']}@{names.get(a['index'])}" for a in ipr.get_addr())

    def as_user(self, user: User, *argv: str) -> list[str]:
        # --init-groups: as sshd does (initgroups), so sudo sees the group.
        return ["ip", "netns", "exec", self.ns, "setpriv", f"--reuid={user.uid}",
                f"--regid={user.gid}", "--init-groups", "--", *argv]

    def kvmshell(self, user: User, command: str,
                 timeout: float = 120) -> subprocess.CompletedProcess[str]:
        from conftest import KVMSHELL
        return subprocess.run(self.as_user(user, KVMSHELL, "--config", str(user.host.conf)),
                              env=user.env(SSH_ORIGINAL_COMMAND=command), capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def helper(self, user: User, *args: str, env: dict[str, str] | None = None,
               sudo: tuple[str, ...] = ("/usr/bin/sudo", "-n", "--"),
               stdout: int | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.as_user(user, *sudo, NETHELPER, *args),
                              env=env if env is not None else user.env(),
                              stdout=stdout if stdout is not None else subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def net(alice: User, bob: User) -> Iterator[Net]:
    tag = secrets.token_hex(3)
    ns, group = f"kvtnet{tag}", f"kvtg{tag}"
    drop_in = Path(f"/etc/sudoers.d/kvmshell-test-{tag}")
    subprocess.run(["groupadd", group], check=True)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for u in (alice, bob):
            subprocess.run(["usermod", "-aG", group, u.name], check=True)
        text = (Path(__file__).resolve().parents[1] / "sudoers.d" / "kvmshell").read_text()
        text = text.replace("/usr/local/libexec/kvmshell/kvmshell-nethelper", NETHELPER)
        text = text.replace("%kvmusers", f"%{group}")
        # Aliases are global across sudoers files: a unique one per session, so
        # that concurrent test sessions never define the same alias twice.
        text = text.replace("KVMSHELL_NETHELPER", f"KVMSHELL_NETHELPER_{tag.upper()}")
        tmp = drop_in.with_name(f".{drop_in.name}.tmp")  # sudo skips names with '.'
        tmp.write_text(text)
        os.chmod(tmp, 0o440)
        subprocess.run(["visudo", "-cf", str(tmp)], check=True, capture_output=True)
        os.rename(tmp, drop_in)
        n = Net(ns, group)
        with n._ipr() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            ipr.link("add", ifname=BRIDGE, kind="bridge")
            (br,) = ipr.link_lookup(ifname=BRIDGE)
            ipr.addr("add", index=br, address=HOST_IP, prefixlen=24)
            ipr.link("set", index=br, state="up")
        yield n
    finally:
        for u in (alice, bob):
            kill_all(u)
        drop_in.unlink(missing_ok=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["groupdel", group], capture_output=True)


@pytest.fixture(scope="module")
def vms(host: Host, alice: User, bob: User, guest: Path, net: Net) -> dict[str, Path]:
    return {
        "na": host.create_vm("na", alice, "-m", "128", "-net", "nic,model=virtio",
                             "-net", f"tap,br={BRIDGE}", guest=guest),
        "nb": host.create_vm("nb", bob, "-net", "nic", "-net", f"tap,br={BRIDGE}",
                             "-net", "nic", "-net", "tap,ip=10.78.0.1/24"),
    }


def _start(net: Net, user: User, vm: str) -> None:
    r = net.kvmshell(user, f"start {vm} -kernel vmlinuz -initrd initrd.img "
                           f"-append 'console=ttyS0 kvmshell.ip={GUEST_IP}/24'")
    assert r.returncode == 0, r.stderr


def _wait_stopped(net: Net, user: User) -> None:
    wait_for(lambda: not user.qemu_pids(), 60, "QEMU to exit")
    wait_for(lambda: not net.taps(), 20, "the taps to go")


# ---- the guest's shell, through the console verb ---------------------------------

def guest_run(net: "Net", user: User, vm: str, command: str, timeout: float = 60) -> str:
    """Run *command* in the guest's shell through the real ``console`` verb,
    in its byte-stream mode (no tty), as a script driving the console would."""
    r = subprocess.run(net.as_user(user, KVMSHELL, "--config", str(user.host.conf)),
                       env=user.env(SSH_ORIGINAL_COMMAND=f"console {vm} --no-replay --linger 3"),
                       input=f"\n{command}; echo TEST-DONE-$?\n", capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    assert re.search(r"TEST-DONE-[0-9]", r.stdout), r.stdout[-2000:]
    return r.stdout


# ---- pure parts --------------------------------------------------------------

def test_tap_options_validated() -> None:
    plan = options.parse_admin(["-net", "nic", "-net", "tap,br=br0"])
    assert options.admin_argv(plan, "v", [7])[3] == "tap,id=net0,fd=7"
    for bad in ("tap", "tap,br=br0,ip=10.0.0.1/24", "tap,br=" + "x" * 16, "tap,br=a/b",
                "tap,ip=10.0.0.1", "tap,ip=224.0.0.1/4", "tap,ifname=x", "tap,br=br0,br=br1",
                "tap,script=/bin/sh"):
        with pytest.raises(RefusedOption, match="-net"):
            options.parse_admin(["-net", "nic", "-net", bad])
    with pytest.raises(RefusedOption, match="MAC"):
        options.parse_admin(["-net", "nic,macaddr=01:00:00:00:00:01", "-net", "user"])


def test_tap_names_deterministic_unique_short() -> None:
    names = {helper.tap_name("/v", f"vm{i}", j) for i in range(200) for j in range(helper.MAX_TAPS)}
    assert len(names) == 200 * helper.MAX_TAPS
    assert all(len(n.encode()) <= 15 for n in names)
    assert helper.tap_name("/v", "a", 0) == helper.tap_name("/v", "a", 0) != helper.tap_name("/w", "a", 0)


def test_admin_refuses_bad_network(host: Host, alice: User) -> None:
    for bad in ("tap,br=no/slash", "nic,macaddr=zz:00:00:00:00:00", "tap,ip=300.1.1.1/24"):
        r = host.kvmadm("create", "badnet", "--owner", alice.name, "--", "-net", "nic",
                        "-net", bad, check=False)
        assert r.returncode == 2 and r.stderr.startswith("kvmadm: -net"), r.stderr
    assert not (host.vmdir / "badnet").exists()


# ---- refusals ------------------------------------------------------------------

def test_refuses_other_users_vm(net: Net, vms: dict[str, Path], alice: User, bob: User) -> None:
    before = (net.links(), net.addrs())
    for user, other in ((alice, "nb"), (bob, "na")):
        for verb in ("up", "down"):
            r = net.helper(user, verb, other)
            assert r.returncode == 2, r
            assert r.stderr.strip() == f"kvmshell-nethelper: VM {other!r} is not yours"
            assert r.stderr.count("\n") == 1
    assert (net.links(), net.addrs()) == before


@pytest.mark.parametrize("args, why", [
    (("up", "na", "extra"), "usage"),
    (("up",), "usage"),
    (("frob", "na"), "unknown verb"),
    (("up", "a" * 4000), "invalid VM name"),
    (("up", "a" * 33), "invalid VM name"),
    (("up", "../na"), "invalid VM name"),
    (("up", "na\n"), "invalid VM name"),
    (("down", "-na"), "invalid VM name"),
])
def test_refuses_bad_arguments(net: Net, vms: dict[str, Path], alice: User,
                               args: tuple[str, ...], why: str) -> None:
    r = net.helper(alice, *args)
    assert r.returncode == 2 and why in r.stderr and r.stderr.count("\n") == 1, r
    assert not net.taps()


def test_refuses_extra_environment(net: Net, vms: dict[str, Path], alice: User) -> None:
    # Through sudo: sudo itself will not pass it (no SETENV in the drop-in).
    r = net.helper(alice, "up", "na", sudo=("/usr/bin/sudo", "-n", "PYTHONPATH=/tmp"))
    assert r.returncode != 0 and "PYTHONPATH" in r.stderr, r
    r = net.helper(alice, "up", "na", sudo=("/usr/bin/sudo", "-n", "-E", "--"),
                   env=alice.env(PYTHONINSPECT="1"))
    assert r.returncode != 0, r
    # As root with a forged sudo environment plus one more variable: the
    # helper's own check.
    env = {"SUDO_UID": str(alice.uid), "PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": "/tmp"}
    r = subprocess.run(["ip", "netns", "exec", net.ns, NETHELPER, "up", "na"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unexpected environment variable 'LD_LIBRARY_PATH'" in r.stderr, r
    assert not net.taps()


def test_refuses_without_sudo(net: Net, vms: dict[str, Path], alice: User) -> None:
    r = net.helper(alice, "up", "na", sudo=())
    assert r.returncode == 2 and "through sudo" in r.stderr, r
    env = {"PATH": "/usr/bin:/bin"}  # root, but no SUDO_UID
    r = subprocess.run([NETHELPER, "up", "na"], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "through sudo" in r.stderr, r


def test_up_needs_a_socket_and_leaves_nothing(net: Net, vms: dict[str, Path], alice: User) -> None:
    r = net.helper(alice, "up", "na")  # stdout is a pipe: nowhere to send the taps
    assert r.returncode == 2 and "unix socket" in r.stderr, r
    assert not net.taps()


# ---- up/down directly: fds, idempotence, helper killed half way ---------------

def _up(net: Net, user: User, vm: str) -> tuple[subprocess.Popen[bytes], socket.socket]:
    mine, theirs = socket.socketpair()
    p = subprocess.Popen(net.as_user(user, "/usr/bin/sudo", "-n", "--", NETHELPER, "up", vm),
                         stdout=theirs.fileno(), stderr=subprocess.PIPE, env=user.env(),
                         stdin=subprocess.DEVNULL)
    theirs.close()
    return p, mine


def test_up_down_direct_idempotent(net: Net, vms: dict[str, Path], bob: User) -> None:
    p, s = _up(net, bob, "nb")
    msg, fds, _, _ = socket.recv_fds(s, 64, 8)
    assert p.wait() == 0 and msg == b"ok 2\n" and len(fds) == 2
    taps = net.taps()
    assert len(taps) == 2
    assert net.bridge_ports(BRIDGE) == [helper.tap_name(str(net_vmdir(vms)), "nb", 0)]
    assert f"10.78.0.1/24@{helper.tap_name(str(net_vmdir(vms)), 'nb', 1)}" in net.addrs()
    # up again while the first run's taps are held open: replaced, not doubled.
    p2, s2 = _up(net, bob, "nb")
    msg2, fds2, _, _ = socket.recv_fds(s2, 64, 8)
    assert p2.wait() == 0 and msg2 == b"ok 2\n" and net.taps() == taps
    r = net.helper(bob, "down", "nb")
    assert r.returncode == 0, r.stderr
    assert not net.taps() and not any("10.78." in a for a in net.addrs())
    for fd in fds + fds2:
        os.close(fd)
    s.close()
    s2.close()
    r = net.helper(bob, "down", "nb")  # nothing left: still fine
    assert r.returncode == 0 and not net.taps()


def net_vmdir(vms: dict[str, Path]) -> Path:
    return vms["na"].parent


def test_helper_killed_half_way_leaves_nothing(net: Net, vms: dict[str, Path], bob: User) -> None:
    t = time.monotonic()
    p, s = _up(net, bob, "nb")
    _, fds, _, _ = socket.recv_fds(s, 64, 8)
    p.wait()
    s.close()
    for fd in fds:
        os.close(fd)
    wait_for(lambda: not net.taps(), 10, "taps to go with their last descriptor")
    span = time.monotonic() - t
    for i in range(12):
        p, s = _up(net, bob, "nb")
        time.sleep(span * i / 12)
        # sudo's child is the helper; kill both, whatever they are doing.
        subprocess.run(["pkill", "-KILL", "-P", str(p.pid)], capture_output=True)
        p.kill()
        p.wait()
        s.close()
        # A helper that sudo forked just as we killed it may still finish its
        # run: what counts is that nothing stays behind once it is gone.
        wait_for(lambda: not net.taps() and not any("10.78." in a for a in net.addrs()),
                 10, f"no taps or addresses after a kill at {i}/12")
    # and the next up works
    p, s = _up(net, bob, "nb")
    msg, fds, _, _ = socket.recv_fds(s, 64, 8)
    assert p.wait() == 0 and len(fds) == 2
    for fd in fds:
        os.close(fd)
    s.close()
    wait_for(lambda: not net.taps(), 10, "taps to go")


# ---- a real guest ----------------------------------------------------------------

def test_ping_both_ways_and_power_off(net: Net, vms: dict[str, Path], alice: User) -> None:
    _start(net, alice, "na")
    try:
        wait_for(lambda: MARKER in console_log(vms["na"]), 120, "the guest to boot")
        assert len(net.taps()) == 1
        r = subprocess.run(["ip", "netns", "exec", net.ns, "ping", "-c", "3", "-W", "5", GUEST_IP],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        out = guest_run(net, alice, "na", f"ping -c 3 -W 5 {HOST_IP}")
        assert "TEST-DONE-0" in out and "3 packets received" in out, out
        # Power off from inside the guest: QEMU exits, the taps go.
        r = net.kvmshell(alice, "stop na")
        assert r.returncode == 0, r.stderr
        _wait_stopped(net, alice)
        assert not any(GUEST_IP in a for a in net.addrs())
    finally:
        kill_all(alice)


def test_kill9_qemu_then_start_again(net: Net, vms: dict[str, Path], alice: User) -> None:
    _start(net, alice, "na")
    try:
        assert len(net.taps()) == 1
        for pid in alice.qemu_pids():
            os.kill(pid, signal.SIGKILL)
        _wait_stopped(net, alice)
        wait_for(lambda: net.kvmshell(alice, "status na --json").stdout.find('"stopped"') >= 0,
                 30, "status stopped")
        _start(net, alice, "na")  # the next start works
        assert len(net.taps()) == 1
        r = net.kvmshell(alice, "kill na")
        assert r.returncode == 0, r.stderr
        _wait_stopped(net, alice)
    finally:
        kill_all(alice)
