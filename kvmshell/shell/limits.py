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
itself counts.  kvmshell counts running VMs from the kernel's lock table
and /proc (common/runstate.py) and disk use from the filesystem and the
descriptors it hands QEMU, before anything starts, and caps the
QEMU process with rlimits set between fork and exec: a guest (or a
hijacked QEMU) that wants more memory than the admin gave it gets none.
"""

from __future__ import annotations

import os
import stat

TYPE_CHECKING = False
from kvmshell.common import runstate
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

    outcome = "refused"   # exit 1 as before; the audit record says refused


def address_space_bytes(megs: int) -> int:
    """RLIMIT_AS for a QEMU whose guest has *megs* MiB of RAM."""
    return (megs + TB_SIZE_MIB + OVERHEAD_MIB) << 20


# ---- counting: running VMs and image bytes -------------------------------
# (issue 20: nothing counted rests on a file the user can unlink, and
# whatever cannot be counted refuses the start)

# How long a start waits for other starts of the same user that are still
# deciding.
CONTENTION_SECONDS = 5.0


class _Deciding(Exception):
    """Over the limit only if other starts of the user, still deciding, go on."""


def admit(cfg: Config, vm: VM, lock: int, fds: list[int]) -> int:
    """Refuse the start if a limit or budget is reached; return the bytes
    the user's VM directories and *fds* count (0 when not counted).

    Called with *vm*'s lock held exclusively (runstate.lock) and its files
    open (*fds*, counted from the descriptors).  Why no per-user lock: the
    start holds its own VM's lock while it counts every other locked VM of
    the user, so of two concurrent starts the second to count sees the
    first.  When that would refuse both, the one that counted first lets
    go of its lock for a random moment and counts again.  Raises
    LimitReached, or AlreadyRunning if the VM was started meanwhile."""
    b = budget(cfg, vm.uid)
    if not any(b.values.values()):
        return 0
    import time

    deadline = time.monotonic() + CONTENTION_SECONDS
    while True:
        try:
            return _check(cfg, b, vm, fds)
        except _Deciding as exc:
            if time.monotonic() > deadline:
                raise LimitReached(str(exc)) from exc
        runstate.unlock(lock)
        time.sleep(0.01 + os.urandom(1)[0] / 2550)   # 10 to 110 ms: contenders part
        runstate.relock(vm, lock)


def _check(cfg: Config, b: "Budget", vm: VM, fds: list[int]) -> int:
    from kvmshell.common import vmtree

    scan = vmtree.scan(cfg, vm.uid)
    # A broken directory of the user's own still holds files and may be
    # locked by a running QEMU (its mode changed under it): both count.
    others = [m for m in scan.dirs if m.dirname != vm.dirname]
    if b["max_running"] or b["max_ram_mib"] or b["max_vcpus"]:
        table = runstate.lock_table()
        if b["max_running"]:
            running_vms(cfg, b, vm, others, table)
        check_totals(b, vm, [m for m in scan.vms if m.dirname != vm.dirname], table)
    if not b["max_image_bytes"]:
        return 0
    used = image_bytes(others + [vm], fds, vm.uid)
    if used > b["max_image_bytes"]:
        raise LimitReached(
            f"VM {vm.name}: your VM directories use {used} bytes, over the "
            f"limit of {b['max_image_bytes']} bytes: delete some images")
    return used


def running_vms(cfg: Config, b: "Budget", vm: VM, others: list[VM],
                table: dict[str, list[tuple[int, bool]]]) -> int:
    """Count the user's running VMs besides *vm*; raise LimitReached (or
    _Deciding) at max_running.

    A VM counts while anyone holds its lock (running, starting or
    stopping), and so does every QEMU process of the user that holds no
    lock of the user's VMs: a sandboxed QEMU cannot change its executable,
    so giving up its lock does not take it out of the count."""
    running: list[str] = []
    deciding: list[str] = []
    lockers: set[int] = set()
    for m in others:
        held = runstate.holders(m, table)
        if held:
            running.append(m.name)
            lockers.update(pid for pid, _ in held)
            if any(exclusive for _, exclusive in held):
                deciding.append(m.name)
    loose = [p for p in runstate.qemu_pids(vm.uid, cfg.qemu) if p not in lockers]
    n = len(running) + len(loose)
    limit = b["max_running"]
    if n >= limit:
        what = ", ".join(sorted(running) + [f"QEMU pid {p}" for p in loose])
        msg = f"VM {vm.name}: you already run {n} VM(s) ({what}), the limit is {limit}"
        if deciding and n - len(deciding) < limit:
            raise _Deciding(msg)
        raise LimitReached(msg)
    return n


def charge(fd: int, st: os.stat_result) -> int:
    """What one file (open on *fd*) counts against ``max_image_bytes``: the
    most it can take, in bytes -- its apparent size, its allocated blocks,
    and, for a qcow2 image, its virtual size (a guest may write its whole
    disk; a sparse file may be filled)."""
    size = max(st.st_size, st.st_blocks * 512)
    try:
        head = os.pread(fd, 32, 0)
    except OSError:
        return size
    if head[:4] == b"QFI\xfb" and len(head) == 32:
        size = max(size, int.from_bytes(head[24:32], "big"))
    return size


def image_bytes(vms: list[VM], fds: list[int] | None = None, uid: int | None = None) -> int:
    """What every file in *vms*' directories (the directories too) counts
    against ``max_image_bytes`` (see :func:`charge`), in bytes, with the open files
    *fds* owned by *uid* (the files handed to QEMU, counted from their
    descriptors: once, however they are named meanwhile) and the unlinked
    files the user's processes hold (:func:`held_bytes`).  Raises
    LimitReached if anything cannot be counted: a directory the caller
    cannot read, or one deeper than budgets.MAX_DEPTH."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for fd in fds or []:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_uid == uid and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += charge(fd, st)
    for vm in vms:
        total += _dir_bytes(vm, seen)
    return total + held_bytes(vms, seen)


