"""Network: the privileged helper, for real, inside network namespaces that
these tests create (bridges, taps and addresses never touch the host's own
namespace).  kvmshell, the helper (through a real sudo and a real sudoers
drop-in naming this session's helper copy) and QEMU all run inside the
namespace via ``ip netns exec``."""

from __future__ import annotations

import contextlib
import re
import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from conftest import (KVMSHELL, MARKER, NETHELPER, Host, User, console_log, grab_fd,
                      kill_all, sudoers_text, wait_for)
from kvmshell.common import adminopts, guestnet, vmid
from kvmshell.privileged import nethelper as helper
from kvmshell.common.errors import RefusedOption

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


@contextlib.contextmanager
def net_rig(alice: User, bob: User) -> Iterator[Net]:
    """A network namespace with bridge BRIDGE (HOST_IP/24), and a sudoers drop-in
    letting *alice* and *bob* (through a group of the rig's own) run the helper.
    Also used by tests/test_guest_tap.py."""
    tag = secrets.token_hex(3)
    ns, group = f"kvtnet{tag}", f"kvtg{tag}"
    drop_in = Path(f"/etc/sudoers.d/kvmshell-test-{tag}")
    subprocess.run(["groupadd", group], check=True)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for u in (alice, bob):
            subprocess.run(["usermod", "-aG", group, u.name], check=True)
        # Aliases are global across sudoers files: unique ones per session, so
        # that concurrent test sessions never define the same alias twice.
        text = sudoers_text(tag, group)
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
def net(alice: User, bob: User) -> Iterator[Net]:
    with net_rig(alice, bob) as n:
        yield n


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
    plan = adminopts.parse_admin(["-net", "nic", "-net", "tap,br=br0"])
    assert adminopts.admin_argv(plan, "v", [7])[3] == "tap,id=net0,fd=7"
    for bad in ("tap", "tap,br=br0,ip=10.0.0.1/24", "tap,br=" + "x" * 16, "tap,br=a/b",
                "tap,ip=10.0.0.1", "tap,ip=224.0.0.1/4", "tap,ifname=x", "tap,br=br0,br=br1",
                "tap,script=/bin/sh"):
        with pytest.raises(RefusedOption, match="-net"):
            adminopts.parse_admin(["-net", "nic", "-net", bad])
    with pytest.raises(RefusedOption, match="MAC"):
        adminopts.parse_admin(["-net", "nic,macaddr=01:00:00:00:00:01", "-net", "user"])


@pytest.mark.security
def test_tap_names_deterministic_unique_short() -> None:
    """Tap names are derived by the helper, never given: for many VM names,
    including names that share all but their last character (which any
    truncation to 15 bytes would merge), all names are distinct, at most 15
    bytes, and of a charset safe anywhere an interface name goes."""
    import string
    names = {guestnet.tap_name("/v", f"vm{i}", j) for i in range(200) for j in range(guestnet.MAX_TAPS)}
    assert len(names) == 200 * guestnet.MAX_TAPS
    vm_names = [f"{'x' * 31}{c}" for c in vmid._NAME_REST] \
        + [f"collide-under-truncation-{i:07d}" for i in range(2000)]
    assert all(len(n) <= vmid.NAME_MAX for n in vm_names)
    many = {guestnet.tap_name(d, n, j) for d in ("/v", "/var/lib/kvmshell/vms")
            for n in vm_names for j in (0, guestnet.MAX_TAPS - 1)}
    assert len(many) == 2 * len(vm_names) * 2
    safe = set(string.ascii_lowercase + string.digits)
    for n in names | many:
        assert 1 <= len(n.encode()) <= 15 and n.startswith("kvs") and set(n) <= safe, n
    assert guestnet.tap_name("/v", "a", 0) == guestnet.tap_name("/v", "a", 0) != guestnet.tap_name("/w", "a", 0)


