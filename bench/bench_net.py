#!/usr/bin/python3
"""Benchmark: the network helper's ``up`` + ``down`` for a VM with one
bridged tap, run as a VM user through sudo exactly as kvmshell runs it,
against the same steps done by hand in the same run, as root:
``ip tuntap add``, ``ip link set master``, ``ip link del``.  Median wall
times; target <= 2x was set for the stdlib-only helper.  Since the helper
speaks netlink through pyroute2 (issue 10: the design card's library, in
place of hand-packed messages), each ``up`` pays pyroute2's import, printed
here too as the new floor; ``down`` skips it when no tap is left.  Also printed, for context: the hand steps each run
through ``sudo -n`` (what a user without the helper would have to do), the
two interpreter starts inside our figure, and a VM's life as kvmshell runs
it (the taps go with QEMU's descriptors; ``down`` runs only if one remains).

Everything happens in a network namespace made for the run; the helper is
this checkout's, installed (like the tests do) with its config path pointed
at the bench's own tree, under a temporary sudoers drop-in.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import statistics
import subprocess
import sys
import time

RUNS = int(os.environ.get("BENCH_RUNS", "40"))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# This checkout's kvmadm and helper, whatever is installed.
KVMADM = ["/usr/bin/python3", "-I", "-c", f"import sys; sys.path.insert(0, {REPO!r}); "
          "sys.argv[0] = 'kvmadm'; from kvmshell.admin.kvmadm import main; sys.exit(main())"]
BRIDGE = "kvbbr0"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import tree_root, write_sudoers  # noqa: E402

WORKER = r"""
import os, socket, statistics, subprocess, sys, time
helper, runs = sys.argv[1], int(sys.argv[2])
env = {"PATH": "/usr/bin:/bin"}
xs = []
for _ in range(runs):
    t = time.perf_counter()
    mine, theirs = socket.socketpair()
    p = subprocess.Popen(["/usr/bin/sudo", "-n", "--", helper, "up", "b"], stdout=theirs,
                         stdin=subprocess.DEVNULL, env=env)
    theirs.close()
    msg, fds, _, _ = socket.recv_fds(mine, 64, 8)
    assert p.wait() == 0 and len(fds) == 1, msg
    subprocess.run(["/usr/bin/sudo", "-n", "--", helper, "down", "b"], check=True, env=env,
                   stdin=subprocess.DEVNULL)
    xs.append(time.perf_counter() - t)
    for fd in fds:
        os.close(fd)
    mine.close()
print(statistics.median(xs))
"""

# The same, through kvmshell's own client code, as a VM's life runs it: the
# taps' descriptors close when QEMU exits (so the kernel deletes the taps),
# and the privileged 'down' runs only if one of them is still there.
LIFECYCLE = r"""
import os, statistics, sys, time
repo, conf, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, repo)
from kvmshell.common import config
from kvmshell.shell import netclient
from kvmshell.common import vmtree
cfg = config.load(conf)
vm = vmtree.resolve(cfg, "b", os.getuid())
xs, downs = [], 0
for _ in range(runs):
    t = time.perf_counter()
    fds = netclient.up(cfg, vm, expect=1)
    for fd in fds:
        os.close(fd)                      # QEMU exits
    if netclient.remaining(cfg, vm, 1):   # the supervisor's teardown
        netclient.down(cfg, vm)
        downs += 1
    xs.append(time.perf_counter() - t)
print(statistics.median(xs), downs)
"""

def install_helper(root: str, conf: str) -> str:
    """This checkout's helper, laid out as `make install` does, config path rewritten."""
    sys.path.insert(0, REPO)
    from kvmshell.admin.install import install_nethelper
    return install_nethelper(root, conf, REPO)


def median_hand(ns: str, prefix: list[str], runs: int) -> float:
    xs = []
    for i in range(runs):
        tap = f"kvbt{i}"
        t = time.perf_counter()
        for argv in (["ip", "tuntap", "add", "dev", tap, "mode", "tap"],
                     ["ip", "link", "set", tap, "master", BRIDGE],
                     ["ip", "link", "del", tap]):
            subprocess.run(["ip", "netns", "exec", ns] + prefix + argv if prefix else
                           ["ip", "-n", ns] + argv[1:], check=True)
        xs.append(time.perf_counter() - t)
    return statistics.median(xs)


