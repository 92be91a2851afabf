"""One owner per VM across hosts: the lease file and its owner record.

    TOP/.leases/                root-owned, 0755: users cannot add, remove
                                or replace anything in it
    TOP/.leases/<name>          the VM's lease: a regular file owned by the
                                VM user, 0644 (kvmadm create makes it)

``start`` on any host takes an OFD write lock (``F_OFD_SETLK``, the whole
file) on the lease, without waiting, before anything else; the supervisor
and QEMU keep that open file description for the VM's whole life, so the
lock goes when the last of them exits (or its host dies).  On a shared tree
over NFSv4 the lock is the server's, so it holds across hosts; NFSv4 locks
are leases, so a dead host's lock expires after the server's lease time and
another host may start the VM (docs/multihost.md).  The VM directory's
``flock`` (common/runstate.py) stays this host's own lock (NFS mounted with
``local_lock=flock``).

The owner record is what the lease file holds: one line of exactly
:data:`RECORD_BYTES` bytes, ``host=NAME pid=PID boot_id=UUID started=EPOCH``
padded with spaces, written in one ``pwrite`` at offset 0 by the lock's
holder (never replaced: a new file would not be the locked one, and the
user could not create it).  It is informational: the lock decides.  A
record whose lease nobody holds (``F_OFD_GETLK``) is stale and ignored.
The VM's user can write the record (it is their file), so readers parse it
strictly and print it escaped; a wrong record can only send the user's own
commands to another listed host, where everything is checked again.
"""

from __future__ import annotations

import os
import stat
import struct

from kvmshell.common.errors import AlreadyRunning, TreeError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kvmshell.common.config import Config
    from kvmshell.common.vmtree import VM

LEASES = ".leases"
RECORD_BYTES = 256
_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
# struct flock (x86-64 and every 64-bit Linux): l_type, l_whence, l_start,
# l_len, l_pid; l_pid must be 0 for OFD locks (fcntl(2)).
_FLOCK = "hhqqi4x"


class Record:
    """An owner record: *host*, QEMU's (or the start's) *pid* there, the
    host's *boot_id* and *started* (seconds since the epoch)."""

    def __init__(self, host: str, pid: int, boot_id: str, started: int) -> None:
        self.host, self.pid, self.boot_id, self.started = host, pid, boot_id, started

    def line(self) -> bytes:
        text = f"host={self.host} pid={self.pid} boot_id={self.boot_id} started={self.started}"
        return text.encode("ascii").ljust(RECORD_BYTES - 1)[:RECORD_BYTES - 1] + b"\n"


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            text = f.read(64).decode("ascii", "replace").strip()
    except OSError:
        return "-"
    return text if all(c in "0123456789abcdef-" for c in text) and text else "-"


def directory(cfg: "Config") -> str:
    return os.path.join(cfg.vmdir, LEASES)


def _open_dir(cfg: "Config") -> int | None:
    """The lease directory's descriptor, None if there is none; TreeError
    if it is not root's."""
    try:
        fd = os.open(directory(cfg), os.O_RDONLY | os.O_DIRECTORY | _FLAGS)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TreeError(f"{directory(cfg)}: {exc.strerror}") from exc
    st = os.fstat(fd)
    if st.st_uid != 0 or st.st_mode & 0o022:
        os.close(fd)
        raise TreeError(f"{directory(cfg)} must be a directory owned by root and not "
                        f"group/world-writable (admin: chown root:root; chmod 755)")
    return fd


