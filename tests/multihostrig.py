"""Several simulated hosts on this one machine, for the multihost suite and
bench/bench_multihost.py.

Each host is a set of fresh namespaces: network, mount, UTS and PID
(``unshare``), held open by a tiny init process (a reaper; killing it kills
every process of the host, as a power cut would).  Each has

* its own hostname (UTS), so kvmshell's ``host_name`` default is the host's;
* an address on a test bridge (``eth0`` in the host, the other end of a
  veth pair on ``br0`` in a switch namespace of the rig's own);
* its own sshd on port 22 of its address, with the shipped drop-in
  (tests/sshrig.py's careless main config around it);
* its own munged (MUNGE's daemon, the real one, as the ``munge`` user), with
  the one key the rig made; its socket, pid file and seed are the host's own,
  because /run/munge is a bind mount of a directory of the host's in its
  mount namespace (the default socket path, as clients use it);
* the same VM tree: nothing to mount, the test's tree is one directory of
  the machine's filesystem, seen alike in every mount namespace (the issue:
  this kernel has no NFS).  Locks on it are the kernel's own, shared by all
  hosts, as an NFSv4 server's are.

``stop()`` kills the inits (and with them each host's sshd, munged and
everything else), removes the rig's directory and checks that nothing is
left: no process, no interface, no mount point.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from sshrig import CARELESS_MAIN, dropin_text

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Iterator
# The test suite's own install of this checkout (conftest.install_checkout),
# its tree and user helpers: the rig's cluster is the suite's, and the
# benchmark's (bench/bench_multihost.py) is the same.
from conftest import (KVMSHELL, REPO, Host, User, _drop_user,  # noqa: E402
                      config_place, kill_all, wait_for)

NAMES = ("hosta", "hostb", "hostc")
SUBNET = "10.77.0"
MUNGE_RUN = "/run/munge"      # where libmunge and munge(1) find the socket
RELAY_RUN = "/run/kvmshell-relay"   # relayclient.MUX_DIR

# The host's init: pid 1 of its PID namespace; reaps, and lives until killed.
_INIT = r"""
import os, signal, socket, subprocess, sys
socket.sethostname(sys.argv[1])
subprocess.run(["mount", "--make-rprivate", "/"], check=True)
subprocess.run(["mount", "--bind", sys.argv[2], sys.argv[3]], check=True)
subprocess.run(["mount", "--bind", sys.argv[4], "/etc/hosts"], check=True)
subprocess.run(["mount", "--bind", sys.argv[5], sys.argv[6]], check=True)
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
os.write(1, b"ready\n")
os.close(1)
signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
while True:
    try:
        os.wait()
    except ChildProcessError:
        signal.pause()
"""


def _child_of(pid: int, timeout: float = 10) -> int:
    """The one child of *pid* (unshare --fork's child: the namespace's init)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except FileNotFoundError:
            break
        if kids:
            return int(kids[0])
        time.sleep(0.02)
    raise RuntimeError(f"unshare {pid} has no child")


def _replaced(text: str, replace: dict[str, str]) -> str:
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