@pytest.mark.parametrize("words", [
    ["-net", "nic", "-net", "tap,br=br0"],
    ["-net", "tap,br=br0", "-net", "nic,macaddr=52:54:00:aa:bb:cc"],
    ["-net", "nic,macaddr=02:00:00:00:00:01", "-net", "user", "-net", "nic",
     "-net", "tap,br=br0"],
    ["-net", "nic,model=virtio", "-net", "nic,macaddr=0A:0B:0C:0D:0E:0F,model=e1000",
     "-net", "tap,ip=10.9.0.1/24", "-net", "tap,br=br1"],
    ["-net", "user", "-net", "socket,listen=127.0.0.1:1234", "-net", "tap,br=br0",
     "-net", "nic", "-net", "nic", "-net", "nic,macaddr=52:54:00:00:00:09"],
], ids=["one", "nic-after", "third-backend", "second-tap", "after-others"])
def test_helper_locks_the_mac_qemu_gives_the_nic(words: list[str]) -> None:
    """The helper re-derives, from the admin's words alone, the MAC that
    adminopts.admin_argv gives the NIC paired with each tap: the MAC it locks
    the bridge port to is the guest's own."""
    argv = adminopts.admin_argv(adminopts.parse_admin(words), "vm", [90, 91])
    by_fd = {}
    for i, word in enumerate(argv):
        m = re.search(r"tap,id=(net\d+),fd=(\d+)", word)
        if m:
            dev = next(a for a in argv if f"netdev={m.group(1)}," in a)
            by_fd[int(m.group(2))] = re.search(r"mac=([0-9a-f:]+)", dev).group(1)  # type: ignore[union-attr]
    taps = helper.taps_of("/v", "vm", words)
    assert [":".join(f"{b:02x}" for b in t.mac) for t in taps] == [by_fd[fd] for fd in sorted(by_fd)]


def test_admin_refuses_bad_network(host: Host, alice: User) -> None:
    for bad in ("tap,br=no/slash", "nic,macaddr=zz:00:00:00:00:00", "tap,ip=300.1.1.1/24"):
        r = host.kvmadm("create", "badnet", "--owner", alice.name, "--", "-net", "nic",
                        "-net", bad, check=False)
        assert r.returncode == 2 and r.stderr.startswith("kvmadm: -net"), r.stderr
    assert not (host.vmdir / "badnet").exists()


# ---- refusals: security-cases.md section 4, one test id per case -------------

LIBC = "/lib/x86_64-linux-gnu/libc.so.6"  # a real library: LD_PRELOAD of it is silent


def assert_helper_refused(net: Net, tree: Host, users: tuple[User, ...],
                          run: "Callable[[], subprocess.CompletedProcess[str]]",
                          token: str, status: int | None = 2) -> str:
    """Run one refused helper call and check: non-zero exit (*status* when
    given; None for sudo's own refusals, which exit 1), one line on stderr
    naming *token*, no traceback, no QEMU of any test user, the namespace's
    links and addresses unchanged, and the VM tree byte-for-byte the same."""
    before = (net.links(), net.addrs(), tree.snapshot())
    r = run()
    assert r.returncode != 0, r
    if status is not None:
        assert r.returncode == status, r
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert token in r.stderr, (token, r.stderr)
    assert (r.stdout or "") == ""
    for u in users:
        assert u.qemu_pids() == [], u.name
    assert (net.links(), net.addrs(), tree.snapshot()) == before
    return r.stderr


def _sudo_as(user: str, *args: str, sudo: tuple[str, ...] = ("/usr/bin/sudo", "-n", "--"),
             env: dict[str, str] | None = None) -> Any:
    return ("sudo", user, args, sudo, env or {})


def _root(env: dict[str, str], *args: str) -> Any:
    """As root in the namespace, with *env* exactly: what sudo would hand the
    helper, forged (only root can run the helper without sudo at all)."""
    return ("root", None, args, (), env)


def _sudo_env(uid: str, **extra: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "SUDO_UID": uid, "SUDO_GID": uid, "SUDO_USER": "x",
            "SUDO_COMMAND": NETHELPER, **extra}


