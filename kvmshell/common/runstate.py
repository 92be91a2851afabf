"""Is a VM running, and since when: answered from /proc, for kvmshell and kvmadm.

Shared by the user's side (status, start, limits) and root's kvmadm
(list, set, remove), so both decide "running" the same way.
"""

from __future__ import annotations

import os
import stat

from kvmshell.common.vmtree import VM

PIDFILE = "qemu.pid"


def qemu_pid(vm: VM) -> int | None:
    """The pid of this VM's QEMU, or None.  The pid file is user-writable,
    so the process is checked: same uid, and its argv names this VM.

    Why the careful open: root (kvmadm list, show, usage, autostart) reads
    it too.  A FIFO must not block, a symlink must not send root to a
    device (a serial port whose open waits for carrier, a watchdog armed by
    an open), so: ``O_NOFOLLOW|O_NONBLOCK|O_NOCTTY`` and a regular file of
    the VM's owner, or no pid."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(vm.file(PIDFILE), flags)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != vm.uid:
            return None
        pid = int(os.read(fd, 32).strip() or b"0")
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
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