class SimHost:
    """One simulated host: name, address, init pid (in the machine's
    namespace), and its daemons' directories."""

    def __init__(self, rig: "Rig", index: int, name: str) -> None:
        self.rig, self.index, self.name = rig, index, name
        self.address = f"{SUBNET}.{index + 1}"
        self.dir = rig.dir / "hosts" / name
        self.dir.mkdir(parents=True, mode=0o755)
        self.munge_run = self.dir / "munge-run"
        self.munge_lib = self.dir / "munge-lib"
        for d, mode in ((self.munge_run, 0o755), (self.munge_lib, 0o700)):
            d.mkdir(mode=mode)
            os.chown(d, rig.munge_uid, rig.munge_gid)
        # The relay client's shared connections (tmpfiles.d/kvmshell.conf
        # makes /run/kvmshell-relay on a real host); chowned to the relay
        # account once it exists.
        self.relay_run = self.dir / "relay-run"
        self.relay_run.mkdir(mode=0o700)
        # /etc/hosts of its own, as a real host has: its name resolves
        # (sudo insists), and so do the others'.
        etc_hosts = self.dir / "etc-hosts"
        etc_hosts.write_text(f"127.0.0.1 localhost\n127.0.1.1 {name}\n")
        os.chmod(etc_hosts, 0o644)
        self.unshare = subprocess.Popen(
            ["unshare", "--net", "--mount", "--uts", "--pid", "--fork", "--mount-proc",
             "--propagation", "private", "/usr/bin/python3", "-I", "-c", _INIT,
             name, str(self.munge_run), MUNGE_RUN, str(etc_hosts),
             str(self.relay_run), RELAY_RUN],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert self.unshare.stdout is not None
        if self.unshare.stdout.readline() != b"ready\n":
            raise RuntimeError(f"host {name} did not come up")
        self.init = _child_of(self.unshare.pid)
        self.sshd: subprocess.Popen[bytes] | None = None
        self.host_key = self.dir / "host_ed25519_key"

    # -- running things on the host ------------------------------------------

    def nsenter(self, *argv: str, net_only: bool = False) -> list[str]:
        """argv that runs *argv* on this host (all its namespaces), or only in
        its network namespace (*net_only*: a client on this host's network
        that sees the machine's files, e.g. the user's own ssh)."""
        spaces = ["-n"] if net_only else ["-n", "-m", "-u", "-p"]
        return ["nsenter", "-t", str(self.init), *spaces, "--", *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 60,
            **kw: object) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(self.nsenter(*argv), capture_output=True, text=True,
                           timeout=timeout, **kw)  # type: ignore[call-overload]
        if check and r.returncode:
            raise RuntimeError(f"{self.name}: {argv}: {r.stderr}")
        return r  # type: ignore[no-any-return]

    def pids(self) -> list[int]:
        """Every process of this host (its PID namespace), as machine pids."""
        try:
            ns = os.readlink(f"/proc/{self.init}/ns/pid")
        except OSError:
            return []
        out = []
        for p in os.listdir("/proc"):
            if p.isdigit():
                try:
                    if os.readlink(f"/proc/{p}/ns/pid") == ns:
                        out.append(int(p))
                except OSError:
                    pass
        return out

    def alive(self) -> bool:
        return self.unshare.poll() is None

    def kill(self) -> None:
        """Host death: SIGKILL to the init kills every process of the host
        (the kernel's rule for a PID namespace)."""
        try:
            os.kill(self.init, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.unshare.wait(10)
        deadline = time.monotonic() + 10
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)

    # -- daemons --------------------------------------------------------------

    def start_munged(self) -> None:
        self.run("setpriv", f"--reuid={self.rig.munge_uid}", f"--regid={self.rig.munge_gid}",
                 "--clear-groups", "--", "/usr/sbin/munged",
                 f"--key-file={self.rig.munge_key}",
                 f"--log-file={self.munge_lib}/munged.log",
                 f"--seed-file={self.munge_lib}/munged.seed",
                 f"--pid-file={MUNGE_RUN}/munged.pid")

    def start_sshd(self, kvmshell_line: str, group: str, keys_dir: str,
                   replace: dict[str, str] | None = None) -> None:
        """sshd on port 22 of this host's address, with the shipped drop-in
        (its paths, group and, by *replace*, anything else changed)."""
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", self.name,
                        "-f", str(self.host_key)], check=True)
        (self.dir / "sshd_config.d").mkdir(exist_ok=True)
        (self.dir / "sshd_config.d" / "kvmshell.conf").write_text(
            _replaced(dropin_text(kvmshell_line, keys_dir, group), replace or {}))
        config = self.dir / "sshd_config"
        main = CARELESS_MAIN.format(port=22, rig=self.dir, loglevel="VERBOSE")
        main = main.replace("ListenAddress 127.0.0.1", f"ListenAddress {self.address}")
        config.write_text(f"Include {self.dir}/sshd_config.d/*.conf\n" + main)
        self.run("/usr/sbin/sshd", "-t", "-f", str(config))
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.sshd = subprocess.Popen(self.nsenter("/usr/sbin/sshd", "-D", "-e", "-f", str(config)),
                                     stdout=subprocess.DEVNULL,
                                     stderr=open(self.dir / "sshd.log", "wb"))

    def wait_sshd(self) -> None:
        deadline = time.monotonic() + 20
        while self.run("python3", "-I", "-c",
                       f"import socket; socket.create_connection(('{self.address}', 22), 1)",
                       check=False).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: sshd did not start: "
                                   + (self.dir / "sshd.log").read_text())
            time.sleep(0.1)


