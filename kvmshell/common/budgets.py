"""Per-user budgets: what one user's running VMs may take in total.

Shared by kvmshell (the early check at start, ``quota``),
kvmadm (``usage``, systemd slice drop-ins) and the cgroup helper (the
kernel's limits), so all three read the same numbers from the same
root-owned files.

The budgets (0 means unlimited):

  max_running      running VMs
  max_ram_mib      the sum of ``-m`` over running VMs, in MiB
  max_vcpus        the sum of ``-smp`` over running VMs
  max_image_bytes  allocated bytes of all files in the user's VM directories
                   (the directories' own blocks included)

Where they live (the filesystem is the only database), highest first:

  1. ``BUDGETS/users/USER.conf``   the user's own file;
  2. ``BUDGETS/groups/GROUP.conf`` one per group the user is in (the group
     database: primary and supplementary groups).  When several of the
     user's groups set a budget, the most generous wins (0, unlimited,
     beats any number): a group grants, membership never takes away;
  3. ``kvmshell.conf``             the defaults.

Each key is resolved on its own, so a user file that sets only
``max_ram_mib`` keeps the group's or the default's other budgets.
``BUDGETS`` is the ``budgets`` setting (default ``/etc/kvmshell/budgets``).
The files have kvmshell.conf's format (``key = value``, ``#`` comments,
unknown keys are errors) and must be regular files owned by root and not
group/world-writable, of at most :data:`MAX_FILE_BYTES` bytes; a file that
is not is an error, never skipped.
"""

from __future__ import annotations

import os
import stat

from kvmshell.common.errors import ConfigError, Unmeasured
from kvmshell.common.rootfile import read_root_file

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

    from kvmshell.common.config import Config
    from kvmshell.common.vmtree import VM

KEYS = ("max_running", "max_ram_mib", "max_vcpus", "max_image_bytes")
MAX_FILE_BYTES = 65536     # a budget file's size cap (a larger one is refused)
# What the kernel allows one running VM beyond its guest RAM: QEMU's code,
# heap and thread stacks (~100 MiB measured for a TCG guest) and the TCG
# translation buffer (128 MiB, see shell/limits.py), with headroom.
OVERHEAD_MIB = 256
# Tasks (threads) per running VM: QEMU's main, RCU and vCPU threads and its
# I/O worker pool (up to 64), the supervisor, the helpers it runs.
TASKS_PER_VM = 192
CPU_PERIOD_US = 100_000
# cgroup v1 cpu.shares of one user's group, and of the group of all VM
# users together: under contention all VMs together weigh as much as one
# busy host process (CPUWeight=100 in systemd's terms), so the host stays
# usable; idle CPU time is still theirs to use.
CPU_SHARES = 1024
# How deep a VM directory may be for its bytes to be counted (one
# descriptor per level is held while the walk is below it).
MAX_DEPTH = 64


class Budget:
    """A user's resolved budgets: ``values[key]`` (0: unlimited) and
    ``sources[key]`` (``default``, ``user NAME`` or ``group NAME``)."""

    def __init__(self, user: str, uid: int) -> None:
        self.user = user
        self.uid = uid
        self.values: dict[str, int] = {}
        self.sources: dict[str, str] = {}

    def __getitem__(self, key: str) -> int:
        return self.values[key]


def _name_ok(name: str) -> bool:
    return bool(name) and "/" not in name and name[0] != "." and "\0" not in name


def read_file(path: str) -> dict[str, int] | None:
    """The budgets one root-owned file sets, or None if there is no file.

    Raises:
        ConfigError: the file is not a root-owned regular file or is over
            :data:`MAX_FILE_BYTES` bytes
            (:func:`~kvmshell.common.rootfile.read_root_file`), or a line is
            not ``key = number`` with a key of :data:`KEYS`.
    """
    # Why root's: a budget file a user could write would let them grant themselves more.
    data = read_root_file(path, MAX_FILE_BYTES, "budget file")
    if data is None:
        return None
    out: dict[str, int] = {}
    for lineno, raw in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, eq, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or key not in KEYS:
            raise ConfigError(f"{path}:{lineno}: unknown budget {key!r} ({', '.join(KEYS)})")
        if not value.isdigit() or len(value) > 19:
            raise ConfigError(f"{path}:{lineno}: {key}: not a number: {value!r}")
        out[key] = int(value)
    return out


def _more_generous(a: int, b: int) -> int:
    return 0 if a == 0 or b == 0 else max(a, b)


def groups_of(user: str, gid: int) -> list[str]:
    """The names of *user*'s groups (primary and supplementary), from the group database."""
    import grp
    names = set()
    for g in os.getgrouplist(user, gid):
        try:
            names.add(grp.getgrgid(g).gr_name)
        except KeyError:
            continue
    return sorted(names)


