"""Is a VM running, and may it start: the VM lock and /proc, for kvmshell and kvmadm.

Shared by the user's side (status, start, limits) and root's kvmadm (list,
set, remove), so both decide "running" the same way, and from nothing the
user can unlink or rewrite.

The VM lock is an ``flock`` on the VM directory itself, taken through a
descriptor of the directory, never on a file inside it: the user owns (and
may delete or replace) everything inside the directory, but not the
directory, which lives in root's top directory.  Who holds it:

    exclusive  a start deciding whether it may run (limits), or kvmadm
               changing the VM (set, remove): short
    shared     a VM that runs: its supervisor, and QEMU on an open file
               description of its own (so either going away alone still
               leaves the VM locked)
    nobody     a stopped VM

Running QEMUs are found in ``/proc/locks``: a holder of a lock on the
directory's inode whose executable (``/proc/PID/exe``, set by the kernel at
exec) is the configured QEMU and whose uid is the VM's.  QEMU takes its own
shared lock between fork and exec, so the lock's pid is QEMU's.  Nothing
here opens a file inside a VM directory, so root may use all of it.
"""

from __future__ import annotations

import os

from kvmshell.common.errors import AlreadyRunning, RuntimeFailure
from kvmshell.common.vmtree import VM

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

LOCKS = "/proc/locks"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
STOPPED, BUSY, RUNNING = "stopped", "busy", "running"


def _key(st: os.stat_result) -> str:
    # /proc/locks spells an inode as MAJOR:MINOR:INODE, the device in hex.
    return f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"


def lock_table() -> dict[str, list[tuple[int, bool]]]:
    """Every flock held on the host: inode key -> [(pid, exclusive)], from
    /proc/locks (format: Documentation/filesystems/proc.rst, "locks")."""
    out: dict[str, list[tuple[int, bool]]] = {}
    with open(LOCKS, "rb") as f:
        for line in f.read().decode("ascii", "replace").splitlines():
            # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5308563 0 EOF"; a waiter
            # has "->" after the number and holds nothing.
            parts = line.split()
            if len(parts) < 6 or parts[1] != "FLOCK":
                continue
            try:
                pid = int(parts[4])
            except ValueError:
                continue
            out.setdefault(parts[5], []).append((pid, parts[3] == "WRITE"))
    return out


def holders(vm: VM, table: dict[str, list[tuple[int, bool]]] | None = None) -> list[tuple[int, bool]]:
    """[(pid, exclusive)] of the locks on *vm*'s directory (empty: stopped).
    The pid is the process that took the lock (it may have exited since)."""
    try:
        st = os.lstat(vm.path)
    except FileNotFoundError:
        return []
    return (lock_table() if table is None else table).get(_key(st), [])


def is_qemu(pid: int, uid: int, qemu: str) -> bool:
    """Is *pid* a process of *uid* running the executable *qemu*?"""
    try:
        if os.stat(f"/proc/{pid}").st_uid != uid:
            return False
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    real = os.path.realpath(qemu)
    # A QEMU started before its package was upgraded runs a deleted file.
    return exe in (real, real + " (deleted)")


def qemu_pid(vm: VM, qemu: str, table: dict[str, list[tuple[int, bool]]] | None = None) -> int | None:
    """The pid of the QEMU that holds *vm*'s lock, or None."""
    for pid, _ in holders(vm, table):
        if is_qemu(pid, vm.uid, qemu):
            return pid
    return None


def state(vm: VM, qemu: str, table: dict[str, list[tuple[int, bool]]] | None = None) -> tuple[str, int | None]:
    """(RUNNING, pid), (BUSY, None): locked but no QEMU of the VM's (being
    started, stopped or changed by the admin), or (STOPPED, None)."""
    held = holders(vm, table)
    for pid, _ in held:
        if is_qemu(pid, vm.uid, qemu):
            return RUNNING, pid
    return (BUSY if held else STOPPED), None


def qemu_pids(uid: int, qemu: str) -> list[int]:
    """Every process of *uid* running *qemu*, whichever VM (or none) it
    claims: what a sandboxed QEMU cannot hide by giving up its lock."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and is_qemu(int(name), uid, qemu):
            out.append(int(name))
    return out


def open_files(uid: int) -> Iterator[tuple[int, os.stat_result]]:
    """(pid, ``stat`` of what the descriptor refers to) for every open
    descriptor of every process whose ``/proc/PID`` is *uid*'s.  Root
    (or *uid* itself) may look; a process that made itself non-dumpable
    has a ``/proc/PID/fd`` of root's, so only root sees its descriptors.
    Processes and descriptors gone meanwhile are skipped.  Only ``stat``
    through ``/proc/PID/fd``: nothing is opened."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                yield int(name), os.stat(f"/proc/{name}/fd/{fd}")
            except OSError:
                continue


def open_dir(vm: VM) -> int:
    """A descriptor of *vm*'s directory (opened through the root-owned top
    directory, so the user cannot put anything else in its place)."""
    try:
        return os.open(vm.path, _DIR_FLAGS)
    except OSError as exc:
        raise RuntimeFailure(f"VM {vm.name}: cannot open its directory: {exc.strerror}") from exc


def lock(vm: VM) -> int:
    """Take *vm*'s lock exclusively, without waiting; return the descriptor.

    Raises AlreadyRunning if anyone holds it (a running VM, a start or the
    admin), RuntimeFailure if the admin renamed or removed the VM meanwhile."""
    fd = open_dir(vm)
    try:
        relock(vm, fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def relock(vm: VM, fd: int) -> None:
    """Take the exclusive lock on *fd*, a descriptor of *vm*'s directory
    (see :func:`lock`; the caller keeps the descriptor either way)."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        raise AlreadyRunning(
            f"VM {vm.name!r} is already running (or being started or stopped)") from exc
    # Why: kvmadm set renames the directory under this lock; a start that
    # read the old name must not run the VM with the old options.
    try:
        same = (os.readlink(os.path.join(vm.top, vm.name)) == vm.dirname
                and _key(os.lstat(vm.path)) == _key(os.fstat(fd)))
    except OSError:
        same = False
    if not same:
        fcntl.flock(fd, fcntl.LOCK_UN)
        raise RuntimeFailure(f"VM {vm.name}: changed by the administrator meanwhile; try again")


def unlock(fd: int) -> None:
    """Let go of the lock on *fd* (the descriptor stays open)."""
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_UN)


def share(fd: int) -> None:
    """Turn an exclusive VM lock into the shared one of a running VM.  If a
    racing start took it in between (flock converts by unlock and relock),
    that one wins: AlreadyRunning."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        raise AlreadyRunning("the VM was started by someone else meanwhile") from exc


def take_own_share(fd: int) -> None:
    """In QEMU, between fork and exec: replace the inherited descriptor *fd*
    (the supervisor's open file description) by a new description of the
    same directory with a shared lock of QEMU's own, whose pid is QEMU's."""
    import fcntl

    # Through the descriptor's magic link (which O_NOFOLLOW would refuse):
    # the same directory, whatever its name is by now.
    own = os.open(f"/proc/self/fd/{fd}", _DIR_FLAGS & ~os.O_NOFOLLOW)
    fcntl.flock(own, fcntl.LOCK_SH | fcntl.LOCK_NB)
    os.dup2(own, fd, inheritable=True)
    os.close(own)


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
