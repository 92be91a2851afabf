"""The test rig: real users, real VM trees, the real installed entry points.

Everything here runs as root (CI does) and acts as unprivileged users
through setpriv, exactly as sshd would run kvmshell for them.
"""

from __future__ import annotations

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
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
KVMSHELL = shutil.which("kvmshell") or "/usr/local/bin/kvmshell"
KVMADM = shutil.which("kvmadm") or "/usr/local/sbin/kvmadm"
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
        settings = {"vmdir": str(self.vmdir), "accel": "tcg", "image_dirs": str(self.images),
                    "stop_timeout": "20", "helper": "/usr/local/libexec/kvmshell/kvmshell-nethelper"}
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
        """Every entry of the tree: type, mode, owner, size, mtime, link target."""
        out: dict[str, tuple[object, ...]] = {}
        for dirpath, dirnames, filenames in os.walk(self.vmdir):
            for leaf in dirnames + filenames:
                p = os.path.join(dirpath, leaf)
                st = os.lstat(p)
                target = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
                out[p] = (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns, target)
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
    root = Path(tempfile.mkdtemp(prefix="kvmshell-test-"))
    os.chmod(root, 0o755)  # users must traverse to their VM directories
    try:
        yield Host(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


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


def kill_all(user: User) -> None:
    for pid in user.qemu_pids():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
