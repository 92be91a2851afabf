"""Is a VM running, and since when: answered from /proc, for kvmshell and kvmadm.

Shared by the user's side (status, start, limits) and root's kvmadm
(list, set, remove), so both decide "running" the same way.
"""

from __future__ import annotations

import os

from kvmshell.common.vmtree import VM

PIDFILE = "qemu.pid"


def qemu_pid(vm: VM) -> int | None:
    """The pid of this VM's QEMU, or None.  The pid file is user-writable,
    so the process is checked: same uid, and its argv names this VM."""
    try:
        with open(vm.file(PIDFILE), "rb") as f:
            pid = int(f.read(32).strip() or b"0")
    except (OSError, ValueError):
        return None
    if pid <= 1:
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        st = os.stat(f"/proc/{pid}")
    except OSError:
        return None
    if st.st_uid != vm.uid or b"guest=" + vm.name.encode() not in argv:
        return None
    try:
        if os.readlink(f"/proc/{pid}/cwd") != vm.path:
            return None
    except OSError:
        return None
    return pid


def started_at(pid: int) -> float | None:
    """Seconds since the epoch when *pid* started."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open("/proc/stat", "rb") as f:
            btime = next(int(l.split()[1]) for l in f if l.startswith(b"btime"))
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