class Rig:
    """*names*: the hosts, in order; their addresses are SUBNET.1, .2, ...

    ``hosts_text`` is the host list (``NAME ADDRESS`` lines) for the
    kvmshell config's ``hosts_file``; ``known_hosts`` the relay's known_hosts
    text (every host's key, by address)."""

    def __init__(self, names: tuple[str, ...], parent: Path) -> None:
        self.tag = secrets.token_hex(3)
        self.dir = Path(tempfile.mkdtemp(prefix="kvmshell-mh-", dir=parent))
        os.chmod(self.dir, 0o755)
        pw = pwd.getpwnam("munge")
        self.munge_uid, self.munge_gid = pw.pw_uid, pw.pw_gid
        self.hosts: list[SimHost] = []
        self.switch: subprocess.Popen[bytes] | None = None
        self.links: list[str] = []
        self.made_dirs: list[str] = []
        try:
            self._start(names)
        except BaseException:
            self.stop()
            raise

    def _start(self, names: tuple[str, ...]) -> None:
        # One MUNGE key for the whole "cluster", as the admin distributes it.
        keydir = self.dir / "munge-key"
        keydir.mkdir(mode=0o700)
        self.munge_key = keydir / "munge.key"
        self.munge_key.write_bytes(os.urandom(1024))
        os.chmod(self.munge_key, 0o400)
        for p in (keydir, self.munge_key):
            os.chown(p, self.munge_uid, self.munge_gid)

        for d in (MUNGE_RUN, RELAY_RUN):     # mount points of each host's own
            if not os.path.isdir(d):
                os.makedirs(d, mode=0o755)
                self.made_dirs.append(d)
        # The switch: a network namespace with the bridge.
        self.switch = subprocess.Popen(
            ["unshare", "--net", "/usr/bin/python3", "-I", "-c",
             "import signal, os; os.write(1, b'ready\\n'); os.close(1); signal.pause()"],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert self.switch.stdout is not None
        self.switch.stdout.readline()
        sw = str(self.switch.pid)

        def in_switch(*argv: str) -> None:
            subprocess.run(["nsenter", "-t", sw, "-n", "--", *argv], check=True)

        in_switch("ip", "link", "add", "br0", "type", "bridge")
        in_switch("ip", "link", "set", "br0", "up")
        in_switch("ip", "link", "set", "lo", "up")
        for i, name in enumerate(names):
            h = SimHost(self, i, name)
            self.hosts.append(h)
            link = f"mh{self.tag}{i}"
            self.links.append(link)
            subprocess.run(["ip", "link", "add", link, "type", "veth", "peer", "name", "eth0",
                            "netns", str(h.init)], check=True)
            subprocess.run(["ip", "link", "set", link, "netns", sw], check=True)
            in_switch("ip", "link", "set", link, "master", "br0")
            in_switch("ip", "link", "set", link, "up")
            h.run("ip", "addr", "add", f"{h.address}/24", "dev", "eth0")
            h.run("ip", "link", "set", "eth0", "up")
            h.start_munged()

    def host(self, name: str) -> SimHost:
        return next(h for h in self.hosts if h.name == name)

    @property
    def hosts_text(self) -> str:
        return "".join(f"{h.name} {h.address}\n" for h in self.hosts)

    @property
    def known_hosts(self) -> str:
        out = []
        for h in self.hosts:
            kind, key = Path(str(h.host_key) + ".pub").read_text().split()[:2]
            out.append(f"{h.address} {kind} {key}\n")
        return "".join(out)

    def stop(self) -> list[str]:
        """Kill every host and the switch, remove the rig's files; return
        what was left behind (empty: nothing)."""
        for h in self.hosts:
            if h.alive():
                h.kill()
        if self.switch is not None and self.switch.poll() is None:
            self.switch.kill()
            self.switch.wait(10)
        left = []
        for h in self.hosts:
            if h.pids():
                left.append(f"processes of {h.name}: {h.pids()}")
        names = {n for _, n in socket.if_nameindex()}
        left += [f"interface {link}" for link in self.links if link in names]
        mounts = Path("/proc/self/mountinfo").read_text()
        if str(self.dir) in mounts:
            left.append(f"a mount below {self.dir}")
        for d in self.made_dirs:
            try:
                os.rmdir(d)
            except OSError as exc:
                left.append(f"{d}: {exc.strerror}")
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.dir.exists():
            left.append(f"{self.dir}")
        return left


# ---- the cluster: rig + shared tree + users ---------------------------------

def _relay_setup(root: Path, tag: str, group: str, rig: Rig, tree: Host,
                 users: list[str]) -> str:
    """The relay account, its key (readable by it alone) and the key's
    forced-command line, the relay stubs, the sudoers drop-in (the shipped
    one with this session's paths, group, account and aliases), and the
    config's multihost settings.  Returns the account's name."""
    import re
    from conftest import _ROOT
    from kvmshell.admin.install import install_relay
    relay = f"kvt{secrets.token_hex(3)}r"
    subprocess.run(["useradd", "-M", "-N", "-d", "/", "-s", "/bin/sh", relay], check=True)
    users.append(relay)
    pw = pwd.getpwnam(relay)
    rdir = root / "relay"
    rdir.mkdir(mode=0o755)
    keydir = rdir / "key"
    keydir.mkdir(mode=0o700)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "kvmrelay",
                    "-f", str(keydir / "id_ed25519")], check=True)
    for p in (keydir, keydir / "id_ed25519", *(h.relay_run for h in rig.hosts)):
        os.chown(p, pw.pw_uid, pw.pw_gid)
    client, helper = install_relay(str(root / "libexec"), str(tree.conf), str(_ROOT / "lib"))
    pub = (keydir / "id_ed25519.pub").read_text().strip()
    addrs = ",".join(h.address for h in rig.hosts)
    (rdir / "authorized_keys").write_text(
        f'restrict,pty,from="{addrs}",command="/usr/bin/sudo -n {helper} '
        f'\\"$SSH_ORIGINAL_COMMAND\\"" {pub}\n')
    os.chmod(rdir / "authorized_keys", 0o644)
    text = (REPO / "sudoers.d" / "kvmshell-relay").read_text()
    for old, new in (("/usr/local/libexec/kvmshell/kvmshell-relayd", helper),
                     ("/usr/local/libexec/kvmshell/kvmshell-relay", client),
                     ("%kvmusers", f"%{group}"), ("(kvmrelay)", f"({relay})"),
                     ("\nkvmrelay ", f"\n{relay} ")):
        assert old in text, old
        text = text.replace(old, new)
    text = re.sub(r"\bKVMSHELL_(RELAYD?)\b", rf"KVMSHELL_\1_MH{tag.upper()}", text)
    drop = Path(f"/etc/sudoers.d/kvmshell-mh-{tag}")
    tmp = drop.with_name(f"kvmshell-mh-{tag}.new")   # sudo skips names with a '.'
    tmp.write_text(text)
    os.chmod(tmp, 0o440)
    subprocess.run(["visudo", "-cf", str(tmp)], check=True, capture_output=True)
    os.rename(tmp, drop)
    tree.write_conf(group=group, authorized_keys=str(root / "authorized_keys"), shell=KVMSHELL,
                    hosts_file=str(root / "hosts"), relay_user=relay, relay_client=client,
                    relay_key=str(keydir / "id_ed25519"),
                    relay_known_hosts=str(rdir / "known_hosts"), stop_timeout="5")
    return relay


