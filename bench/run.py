#!/usr/bin/python3
"""Run every benchmark under bench/ (each prints its own ratio line)."""
import glob
import os
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
rc = 0
for script in sorted(glob.glob(os.path.join(here, "bench_*.py"))):
    rc |= subprocess.run([sys.executable, script]).returncode
sys.exit(rc)
