"""kvmshell's side of the privileged network helper (see kvmshell/privileged/nethelper.py).

kvmshell runs as the VM user and cannot open /dev/net/tun (mode 0600), so
it asks the helper, through sudo, with nothing but a verb and the VM name.
The helper's stdout is one end of a unix socketpair (sudo closes every
descriptor above 2, so stdout is the one way in) and the tap descriptors
come back over it with SCM_RIGHTS.
"""

from __future__ import annotations

import os
import socket

from kvmshell.common.config import Config
from kvmshell.common.errors import RuntimeFailure
from kvmshell.common.vmtree import VM

SUDO = "/usr/bin/sudo"
TIMEOUT = 30.0


def _argv(cfg: Config, verb: str, vm: VM) -> list[str]:
    # -n: never prompt (there is no one to answer); "--" ends sudo's options.
    return [SUDO, "-n", "--", cfg.helper, verb, vm.name]


def _env() -> dict[str, str]:
    # Why: nothing of the user's environment goes near a root process
    # (sudo resets it too; the helper refuses what it does not expect).
    return {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}


def _reason(err: bytes, code: int) -> str:
    lines = [l for l in err.decode("utf-8", "replace").splitlines() if l.strip()]
    return lines[-1].strip() if lines else f"exit status {code}"


def up(cfg: Config, vm: VM, expect: int | None = None) -> list[int]:
    """Have the helper create the VM's taps; return their descriptors
    (close-on-exec, owned by the caller)."""
    import subprocess

    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fds: list[int] = []
    try:
        try:
            proc = subprocess.Popen(_argv(cfg, "up", vm), stdin=subprocess.DEVNULL,
                                    stdout=theirs.fileno(), stderr=subprocess.PIPE,
                                    env=_env(), close_fds=True)
        except OSError as exc:
            raise RuntimeFailure(f"VM {vm.name}: cannot run {SUDO}: {exc.strerror}") from exc
        theirs.close()
        mine.settimeout(TIMEOUT)
        try:
            msg, fds, _, _ = socket.recv_fds(mine, 64, 64)
        except OSError:
            msg = b""
        try:
            _, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if proc.returncode != 0 or not msg.startswith(b"ok "):
            raise RuntimeFailure(f"VM {vm.name}: network setup failed: "
                                 f"{_reason(err, proc.returncode)}")
        if expect is not None and len(fds) != expect:
            raise RuntimeFailure(f"VM {vm.name}: the network helper sent {len(fds)} taps, "
                                 f"expected {expect}")
        for fd in fds:
            os.set_inheritable(fd, False)
        out, fds = fds, []
        return out
    finally:
        for fd in fds:
            os.close(fd)
        mine.close()
        theirs.close()


def remaining(cfg: Config, vm: VM, taps: int) -> list[str]:
    """Which of the VM's tap names exist in this network namespace (no
    privilege needed).  The names are the helper's own derivation."""
    from kvmshell.common.guestnet import tap_name

    out = []
    for i in range(taps):
        name = tap_name(cfg.vmdir, vm.name, i)
        try:
            socket.if_nametoindex(name)
        except OSError:
            continue
        out.append(name)
    return out


def down(cfg: Config, vm: VM) -> None:
    """Have the helper delete whatever taps of the VM remain."""
    import subprocess

    try:
        r = subprocess.run(_argv(cfg, "down", vm), stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           env=_env(), timeout=TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeFailure(f"VM {vm.name}: network teardown failed: {exc}") from exc
    if r.returncode != 0:
        raise RuntimeFailure(f"VM {vm.name}: network teardown failed: "
                             f"{_reason(r.stderr, r.returncode)}")
