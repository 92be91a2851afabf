"""Shared set-up for the benchmarks: a VM user and a VM tree of the run's
own, the test guest, and the timing loop most ratios are measured with."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time

# This checkout's package under a root of the run's own, as the tests install it.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
from installrig import install_checkout  # noqa: E402

KVMSHELL = os.environ.get("KVMSHELL") or shutil.which("kvmshell") or "/usr/local/bin/kvmshell"
KVMADM = os.environ.get("KVMADM") or shutil.which("kvmadm") or "/usr/local/sbin/kvmadm"
USER = "kvmbench"
# kvmshell takes a config only from /etc/kvmshell or this root-owned place
# (kvmshell/common/config.py, USER_CONFIG_DIRS).
PLACE = "/run/kvmshell-test"


def tree_root() -> str:
    """A fresh 0755 directory for a run's tree and config, in PLACE."""
    os.makedirs(PLACE, mode=0o755, exist_ok=True)
    root = tempfile.mkdtemp(prefix="kvmshell-bench-", dir=PLACE)
    os.chmod(root, 0o755)
    return root


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_sudoers(drop_in: str, tag: str, group: str, helpers: dict[str, str]) -> None:
    """The shipped sudoers drop-in (sudoers.d/kvmshell) as file *drop_in*
    (0440): each installed helper path that is a key of *helpers* replaced
    by its value, the group %kvmusers by *group*, and every alias given
    *tag*: aliases are global, and the installed drop-in already defines
    them."""
    import re
    with open(os.path.join(REPO, "sudoers.d", "kvmshell")) as f:
        text = f.read()
    for installed, here in helpers.items():
        text = text.replace(installed, here)
    with open(drop_in, "w") as f:
        f.write(re.sub(r"\bKVMSHELL_([A-Z]+)\b", rf"KVMSHELL_\1_{tag.upper()}",
                       text.replace("%kvmusers", f"%{group}")))
    os.chmod(drop_in, 0o440)
# The cached test guest (tests/guest/build-guest.sh; `make guest`) and the
# line its init prints once booted.
GUEST = os.environ.get("KVMSHELL_GUEST", os.path.join(REPO, "build", "guest"))
MARKER = b"KVMSHELL-GUEST-READY"


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    """Wall seconds of one run of *argv* (stdin and stdout /dev/null; env
    *env*, else this process's); CalledProcessError if it fails."""
    t = time.perf_counter()
    subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   check=True)
    return time.perf_counter() - t


def interleaved(base_cmd: list[str], tool_cmd: list[str], runs: int, warm: int,
                env: dict[str, str] | None = None) -> tuple[list[float], list[float]]:
    """(baseline seconds, tool seconds), *runs* of each, alternating so both
    run under the same conditions, after *warm* untimed rounds of each
    (page cache, connections)."""
    for _ in range(warm):
        timed(base_cmd, env)
        timed(tool_cmd, env)
    base, tool = [], []
    for _ in range(runs):
        base.append(timed(base_cmd, env))
        tool.append(timed(tool_cmd, env))
    return base, tool


def wait_file(path: str, token: bytes, timeout: float) -> None:
    """Until file *path* holds *token*; TimeoutError after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path, "rb") as f:
                if token in f.read():
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{token!r} not in {path}")


class Tree:
    """A user (made if missing), a 0755 temp root and a config naming a tree in it.
    ``create(vm, *admin)`` makes a VM for the user and returns its directory.

    With *checkout*, the run uses this checkout's kvmshell and kvmadm (copied
    into the temp root), whatever is installed; ``self.kvmshell`` and
    ``self.kvmadm`` name the entry points either way."""

    def __init__(self, checkout: bool = False) -> None:
        # A user the run makes is the run's own: close() removes it again.
        self.made_user = subprocess.run(["id", USER], capture_output=True).returncode != 0
        if self.made_user:
            subprocess.run(["useradd", "-M", "-N", "-s", KVMSHELL, USER], check=True)
        self.pw = pwd.getpwnam(USER)
        self.as_user = ["setpriv", f"--reuid={self.pw.pw_uid}", f"--regid={self.pw.pw_gid}",
                        "--clear-groups", "--"]
        self.root = tree_root()
        self.kvmshell, self.kvmadm = KVMSHELL, KVMADM
        if checkout:
            self.kvmshell, self.kvmadm = install_checkout(os.path.join(self.root, "inst"))
        self.vmdir = os.path.join(self.root, "vms")
        self.conf = os.path.join(self.root, "k.conf")
        with open(self.conf, "w") as f:
            # cgroup = off: the bench user is in no sudoers group (bench_uefi.py
            # sets up the cgroup helper itself).
            f.write(f"vmdir = {self.vmdir}\naccel = tcg\ncgroup = off\n")

    def user_dir(self, leaf: str) -> str:
        """A 0700 directory *leaf* in the root, owned by the user (a
        baseline QEMU's working directory)."""
        path = os.path.join(self.root, leaf)
        os.mkdir(path, 0o700)
        os.chown(path, self.pw.pw_uid, self.pw.pw_gid)
        return path

    def put_guest(self, *dirs: str) -> None:
        """The test guest's kernel and initramfs into each of *dirs*, the user's."""
        for d in dirs:
            for leaf in ("vmlinuz", "initrd.img"):
                shutil.copyfile(os.path.join(GUEST, leaf), os.path.join(d, leaf))
                os.chown(os.path.join(d, leaf), self.pw.pw_uid, self.pw.pw_gid)

    def create(self, vm: str, *admin: str) -> str:
        subprocess.run([self.kvmadm, "--config", self.conf, "create", vm, "--owner", USER, "--",
                        *admin], check=True, stdout=subprocess.DEVNULL)
        return os.path.join(self.vmdir, os.readlink(os.path.join(self.vmdir, vm)))

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        if self.made_user:
            subprocess.run(["userdel", "-f", USER], capture_output=True)
