#!/usr/bin/python3
"""Benchmark: median wall time of ``kvmshell status`` against the bare
interpreter (``/usr/bin/python3 -I -c pass``), both run the same way (as a
VM user, through setpriv), measured in the same run.  Target: <= 1.5x."""

from __future__ import annotations

import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

RUNS = int(os.environ.get("BENCH_RUNS", "60"))
KVMSHELL = shutil.which("kvmshell") or "/usr/local/bin/kvmshell"
KVMADM = shutil.which("kvmadm") or "/usr/local/sbin/kvmadm"


def timed(argv: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def main() -> int:
    user = "kvmbench"
    if subprocess.run(["id", user], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "-M", "-N", "-s", KVMSHELL, user], check=True)
    pw = pwd.getpwnam(user)
    root = tempfile.mkdtemp(prefix="kvmshell-bench-")
    os.chmod(root, 0o755)
    try:
        conf = os.path.join(root, "k.conf")
        with open(conf, "w") as f:
            f.write(f"vmdir = {root}/vms\naccel = tcg\n")
        subprocess.run([KVMADM, "--config", conf, "create", "b", "--owner", user, "--",
                        "-m", "128"], check=True, stdout=subprocess.DEVNULL)
        as_user = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", "--"]
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
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
