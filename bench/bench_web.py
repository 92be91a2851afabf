#!/usr/bin/python3
"""Benchmark: console keystroke round trip through the web front door
(a WebSocket to kvmshell-web, which runs ``kvmshell console`` as the user
through sudo) against the ssh path (``ssh -T host console`` through sshd's
ForceCommand), to the same booted guest, in the same run.  Target: the web
path's median at most 1.5x the ssh path's.

Both clients are scripts, not browsers, so only the transports differ:
a keystroke (``a``) goes in, the guest's echo comes back.  Rounds
alternate between the paths; each round opens its session with a console
take-over (``--force``, the web's "take over" page) so either may type,
and syncs on a marker before timing.  The round trip includes the guest's
own echo under TCG, the same for both.

Everything is this checkout's code, installed like the tests do: a VM user,
a group standing for kvmusers, the web server as a system user of the run's
own with the shipped sudoers drop-in and PAM service (tests/webrig.py), and
a private sshd on 127.0.0.1 with the shipped sshd drop-in (tests/sshrig.py).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from benchlib import GUEST, MARKER, install_checkout, tree_root, wait_file  # noqa: E402
from sshrig import Sshd  # noqa: E402
from webrig import WebRig  # noqa: E402

KEYS = int(os.environ.get("BENCH_WEB_KEYS", "40"))
ROUNDS = int(os.environ.get("BENCH_WEB_ROUNDS", "4"))
PASSWORD = "Pw-" + secrets.token_hex(8)


class Reader:
    """Read a byte stream until a token (the console's output)."""

    def __init__(self, recv: Callable[[float], bytes]) -> None:
        self.recv = recv
        self.buf = b""

    def until(self, token: bytes, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while token not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {token!r} within {timeout}s")
            self.buf += self.recv(left)
        self.buf = self.buf[self.buf.index(token) + len(token):]


def measure(send: Callable[[bytes], None], reader: Reader, tag: str) -> list[float]:
    send(f"\x15echo sync-{tag}-$((1+1))\r".encode())
    reader.until(f"sync-{tag}-2\r\n".encode())
    reader.until(b"guest# ")
    times = []
    for _ in range(KEYS):
        t = time.perf_counter()
        send(b"a")
        reader.until(b"a")
        times.append(time.perf_counter() - t)
    send(b"\x15\r")                            # kill the line of a's
    reader.until(b"guest# ")
    return times


def ssh_round(sshd: Sshd, user: str, key: Path, tag: str) -> list[float]:
    import select
    p = subprocess.Popen(sshd.ssh_argv(user, key, "-T") + ["console", "c", "--force"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         env={"PATH": "/usr/bin:/bin"})
    assert p.stdin and p.stdout
    fd_in, fd_out = p.stdin.fileno(), p.stdout.fileno()

    def recv(timeout: float) -> bytes:
        if not select.select([fd_out], [], [], timeout)[0]:
            return b""
        data = os.read(fd_out, 65536)
        if not data:
            raise EOFError("ssh console ended")
        return data

    try:
        return measure(lambda b: os.write(fd_in, b) and None, Reader(recv), tag)
    finally:
        p.kill()
        p.wait()


def web_round(rig: WebRig, cookie: str, csrf: str, tag: str) -> list[float]:
    import httpx
    from websockets.sync.client import connect
    r = httpx.post(f"{rig.origin}/api/tickets", json={"vm": "c", "kind": "force"},
                   headers={"Origin": rig.origin, "Cookie": f"__Host-kvmshell={cookie}",
                            "X-CSRF-Token": csrf}, trust_env=False, timeout=60)
    r.raise_for_status()
    with connect(f"ws://localhost:{rig.port}/ws", proxy=None, compression=None,
                 origin=rig.origin,  # type: ignore[arg-type]
                 additional_headers={"Cookie": f"__Host-kvmshell={cookie}"}) as ws:
        ws.send(json.dumps({"ticket": r.json()["ticket"]}))
        first = ws.recv(timeout=30)
        assert json.loads(first) == {"ok": "force"}, first

        def recv(timeout: float) -> bytes:
            try:
                m = ws.recv(timeout=timeout)
            except TimeoutError:
                return b""
            return m if isinstance(m, bytes) else b""

        return measure(ws.send, Reader(recv), tag)


def login(rig: WebRig, user: str) -> tuple[str, str]:
    import httpx
    r = httpx.post(f"{rig.origin}/login", json={"user": user, "password": PASSWORD},
                   headers={"Origin": rig.origin}, trust_env=False, timeout=60)
    r.raise_for_status()
    cookie = r.headers["set-cookie"].split(";")[0].split("=", 1)[1]
    page = httpx.get(f"{rig.origin}/", headers={"Cookie": f"__Host-kvmshell={cookie}"},
                     trust_env=False, timeout=60)
    m = re.search(r'name="kvmshell-csrf" content="([^"]+)"', page.text)
    assert m, page.text
    return cookie, m.group(1)


def main() -> int:
    root = Path(tree_root())
    kvmshell, kvmadm = install_checkout(str(root))
    conf = root / "k.conf"
    # cgroup = off: the run's user has no sudoers line for the cgroup helper
    # (as benchlib.Tree; bench_uefi.py sets the helper up itself).
    conf.write_text(f"vmdir = {root}/vms\naccel = tcg\ncgroup = off\n")
    os.chmod(conf, 0o644)
    user = f"kvb{secrets.token_hex(3)}"
    rig: WebRig | None = None
    sshd: Sshd | None = None
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}
    try:
        rig = WebRig(root, str(kvmshell), conf, root / "lib")
        sshd = Sshd(f"{kvmshell} --config {conf}", rig.group, loglevel="INFO")
        key = sshd.client_key(user)
        subprocess.run(["useradd", "-M", "-N", "-d", "/", "-s", str(kvmshell), user],
                       check=True)
        rig.add_user(user, PASSWORD)
        (sshd.keys / user).write_text("restrict,pty " + Path(f"{key}.pub").read_text())
        os.chmod(sshd.keys / user, 0o644)
        pw = pwd.getpwnam(user)
        as_user = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups",
                   "--"]
        subprocess.run([str(kvmadm), "--config", str(conf), "create", "c", "--owner", user,
                        "--", "-m", "256"], check=True, stdout=subprocess.DEVNULL)
        vmdir = root / "vms" / os.readlink(root / "vms" / "c")
        for leaf in ("vmlinuz", "initrd.img"):
            shutil.copyfile(Path(GUEST) / leaf, vmdir / leaf)
            os.chown(vmdir / leaf, pw.pw_uid, pw.pw_gid)
        subprocess.run(as_user + [str(kvmshell), "--config", str(conf), "start", "c", "-kernel",
                                  "vmlinuz", "-initrd", "initrd.img", "-append",
                                  "console=ttyS0"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        wait_file(str(vmdir / "console.log"), MARKER, 180)     # the guest has booted
        rig.start()
        cookie, csrf = login(rig, user)
        web_round(rig, cookie, csrf, "warm-w")                 # warm up both paths
        ssh_round(sshd, user, key, "warm-s")
        web: list[float] = []
        ssh: list[float] = []
        for r in range(ROUNDS):                                # interleaved
            web += web_round(rig, cookie, csrf, f"w{r}")
            ssh += ssh_round(sshd, user, key, f"s{r}")
        mw, ms = statistics.median(web), statistics.median(ssh)
        print(f"console keystroke round trip: browser path (WebSocket, kvmshell-web) median "
              f"{mw * 1000:.2f} ms; ssh path (ssh -T console) median {ms * 1000:.2f} ms; "
              f"ratio {mw / ms:.2f}x (target <= 1.5x; {len(web)} keystrokes each)")
    finally:
        subprocess.run(["pkill", "-KILL", "-u", user], capture_output=True)
        time.sleep(0.3)
        if sshd is not None:
            sshd.stop()
        if rig is not None:
            rig.close()
        subprocess.run(["userdel", "-f", user], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
