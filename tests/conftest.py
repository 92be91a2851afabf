"""The test rig: real users, real VM trees, the real installed entry points.

Everything here runs as root (CI does) and acts as unprivileged users
through setpriv, exactly as sshd would run kvmshell for them.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, NamedTuple

import pytest

from installrig import install_checkout

if TYPE_CHECKING:
    from multihostrig import Cluster
    from sshrig import Sshd

REPO = Path(__file__).resolve().parents[1]
GUEST_DIR = Path(os.environ.get("KVMSHELL_GUEST", REPO / "build" / "guest"))
MARKER = b"KVMSHELL-GUEST-READY"


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.geteuid() != 0:
        raise pytest.UsageError("the kvmshell suite runs as root (it creates users and trees)")


@pytest.fixture(scope="session")
def guest() -> Path:
    """The tiny test guest (kernel + busybox initramfs), built once and cached."""
    if not (GUEST_DIR / "vmlinuz").exists() or not (GUEST_DIR / "initrd.img").exists():
        subprocess.run([str(REPO / "tests/guest/build-guest.sh"), str(GUEST_DIR)], check=True)
    return GUEST_DIR


def install_nethelper(root: Path, config: Path) -> str:
    """This checkout's network helper, laid out as `make install` does, its
    fixed config path rewritten to *config* (the helper takes no config option)."""
    from kvmshell.admin.install import install_nethelper as install
    return install(str(root / "libexec"), str(config), str(_ROOT / "lib"))


def install_cgrouphelper(root: Path, config: Path) -> str:
    """This checkout's cgroup helper, as install_nethelper lays out the network helper."""
    from kvmshell.admin.install import install_cgrouphelper as install
    return install(str(root / "libexec"), str(config), str(_ROOT / "lib"))


def sudoers_text(tag: str, group: str) -> str:
    """The shipped sudoers drop-in for this session: the helpers' paths are
    this session's copies, the group is *group*, and every alias gets *tag*
    (aliases are global across sudoers files, so concurrent sessions and the
    installed drop-in must never define the same one)."""
    import re
    text = (REPO / "sudoers.d" / "kvmshell").read_text()
    text = text.replace("/usr/local/libexec/kvmshell/kvmshell-nethelper", NETHELPER)
    text = text.replace("/usr/local/libexec/kvmshell/kvmshell-cgrouphelper", CGROUPHELPER)
    text = text.replace("%kvmusers", f"%{group}")
    return re.sub(r"\bKVMSHELL_([A-Z]+)\b", rf"KVMSHELL_\1_{tag.upper()}", text)


def config_place() -> Path:
    """The tests' own place, the one kvmshell takes a config from besides
    /etc/kvmshell (config.USER_CONFIG_DIRS): root's, made here if missing."""
    from kvmshell.common.config import USER_CONFIG_DIRS
    place = Path(USER_CONFIG_DIRS[1])
    place.mkdir(mode=0o755, exist_ok=True)
    st = place.lstat()
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o022, place
    return place


_ROOT = Path(tempfile.mkdtemp(prefix="kvmshell-test-", dir=config_place()))
os.chmod(_ROOT, 0o755)  # users must traverse to their VM directories
# Also when no test asks for the host fixture (e.g. -m security -k prop, --collect-only).
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)
KVMSHELL, KVMADM = install_checkout(_ROOT)
NETHELPER = install_nethelper(_ROOT, _ROOT / "kvmshell.conf")
CGROUPHELPER = install_cgrouphelper(_ROOT, _ROOT / "kvmshell.conf")