class Cluster:
    def __init__(self, rig: Rig, tree: Host, x: User, y: User, keys: dict[str, Path],
                 relay: str, root: Path) -> None:
        self.rig, self.tree, self.x, self.y, self.keys = rig, tree, x, y, keys
        self.relay, self.root = relay, root

    def host(self, name: str) -> SimHost:
        return self.rig.host(name)

    def kvmshell(self, on: str, user: User, command: str, timeout: float = 120,
                 **kw: object) -> subprocess.CompletedProcess[str]:
        """kvmshell as sshd's ForceCommand runs it, on host *on* (no ssh)."""
        h = self.host(on)
        return subprocess.run(h.nsenter(*user.argv(KVMSHELL, "--config", str(self.tree.conf))),
                              env=user.env(SSH_ORIGINAL_COMMAND=command),
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]

    def ssh_argv(self, to: str, user: User, *args: str) -> list[str]:
        """The user's own ssh client (on host *to*'s network) to *to*'s sshd."""
        h = self.host(to)
        return h.nsenter("ssh", "-i", str(self.keys[user.name]), "-F", "/dev/null",
                         "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                         "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                         "-o", "IdentitiesOnly=yes", *args, f"{user.name}@{h.address}",
                         net_only=True)

    def ssh(self, to: str, user: User, *words: str, timeout: float = 120,
            opts: tuple[str, ...] = (), input: bytes | None = None
            ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.ssh_argv(to, user, *opts) + list(words), capture_output=True,
                              timeout=timeout, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL)

    def qemu_host(self, user: User) -> list[str]:
        """The hosts (by PID namespace) where *user*'s QEMUs run, one entry each."""
        out = []
        for pid in user.qemu_pids():
            ns = os.readlink(f"/proc/{pid}/ns/pid")
            out += [h.name for h in self.rig.hosts
                    if h.alive() and os.readlink(f"/proc/{h.init}/ns/pid") == ns]
        return out

    def lease_record(self, vm: str) -> str:
        """VM *vm*'s owner record (``TOP/.leases/VM.host``), stripped."""
        return (self.tree.vmdir / ".leases" / f"{vm}.host").read_bytes().decode().strip()

    def remove_x_vms(self, *names: str) -> None:
        """Clean-up: every QEMU of X's killed (and gone), then VMs *names*
        removed with their directories."""
        kill_all(self.x)
        wait_for(lambda: not self.x.qemu_pids(), 30, "QEMU gone")
        for name in names:
            self.tree.kvmadm("remove", name, "--purge")


