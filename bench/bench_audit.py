#!/usr/bin/python3
"""Benchmark: what the audit record costs a command.  Median wall time of
``kvmshell status`` (ssh way in) sending its record to a live syslog socket
(log_socket, read by this process), against the same kvmshell with the
record turned off (the entry script with ``cli._audit`` replaced by a no-op),
both run as a VM user through setpriv, interleaved in the same run.
Target: <= 1.05x."""

from __future__ import annotations

import os
import socket
import statistics
import sys
import threading
import time

RUNS = int(os.environ.get("BENCH_RUNS", "60"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import KVMSHELL, Tree, interleaved  # noqa: E402


def main() -> int:
    tree = Tree()
    sink_path = os.path.join(tree.root, "log.sock")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(sink_path)
    os.chmod(sink_path, 0o666)
    got = []
    threading.Thread(target=lambda: [got.append(sink.recv(65536)) for _ in iter(int, 1)],
                     daemon=True).start()
    try:
        tree.create("b", "-m", "128")
        with open(tree.conf, "a") as f:
            f.write(f"log_socket = {sink_path}\n")
        # The same entry script, with the record turned off.
        with open(KVMSHELL) as f:
            lines = f.read().splitlines(True)
        at = next(i for i, l in enumerate(lines) if l.startswith("from kvmshell.shell.cli"))
        lines.insert(at, "import kvmshell.shell.cli as _c; _c._audit = lambda *a: None\n")
        quiet = os.path.join(tree.root, "kvmshell-noaudit")
        with open(quiet, "w") as f:
            f.write("".join(lines))
        os.chmod(quiet, 0o755)
        env = {"PATH": "/usr/bin:/bin", "SSH_ORIGINAL_COMMAND": "status b",
               "SSH_CONNECTION": "192.0.2.7 51234 192.0.2.1 22"}
        base_cmd = tree.as_user + [quiet, "--config", tree.conf]
        tool_cmd = tree.as_user + [KVMSHELL, "--config", tree.conf]
        # interleaved: same conditions for both; 5 rounds warm the page cache
        base, tool = interleaved(base_cmd, tool_cmd, RUNS, warm=5, env=env)
        time.sleep(0.2)
        mb, mt = statistics.median(base), statistics.median(tool)
        print(f"audit: kvmshell status without the record median {mb * 1000:.1f} ms; "
              f"with it median {mt * 1000:.1f} ms ({len(got)} records received); "
              f"ratio {mt / mb:.2f}x (target <= 1.05x)")
    finally:
        sink.close()
        tree.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
