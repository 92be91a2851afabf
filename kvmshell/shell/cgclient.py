"""kvmshell's side of the cgroup helper (see kvmshell/privileged/cgrouphelper.py).

``start`` asks the helper, through sudo, to put this very process in the
user's cgroup (``attach VM``): the helper learns which process from the
socketpair on its stdin (the kernel records who made it), so nothing but a
verb and the VM name crosses.  The supervisor and QEMU are forked after the
move and are born inside, with the kernel's limits from the user's budget.

The request runs while ``start`` opens files and sets up the network
(:func:`begin` .. :func:`finish`), so its cost overlaps with that work.
"""

from __future__ import annotations

from kvmshell.common.config import Config
from kvmshell.common.errors import RuntimeFailure
from kvmshell.common.vmtree import VM

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    import subprocess

SUDO = "/usr/bin/sudo"
TIMEOUT = 30.0


class Pending:
    """A running ``attach`` request."""

    def __init__(self, vm: VM, proc: "subprocess.Popen[bytes]", sock: "socket.socket") -> None:
        self.vm = vm
        self.proc = proc
        self.sock = sock


def begin(cfg: Config, vm: VM) -> Pending | None:
    """Start the helper's ``attach`` for *vm* (None when the kernel holds no
    budgets here: ``cgroup = off``, or ``auto`` on a host without a mechanism)."""
    from kvmshell.common import cgroups
    if cgroups.mode(cfg) == "off":
        return None
    import subprocess

    # Imported here, not at the top: 'socket' costs ~7 ms (enum, selectors)
    # and every start imports this module, with cgroup = off too.
    import socket

    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Why the environment: nothing of the user's goes near a root process.
        proc = subprocess.Popen([SUDO, "-n", "--", cfg.cgroup_helper, "attach", vm.name],
                                stdin=theirs.fileno(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
                                close_fds=True)
    except OSError as exc:
        mine.close()
        raise RuntimeFailure(f"VM {vm.name}: cannot run {SUDO}: {exc.strerror}") from exc
    finally:
        theirs.close()
    return Pending(vm, proc, mine)


def finish(p: Pending | None) -> None:
    """Wait for the helper; raise RuntimeFailure (with its reason) unless this
    process is now in the user's cgroup."""
    if p is None:
        return
    import subprocess

    try:
        try:
            _, err = p.proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            p.proc.kill()
            _, err = p.proc.communicate()
    finally:
        p.sock.close()
    if p.proc.returncode != 0:
        lines = [l for l in err.decode("utf-8", "replace").splitlines() if l.strip()]
        reason = lines[-1].strip() if lines else f"exit status {p.proc.returncode}"
        raise RuntimeFailure(f"VM {p.vm.name}: cannot apply your budget's kernel limits: {reason}")


def cancel(p: Pending | None) -> None:
    """Wait for the helper without judging it (the start failed anyway)."""
    if p is None:
        return
    try:
        p.proc.communicate(timeout=TIMEOUT)
    except Exception:
        p.proc.kill()
        p.proc.wait()
    finally:
        p.sock.close()
