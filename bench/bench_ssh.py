#!/usr/bin/python3
"""Benchmark: ``ssh host status`` (a VM user, through the shipped drop-in's
ForceCommand to the installed kvmshell) against ``ssh host true`` (a plain
user with /bin/sh), through the same sshd on 127.0.0.1, with fresh
connections, interleaved, in the same run.  Target: <= 1.2x."""

from __future__ import annotations

import os
import pwd
import shutil
import statistics
import subprocess
import sys

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")]
from benchlib import interleaved, tree_root  # noqa: E402
from sshrig import Sshd  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", "40"))
KVMSHELL = os.environ.get("KVMSHELL_BIN") or shutil.which("kvmshell") or "/usr/local/bin/kvmshell"
KVMADM = os.environ.get("KVMADM_BIN") or shutil.which("kvmadm") or "/usr/local/sbin/kvmadm"
GROUP, VMUSER, BASEUSER = "kvmbenchg", "kvmbenchs", "kvmbenchb"


def main() -> int:
    root = tree_root()
    conf = os.path.join(root, "k.conf")
    sshd = None
    try:
        subprocess.run(["groupadd", GROUP], check=True)
        sshd = Sshd(f"{KVMSHELL} --config {conf}", GROUP, loglevel="INFO")
        with open(conf, "w") as f:
            f.write(f"vmdir = {root}/vms\naccel = tcg\ngroup = {GROUP}\n"
                    f"authorized_keys = {sshd.keys}\nshell = {KVMSHELL}\n")
        vkey, bkey = sshd.client_key(VMUSER), sshd.client_key(BASEUSER)
        subprocess.run([KVMADM, "--config", conf, "adduser", VMUSER, "--key", f"{vkey}.pub"],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run([KVMADM, "--config", conf, "create", "b", "--owner", VMUSER, "--",
                        "-m", "128"], check=True, stdout=subprocess.DEVNULL)
        # The baseline user: a plain account, its key in its own home.
        home = sshd.rig / "home-base"
        subprocess.run(["useradd", "-M", "-N", "-d", str(home), "-s", "/bin/sh", BASEUSER],
                       check=True)
        pw = pwd.getpwnam(BASEUSER)
        (home / ".ssh").mkdir(parents=True, mode=0o700)
        shutil.copy(f"{bkey}.pub", home / ".ssh" / "authorized_keys")
        for p in (home, home / ".ssh", home / ".ssh" / "authorized_keys"):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        # The client's default key exchange (post-quantum sntrup761, slow), and
        # curve25519 alone: a quicker handshake makes the ratio stricter.
        for label, opts in (("default kex", []),
                            ("curve25519 kex", ["-o", "KexAlgorithms=curve25519-sha256"])):
            tool_cmd = sshd.ssh_argv(VMUSER, vkey, *opts) + ["status"]
            base_cmd = sshd.ssh_argv(BASEUSER, bkey, *opts) + ["true"]
            # interleaved: same conditions for both, after 3 rounds to warm up
            base, tool = interleaved(base_cmd, tool_cmd, RUNS, warm=3)
            mb, mt = statistics.median(base), statistics.median(tool)
            print(f"ssh ({label}): 'ssh host true' median {mb * 1000:.1f} ms; 'ssh host status' "
                  f"median {mt * 1000:.1f} ms; ratio {mt / mb:.2f}x (target <= 1.2x)")
    finally:
        if sshd is not None:
            sshd.stop()
        for user in (VMUSER, BASEUSER):
            subprocess.run(["pkill", "-KILL", "-u", user], capture_output=True)
            subprocess.run(["userdel", "-f", user], capture_output=True)
        subprocess.run(["groupdel", GROUP], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
