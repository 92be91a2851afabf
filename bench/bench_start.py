#!/usr/bin/python3
"""Benchmark: ``kvmshell start`` against bare QEMU, and the supervisor's memory.

Start to QMP ready, median wall times, interleaved, in the same run, both
as the same VM user (through setpriv), the same guest (the test kernel and
initramfs, 256 MiB, TCG, no network):

  * kvmshell: ``kvmshell start VM -kernel ... -initrd ... -append ...``
    until it returns; it returns once QEMU's monitor answered (QMP
    ``query-status``), so the VM is ready when it does;
  * the baseline, bare QEMU: the same machine options kvmshell gives QEMU
    (sandbox, -nodefaults, translation buffer, ...), started by hand, with
    QMP on a unix socket the bench bound beforehand and passed in (fd=): the
    bench connects and sends ``qmp_capabilities`` and ``query-status``
    before QEMU runs, and reads the greeting and both answers as soon as
    QEMU gives them: no polling interval, no round trip.
    QEMU's own start is the floor.  Target: kvmshell/bare <= 1.25x.

The supervisor: the resident set (VmRSS) of the per-VM supervisor kvmshell
leaves behind, printed beside its QEMU's, once the guest has booted and a
console session has come and gone.  Target: <= 10 MB.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from typing import BinaryIO

RUNS = int(os.environ.get("BENCH_RUNS", "30"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import MARKER, Tree, wait_file  # noqa: E402
QEMU = "/usr/bin/qemu-system-x86_64"
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}


def _answer(f: BinaryIO, what: str) -> dict[str, object]:
    """The next QMP reply (events skipped) read from the file *f*."""
    while True:
        line = f.readline()
        if not line:
            raise EOFError(f"QEMU closed QMP before answering {what}")
        msg: dict[str, object] = json.loads(line)
        if "return" in msg or "error" in msg or "QMP" in msg:
            return msg


def bare_start(as_user: list[str], cwd: str) -> tuple[float, subprocess.Popen[bytes]]:
    """Bare QEMU until QMP answers query-status: (seconds, the process)."""
    path = os.path.join(cwd, "qmp.sock")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(1)
    argv = [QEMU, "-name", "guest=bare", "-nodefaults", "-no-user-config", "-sandbox", SANDBOX,
            "-machine", "pc", "-accel", "tcg,tb-size=128", "-m", "256", "-display", "none",
            "-chardev", f"socket,id=qmp,fd={lsock.fileno()},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            "-chardev", "null,id=serial0", "-serial", "chardev:serial0",
            "-kernel", "vmlinuz", "-initrd", "initrd.img", "-append", "console=ttyS0"]
    t = time.perf_counter()
    proc = subprocess.Popen(as_user + argv, cwd=cwd, env=ENV, pass_fds=[lsock.fileno()],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(60)
    c.connect(path)                      # queued on the bound socket: no wait
    # Both commands at once: QEMU reads them after its greeting, in order.
    c.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "query-status"}\n')
    f = c.makefile("rb")
    _answer(f, "the greeting")
    _answer(f, "qmp_capabilities")
    reply = _answer(f, "query-status")
    dt = time.perf_counter() - t
    assert isinstance(reply.get("return"), dict), reply
    f.close()
    c.close()
    lsock.close()
    return dt, proc


def kvmshell_start(tree: Tree) -> float:
    t = time.perf_counter()
    subprocess.run(tree.as_user + [tree.kvmshell, "--config", tree.conf, "start", "s",
                                   "-kernel", "vmlinuz", "-initrd", "initrd.img",
                                   "-append", "console=ttyS0"],
                   env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def kvmshell_kill(tree: Tree) -> None:
    subprocess.run(tree.as_user + [tree.kvmshell, "--config", tree.conf, "kill", "s"],
                   env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise LookupError(f"no VmRSS for {pid}")


def ppid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("PPid:"):
                return int(line.split()[1])
    raise LookupError(f"no PPid for {pid}")


def qemu_of(tree: Tree, name: str) -> int:
    """The pid of the bench user's QEMU whose -name is guest=*name* (from
    /proc: kvmshell keeps no pid file)."""
    want = b"guest=" + name.encode()
    for leaf in os.listdir("/proc"):
        if not leaf.isdigit():
            continue
        try:
            if os.stat(f"/proc/{leaf}").st_uid != tree.pw.pw_uid:
                continue
            with open(f"/proc/{leaf}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if "qemu-system" in os.path.basename(argv[0].decode()) and want in argv:
            return int(leaf)
    raise LookupError(f"no QEMU of VM {name}")


def memory(tree: Tree, vmdir: str) -> tuple[int, int]:
    """(supervisor, QEMU) RSS in KiB, the guest booted, a console session over."""
    kvmshell_start(tree)
    try:
        wait_file(os.path.join(vmdir, "console.log"), MARKER, 180)
        qemu = qemu_of(tree, "s")
        sup = ppid(qemu)
        # A console session: attach (with replay), type a line, leave.
        r = subprocess.run(tree.as_user + [tree.kvmshell, "--config", tree.conf, "console", "s",
                                           "--spy"],
                           env=ENV, input=b"", capture_output=True, timeout=30)
        assert MARKER in r.stdout, r
        time.sleep(0.5)
        return rss_kib(sup), rss_kib(qemu)
    finally:
        kvmshell_kill(tree)


def main() -> int:
    tree = Tree(checkout=not os.environ.get("KVMSHELL"))
    try:
        vmdir = tree.create("s", "-m", "256")
        bare = tree.user_dir("bare")
        tree.put_guest(vmdir, bare)
        ks, bs = [], []
        for i in range(RUNS + 3):                # interleaved; the first 3 warm up
            b, proc = bare_start(tree.as_user, bare)
            proc.kill()
            proc.wait()
            k = kvmshell_start(tree)
            kvmshell_kill(tree)
            if i >= 3:
                bs.append(b)
                ks.append(k)
        mb, mk = statistics.median(bs), statistics.median(ks)
        print(f"start to QMP ready: bare QEMU median {mb * 1000:.1f} ms; kvmshell start median "
              f"{mk * 1000:.1f} ms; ratio {mk / mb:.2f}x (target <= 1.25x); best of {RUNS}: "
              f"{min(bs) * 1000:.1f} / {min(ks) * 1000:.1f} ms, {min(ks) / min(bs):.2f}x")
        sup, qemu = memory(tree, vmdir)
        print(f"supervisor RSS: {sup / 1024:.1f} MB (target <= 10 MB), beside its QEMU's "
              f"{qemu / 1024:.1f} MB (256 MiB guest, booted)")
    finally:
        subprocess.run(tree.as_user + [tree.kvmshell, "--config", tree.conf, "kill", "s"],
                       capture_output=True, env=ENV)
        tree.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
