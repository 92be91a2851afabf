"""Per-user limits, enforced by kvmshell outside QEMU.

Admin settings (``kvmshell.conf``):
  max_running      running VMs per user (0: unlimited);
  max_image_bytes  bytes of files in all of a user's VM directories (0: unlimited).

Why outside QEMU: QEMU is assumed compromised, so nothing it says about
itself counts.  kvmshell counts running VMs from /proc (monitor.qemu_pid)
and disk use from the filesystem, before anything starts, and caps the
QEMU process with rlimits set between fork and exec: a guest (or a
hijacked QEMU) that wants more memory than the admin gave it gets none.
"""

from __future__ import annotations

import os
import stat

from kvmshell.common.config import Config
from kvmshell.common.errors import RuntimeFailure
from kvmshell.common.vmtree import VM

# QEMU's own memory beside guest RAM: code, libraries, thread stacks,
# malloc arenas, device state.  Measured ~290 MiB for an idle TCG guest
# with the translation buffer below; the rest is headroom (VNC, disks).
OVERHEAD_MIB = 768
# TCG's translation buffer.  QEMU 7.2 defaults to 1 GiB of address space
# for it, which would dwarf the cap: the wrapper sets it explicitly.
TB_SIZE_MIB = 128


class LimitReached(RuntimeFailure):
    """An admin limit refuses the start (nothing was started)."""


def address_space_bytes(megs: int) -> int:
    """RLIMIT_AS for a QEMU whose guest has *megs* MiB of RAM."""
    return (megs + TB_SIZE_MIB + OVERHEAD_MIB) << 20


def user_lock(cfg: Config, mine: list[VM]) -> int:
    """Serialise this user's starts while they count and start.

    Why a directory: the user can replace any file in their own VM
    directories (and so would defeat a lock file), but not the directories
    themselves, which live in the root-owned top directory.  The lock is an
    flock on the user's first VM directory (by name), so different users
    never wait for each other.
    """
    import fcntl

    fd = os.open(mine[0].path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def charge(path: str, st: os.stat_result) -> int:
    """What one file counts against ``max_image_bytes``: the most it can
    take, in bytes -- its apparent size, its allocated blocks, and, for a
    qcow2 image, its virtual size (a guest may write its whole disk; a
    sparse file may be filled)."""
    size = max(st.st_size, st.st_blocks * 512)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return size
    try:
        head = os.pread(fd, 32, 0)
    except OSError:
        return size
    finally:
        os.close(fd)
    if head[:4] == b"QFI\xfb" and len(head) == 32:
        size = max(size, int.from_bytes(head[24:32], "big"))
    return size


def image_bytes(vms: list[VM]) -> int:
    """What all regular files in *vms*' directories count against
    ``max_image_bytes`` (see :func:`charge`), in bytes."""
    total = 0
    for vm in vms:
        for dirpath, _dirs, leaves in os.walk(vm.path):  # os.walk never follows symlinks
            for leaf in leaves:
                path = os.path.join(dirpath, leaf)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    total += charge(path, st)
    return total


def check(cfg: Config, vm: VM) -> int:
    """Refuse the start if a limit is reached; return a lock fd to hold until
    the VM runs (or -1 when there is no running-VM limit)."""
    if not cfg.max_running and not cfg.max_image_bytes:
        return -1
    from kvmshell.shell import monitor
    from kvmshell.common import vmtree

    mine = vmtree.owned(cfg, vm.uid)
    if not any(m.dirname == vm.dirname for m in mine):
        mine.append(vm)
    lock = user_lock(cfg, mine) if cfg.max_running else -1
    try:
        if cfg.max_running:
            running = [m.name for m in mine if m.dirname != vm.dirname and monitor.qemu_pid(m)]
            if len(running) >= cfg.max_running:
                raise LimitReached(
                    f"VM {vm.name}: you already run {len(running)} VM(s) "
                    f"({', '.join(sorted(running))}), the limit is {cfg.max_running}")
        if cfg.max_image_bytes:
            used = image_bytes(mine)
            if used > cfg.max_image_bytes:
                raise LimitReached(
                    f"VM {vm.name}: your VM directories use {used} bytes, over the "
                    f"limit of {cfg.max_image_bytes} bytes: delete some images")
    except BaseException:
        if lock >= 0:
            os.close(lock)
        raise
    return lock


def qemu_rlimits(cfg: Config, megs: int) -> list[tuple[int, int]]:
    """(resource, limit) pairs for QEMU: address space, and file size when
    images are limited (no single image may grow past the user's total)."""
    import resource

    out = [(resource.RLIMIT_AS, address_space_bytes(megs))]
    if cfg.max_image_bytes:
        out.append((resource.RLIMIT_FSIZE, cfg.max_image_bytes))
    return out


def apply(rlimits: list[tuple[int, int]]) -> None:
    """Set *rlimits* on the calling process (QEMU, between fork and exec)."""
    import resource

    for res, value in rlimits:
        resource.setrlimit(res, (value, value))
