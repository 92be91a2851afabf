"""Shared set-up for the benchmarks: a VM user and a VM tree of the run's own."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile

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


class Tree:
    """A user (made if missing), a 0755 temp root and a config naming a tree in it.
    ``create(vm, *admin)`` makes a VM for the user and returns its directory."""

    def __init__(self) -> None:
        # A user the run makes is the run's own: close() removes it again.
        self.made_user = subprocess.run(["id", USER], capture_output=True).returncode != 0
        if self.made_user:
            subprocess.run(["useradd", "-M", "-N", "-s", KVMSHELL, USER], check=True)
        self.pw = pwd.getpwnam(USER)
        self.as_user = ["setpriv", f"--reuid={self.pw.pw_uid}", f"--regid={self.pw.pw_gid}",
                        "--clear-groups", "--"]
        self.root = tree_root()
        self.conf = os.path.join(self.root, "k.conf")
        with open(self.conf, "w") as f:
            # cgroup = off: the bench user is in no sudoers group (bench_uefi.py
            # sets up the cgroup helper itself).
            f.write(f"vmdir = {self.root}/vms\naccel = tcg\ncgroup = off\n")

    def create(self, vm: str, *admin: str) -> str:
        subprocess.run([KVMADM, "--config", self.conf, "create", vm, "--owner", USER, "--",
                        *admin], check=True, stdout=subprocess.DEVNULL)
        vms = os.path.join(self.root, "vms")
        return os.path.join(vms, os.readlink(os.path.join(vms, vm)))

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        if self.made_user:
            subprocess.run(["userdel", "-f", USER], capture_output=True)
