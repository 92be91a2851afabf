#!/usr/bin/python3
"""Benchmark: ``connect VM 7`` against a direct TCP connection to the same
guest port, in the same run, on the real Debian guest (user-mode network).

The guest runs a small echo server on port 7 (typed in over the console:
Python 3 is there for cloud-init).  The direct path is the admin's
``-redir tcp:PORT::7`` (a standing slirp forward on 127.0.0.1); the
connect path is kvmshell's verb run as the VM user with its stdin/stdout
as pipes, exactly what sshd gives a ProxyCommand session (the SSH
transport itself is left out of both).  Both go through the same slirp
stack into the same guest, so the difference is what connect adds.

Measured, interleaved (direct, connect, direct, ...):
  * round-trip latency of 32-byte messages (median of RTT_MSGS each);
  * throughput: THRU_BYTES echoed back (sent and read concurrently).
Targets: connect adds at most 0.5 ms per round trip; at least 0.8x the
direct throughput.  Also printed: connect's set-up time (process start,
QMP forward, accept check) to the first echoed byte.
"""

from __future__ import annotations

import base64
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchlib import KVMSHELL, Tree  # noqa: E402
import debianrig  # noqa: E402

RTT_MSGS = int(os.environ.get("BENCH_RTT_MSGS", "300"))
THRU_BYTES = int(os.environ.get("BENCH_THRU_BYTES", str(8 << 20)))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
VM = "cb"

ECHO = b"""
import socket, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", 7))
s.listen(8)
def serve(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        d = c.recv(65536)
        if not d:
            break
        c.sendall(d)
    c.close()
print("ECHO-" + "LISTENING", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


class Pipe:
    """``kvmshell connect`` as a byte stream (its stdin/stdout)."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, bufsize=0)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.w, self.r = self.proc.stdin.fileno(), self.proc.stdout.fileno()

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.w, view):]

    def recv(self, n: int) -> bytes:
        return os.read(self.r, n)

    def shut(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        self.proc.wait(30)
        err = self.proc.stderr.read().decode() if self.proc.stderr else ""
        if self.proc.returncode:
            raise RuntimeError(f"connect exited {self.proc.returncode}: {err}")


class Sock:
    def __init__(self, port: int) -> None:
        self.s = socket.create_connection(("127.0.0.1", port))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def recv(self, n: int) -> bytes:
        return self.s.recv(n)

    def shut(self) -> None:
        self.s.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.s.close()


def read_exact(conn: "Sock | Pipe", n: int) -> None:
    got = 0
    while got < n:
        chunk = conn.recv(min(65536, n - got))
        if not chunk:
            raise RuntimeError("connection closed early")
        got += len(chunk)


def rtts(conn: "Sock | Pipe") -> float:
    msg = b"x" * 32
    for _ in range(20):   # warm up (slirp, guest scheduler)
        conn.send(msg)
        read_exact(conn, len(msg))
    out = []
    for _ in range(RTT_MSGS):
        t = time.perf_counter()
        conn.send(msg)
        read_exact(conn, len(msg))
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def throughput(conn: "Sock | Pipe") -> float:
    block = os.urandom(65536)

    def writer() -> None:
        left = THRU_BYTES
        while left:
            n = min(left, len(block))
            conn.send(block[:n])
            left -= n

    t = time.perf_counter()
    th = threading.Thread(target=writer)
    th.start()
    read_exact(conn, THRU_BYTES)
    th.join()
    return THRU_BYTES / (time.perf_counter() - t)


def console(tree: Tree, text: str, linger: int = 5) -> str:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/", "LC_ALL": "C",
           "SSH_ORIGINAL_COMMAND": f"console {VM} --no-replay --linger {linger}"}
    r = subprocess.run(tree.as_user + [KVMSHELL, "--config", tree.conf], env=env, input=text,
                       capture_output=True, text=True, timeout=120)
    return r.stdout


