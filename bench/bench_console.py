#!/usr/bin/python3
"""Benchmark: the serial console, guest -> user, measured in one run.

Two copies of the test guest boot side by side, both as the same VM user,
both under TCG with the same kernel, initramfs and memory:

  * through kvmshell: ``kvmshell start``, read with ``kvmshell console``
    (the supervisor's multiplexer plus the console client);
  * the baseline: plain QEMU with its serial port as a unix socket server,
    read with ``socat - UNIX-CONNECT:``, the least a relay can do (and how
    kvmshell's supervisor first read the serial port).  kvmshell now reads
    it through a FIFO pair instead, which QEMU's one-byte UART writes do not
    fill up, so with two copies on one path it can still beat the baseline.

Both clients run without a tty (the byte-stream mode) and are driven the
same way, interleaved.  Figures:
  throughput: bytes/s of ``head -c N /dev/zero | tr '\\0' x`` reaching the
              user (median of rounds); ratio kvmshell/socat, target >= 0.8x;
  latency:    median round trip of one keystroke to the guest's echo;
              the console's added latency is kvmshell minus socat.
"""

from __future__ import annotations

import os
import select
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import KVMSHELL, MARKER, Tree, wait_file  # noqa: E402
FLOOD = int(os.environ.get("BENCH_CONSOLE_BYTES", str(1024 * 1024)))
ROUNDS = int(os.environ.get("BENCH_CONSOLE_ROUNDS", "3"))
KEYS = int(os.environ.get("BENCH_CONSOLE_KEYS", "40"))


class Stream:
    """A console client run without a tty, read and written through pipes."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})
        assert self.proc.stdin and self.proc.stdout
        self.win = self.proc.stdin.fileno()
        self.rfd = self.proc.stdout.fileno()
        self.buf = b""

    def send(self, data: bytes) -> None:
        os.write(self.win, data)

    def until(self, token: bytes, timeout: float = 120) -> int:
        """Read until *token*; return the bytes read (token included)."""
        deadline = time.monotonic() + timeout
        total = 0
        buf = self.buf
        keep = len(token) - 1
        while True:
            i = buf.find(token)
            if i >= 0:
                self.buf = buf[i + len(token):]
                return total + i + len(token)
            if len(buf) > keep:
                total += len(buf) - keep
                buf = buf[len(buf) - keep:]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.rfd], [], [], left)[0]:
                raise TimeoutError(f"no {token!r} within {timeout}s")
            data = os.read(self.rfd, 65536)
            if not data:
                raise EOFError(f"stream ended before {token!r}")
            buf += data

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def throughput(s: Stream, n: int, tag: str) -> float:
    s.send(b"\n")
    s.until(b"guest# ")
    t = time.perf_counter()
    s.send(f"head -c {n} /dev/zero | tr '\\0' x; echo; echo {tag}-$((40+2))\n".encode())
    got = s.until(f"{tag}-42".encode(), timeout=600)
    dt = time.perf_counter() - t
    return got / dt


def latency(s: Stream) -> float:
    s.send(b"\n")
    s.until(b"guest# ")
    times = []
    for _ in range(KEYS):
        t = time.perf_counter()
        s.send(b"a")
        s.until(b"a")
        times.append(time.perf_counter() - t)
    s.send(b"\x15\n")                      # kill the line of a's; an empty command
    s.until(b"guest# ")
    return statistics.median(times)


def main() -> int:
    tree = Tree()
    as_user, conf = tree.as_user, tree.conf
    streams: list[Stream] = []
    raw_qemu = None
    try:
        vmdir = tree.create("c", "-m", "256")
        raw = tree.user_dir("raw")
        tree.put_guest(vmdir, raw)
        env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}
        subprocess.run(as_user + [KVMSHELL, "--config", conf, "start", "c", "-kernel", "vmlinuz",
                                  "-initrd", "initrd.img", "-append", "console=ttyS0"],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        # The baseline guest: same machine, serial straight to a socket.
        raw_qemu = subprocess.Popen(
            as_user + ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-machine", "pc",
                       "-accel", "tcg", "-m", "256", "-display", "none",
                       "-chardev", "socket,id=s0,path=raw.sock,server=on,wait=off",
                       "-serial", "chardev:s0", "-kernel", "vmlinuz", "-initrd", "initrd.img",
                       "-append", "console=ttyS0"],
            cwd=raw, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_file(os.path.join(vmdir, "console.log"), MARKER, 180)
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(raw, "raw.sock")):
            if time.monotonic() > deadline:
                raise TimeoutError("the baseline QEMU made no socket")
            time.sleep(0.1)
        ks = Stream(as_user + [KVMSHELL, "--config", conf, "console", "c", "--no-replay"])
        so = Stream(as_user + ["socat", "-", f"UNIX-CONNECT:{raw}/raw.sock"])
        streams += [ks, so]
        so.send(b"\n")
        so.until(b"guest# ", timeout=180)        # the baseline guest has booted
        kt, st = [], []
        for r in range(ROUNDS):                  # interleaved, same conditions
            kt.append(throughput(ks, FLOOD, f"k{r}"))
            st.append(throughput(so, FLOOD, f"s{r}"))
        kl, sl = [], []
        for _ in range(3):
            kl.append(latency(ks))
            sl.append(latency(so))
        mk, ms = statistics.median(kt), statistics.median(st)
        lk, ls = statistics.median(kl), statistics.median(sl)
        print(f"console throughput: kvmshell console {mk / 1e6:.2f} MB/s; socat relay "
              f"{ms / 1e6:.2f} MB/s; ratio {mk / ms:.2f}x (target >= 0.8x)")
        print(f"console keystroke round trip: kvmshell console {lk * 1000:.2f} ms; socat relay "
              f"{ls * 1000:.2f} ms; added by kvmshell {(lk - ls) * 1000:+.2f} ms")
    finally:
        for s in streams:
            s.close()
        if raw_qemu is not None:
            raw_qemu.kill()
            raw_qemu.wait()
        subprocess.run(as_user + [KVMSHELL, "--config", conf, "kill", "c"],
                       capture_output=True, env={"PATH": "/usr/bin:/bin"})
        time.sleep(0.5)
        tree.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
