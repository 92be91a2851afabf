#!/usr/bin/python3
"""Benchmark: median wall time of ``kvmshell status`` against the bare
interpreter (``/usr/bin/python3 -I -c pass``), both run the same way (as a
VM user, through setpriv), measured in the same run.  Target: <= 1.5x."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

RUNS = int(os.environ.get("BENCH_RUNS", "60"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import KVMSHELL, Tree  # noqa: E402


def timed(argv: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def main() -> int:
    tree = Tree()
    try:
        tree.create("b", "-m", "128")
        conf, as_user = tree.conf, tree.as_user
        env = {"PATH": "/usr/bin:/bin", "SSH_ORIGINAL_COMMAND": "status b"}
        base_cmd = as_user + ["/usr/bin/python3", "-I", "-c", "pass"]
        tool_cmd = as_user + [KVMSHELL, "--config", conf]
        for _ in range(5):                       # warm the page cache
            timed(base_cmd, env)
            timed(tool_cmd, env)
        base, tool = [], []
        for _ in range(RUNS):                    # interleaved: same conditions for both
            base.append(timed(base_cmd, env))
            tool.append(timed(tool_cmd, env))
        mb, mt = statistics.median(base), statistics.median(tool)
        print(f"status: python3 -I -c pass median {mb * 1000:.1f} ms; "
              f"kvmshell status median {mt * 1000:.1f} ms; ratio {mt / mb:.2f}x (target <= 1.5x)")
    finally:
        tree.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
