#!/usr/bin/python3
"""Benchmark: median wall time of ``kvmshell status`` against the bare
interpreter (``/usr/bin/python3 -I -c pass``), both run the same way (as a
VM user, through setpriv), measured in the same run.  Target: <= 1.5x."""

from __future__ import annotations

import os
import statistics
import sys

RUNS = int(os.environ.get("BENCH_RUNS", "60"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import KVMSHELL, Tree, interleaved  # noqa: E402


def main() -> int:
    tree = Tree()
    try:
        tree.create("b", "-m", "128")
        conf, as_user = tree.conf, tree.as_user
        env = {"PATH": "/usr/bin:/bin", "SSH_ORIGINAL_COMMAND": "status b"}
        base_cmd = as_user + ["/usr/bin/python3", "-I", "-c", "pass"]
        tool_cmd = as_user + [KVMSHELL, "--config", conf]
        # interleaved: same conditions for both; 5 rounds warm the page cache
        base, tool = interleaved(base_cmd, tool_cmd, RUNS, warm=5, env=env)
        mb, mt = statistics.median(base), statistics.median(tool)
        print(f"status: python3 -I -c pass median {mb * 1000:.1f} ms; "
              f"kvmshell status median {mt * 1000:.1f} ms; ratio {mt / mb:.2f}x (target <= 1.5x)")
    finally:
        tree.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