def open_lease(cfg: "Config", name: str, *, write: bool, uid: int | None = None) -> int | None:
    """The lease file of VM *name* (O_RDWR if *write*), None if it has none.
    *uid*: it must be that user's (a lease of someone else's is the
    admin's to fix: TreeError)."""
    dfd = _open_dir(cfg)
    if dfd is None:
        return None
    try:
        fd = os.open(name, (os.O_RDWR if write else os.O_RDONLY) | _FLAGS, dir_fd=dfd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TreeError(f"VM {name}: its lease {LEASES}/{name}: {exc.strerror} "
                        "(admin: kvmadm set VM recreates it)") from exc
    finally:
        os.close(dfd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (uid is not None and st.st_uid != uid):
        os.close(fd)
        raise TreeError(f"VM {name}: its lease {LEASES}/{name} is not a file of the VM's "
                        "owner (admin: kvmadm set VM recreates it)")
    return fd


def _lk(fd: int, cmd: int, kind: int) -> tuple[int, int]:
    import fcntl
    got = fcntl.fcntl(fd, cmd, struct.pack(_FLOCK, kind, os.SEEK_SET, 0, 0, 0))
    assert isinstance(got, bytes)
    ltype, _, _, _, pid = struct.unpack(_FLOCK, got)
    return ltype, pid


def held(fd: int) -> bool:
    """Does anyone (any open file description, on any host sharing the
    tree) hold a lock on the lease *fd*?"""
    import fcntl
    ltype, _ = _lk(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK)
    return ltype != fcntl.F_UNLCK


def read_record(fd: int) -> Record | None:
    """The owner record in the lease *fd*, None if there is none or it
    does not parse (a torn or foreign record: the caller says 'unknown')."""
    try:
        data = os.pread(fd, RECORD_BYTES, 0)
    except OSError:
        return None
    fields: dict[str, str] = {}
    for word in data.decode("ascii", "replace").split():
        key, eq, value = word.partition("=")
        if not eq or key in fields:
            return None
        fields[key] = value
    try:
        host, pid, started = fields["host"], int(fields["pid"]), int(fields["started"])
        boot = fields["boot_id"]
    except (KeyError, ValueError):
        return None
    from kvmshell.common.hosts import is_name
    if not is_name(host) or pid <= 0 or not all(c in "0123456789abcdef-" for c in boot):
        return None
    return Record(host, pid, boot, started)


def write_record(fd: int, host: str, pid: int) -> None:
    """Write this host's owner record into the lease *fd* (held by the caller)."""
    import time
    os.pwrite(fd, Record(host, pid, boot_id(), int(time.time())).line(), 0)


def take(cfg: "Config", vm: "VM", host: str, *, required: bool,
         several: bool | None = None) -> int | None:
    """Take *vm*'s lease for a start on *host*; return its descriptor (the
    caller hands it to the supervisor and QEMU), or None when the VM has no
    lease and none is *required* (one host).  *several* (default:
    *required*): hosts share the tree, so a refusal names the host.  A
    *required* lease (a start on a host of the list) gets this start's record.

    Raises AlreadyRunning naming the host that runs it (from its record),
    TreeError if a required lease is missing or is not the owner's."""
    import fcntl
    several = required if several is None else several
    fd = open_lease(cfg, vm.name, write=True, uid=vm.uid)
    if fd is None:
        if required:
            raise TreeError(f"VM {vm.name} has no lease in {directory(cfg)} "
                            "(admin: kvmadm set VM recreates it)")
        return None
    try:
        _lk(fd, fcntl.F_OFD_SETLK, fcntl.F_WRLCK)
    except OSError as exc:
        rec = read_record(fd)
        os.close(fd)
        where = f" on host {rec.host}" if rec is not None and several else ""
        raise AlreadyRunning(f"VM {vm.name!r} is already running{where} "
                             f"(or being started or stopped{' there' if where else ''})") from exc
    if required:
        # Only a start where several hosts share the tree: alone, the record says
        # nothing, and a refused start leaves the tree as it was.
        try:
            write_record(fd, host, os.getpid())
        except OSError:
            pass        # informational: the lock is what counts
    return fd


def where(cfg: "Config", vm: "VM") -> str | None:
    """The host that runs *vm* (or is starting or stopping it), from its
    held lease's record; None if its lease is free (or it has none).  A
    held lease with an unreadable record: '?'."""
    fd = open_lease(cfg, vm.name, write=False)
    if fd is None:
        return None
    try:
        if not held(fd):
            return None
        rec = read_record(fd)
        return rec.host if rec is not None else "?"
    finally:
        os.close(fd)


def running_per_host(cfg: "Config") -> dict[str, int]:
    """How many VMs each host runs, from every held lease's record (the
    placement rule's input; see docs/multihost.md).  Costs one open and
    one lock test per VM of the tree."""
    dfd = _open_dir(cfg)
    if dfd is None:
        return {}
    out: dict[str, int] = {}
    try:
        for leaf in os.listdir(dfd):
            try:
                fd = os.open(leaf, os.O_RDONLY | _FLAGS, dir_fd=dfd)
            except OSError:
                continue
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode) and held(fd):
                    rec = read_record(fd)
                    if rec is not None:
                        out[rec.host] = out.get(rec.host, 0) + 1
            finally:
                os.close(fd)
    finally:
        os.close(dfd)
    return out


def create(cfg: "Config", name: str, uid: int, gid: int) -> None:
    """kvmadm (root): make VM *name*'s lease, owned by *uid*, 0644, in the
    lease directory (made root's 0755 if missing); an old one is replaced
    (a new VM of an old name, or a lease of the wrong owner)."""
    ldir = directory(cfg)
    if not os.path.lexists(ldir):
        os.mkdir(ldir, 0o755)
    dfd = _open_dir(cfg)
    assert dfd is not None
    tmp = f".{name}.new"
    try:
        try:
            os.unlink(tmp, dir_fd=dfd)
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FLAGS, 0o644, dir_fd=dfd)
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, 0o644)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    finally:
        os.close(dfd)


def remove(cfg: "Config", name: str) -> None:
    """kvmadm (root): remove VM *name*'s lease (its VM is gone)."""
    dfd = _open_dir(cfg)
    if dfd is None:
        return
    try:
        os.unlink(name, dir_fd=dfd)
    except FileNotFoundError:
        pass
    finally:
        os.close(dfd)
