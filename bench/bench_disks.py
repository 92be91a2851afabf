#!/usr/bin/python3
"""Benchmark: disks.

1. ``disk clone`` of a base of 1 GiB and of 8 GiB (allocated) through the
   installed kvmshell, as a VM user, against ``cp`` of the same base in the
   same run.  Target: clone time independent of the base's size, < 0.2 s.
2. Sequential write throughput inside the guest (busybox ``dd`` of 128 MiB
   with O_DIRECT to the second disk), on a raw disk kvmshell passed as a
   descriptor in its -blockdev graph, against the same QEMU started by hand
   on the same image by path (``-drive file=...``), for IDE and virtio.
   Target: >= 0.95x.  Both under TCG, so the absolute figures are low; the
   ratio is what kvmshell's way of passing the disk costs.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import KVMADM, KVMSHELL, Tree  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = os.environ.get("KVMSHELL_GUEST", os.path.join(REPO, "build", "guest"))
RUNS = int(os.environ.get("BENCH_RUNS", "7"))
DD_MIB = 128


def _median_time(argv: list[str], runs: int, before: list[str] | None = None) -> float:
    xs = []
    for _ in range(runs):
        if before:
            subprocess.run(before, check=True)
        t = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        xs.append(time.perf_counter() - t)
    return statistics.median(xs)


def bench_clone(tree: Tree, vmdir: str) -> None:
    for gib in (1, 8):
        base = os.path.join(vmdir, f"base{gib}.img")
        subprocess.run(["fallocate", "-l", f"{gib}G", base], check=True)
        # Real data in the first MiB of every 64 MiB, so cp has blocks to copy.
        with open(base, "r+b") as f:
            for off in range(0, gib << 30, 64 << 20):
                f.seek(off)
                f.write(os.urandom(1 << 20))
        os.chown(base, tree.pw.pw_uid, tree.pw.pw_gid)
        clone = tree.as_user + [KVMSHELL, "--config", tree.conf, "disk", "clone", "b",
                                "c.qcow2", f"base{gib}.img"]
        rm = tree.as_user + [KVMSHELL, "--config", tree.conf, "rm", "b", "c.qcow2"]
        ours = []
        for _ in range(RUNS):
            t = time.perf_counter()
            subprocess.run(clone, check=True, stdout=subprocess.DEVNULL)
            ours.append(time.perf_counter() - t)
            subprocess.run(rm, check=True, stdout=subprocess.DEVNULL)
        copy = os.path.join(vmdir, "copy.img")
        cp = _median_time(["cp", "--sparse=never", base, copy], 3,
                          before=["rm", "-f", copy])
        os.unlink(copy)
        os.unlink(base)
        o = statistics.median(ours)
        print(f"disk clone of a {gib} GiB base: {o * 1000:.1f} ms (target < 200 ms); "
              f"cp of the same base: {cp * 1000:.1f} ms -> {o / cp:.3f}x")


def _guest_dd(console: "object", marker: str) -> float:
    import pexpect
    assert isinstance(console, pexpect.spawn)
    console.send("\r")
    console.expect_exact("guest# ")
    t = time.perf_counter()
    console.send(f"dd if=/dev/zero of=$D bs=1M count={DD_MIB} oflag=direct 2>/dev/null; "
                 f"echo {marker}-$((40+2))\r")
    console.expect_exact(f"{marker}-42", timeout=600)
    return time.perf_counter() - t


def bench_throughput(tree: Tree, vmdir: str) -> None:
    import pexpect

    for leaf in ("vmlinuz", "initrd.img"):
        subprocess.run(["cp", os.path.join(GUEST, leaf), os.path.join(vmdir, leaf)], check=True)
        os.chown(os.path.join(vmdir, leaf), tree.pw.pw_uid, tree.pw.pw_gid)
    disk = os.path.join(vmdir, "t.img")
    for bus, dev in (("ide", "/dev/sdb"), ("virtio", "/dev/vdb")):
        # -disk-interface: kvmadm set needs the VM stopped, which it is.
        subprocess.run([KVMADM, "--config", tree.conf, "set", "b", "--", "-m", "256",
                        "-disk-interface", bus], check=True, stdout=subprocess.DEVNULL)
        vmdir = os.path.join(tree.root, "vms", os.readlink(os.path.join(tree.root, "vms", "b")))
        disk = os.path.join(vmdir, "t.img")
        empty = os.path.join(vmdir, "e.img")
        for path in (disk, empty):
            with open(path, "wb") as f:
                f.truncate((DD_MIB + 16) << 20)
            os.chown(path, tree.pw.pw_uid, tree.pw.pw_gid)
        figures = {}
        for way in ("kvmshell", "hand"):
            if way == "kvmshell":
                start = tree.as_user + [KVMSHELL, "--config", tree.conf, "start", "b", "-hda",
                                        "e.img", "-hdb", "t.img", "-kernel", "vmlinuz",
                                        "-initrd", "initrd.img", "-append", "console=ttyS0"]
                subprocess.run(start, check=True, stdout=subprocess.DEVNULL)
                c = pexpect.spawn(tree.as_user[0], tree.as_user[1:] + [
                    KVMSHELL, "--config", tree.conf, "console", "b"], encoding="utf-8",
                    codec_errors="replace", timeout=120)
                c.expect_exact("Escape character is ^]")
            else:
                c = pexpect.spawn(tree.as_user[0], tree.as_user[1:] + [
                    "/usr/bin/qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-nodefaults",
                    "-machine", "pc", "-display", "none", "-serial", "stdio",
                    "-drive", f"file={empty},format=raw,if={bus},index=0",
                    "-drive", f"file={disk},format=raw,if={bus},index=1",
                    "-kernel", os.path.join(vmdir, "vmlinuz"),
                    "-initrd", os.path.join(vmdir, "initrd.img"), "-append", "console=ttyS0"],
                    encoding="utf-8", codec_errors="replace", timeout=120)
            c.expect_exact("KVMSHELL-GUEST-READY", timeout=300)
            c.send(f"\rD={dev}\r")
            xs = [_guest_dd(c, f"w{i}") for i in range(3)]
            figures[way] = DD_MIB / statistics.median(xs)
            if way == "kvmshell":
                c.sendcontrol("]")
                c.close()
                subprocess.run(tree.as_user + [KVMSHELL, "--config", tree.conf, "kill", "b"],
                               check=True, stdout=subprocess.DEVNULL)
            else:
                c.terminate(force=True)
        ratio = figures["kvmshell"] / figures["hand"]
        print(f"sequential write in the guest, {bus}: {figures['kvmshell']:.1f} MiB/s through "
              f"kvmshell's descriptor graph; {figures['hand']:.1f} MiB/s with QEMU by hand on "
              f"the path -> {ratio:.2f}x (target >= 0.95x)")
        os.unlink(disk)
        os.unlink(empty)


def main() -> int:
    tree = Tree()
    try:
        vmdir = tree.create("b", "-m", "256")
        bench_clone(tree, vmdir)
        bench_throughput(tree, vmdir)
    finally:
        subprocess.run(["pkill", "-KILL", "-u", str(tree.pw.pw_uid)], capture_output=True)
        time.sleep(0.3)
        tree.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