# (id, how, token, status).  "alice"/"bob" are the VM users; na is alice's, nb bob's.
HELPER_CASES: list[tuple[str, Any, str, int | None]] = [
    # arguments of the caller's choosing
    ("args-none", _sudo_as("alice"), "got 0 arguments", 2),
    ("args-one", _sudo_as("alice", "up"), "got 1 arguments", 2),
    ("args-extra", _sudo_as("alice", "up", "na", "extra"), "got 3 arguments", 2),
    ("args-ifname", _sudo_as("alice", "up", "na", "ifname=eth0"), "got 3 arguments", 2),
    ("verb-unknown", _sudo_as("alice", "frob", "na"), "unknown verb 'frob'", 2),
    ("verb-option", _sudo_as("alice", "--config=/tmp/x", "na"), "unknown verb '--config=/tmp/x'", 2),
    ("verb-case", _sudo_as("alice", "UP", "na"), "unknown verb 'UP'", 2),
    ("name-4000", _sudo_as("alice", "up", "a" * 4000), "invalid VM name (1 to 32", 2),
    ("name-33", _sudo_as("alice", "up", "a" * 33), "invalid VM name (1 to 32", 2),
    ("name-empty", _sudo_as("alice", "up", ""), "invalid VM name (1 to 32", 2),
    ("name-dotdot", _sudo_as("alice", "up", "../na"), "invalid VM name '../na'", 2),
    ("name-abs", _sudo_as("alice", "up", "/etc/passwd"), "invalid VM name '/etc/passwd'", 2),
    ("name-newline", _sudo_as("alice", "up", "na\n"), "invalid VM name 'na\\n'", 2),
    ("name-dash", _sudo_as("alice", "down", "-na"), "invalid VM name '-na'", 2),
    ("name-dot", _sudo_as("alice", "up", ".na"), "invalid VM name '.na'", 2),
    ("name-colon", _sudo_as("alice", "up", "na:0"), "invalid VM name 'na:0'", 2),
    ("name-space", _sudo_as("alice", "up", "na x"), "invalid VM name 'na x'", 2),
    ("name-nonascii", _sudo_as("alice", "up", "n\u0430"), "invalid VM name 'n\\xd0\\xb0'", 2),
    ("name-unknown", _sudo_as("alice", "up", "nosuchvm"), "no VM named 'nosuchvm'", 2),
    # a VM the caller does not own, both verbs, both ways round
    ("other-up", _sudo_as("alice", "up", "nb"), "VM 'nb' is not yours", 2),
    ("other-down", _sudo_as("alice", "down", "nb"), "VM 'nb' is not yours", 2),
    ("other-up-bob", _sudo_as("bob", "up", "na"), "VM 'na' is not yours", 2),
    ("other-down-bob", _sudo_as("bob", "down", "na"), "VM 'na' is not yours", 2),
    # environment of the caller's choosing, through sudo: sudo refuses (no SETENV)
    ("sudo-set-PYTHONPATH", _sudo_as("alice", "up", "na", sudo=("/usr/bin/sudo", "-n", "PYTHONPATH=/tmp", "--")),
     "PYTHONPATH", None),
    ("sudo-set-LD_PRELOAD", _sudo_as("alice", "up", "na", sudo=("/usr/bin/sudo", "-n", f"LD_PRELOAD={LIBC}", "--")),
     "LD_PRELOAD", None),
    ("sudo-set-SUDO_UID", _sudo_as("bob", "up", "na", sudo=("/usr/bin/sudo", "-n", "SUDO_UID=0", "--")),
     "SUDO_UID", None),
    ("sudo-set-TMPDIR", _sudo_as("alice", "up", "na", sudo=("/usr/bin/sudo", "-n", "TMPDIR=/tmp", "--")),
     "TMPDIR", None),
    ("sudo-E-PYTHONINSPECT", _sudo_as("alice", "up", "na", sudo=("/usr/bin/sudo", "-n", "-E", "--"),
                                       env={"PYTHONINSPECT": "1", "LD_PRELOAD": LIBC}),
     "preserve the environment", None),
    ("sudo-preserve-PYTHONINSPECT", _sudo_as("alice", "up", "na", sudo=("/usr/bin/sudo", "-n", "--preserve-env=PYTHONINSPECT", "--"),
                                          env={"PYTHONINSPECT": "1"}),
     "PYTHONINSPECT", None),
    # sudo drops LD_PRELOAD silently (its built-in env_delete list) instead of
    # refusing: the helper's own environment check then passes, and the only
    # refusal is the missing socket.  Shows LD_PRELOAD never reaches it.
    ("sudo-preserve-LD_PRELOAD", _sudo_as("alice", "up", "na", sudo=("/usr/bin/sudo", "-n", "--preserve-env=LD_PRELOAD", "--"),
                                          env={"LD_PRELOAD": LIBC}),
     "stdout must be a unix socket", 2),
    # no sudo at all: a user with a forged SUDO_UID is not root
    ("user-forged-SUDO_UID", ("user", "bob", ("up", "na"), (), {"SUDO_UID": "0"}),
     "must be run as root through sudo", 2),
    # root with a sudo-like environment plus one variable: the helper's own check
    ("root-LD_PRELOAD", _root(_sudo_env("A", LD_PRELOAD=LIBC), "up", "na"),
     "unexpected environment variable 'LD_PRELOAD'", 2),
    ("root-LD_LIBRARY_PATH", _root(_sudo_env("A", LD_LIBRARY_PATH="/tmp"), "up", "na"),
     "unexpected environment variable 'LD_LIBRARY_PATH'", 2),
    ("root-PYTHONPATH", _root(_sudo_env("A", PYTHONPATH="/tmp"), "up", "na"),
     "unexpected environment variable 'PYTHONPATH'", 2),
    ("root-PYTHONINSPECT", _root(_sudo_env("A", PYTHONINSPECT="1"), "up", "na"),
     "unexpected environment variable 'PYTHONINSPECT'", 2),
    ("root-PYTHONHOME", _root(_sudo_env("A", PYTHONHOME="/tmp"), "up", "na"),
     "unexpected environment variable 'PYTHONHOME'", 2),
    ("root-TMPDIR", _root(_sudo_env("A", TMPDIR="/tmp"), "up", "na"),
     "unexpected environment variable 'TMPDIR'", 2),
    ("root-BASH_ENV", _root(_sudo_env("A", BASH_ENV="/tmp/x"), "down", "na"),
     "unexpected environment variable 'BASH_ENV'", 2),
    ("root-no-SUDO_UID", _root({"PATH": "/usr/bin:/bin"}, "up", "na"), "no SUDO_UID", 2),
    ("root-SUDO_UID-junk", _root(_sudo_env("0 ; id"), "up", "na"), "no SUDO_UID", 2),
    ("root-SUDO_UID-long", _root(_sudo_env("0" * 40), "up", "na"), "no SUDO_UID", 2),
    # stdout not a socket: nowhere to send the taps, nothing created
    ("stdout-pipe", _sudo_as("alice", "up", "na"), "stdout must be a unix socket", 2),
]