def resolve(cfg: "Config", uid: int) -> Budget:
    """The budgets of the user *uid*, by the precedence in this module's doc.

    Raises:
        ConfigError: a budget file is unsafe or malformed.
    """
    import pwd
    try:
        pw = pwd.getpwuid(uid)
        user, gid = pw.pw_name, pw.pw_gid
    except KeyError:
        user, gid = str(uid), -1
    b = Budget(user, uid)
    for key in KEYS:
        b.values[key] = int(getattr(cfg, key))
        b.sources[key] = "default"
    if gid >= 0:
        granted: dict[str, tuple[int, str]] = {}
        for group in groups_of(user, gid):
            if not _name_ok(group):
                continue
            got = read_file(os.path.join(cfg.budgets, "groups", group + ".conf"))
            for key, value in (got or {}).items():
                if key in granted:
                    best = _more_generous(granted[key][0], value)
                    if best != granted[key][0]:
                        granted[key] = (best, group)
                else:
                    granted[key] = (value, group)
        for key, (value, group) in granted.items():
            b.values[key], b.sources[key] = value, f"group {group}"
    if _name_ok(user):
        own = read_file(os.path.join(cfg.budgets, "users", user + ".conf"))
        for key, value in (own or {}).items():
            b.values[key], b.sources[key] = value, f"user {user}"
    return b


# ---- what the user's running VMs take ---------------------------------------

class Totals:
    """What a user's running VMs take: their names, RAM (MiB) and vCPUs,
    read from the admin's words in each VM's identifier."""

    def __init__(self) -> None:
        self.running: list[str] = []
        self.ram_mib = 0
        self.vcpus = 0
        # Of those, the VMs locked exclusively: a start still deciding.
        self.deciding_ram_mib = 0
        self.deciding_vcpus = 0


def vm_size(vm: "VM") -> tuple[int, int]:
    """(RAM MiB, vCPUs) the admin gave *vm*; (0, 0) if its identifier does not
    parse (such a VM cannot start)."""
    from kvmshell.common import adminopts
    from kvmshell.common.errors import KvmshellError
    try:
        plan = adminopts.parse_admin(vm.admin_words)
    except KvmshellError:
        return 0, 0
    return plan.megs, plan.smp


def totals(vms: "list[VM]", skip: str | None = None,
           table: dict[str, list[tuple[int, bool]]] | None = None) -> Totals:
    """Totals over the VMs among *vms* whose lock is held (running, being
    started or stopped: common/runstate.py; *table*: the lock table, read
    here if not given), not counting directory *skip*."""
    from kvmshell.common import runstate
    table = runstate.lock_table() if table is None else table
    t = Totals()
    for vm in vms:
        held = runstate.holders(vm, table)
        if vm.dirname == skip or not held:
            continue
        megs, smp = vm_size(vm)
        t.running.append(vm.name)
        t.ram_mib += megs
        t.vcpus += smp
        if any(exclusive for _, exclusive in held):
            t.deciding_ram_mib += megs
            t.deciding_vcpus += smp
    return t