def _dir_bytes(vm: VM, seen: set[tuple[int, int]]) -> int:
    """*vm*'s directory and every file below it, directories included
    (budgets.files_below), each once."""
    from kvmshell.common import budgets
    from kvmshell.common.errors import Unmeasured
    total = 0
    rel = ""
    try:
        for dfd, leaf, rel, st in budgets.files_below(vm.path):
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                # A directory, symlink or FIFO takes its blocks; only a
                # regular file can claim more (a qcow2's virtual size).
                total += (_charge_at(dfd, leaf, st) if stat.S_ISREG(st.st_mode)
                          else st.st_blocks * 512)
    except (Unmeasured, OSError) as exc:
        why = exc.message if isinstance(exc, Unmeasured) else \
            f"cannot count {rel} ({exc.strerror or 'error'})"
        raise LimitReached(f"VM {vm.name}: {why}: a start is refused while anything in "
                           "your VM directories cannot be counted") from exc
    return total


def _charge_at(dfd: int, leaf: str, st: os.stat_result) -> int:
    """:func:`charge` of *leaf* in directory *dfd* (a file that cannot be
    opened, say mode 000, counts its size and blocks)."""
    try:
        fd = os.open(leaf, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                     | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return max(st.st_size, st.st_blocks * 512)
    try:
        return charge(fd, os.fstat(fd))
    finally:
        os.close(fd)


def held_bytes(vms: list[VM], seen: set[tuple[int, int]] | None = None) -> int:
    """:func:`kvmshell.common.budgets.held_bytes` (shared with kvmadm usage)."""
    from kvmshell.common import budgets
    return budgets.held_bytes(vms, seen)


# ---- max_image_bytes while QEMU runs: the file-size cap ---------------------
#
# RLIMIT_FSIZE stops a process writing at or past an offset (EFBIG; SIGXFSZ
# is ignored, so QEMU reports an I/O error to the guest instead of dying).
# So a file QEMU writes can gain at most (cap - what is allocated below the
# cap): a qcow2 grows by appending, a -snapshot overlay starts empty, and a
# raw image is written within its size (only its holes can fill).  The cap
# is chosen so that all of them together fit in the room left.

# QEMU's own log (its stderr) is a file it writes too: it may use this much
# even when no room is left, so that QEMU's reason for failing is kept.
LOG_ROOM = 64 * 1024


def file_size_cap(cfg: Config, vm: VM, writable: list[tuple[str, os.stat_result]],
                  overlays: int) -> int | None:
    """RLIMIT_FSIZE (bytes) for a QEMU that writes *writable* images
    ((format, fstat) of each descriptor opened read-write) and *overlays*
    -snapshot overlays; None when max_image_bytes is 0 (no limit).

    Worst case with the returned cap: every qcow2 and overlay grows to the
    cap and every raw image's holes fill; together that fits the room left
    of max_image_bytes (counted now, overlays of running VMs included).  A
    raw image needs a cap of at least its size (it is written anywhere
    within); if that cap would let the others outgrow the room, or holes
    alone do not fit, LimitReached (nothing started)."""
    limit = image_limit(cfg, vm.uid)
    if not limit:
        return None
    from kvmshell.common import vmtree

    dirs = vmtree.scan(cfg, vm.uid).dirs
    if not any(d.dirname == vm.dirname for d in dirs):
        dirs.append(vm)
    room = max(0, limit - image_bytes(dirs))
    holes = floor = 0
    grow: list[tuple[int, int]] = []          # (size, allocated) of each qcow2
    for fmt, st in writable:
        allocated = min(st.st_blocks * 512, st.st_size)
        if fmt == "qcow2":
            grow.append((st.st_size, allocated))
        else:
            holes += st.st_size - allocated
            floor = max(floor, st.st_size)

    def growth(cap: int) -> int:
        return holes + overlays * cap + sum(max(cap, size) - alloc for size, alloc in grow)

    if holes > room:
        raise LimitReached(f"VM {vm.name}: its raw images have {holes} bytes of holes the guest "
                           f"could fill, more than the {room} bytes left of max_image_bytes")
    if not grow and not overlays:
        return max(floor, LOG_ROOM)
    lo, hi = 0, room + max([size for size, _ in grow] + [0])
    while lo < hi:                            # the largest cap whose growth fits the room
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if growth(mid) <= room else (lo, mid - 1)
    if lo < floor:
        raise LimitReached(
            f"VM {vm.name}: a raw image of {floor} bytes needs a file-size cap that would let "
            f"its growing images (qcow2, -snapshot) outgrow the {room} bytes left of "
            "max_image_bytes: use -snapshot, or fewer writable images")
    return max(lo, LOG_ROOM)


def qemu_rlimits(cfg: Config, megs: int, fsize: int | None = None,
                 image_limit: int | None = None) -> list[tuple[int, int, int]]:
    """(resource, soft, hard) limits for QEMU: its address space, and when
    images are limited its file size: *fsize* (see file_size_cap) as the
    soft limit, the user's max_image_bytes (*image_limit*; default
    kvmshell.conf's) as the hard one (the most 'save' may raise it to, for
    the state file, while the guest is paused)."""
    import resource

    limit = cfg.max_image_bytes if image_limit is None else image_limit
    aspace = address_space_bytes(megs)
    out = [(resource.RLIMIT_AS, aspace, aspace)]
    if limit:
        hard = max(limit, fsize or 0)
        out.append((resource.RLIMIT_FSIZE, min(fsize or hard, hard), hard))
    return out


def apply(rlimits: list[tuple[int, int, int]]) -> None:
    """Set *rlimits* on the calling process (QEMU, between fork and exec)."""
    import resource

    for res, soft, hard in rlimits:
        resource.setrlimit(res, (soft, hard))
        if res == resource.RLIMIT_FSIZE:
            # An ignored signal stays ignored across exec: a write past the
            # cap fails with EFBIG (an I/O error for the guest), QEMU lives.
            # _signal: 'signal' imports enum, ~3 ms between fork and exec.
            import _signal  # type: ignore[import-not-found]
            _signal.signal(_signal.SIGXFSZ, _signal.SIG_IGN)


def lift_file_cap(pid: int) -> int | None:
    """Raise QEMU *pid*'s file-size soft limit to its hard limit (for the
    state 'save' writes while the guest is paused); return the old soft
    limit for :func:`restore_file_cap`, or None if there was nothing to do."""
    import resource

    try:
        soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        if soft == hard:
            return None
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard, hard))
    except OSError as exc:
        raise RuntimeFailure(f"cannot raise the file-size limit of QEMU (pid {pid}) "
                             f"for the state: {exc.strerror}") from exc
    return soft