@pytest.mark.security
@pytest.mark.parametrize("case, how, token, status", HELPER_CASES,
                         ids=[c[0] for c in HELPER_CASES])
def test_helper_refuses(net: Net, vms: dict[str, Path], host: Host, alice: User, bob: User,
                        case: str, how: Any, token: str, status: int | None) -> None:
    kind, who, args, sudo, env = how
    users = {"alice": alice, "bob": bob}
    if kind == "root":
        env = {k: (str(alice.uid) if v == "A" else v) for k, v in env.items()}

        def run() -> subprocess.CompletedProcess[str]:
            return subprocess.run(["ip", "netns", "exec", net.ns, NETHELPER, *args], env=env,
                                  capture_output=True, text=True, timeout=60,
                                  stdin=subprocess.DEVNULL)
    else:
        user = users[who]
        # A pipe for stdout: "up" would need kvmshell's socket to hand over taps,
        # so every refusal below happens with nothing to receive them either way.
        run = lambda: net.helper(user, *args, sudo=sudo, env=user.env(**env))  # noqa: E731
    assert_helper_refused(net, host, (alice, bob), run, token, status)
    assert not net.taps()


# ---- interface names: derived, never given; admin bridge names re-checked -------

BAD_BRIDGES = [("long", "b" * 16), ("slash", "br/0"), ("colon", "br:0"), ("space", "br 0"),
               ("tab", "br\t0"), ("newline", "br\n0"), ("dot", "."), ("dotdot", ".."),
               ("empty", ""), ("nonascii", "br\u00e9")]


@pytest.mark.security
@pytest.mark.parametrize("bridge", [b for _, b in BAD_BRIDGES], ids=[i for i, _ in BAD_BRIDGES])
def test_kvmadm_refuses_bad_bridge_name(host: Host, alice: User, bridge: str) -> None:
    before = host.snapshot()
    r = host.kvmadm("create", "badbr", "--owner", alice.name, "--", "-net", "nic",
                    "-net", f"tap,br={bridge}", check=False)
    assert r.returncode == 2 and r.stderr.startswith("kvmadm: -net"), r.stderr
    from kvmshell.common.text import printable
    # kvmadm's messages escape what is not printable ASCII (issue 18).
    assert r.stderr.count("\n") == 1 and (printable(repr(bridge), backslash=False) in r.stderr
                                           or "-net tap" in r.stderr), r.stderr
    assert host.snapshot() == before and not os.path.lexists(host.vmdir / "badbr")


