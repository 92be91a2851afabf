#!/usr/bin/python3
"""Benchmark: ``kvmshell list`` in a big tree against a tree of one VM.

Three VM trees, made for the run: 1 VM (the caller's), 1000 VMs and
10,000 VMs (the caller owns one; the others belong to other uids).  The big
trees are laid out directly by root (mkdir, chown, symlink, then the
per-owner view rebuilt, as by ``kvmadm refresh``: what kvmadm create
leaves, without running it 10,000 times).  ``kvmshell list`` runs as the
VM user through setpriv, interleaved over the trees, in the same run;
median wall times.  Targets: 1000 VMs <= 1.10x, 10,000 VMs <= 1.25x the
one-VM tree.  Also printed: ``status`` with the VM left out (the same
search for the caller's VMs), and ``list`` in a 10,000-VM tree whose view
is stale (changed by hand since: the whole tree is read, as before the
view).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

RUNS = int(os.environ.get("BENCH_RUNS", "40"))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import Tree, timed  # noqa: E402
sys.path.insert(0, REPO)
from kvmshell.common import vmid  # noqa: E402  (this checkout's identifier encoding)
from kvmshell.common.config import load  # noqa: E402
from kvmshell.admin import ownerview  # noqa: E402  (this checkout's per-owner view)

SIZES = (1, 1000, 10000)
OTHER_UIDS = range(61000, 61050)      # owners of the other VMs (no such users needed)
ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}


def make_tree(top: str, n: int, uid: int, gid: int, view: bool = True) -> str:
    """*top* with *n* VMs: the caller's 'mine' and n-1 of other uids, and
    (*view*) a fresh per-owner view, else a stale one; the config's path."""
    os.mkdir(top, 0o755)
    for i in range(n):
        name = "mine" if i == 0 else f"vm{i:05d}"
        owner = uid if i == 0 else OTHER_UIDS[i % len(OTHER_UIDS)]
        dirname = vmid.encode(name, ["-m", "128"])
        path = os.path.join(top, dirname)
        os.mkdir(path, 0o700)
        os.chown(path, owner, gid if i == 0 else owner)
        os.symlink(dirname, os.path.join(top, name))
    conf = top + ".conf"
    with open(conf, "w") as f:
        f.write(f"vmdir = {top}\naccel = tcg\ncgroup = off\n")
    ownerview.refresh(load(conf))
    if not view:
        os.symlink("gone.x", os.path.join(top, "gone"))    # a change by hand: the stamp is off
    return conf


def main() -> int:
    tree = Tree(checkout=not os.environ.get("KVMSHELL"))
    try:
        uid, gid = tree.pw.pw_uid, tree.pw.pw_gid
        t = time.perf_counter()
        confs = {n: make_tree(os.path.join(tree.root, f"vms{n}"), n, uid, gid) for n in SIZES}
        stale = make_tree(os.path.join(tree.root, "stale"), SIZES[-1], uid, gid, view=False)
        setup = time.perf_counter() - t
        cmds = {(verb, n): tree.as_user + [tree.kvmshell, "--config", confs[n], verb]
                for verb in ("list", "status") for n in SIZES}
        cmds[("stale", SIZES[-1])] = tree.as_user + [tree.kvmshell, "--config", stale, "list"]
        for argv in cmds.values():               # each works, and warms the page cache
            out = subprocess.run(argv, env=ENV, stdin=subprocess.DEVNULL, capture_output=True,
                                 text=True, check=True).stdout
            assert out.startswith("mine"), out
            timed(argv, ENV)
        times: dict[tuple[str, int], list[float]] = {k: [] for k in cmds}
        for _ in range(RUNS):                    # interleaved: same conditions for all
            for k, argv in cmds.items():
                times[k].append(timed(argv, ENV))
        med = {k: statistics.median(v) for k, v in times.items()}
        best = {k: min(v) for k, v in times.items()}
        print(f"trees of {', '.join(str(n) for n in SIZES)} VMs laid out in {setup:.1f} s")
        targets = {1000: 1.10, 10000: 1.25}
        for verb in ("list", "status"):
            base = med[(verb, 1)]
            parts = [f"{n} VMs {med[(verb, n)] * 1000:.1f} ms ({med[(verb, n)] / base:.2f}x"
                     + (f", target <= {targets[n]:.2f}x)" if verb == "list" else ")")
                     for n in SIZES[1:]]
            what = "list" if verb == "list" else "status, VM left out"
            print(f"{what}: 1 VM {base * 1000:.1f} ms; " + "; ".join(parts)
                  + f"; best of {RUNS}: " + ", ".join(
                      f"{best[(verb, n)] / best[(verb, 1)]:.2f}x" for n in SIZES[1:]))
        n = SIZES[-1]
        print(f"list, {n} VMs, the view stale (the whole tree read): "
              f"{med[('stale', n)] * 1000:.1f} ms ({med[('stale', n)] / med[('list', 1)]:.2f}x)")
    finally:
        tree.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