def main() -> int:
    debian = debianrig.debian_guest()
    tree = Tree()
    hport = 0
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            hport = s.getsockname()[1]
        with open(tree.conf, "a") as f:
            f.write(f"image_dirs = {debian}\nstop_timeout = 60\n")
        admin = ["-m", "1024", "-net", "nic,model=virtio", "-net", "user",
                 "-redir", f"tcp:{hport}::7"]
        path = tree.create(VM, *admin)
        # The test image turns cloud-init's network config off unless the
        # kernel command line brings one (see tests/guestrig.py): kvmshell's own.
        from kvmshell.common import adminopts
        from kvmshell.shell import cloudinit
        net = cloudinit.network_config(adminopts.parse_admin(admin), VM)
        assert net is not None
        netarg = "network-config=" + base64.b64encode(net).decode()
        env = {"PATH": "/usr/bin:/bin", "HOME": "/", "LC_ALL": "C"}
        start = (f"start {VM} -hda {debian / debianrig.IMAGE} -snapshot "
                 f"-kernel {debian / debianrig.KERNEL} -initrd {debian / debianrig.INITRD} "
                 f"-append '{debianrig.CMDLINE_IDE} {netarg}'")
        t0 = time.monotonic()
        subprocess.run(tree.as_user + [KVMSHELL, "--config", tree.conf],
                       env=dict(env, SSH_ORIGINAL_COMMAND=start), check=True,
                       stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        log = os.path.join(path, "console.log")
        while debianrig.READY.encode() not in open(log, "rb").read():
            if time.monotonic() - t0 > debianrig.BOOT_TIMEOUT:
                raise RuntimeError("the guest did not boot")
            time.sleep(1)
        b64 = base64.b64encode(ECHO).decode()
        out = console(tree, f"\necho {b64} | base64 -d > /tmp/echo.py; "
                            "python3 /tmp/echo.py >/dev/console 2>&1 &\n", linger=8)
        deadline = time.monotonic() + 120
        while b"ECHO-LISTENING" not in open(log, "rb").read():
            if time.monotonic() > deadline:
                raise RuntimeError("the echo server did not start: " + out[-500:])
            time.sleep(0.5)

        uenv = dict(env, SSH_ORIGINAL_COMMAND=f"connect {VM} 7")
        argv = tree.as_user + [KVMSHELL, "--config", tree.conf]
        lat: dict[str, list[float]] = {"direct": [], "connect": []}
        thr: dict[str, list[float]] = {"direct": [], "connect": []}
        setup: list[float] = []
        for _ in range(ROUNDS):
            for kind in ("direct", "connect"):
                if kind == "direct":
                    conn: Sock | Pipe = Sock(hport)
                else:
                    t = time.perf_counter()
                    conn = Pipe(argv, uenv)
                    try:
                        conn.send(b"?")
                        read_exact(conn, 1)
                    except (OSError, RuntimeError):
                        conn.close()   # raises with connect's own message, if it failed
                        raise
                    setup.append(time.perf_counter() - t)
                lat[kind].append(rtts(conn))
                thr[kind].append(throughput(conn))
                conn.shut()
                conn.close()
        d_rtt, c_rtt = statistics.median(lat["direct"]), statistics.median(lat["connect"])
        d_thr, c_thr = statistics.median(thr["direct"]), statistics.median(thr["connect"])
        added = (c_rtt - d_rtt) * 1000
        ratio = c_thr / d_thr
        print(f"connect: round trip of 32 bytes: direct {d_rtt * 1000:.3f} ms, through connect "
              f"{c_rtt * 1000:.3f} ms: added {added:+.3f} ms (target <= +0.5 ms) "
              f"{'OK' if added <= 0.5 else 'MISSED'}")
        print(f"connect: echo throughput ({THRU_BYTES >> 20} MiB): direct {d_thr / 1e6:.1f} MB/s, "
              f"through connect {c_thr / 1e6:.1f} MB/s: {ratio:.2f}x (target >= 0.8x) "
              f"{'OK' if ratio >= 0.8 else 'MISSED'}")
        print(f"connect: set-up to the first echoed byte: median {statistics.median(setup) * 1000:.0f} ms "
              f"(process start, QMP forward, accept check; {ROUNDS} runs)")
        return 0
    finally:
        subprocess.run(tree.as_user + [KVMSHELL, "--config", tree.conf],
                       env={"PATH": "/usr/bin:/bin", "HOME": "/", "LC_ALL": "C",
                            "SSH_ORIGINAL_COMMAND": f"kill {VM}"},
                       capture_output=True, stdin=subprocess.DEVNULL)
        tree.close()


if __name__ == "__main__":
    sys.exit(main())