@pytest.fixture(scope="module")
def badbr_tree(host: Host, alice: User) -> tuple[Host, str]:
    """A tree of its own whose VMs carry bridge names kvmadm would refuse
    (written past kvmadm, as a careless or compromised admin tool might), and
    a helper copy reading that tree's config (the helper's config path is fixed)."""
    from conftest import install_nethelper
    root = host.root / "net-badbr"
    root.mkdir(mode=0o755)
    tree = Host.__new__(Host)
    tree.root, tree.vmdir, tree.images, tree.conf = root, root / "vms", root / "img", root / "k.conf"
    tree.images.mkdir()
    tree.write_conf()
    helper_path = install_nethelper(root, tree.conf)
    import base64
    for i, (_, bridge) in enumerate(BAD_BRIDGES):
        name = f"bb{i}"
        path = tree.create_vm(name, alice, "-net", "nic", "-net", f"tap,br={BRIDGE}")
        words = ["-net", "nic", "-net", f"tap,br={bridge}"]
        payload = "\0".join([name, *words]).encode()
        dirname = f"{name}." + base64.urlsafe_b64encode(payload).decode().rstrip("=")
        os.rename(path, tree.vmdir / dirname)
        os.unlink(tree.vmdir / name)
        os.symlink(dirname, tree.vmdir / name)
    return tree, helper_path


