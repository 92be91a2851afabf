#!/usr/bin/python3
"""Benchmark: ``ssh frontdoor status VM`` where the VM runs on another host
(routed: MUNGE credential, the relay client through sudo, ssh to the far
host's relay account, the relay helper, kvmshell there) against ``ssh
host status VM`` on the host that runs it, on the three-host rig of the
multihost suite (tests/multihostrig.py: namespaces, one sshd and munged per
host), with fresh user connections, interleaved, in the same run.
Target: <= 1.5x.

Measured with the user's ssh client's default key exchange and with
curve25519 alone (stricter); the relay's own connections are OpenSSH's
shared ones (ControlMaster), as installed."""

from __future__ import annotations

import os
import statistics
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
# this checkout: benchlib, the package, the test rig
sys.path[:0] = [_HERE, os.path.join(_HERE, ".."), os.path.join(_HERE, "..", "tests")]
os.environ.setdefault("KVMSHELL_GUEST", "/nonexistent")   # conftest's: no guest needed
from benchlib import interleaved  # noqa: E402
from multihostrig import cluster  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", "30"))


def main() -> int:
    with cluster() as c:
        c.tree.create_vm("b", c.x, "-m", "64", "-host", "hostb")
        r = c.ssh("hostb", c.x, "start", "b")
        assert r.returncode == 0, r.stderr
        try:
            # The user's client with its default key exchange (post-quantum
            # sntrup761, as users connect), and curve25519 alone: a quicker
            # handshake makes the ratio stricter (as bench_ssh.py).
            for label, opts in (("default kex", ()),
                                ("curve25519 kex", ("-o", "KexAlgorithms=curve25519-sha256"))):
                local = c.ssh_argv("hostb", c.x, *opts) + ["status", "b"]
                routed = c.ssh_argv("hosta", c.x, *opts) + ["status", "b"]
                # interleaved: same conditions for both, after 3 rounds to
                # warm up (and to open the relay's shared connection)
                base, tool = interleaved(local, routed, RUNS, warm=3)
                mb, mt = statistics.median(base), statistics.median(tool)
                print(f"multihost ({label}): 'ssh hostb status' (runs there) median "
                      f"{mb * 1000:.1f} ms; 'ssh hosta status' (routed to hostb) median "
                      f"{mt * 1000:.1f} ms; ratio {mt / mb:.2f}x (target <= 1.5x)")
        finally:
            c.ssh("hostb", c.x, "kill", "b")
    return 0


if __name__ == "__main__":
    sys.exit(main())