def restore_file_cap(pid: int, soft: int | None) -> None:
    """Put back the soft limit :func:`lift_file_cap` raised (before the guest runs again)."""
    import resource

    if soft is None:
        return
    try:
        hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)[1]
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))
    except OSError:
        pass   # QEMU is gone


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


def check_totals(b: "Budget", vm: VM, others: list[VM],
                 table: dict[str, list[tuple[int, bool]]]) -> None:
    """Refuse the start if *vm*'s RAM or vCPUs do not fit what the user's
    other running VMs (*others* whose lock is held, from *table*) leave of
    the budget.  Called with *vm*'s lock held (see :func:`admit`).

    Raises:
        LimitReached: naming the budget, what *vm* needs and what is left.
        _Deciding: it would fit but for other starts still deciding.
    """
    if not b["max_ram_mib"] and not b["max_vcpus"]:
        return
    from kvmshell.common import budgets

    megs, smp = budgets.vm_size(vm)
    t = budgets.totals(others, table=table)
    running = f" ({', '.join(sorted(t.running))} running)" if t.running else ""
    for key, what, need, used, deciding in (
            ("max_ram_mib", "RAM", megs, t.ram_mib, t.deciding_ram_mib),
            ("max_vcpus", "vCPU", smp, t.vcpus, t.deciding_vcpus)):
        limit = b[key]
        if limit and used + need > limit:
            left = max(limit - used, 0)
            if key == "max_ram_mib":
                needs, limit_s, left_s = f"{need} MiB of RAM", f"{limit} MiB", f"{left} MiB"
            else:
                needs, limit_s, left_s = f"{need} vCPU(s)", str(limit), f"{left} vCPU(s)"
            msg = (f"VM {vm.name}: needs {needs}, your {what} budget ({key} = {limit_s}, "
                   f"{b.sources[key]}) has {left_s} left{running}")
            if deciding and used - deciding + need <= limit:
                raise _Deciding(msg)
            raise LimitReached(msg)


def image_limit(cfg: Config, uid: int) -> int:
    """The user's max_image_bytes (0: unlimited), for RLIMIT_FSIZE."""
    return budget(cfg, uid)["max_image_bytes"]