@pytest.mark.security
@pytest.mark.parametrize("index", range(len(BAD_BRIDGES)), ids=[i for i, _ in BAD_BRIDGES])
def test_helper_rechecks_bridge_name(net: Net, badbr_tree: tuple[Host, str], alice: User,
                                     bob: User, index: int) -> None:
    tree, helper_path = badbr_tree
    bridge = BAD_BRIDGES[index][1]
    env = _sudo_env(str(alice.uid))

    def run() -> subprocess.CompletedProcess[str]:
        # As sudo would run it for alice (root, SUDO_UID): the helper's own check.
        return subprocess.run(["ip", "netns", "exec", net.ns, helper_path, "up", f"bb{index}"],
                              env=env, capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
    # A bad admin configuration is a failure (exit 1), not a user refusal.
    # Non-ASCII never decodes (the helper reads identifiers as ASCII only);
    # control characters fail the identifier's own check; the rest fail
    # kvmadm's option parser, which the helper re-runs.
    token = ("undecodable identifier" if not bridge.isascii() else
             "invalid option word" if not bridge.isprintable() else
             f"invalid bridge name {bridge!r}")
    assert_helper_refused(net, tree, (alice, bob), run, token, 1)


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
    assert net.bridge_ports(BRIDGE) == [guestnet.tap_name(str(net_vmdir(vms)), "nb", 0)]
    assert f"10.78.0.1/24@{guestnet.tap_name(str(net_vmdir(vms)), 'nb', 1)}" in net.addrs()
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


@pytest.mark.security
def test_names_colliding_under_truncation_get_distinct_taps(
        net: Net, vms: dict[str, Path], host: Host, alice: User) -> None:
    """Two VMs whose names agree in their first 31 characters (any name
    truncated to IFNAMSIZ would collide) run side by side: two distinct taps,
    both on the bridge, and both gone when their descriptors close."""
    a, b = "c" * 31 + "1", "c" * 31 + "2"
    for name in (a, b):
        host.create_vm(name, alice, "-net", "nic", "-net", f"tap,br={BRIDGE}")
    before = net.links()
    held = []
    for name in (a, b):
        p, s = _up(net, alice, name)
        msg, fds, _, _ = socket.recv_fds(s, 64, 8)
        assert p.wait() == 0 and msg == b"ok 1\n" and len(fds) == 1
        held.append((s, fds))
    want = sorted(guestnet.tap_name(str(net_vmdir(vms)), n, 0) for n in (a, b))
    assert len(set(want)) == 2
    assert net.taps() == want and net.bridge_ports(BRIDGE) == want
    for s, fds in held:
        for fd in fds:
            os.close(fd)
        s.close()
    wait_for(lambda: net.links() == before, 10, "the taps to go")


@pytest.mark.security
def test_helper_killed_half_way_leaves_nothing(net: Net, vms: dict[str, Path], host: Host,
                                               alice: User, bob: User) -> None:
    links, addrs, tree = net.links(), net.addrs(), host.snapshot()
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
    # Nothing stays behind: the namespace and the tree as before, no QEMU.
    wait_for(lambda: (net.links(), net.addrs()) == (links, addrs), 10, "the namespace as before")
    assert host.snapshot() == tree
    assert alice.qemu_pids() == [] and bob.qemu_pids() == []


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


def _bridge_json(net: Net, *args: str) -> list[dict[str, object]]:
    import json
    r = subprocess.run(["ip", "netns", "exec", net.ns, "bridge", "-j", "-d", *args],
                       capture_output=True, text=True, check=True)
    return list(json.loads(r.stdout or "[]"))


@pytest.mark.security
def test_guest_cannot_send_as_another_mac(net: Net, vms: dict[str, Path], alice: User) -> None:
    """The helper locks each bridged tap to its guest's MAC (learning off,
    locked port, one static FDB entry): the guest reaches the host with its
    own MAC, and nothing it sends with another MAC crosses the bridge."""
    _start(net, alice, "na")
    try:
        tap = guestnet.tap_name(str(net_vmdir(vms)), "na", 0)
        mac = guestnet.stable_mac("na", 0)
        (port,) = [p for p in _bridge_json(net, "link", "show", "dev", tap)]
        assert port.get("locked") is True and port.get("learning") is False, port
        # Beside the tap's own host-side address (a "permanent", local entry):
        # exactly one static entry, the guest's MAC.
        fdb = [e for e in _bridge_json(net, "fdb", "show", "dev", tap)
               if e.get("master") == BRIDGE and e.get("state") != "permanent"]
        assert [(e["mac"], e.get("state")) for e in fdb] == [(mac, "static")], fdb
        wait_for(lambda: MARKER in console_log(vms["na"]), 120, "the guest to boot")
        out = guest_run(net, alice, "na", f"ping -c 2 -W 3 {HOST_IP}")
        assert "TEST-DONE-0" in out, out
        # One ping a line, so that the console never falls quiet for long.
        pings = (f"n=0; for i in 1 2 3; do ping -c 1 -W 1 {HOST_IP} >/dev/null && n=$((n+1)); "
                 "echo try-$i; done; echo replies-$n")
        spoof = "52:54:00:de:ad:01"
        out = guest_run(net, alice, "na", f"ip link set eth0 address {spoof}; {pings}")
        assert "replies-0" in out, out
        # Nothing was learned for the spoofed address, anywhere on the bridge.
        assert spoof not in {e.get("mac") for e in _bridge_json(net, "fdb", "show")}
        out = guest_run(net, alice, "na", f"ip link set eth0 address {mac}; {pings}")
        assert re.search(r"replies-[123]", out), out
        r = net.kvmshell(alice, "kill na")
        assert r.returncode == 0, r.stderr
        _wait_stopped(net, alice)
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


@pytest.mark.security
def test_leaked_tap_is_deleted_when_qemu_exits(net: Net, vms: dict[str, Path],
                                               alice: User) -> None:
    """A tap descriptor that outlives QEMU (passed to another process) would
    keep the tap on the bridge: the supervisor sees it still there after
    QEMU's exit and has the helper delete it."""
    _start(net, alice, "na")
    stolen = -1
    try:
        (pid,) = alice.qemu_pids()
        tap = guestnet.tap_name(str(net_vmdir(vms)), "na", 0)
        fds = [int(n) for n in os.listdir(f"/proc/{pid}/fd")
               if f"iff:\t{tap}" in Path(f"/proc/{pid}/fdinfo/{n}").read_text()]
        assert len(fds) == 1, fds
        stolen = grab_fd(pid, fds[0])  # as a compromised QEMU could
        r = net.kvmshell(alice, "kill na")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: not alice.qemu_pids(), 30, "QEMU to exit")
        wait_for(lambda: not net.taps(), 20, "the leaked tap to be deleted")
        assert net.bridge_ports(BRIDGE) == []
    finally:
        if stolen >= 0:
            os.close(stolen)
        kill_all(alice)