class User:
    """A real local user, created for the test session."""

    def __init__(self, name: str, host: "Host") -> None:
        self.name = name
        pw = pwd.getpwnam(name)
        self.uid, self.gid = pw.pw_uid, pw.pw_gid
        self.host = host

    def argv(self, *args: str) -> list[str]:
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
                "--", *args]

    def env(self, **extra: str) -> dict[str, str]:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/", "USER": self.name,
               "LC_ALL": "C"}
        env.update(extra)
        return env

    def ssh_command(self, command: str, timeout: float = 120,
                    **env: str) -> subprocess.CompletedProcess[str]:
        """Run kvmshell as sshd's ForceCommand would: SSH_ORIGINAL_COMMAND set."""
        return subprocess.run(self.argv(KVMSHELL, "--config", str(self.host.conf)),
                              env=self.env(SSH_ORIGINAL_COMMAND=command, **env),
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def kvmshell(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run kvmshell with an argv (as the admin or a test would)."""
        return subprocess.run(self.argv(KVMSHELL, "--config", str(self.host.conf), *args),
                              env=self.env(), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def status(self, vm: str) -> dict[str, object]:
        r = self.ssh_command(f"status {vm} --json")
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert isinstance(doc, dict)
        return doc

    def qemu_pids(self) -> list[int]:
        r = subprocess.run(["pgrep", "-u", str(self.uid), "-f", "qemu-system"],
                           capture_output=True, text=True)
        return [int(p) for p in r.stdout.split()]


class Host:
    """A VM tree and config of the test session's own."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.vmdir = root / "vms"
        self.images = root / "images"
        self.conf = root / "kvmshell.conf"
        self.images.mkdir(mode=0o755)
        self.write_conf()

    def write_conf(self, **extra: str) -> None:
        # cgroup = off: the kernel's budgets need the cgroup helper's sudoers
        # line, which only the tests that use it install (test_hardware.py).
        settings = {"vmdir": str(self.vmdir), "accel": "tcg", "image_dirs": str(self.images),
                    "stop_timeout": "20", "helper": NETHELPER, "cgroup": "off",
                    "cgroup_helper": CGROUPHELPER}
        settings.update(extra)
        self.conf.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        os.chmod(self.conf, 0o644)

    def kvmadm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([KVMADM, "--config", str(self.conf), *args],
                           capture_output=True, text=True, timeout=60)
        if check:
            assert r.returncode == 0, r.stderr
        return r

    def vm_path(self, name: str) -> Path:
        return self.vmdir / os.readlink(self.vmdir / name)

    def create_vm(self, name: str, user: User, *admin: str, guest: Path | None = None) -> Path:
        self.kvmadm("create", name, "--owner", user.name, "--", *admin)
        path = self.vm_path(name)
        if guest is not None:
            for leaf in ("vmlinuz", "initrd.img"):
                shutil.copyfile(guest / leaf, path / leaf)
                os.chown(path / leaf, user.uid, user.gid)
        return path

    def snapshot(self) -> dict[str, tuple[object, ...]]:
        """Every entry of the tree: type, mode, owner, size, mtime, link target, contents."""
        out: dict[str, tuple[object, ...]] = {}
        for dirpath, dirnames, filenames in os.walk(self.vmdir):
            for leaf in dirnames + filenames:
                p = os.path.join(dirpath, leaf)
                st = os.lstat(p)
                target = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
                digest = None
                if stat.S_ISREG(st.st_mode):  # byte for byte: contents too
                    with open(p, "rb") as f:
                        digest = hashlib.sha256(f.read()).hexdigest()
                out[p] = (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns, target, digest)
        return out


def _make_user(tag: str) -> str:
    name = f"kvt{secrets.token_hex(3)}{tag}"
    subprocess.run(["useradd", "-M", "-N", "-d", "/nonexistent", "-s", KVMSHELL, name],
                   check=True)
    return name


def _drop_user(name: str) -> None:
    subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True)
    time.sleep(0.2)
    subprocess.run(["userdel", "-f", name], capture_output=True)


@pytest.fixture(scope="session")
def host() -> Iterator[Host]:
    try:
        yield Host(_ROOT)
    finally:
        shutil.rmtree(_ROOT, ignore_errors=True)


@pytest.fixture(scope="session")
def alice(host: Host) -> Iterator[User]:
    name = _make_user("a")
    try:
        yield User(name, host)
    finally:
        _drop_user(name)


@pytest.fixture(scope="session")
def bob(host: Host) -> Iterator[User]:
    name = _make_user("b")
    try:
        yield User(name, host)
    finally:
        _drop_user(name)


def wait_for(predicate: "callable[[], bool]", timeout: float, what: str) -> None:  # type: ignore[valid-type]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def console_log(vm_path: Path) -> bytes:
    data = b""
    for leaf in ("console.log.1", "console.log"):
        try:
            data += (vm_path / leaf).read_bytes()
        except FileNotFoundError:
            pass
    return data


def lock_holders(path: Path) -> list[tuple[int, str]]:
    """(pid, READ|WRITE) of the flocks on directory *path*, from /proc/locks
    (read here, not through kvmshell, so kvmshell does not grade itself)."""
    st = os.lstat(path)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    out = []
    for line in Path("/proc/locks").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == key:
            out.append((int(parts[4]), parts[3]))
    return out


@pytest.fixture(scope="module")
def module_vms_removed(host: Host) -> Iterator[None]:
    """The VMs a module makes in the session's tree are removed at its end
    (other modules expect the session's users to own a known set).  Use
    with ``pytest.mark.usefixtures("module_vms_removed")``."""
    def entries() -> set[str]:
        return set(os.listdir(host.vmdir)) if host.vmdir.is_dir() else set()
    before = entries()
    yield
    for leaf in sorted(entries() - before):
        if not leaf.startswith("."):
            host.kvmadm("remove", leaf.split(".", 1)[0], "--purge", check=False)


@pytest.fixture(scope="session")
def manpages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The man pages as ``make man`` builds them (man/mkman.py), by name."""
    out = tmp_path_factory.mktemp("man")
    r = subprocess.run(["/usr/bin/python3", str(REPO / "man" / "mkman.py"), str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return {p.name: p for p in out.iterdir()}


def render_man(page: Path, width: int = 200) -> str:
    """*page* as man(1) shows it (*width* columns, MANWIDTH), after groff and
    man found nothing to warn about."""
    r = subprocess.run(["groff", "-man", "-ww", "-z", "-Tutf8", str(page)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    r = subprocess.run(["man", "--warnings", "-l", "-P", "cat", str(page)],
                       env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", "MANWIDTH": str(width)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return r.stdout


class FrontDoor(NamedTuple):
    root: Path
    host: "Host"
    sshd: "Sshd"
    group: str
    name: str


@contextlib.contextmanager
def ssh_front_door(prefix: str, tag: str, loglevel: str = "DEBUG2",
                   **settings: str) -> Iterator[FrontDoor]:
    """A VM tree of its own (in a temp root named *prefix*...) behind a real
    sshd with the shipped drop-in (tests/sshrig.py), a group standing for
    kvmusers, the config naming both (plus *settings*), and the name of the
    VM user to be made (kvt...*tag*; the caller runs ``kvmadm adduser``).
    All removed on exit: the sshd, the user if made, the group, the root."""
    from sshrig import Sshd
    group = f"kvt{secrets.token_hex(3)}g"
    name = f"kvt{secrets.token_hex(3)}{tag}"
    subprocess.run(["groupadd", group], check=True)
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=config_place()))
    sshd = None
    try:
        os.chmod(root, 0o755)
        host = Host(root)
        sshd = Sshd(f"{KVMSHELL} --config {host.conf}", group, loglevel=loglevel)
        # Test-only device: the login shell is a wrapper adding --config for this
        # session's tree.  kvmshell takes --config from its own argv only, and a
        # client that sends no command gets sshd's ForceCommand line as `-c TEXT`
        # with no SSH_ORIGINAL_COMMAND: text kvmshell cannot tell from the user's.
        shell = root / "kvmshell-login-test"
        shell.write_text(f"#!/bin/sh\nexec {KVMSHELL} --config {host.conf} \"$@\"\n")
        os.chmod(shell, 0o755)
        host.write_conf(group=group, authorized_keys=str(sshd.keys), shell=str(shell),
                        **settings)
        yield FrontDoor(root, host, sshd, group, name)
    finally:
        subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True)
        if sshd is not None:
            sshd.stop()
        _drop_user(name)
        subprocess.run(["groupdel", group], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator["Cluster"]:
    """The multihost rig (tests/multihostrig.py: three hosts, one tree,
    users X and Y), one per module that asks, removed at the module's end."""
    from multihostrig import cluster as make_cluster   # it imports this module
    with make_cluster() as c:
        yield c


@pytest.fixture
def bare_vm(cluster: "Cluster") -> Iterator[str]:
    """A VM of X's on the multihost rig with no pin and no disk (QEMU
    answers QMP at once); removed after the test, X's QEMUs killed."""
    name = f"b{secrets.token_hex(3)}"
    cluster.tree.create_vm(name, cluster.x, "-m", "64")
    try:
        yield name
    finally:
        cluster.remove_x_vms(name)


def grab_fd(pid: int, fd: int) -> int:
    """pidfd_getfd(2): a descriptor of ours on the same open file
    description as *pid*'s *fd*, as any process of *pid*'s uid may take
    (a compromised QEMU handing its tap on, the user's code taking a
    lock's descriptor)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        got = libc.syscall(438, pidfd, fd, 0)  # SYS_pidfd_getfd on x86_64
        if got < 0:
            raise OSError(ctypes.get_errno(), "pidfd_getfd")
        return int(got)
    finally:
        os.close(pidfd)


def kill_all(user: User) -> None:
    for pid in user.qemu_pids():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def assert_refused(host: Host, user: User, command: str, token: str, status: int = 2,
                   **env: str) -> str:
    """Run *command* as *user* through the real entry point and check the
    refusal: one ``kvmshell:`` line naming *token*, exit *status*, no QEMU,
    and a VM tree byte-for-byte the same."""
    before = host.snapshot()
    r = user.ssh_command(command, **env)
    assert r.returncode == status, (command, r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    assert r.stderr.startswith("kvmshell: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert token in r.stderr, (token, r.stderr)
    assert user.qemu_pids() == []
    assert host.snapshot() == before
    return r.stderr