def ofd_lock(path: Path) -> int:
    """An open file description of *path* holding a write lock (OFD) on
    it, as another host's supervisor holds a lease; closing it frees it."""
    import fcntl
    import struct
    fd = os.open(path, os.O_RDWR)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
    return fd


@contextlib.contextmanager
def cluster(names: tuple[str, ...] = NAMES) -> Iterator[Cluster]:
    """Hosts *names* (a Rig), a shared VM tree with its config (host list,
    relay settings), VM users X and Y (``kvmadm adduser``, keys), the relay
    account, an sshd per host; all removed again on exit (and checked)."""
    tag = secrets.token_hex(3)
    group = f"kvt{tag}g"
    subprocess.run(["groupadd", group], check=True)
    root = Path(tempfile.mkdtemp(prefix="kvmshell-mhtest-", dir=config_place()))
    os.chmod(root, 0o755)
    tree = Host(root)
    users: list[str] = []
    rig = None
    try:
        keys_dir = root / "authorized_keys"
        keys_dir.mkdir(mode=0o755)
        rig = Rig(names, config_place())
        (root / "hosts").write_text(rig.hosts_text)
        os.chmod(root / "hosts", 0o644)
        relay = _relay_setup(root, tag, group, rig, tree, users)
        keys: dict[str, Path] = {}
        made: list[User] = []
        for suffix in ("x", "y"):
            name = f"kvt{secrets.token_hex(3)}{suffix}"
            key = root / f"key-{name}"
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name,
                            "-f", str(key)], check=True)
            tree.kvmadm("adduser", name, "--key", f"{key}.pub", "--no-kvm")
            users.append(name)
            keys[name] = key
            made.append(User(name, tree))
        for h in rig.hosts:
            h.start_sshd(f"{KVMSHELL} --config {tree.conf}", group, str(keys_dir),
                         {"Match User kvmrelay": f"Match User {relay}",
                          "/etc/kvmshell/relay/authorized_keys":
                              str(root / "relay" / "authorized_keys")})
        (root / "relay" / "known_hosts").write_text(rig.known_hosts)
        os.chmod(root / "relay" / "known_hosts", 0o644)
        for h in rig.hosts:
            h.wait_sshd()
        yield Cluster(rig, tree, made[0], made[1], keys, relay, root)
    finally:
        Path(f"/etc/sudoers.d/kvmshell-mh-{tag}").unlink(missing_ok=True)
        for name in users:
            _drop_user(name)
        left = rig.stop() if rig is not None else []
        subprocess.run(["groupdel", group], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
        assert left == [], left


