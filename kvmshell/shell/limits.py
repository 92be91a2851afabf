"""Per-user limits, enforced by kvmshell outside QEMU.

Admin settings (``kvmshell.conf``, overridden per user and per group under
``/etc/kvmshell/budgets``: see :mod:`kvmshell.common.budgets`):
  max_running      running VMs per user (0: unlimited);
  max_ram_mib      the sum of -m over the user's running VMs (0: unlimited);
  max_vcpus        the sum of -smp over the user's running VMs (0: unlimited);
  max_image_bytes  bytes of files in all of a user's VM directories (0: unlimited).

These checks are the friendly, early refusal.  Against code running as the
user (which can delete the files counted here, or run QEMU itself) the
budgets are held by the kernel: the cgroup helper puts every VM in the
user's cgroup with limits from root's files (:func:`place`).

Why outside QEMU: QEMU is assumed compromised, so nothing it says about
itself counts.  kvmshell counts running VMs from /proc (monitor.qemu_pid)
and disk use from the filesystem, before anything starts, and caps the
QEMU process with rlimits set between fork and exec: a guest (or a
hijacked QEMU) that wants more memory than the admin gave it gets none.
"""

from __future__ import annotations

import os
import stat

TYPE_CHECKING = False
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


def image_bytes(vms: list[VM]) -> int:
    """Disk space (allocated blocks) of all regular files in *vms*' directories."""
    total = 0
    for vm in vms:
        for dirpath, _dirs, leaves in os.walk(vm.path):  # os.walk never follows symlinks
            for leaf in leaves:
                try:
                    st = os.lstat(os.path.join(dirpath, leaf))
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    total += st.st_blocks * 512
    return total


def check(cfg: Config, vm: VM) -> int:
    """Refuse the start if a limit is reached; return a lock fd to hold until
    the VM runs (or -1 when there is no running-VM limit)."""
    b = budget(cfg, vm.uid)
    if not any(b.values.values()):
        return -1
    from kvmshell.shell import monitor
    from kvmshell.common import vmtree

    mine = vmtree.owned(cfg, vm.uid)
    if not any(m.dirname == vm.dirname for m in mine):
        mine.append(vm)
    lock = user_lock(cfg, mine) if _needs_lock(b) else -1
    try:
        if b["max_running"]:
            running = [m.name for m in mine if m.dirname != vm.dirname and monitor.qemu_pid(m)]
            if len(running) >= b["max_running"]:
                raise LimitReached(
                    f"VM {vm.name}: you already run {len(running)} VM(s) "
                    f"({', '.join(sorted(running))}), the limit is {b['max_running']}")
        check_totals(b, vm, mine)
        if b["max_image_bytes"]:
            used = image_bytes(mine)
            if used > b["max_image_bytes"]:
                raise LimitReached(
                    f"VM {vm.name}: your VM directories use {used} bytes, over the "
                    f"limit of {b['max_image_bytes']} bytes: delete some images")
    except BaseException:
        if lock >= 0:
            os.close(lock)
        raise
    return lock


def qemu_rlimits(cfg: Config, megs: int, image_limit: int | None = None) -> list[tuple[int, int]]:
    """(resource, limit) pairs for QEMU: address space, and file size when
    images are limited (no single image may grow past the user's total).
    *image_limit*: the user's max_image_bytes (default: kvmshell.conf's)."""
    import resource

    limit = cfg.max_image_bytes if image_limit is None else image_limit
    out = [(resource.RLIMIT_AS, address_space_bytes(megs))]
    if limit:
        out.append((resource.RLIMIT_FSIZE, limit))
    return out


def apply(rlimits: list[tuple[int, int]]) -> None:
    """Set *rlimits* on the calling process (QEMU, between fork and exec)."""
    import resource

    for res, value in rlimits:
        resource.setrlimit(res, (value, value))


# ---- budgets of RAM and vCPUs, kept apart from the counting above ----

_BUDGETS: dict[tuple[int, int], "Budget"] = {}

if TYPE_CHECKING:
    from kvmshell.common.budgets import Budget


def budget(cfg: Config, uid: int) -> "Budget":
    """The user's resolved budgets (kvmshell.conf, group and user files),
    read once per process."""
    key = (id(cfg), uid)
    if key not in _BUDGETS:
        from kvmshell.common import budgets
        _BUDGETS[key] = budgets.resolve(cfg, uid)
    return _BUDGETS[key]


def _needs_lock(b: "Budget") -> bool:
    """Budgets over running VMs are counted under the per-user lock."""
    return bool(b["max_running"] or b["max_ram_mib"] or b["max_vcpus"])


def check_totals(b: "Budget", vm: VM, mine: list[VM]) -> None:
    """Refuse the start if *vm*'s RAM or vCPUs do not fit what the user's
    other running VMs leave of the budget.  Called under the per-user lock.

    Raises:
        LimitReached: naming the budget, what *vm* needs and what is left.
    """
    if not b["max_ram_mib"] and not b["max_vcpus"]:
        return
    from kvmshell.common import budgets

    megs, smp = budgets.vm_size(vm)
    t = budgets.totals(mine, skip=vm.dirname)
    others = f" ({', '.join(sorted(t.running))} running)" if t.running else ""
    for key, what, need, used in (("max_ram_mib", "RAM", megs, t.ram_mib),
                                  ("max_vcpus", "vCPU", smp, t.vcpus)):
        limit = b[key]
        if limit and used + need > limit:
            left = max(limit - used, 0)
            if key == "max_ram_mib":
                needs, limit_s, left_s = f"{need} MiB of RAM", f"{limit} MiB", f"{left} MiB"
            else:
                needs, limit_s, left_s = f"{need} vCPU(s)", str(limit), f"{left} vCPU(s)"
            raise LimitReached(
                f"VM {vm.name}: needs {needs}, your {what} budget ({key} = {limit_s}, "
                f"{b.sources[key]}) has {left_s} left{others}")


def image_limit(cfg: Config, uid: int) -> int:
    """The user's max_image_bytes (0: unlimited), for RLIMIT_FSIZE."""
    return budget(cfg, uid)["max_image_bytes"]