def files_below(path: str) -> Iterator[tuple[int, str, str, os.stat_result]]:
    """Every file of the directory *path*, itself first and then everything
    below it, depth first, directories included (they take blocks too: a
    directory of many long names, hard links of one empty file, holds
    megabytes), as (descriptor of its directory, its name there, its path
    below *path* for messages, its ``lstat``); *path* itself comes as
    (its own descriptor, ``"."``, ``""``, its ``fstat``).  Walked through
    directory descriptors
    opened ``O_NOFOLLOW|O_NONBLOCK`` (a symlink is never followed, a FIFO
    never waited on), one descriptor per level and at most MAX_DEPTH
    levels, so a wide or deep tree cannot run the walker out of
    descriptors.  What is gone meanwhile is skipped.  Raises Unmeasured
    (its *partial* left 0) naming the first thing it cannot read, never
    a smaller count in silence (``du`` says "cannot read directory" too)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        top = os.open(path, flags)
    except OSError as exc:
        raise Unmeasured("", exc.strerror or "error") from exc
    try:
        stack = [(top, os.scandir(top), "")]
    except OSError as exc:
        os.close(top)
        raise Unmeasured("", exc.strerror or "error") from exc
    try:
        try:
            here = os.fstat(top)
        except OSError as exc:
            raise Unmeasured("", exc.strerror or "error") from exc
        yield top, ".", "", here
        while stack:
            dfd, entries, rel = stack[-1]
            name = rel
            try:
                entry = next(entries, None)
                if entry is None:
                    stack.pop()
                    entries.close()
                    os.close(dfd)
                    continue
                name = f"{rel}/{entry.name}" if rel else entry.name
                st = entry.stat(follow_symlinks=False)
                yield dfd, entry.name, name, st
                if stat.S_ISDIR(st.st_mode):
                    if len(stack) >= MAX_DEPTH:
                        raise Unmeasured(name, f"more than {MAX_DEPTH} levels deep")
                    sub = os.open(entry.name, flags, dir_fd=dfd)
                    try:
                        stack.append((sub, os.scandir(sub), name))
                    except BaseException:
                        os.close(sub)
                        raise
            except FileNotFoundError:
                continue   # gone meanwhile: nothing left to count
            except OSError as exc:
                raise Unmeasured(name, exc.strerror or "error") from exc
    finally:
        for dfd, entries, _ in stack:
            entries.close()
            os.close(dfd)


def dir_bytes(path: str) -> int:
    """Allocated bytes (``st_blocks`` x 512) of the directory *path* and
    every file below it, directories included, for root (kvmadm):
    :func:`files_below`, which opens only directories.  Raises
    Unmeasured, its *partial* the bytes counted before the walk stopped
    (a lower bound)."""
    total = 0
    try:
        for _, _, _, st in files_below(path):
            total += st.st_blocks * 512
    except Unmeasured as exc:
        exc.partial = total
        raise
    return total


def held_bytes(vms: "list[VM]", seen: set[tuple[int, int]] | None = None) -> int:
    """Disk space of files that are unlinked but still open in a process of
    the VMs' owner, on the VMs' filesystems: QEMU's ``-snapshot`` overlay
    (a temporary file QEMU removes at once and keeps open, in the VM
    directory, its TMPDIR).  No directory walk sees them.  Read from
    /proc/PID/fd of the owner's processes; one that hides its descriptors
    (not dumpable) is counted by root only.  Files in *seen* ((dev, ino), counted
    already) are skipped.  The owner (kvmshell's count) or root (kvmadm
    usage) may call it."""
    from kvmshell.common import runstate
    if not vms:
        return 0
    uid = vms[0].uid
    devs = set()
    for vm in vms:
        try:
            devs.add(os.lstat(vm.path).st_dev)
        except OSError:
            pass
    seen = set() if seen is None else seen
    total = 0
    for _, st in runstate.open_files(uid):
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 0 and st.st_dev in devs \
                and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


# ---- the kernel's side ------------------------------------------------------------

class KernelLimits:
    """The cgroup limits of one user, from the budget (None: no limit).

    memory_bytes  max_ram_mib + OVERHEAD_MIB per VM slot (cgroup v1
                  ``memory.limit_in_bytes``; systemd ``MemoryMax``);
    cpu_quota_us  max_vcpus CPUs of time per CPU_PERIOD_US (``cpu.cfs_quota_us``;
                  ``CPUQuota`` = max_vcpus x 100%);
    pids          TASKS_PER_VM per slot (``pids.max``; ``TasksMax``).

    A slot is a VM the user may run at once: ``max_running`` if set, and
    never more than the VMs the user owns (the root-owned tree says).
    """

    def __init__(self, budget: Budget, owned: int) -> None:
        slots = max(1, min(budget["max_running"] or owned, owned))
        self.slots = slots
        ram = budget["max_ram_mib"]
        self.memory_bytes: int | None = (ram + OVERHEAD_MIB * slots) << 20 if ram else None
        vcpus = budget["max_vcpus"]
        self.cpu_quota_us: int | None = vcpus * CPU_PERIOD_US if vcpus else None
        self.cpu_period_us = CPU_PERIOD_US
        self.cpu_shares = CPU_SHARES
        self.pids = TASKS_PER_VM * slots

    def as_dict(self) -> dict[str, int | None]:
        return {"memory_bytes": self.memory_bytes, "cpu_quota_us": self.cpu_quota_us,
                "cpu_period_us": self.cpu_period_us, "cpu_shares": self.cpu_shares,
                "pids": self.pids}


def owned_count(cfg: "Config", uid: int) -> int:
    """How many VMs of the tree *uid* owns, from the root-owned top directory:
    its symlinks and the owners of the directories they name (lstat only)."""
    import stat as st_
    n = 0
    try:
        entries = list(os.scandir(cfg.vmdir))
    except OSError:
        return 0
    for entry in entries:
        if "." in entry.name or not entry.is_symlink():
            continue
        try:
            target = os.readlink(entry.path)
            st = os.lstat(os.path.join(cfg.vmdir, target))
        except OSError:
            continue
        if "/" not in target and st_.S_ISDIR(st.st_mode) and st.st_uid == uid:
            n += 1
    return n


def slice_dropin(limits: KernelLimits) -> str:
    """The ``user-UID.slice`` drop-in for one user (systemd hosts), from
    :class:`KernelLimits`.  Keys: systemd.resource-control(5)."""
    lines = ["# Written by kvmadm slices from kvmshell's budgets; do not edit.",
             "[Slice]",
             "CPUWeight=100",
             f"TasksMax={limits.pids}"]
    if limits.memory_bytes is not None:
        lines.append(f"MemoryMax={limits.memory_bytes >> 20}M")
    if limits.cpu_quota_us is not None:
        lines.append(f"CPUQuota={limits.cpu_quota_us * 100 // limits.cpu_period_us}%")
    return "\n".join(lines) + "\n"
