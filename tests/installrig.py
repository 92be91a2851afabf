"""This checkout's kvmshell package installed under a root of the run's
own, for the test suite (tests/conftest.py) and the benchmarks
(bench/benchlib.py).  Imports nothing of the suite: importing conftest
makes the session's tree."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def install_checkout(root: Path | str) -> tuple[str, str]:
    """Put this checkout's package where the test (or bench) users can read
    it, in *root*/lib, with entry scripts in *root*/bin exactly like
    bin/kvmshell and bin/kvmadm (system Python, isolated mode) plus one
    sys.path line.  So the suite tests this tree's code, whatever is
    installed in /usr/local, and checkouts do not collide.  Returns the
    (kvmshell, kvmadm) paths."""
    root = Path(root)
    lib = root / "lib"
    shutil.copytree(REPO / "kvmshell", lib / "kvmshell",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["/usr/bin/python3", "-m", "compileall", "-q", str(lib)], check=True)
    (root / "bin").mkdir()
    out = []
    for script in ("kvmshell", "kvmadm"):
        text = (REPO / "bin" / script).read_text().splitlines(True)
        text.insert(1, f"import sys; sys.path.insert(0, {str(lib)!r})\n")
        path = root / "bin" / script
        path.write_text("".join(text))
        out.append(str(path))
    for dirpath, dirnames, filenames in os.walk(root):
        for leaf in dirnames:
            os.chmod(os.path.join(dirpath, leaf), 0o755)
        for leaf in filenames:
            os.chmod(os.path.join(dirpath, leaf), 0o644)
    for script in out:
        os.chmod(script, 0o755)
    return out[0], out[1]