def main() -> int:
    tag = secrets.token_hex(3)
    user, group, ns = "kvmbench", f"kvbg{tag}", f"kvbns{tag}"
    made_user = subprocess.run(["id", user], capture_output=True).returncode != 0
    if made_user:
        subprocess.run(["useradd", "-M", "-N", "-s", "/bin/false", user], check=True)
    pw = pwd.getpwnam(user)
    root = tree_root()
    drop_in = f"/etc/sudoers.d/kvmshell-bench-{tag}"
    subprocess.run(["groupadd", group], check=True)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["usermod", "-aG", group, user], check=True)
        conf = os.path.join(root, "k.conf")
        with open(conf, "w") as f:
            f.write(f"vmdir = {root}/vms\naccel = tcg\nhelper = {root}/kvmshell-nethelper\n")
        subprocess.run(KVMADM + ["--config", conf, "create", "b", "--owner", user, "--",
                        "-net", "nic", "-net", f"tap,br={BRIDGE}"], check=True,
                       stdout=subprocess.DEVNULL)
        helper = install_helper(root, conf)
        write_sudoers(drop_in, tag, group,
                      {"/usr/local/libexec/kvmshell/kvmshell-nethelper": helper})
        subprocess.run(["ip", "-n", ns, "link", "add", BRIDGE, "type", "bridge"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", BRIDGE, "up"], check=True)
        hand = median_hand(ns, [], RUNS)
        hand_sudo = median_hand(ns, ["/usr/bin/sudo", "-n", "--"], RUNS)
        starts = []
        for _ in range(RUNS):
            t = time.perf_counter()
            for _ in range(2):
                subprocess.run(["/usr/bin/python3", "-IS", "-c", "pass"], check=True)
            starts.append(time.perf_counter() - t)
        floor = statistics.median(starts)
        imports = []
        for _ in range(max(RUNS // 4, 3)):
            t = time.perf_counter()
            subprocess.run(["/usr/bin/python3", "-I", "-c", "import pyroute2"], check=True)
            imports.append(time.perf_counter() - t)
        pyroute2_import = statistics.median(imports) - floor / 2
        r = subprocess.run(["ip", "netns", "exec", ns, "setpriv", f"--reuid={pw.pw_uid}",
                            f"--regid={pw.pw_gid}", "--init-groups", "--",
                            "/usr/bin/python3", "-I", "-c", WORKER, helper, str(RUNS)],
                           capture_output=True, text=True, check=True)
        ours = float(r.stdout.split()[-1])
        r = subprocess.run(["ip", "netns", "exec", ns, "setpriv", f"--reuid={pw.pw_uid}",
                            f"--regid={pw.pw_gid}", "--init-groups", "--",
                            "/usr/bin/python3", "-I", "-c", LIFECYCLE, REPO, conf, str(RUNS)],
                           capture_output=True, text=True, check=True)
        life, downs = float(r.stdout.split()[0]), int(r.stdout.split()[1])
        print(f"network helper up+down per VM (1 bridged tap): {ours * 1000:.1f} ms; "
              f"by hand (ip tuntap add, link set master, link del): {hand * 1000:.1f} ms "
              f"-> {ours / hand:.2f}x (target <= 2x); "
              f"by hand through sudo: {hand_sudo * 1000:.1f} ms -> {ours / hand_sudo:.2f}x; "
              f"of ours, two bare interpreter starts (python3 -IS -c pass): {floor * 1000:.1f} ms, "
              f"pyroute2's import: {pyroute2_import * 1000:.1f} ms")
        print(f"as kvmshell runs a VM's life (up; QEMU's exit closes the taps; 'down' only if "
              f"one remains: {downs} of {RUNS} runs): {life * 1000:.1f} ms -> {life / hand:.2f}x")
        return 0
    finally:
        os.unlink(drop_in) if os.path.exists(drop_in) else None
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["groupdel", group], capture_output=True)
        if made_user:
            subprocess.run(["userdel", "-f", user], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
