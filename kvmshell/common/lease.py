"""One owner per VM across hosts: the lease file and its owner record.

    TOP/.leases/                root-owned, 0755: users cannot add, remove
                                or replace anything in it
    TOP/.leases/<name>          the VM's lease: a regular file owned by the
                                VM user, 0600 (kvmadm create makes it)
    TOP/.leases/<name>.host     its owner record: a regular file owned by
                                the VM user, 0644 (kvmadm create makes it)

``start`` on any host takes an OFD write lock (``F_OFD_SETLK``, the whole
file) on the lease, without waiting, before anything else; the supervisor
and QEMU keep that open file description for the VM's whole life, so the
lock goes when the last of them exits (or its host dies).  On a shared tree
over NFSv4 the lock is the server's, so it holds across hosts; NFSv4 locks
are leases, so a dead host's lock expires after the server's lease time and
another host may start the VM (docs/multihost.md).  The VM directory's
``flock`` (common/runstate.py) stays this host's own lock (NFS mounted with
``local_lock=flock``).

Why 0600: a lock needs only an open file (a read lock, a read-only one),
so whoever can open the lease can hold it and block the VM on every host.
Only the VM user and root can open a 0600 file; kvmshell refuses a lease
others can open (:func:`open_lease`: the admin's ``kvmadm set`` makes a new
one) and kvmadm makes a new one whenever it changes the VM.

The owner record lives beside the lease, in ``<name>.host``, so that every
user's kvmshell can read it for the placement rule without being able to
open (and so lock) the lease: one line of exactly :data:`RECORD_BYTES`
bytes, ``host=NAME pid=PID boot_id=UUID started=EPOCH`` padded with
spaces, written in one ``pwrite`` at offset 0 by the lease's holder, and
emptied (truncated) by the supervisor when the VM ends.  Only the VM user
(and root) can write it, and nobody can replace it (root's directory).  It
is informational: the lock decides who runs the VM.  Where the lease can
be tested (the VM's own user, root) a record whose lease nobody holds
(``F_OFD_GETLK``) is stale and ignored; the placement rule, run for every
user's VMs, counts the non-empty records (a record left by a dead host
counts until that VM starts again somewhere).  The VM's user can write the
record (it is their file), so readers parse it strictly, ignore it if the
file is group/world-writable, and print it escaped; a wrong record can
only send the user's own commands to another listed host, where
everything is checked again, or bias the placement of other starts.
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
# What a refusal about a broken lease tells the admin: `kvmadm set VM` with
# nothing after "--" would set the VM's admin options to none.
RENEW = ("(admin: kvmadm set VM -- OPTIONS, with the options kvmadm show VM gives, "
         "recreates it)")
RECORD = ".host"            # the owner record's file: NAME + RECORD (no '.' in a VM name)
RECORD_BYTES = 256
MODE = 0o600                # the lease's
RECORD_MODE = 0o644
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


def open_lease(cfg: "Config", name: str, *, write: bool, uid: int | None = None,
               private: bool = True) -> int | None:
    """The lease file of VM *name* (O_RDWR if *write*), None if it has none.
    *uid*: it must be that user's (a lease of someone else's is the
    admin's to fix: TreeError).  *private*: it must be 0600 (TreeError
    otherwise: another user could have it open, and hold it); kvmadm,
    which makes a new one, opens an old lease with *private* False."""
    dfd = _open_dir(cfg)
    if dfd is None:
        return None
    try:
        fd = os.open(name, (os.O_RDWR if write else os.O_RDONLY) | _FLAGS, dir_fd=dfd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TreeError(f"VM {name}: its lease {LEASES}/{name}: {exc.strerror} "
                        + RENEW) from exc
    finally:
        os.close(dfd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (uid is not None and st.st_uid != uid):
        os.close(fd)
        raise TreeError(f"VM {name}: its lease {LEASES}/{name} is not a file of the VM's "
                        "owner " + RENEW)
    if private and stat.S_IMODE(st.st_mode) & 0o077:
        os.close(fd)
        raise TreeError(f"VM {name}: its lease {LEASES}/{name} can be opened by other users "
                        f"(mode {stat.S_IMODE(st.st_mode):04o}, not 0600), so they could hold "
                        "it " + RENEW)
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


def _parse(data: bytes) -> Record | None:
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


def _read_at(dfd: int, leaf: str) -> tuple[Record | None, int]:
    """The record in file *leaf* of the lease directory *dfd*, and the
    file's owner (-1 if it cannot be opened): no record if there is none,
    it is not a regular file, anyone but its owner may write it, or it
    does not parse.  Reads at most RECORD_BYTES."""
    try:
        fd = os.open(leaf, os.O_RDONLY | _FLAGS, dir_fd=dfd)
    except OSError:
        return None, -1
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o022:
            return None, st.st_uid
        return _parse(os.pread(fd, RECORD_BYTES, 0)), st.st_uid
    except OSError:
        return None, -1
    finally:
        os.close(fd)


def _free_at(dfd: int, leaf: str) -> bool:
    """Is the lease *leaf* of the lease directory *dfd* there, openable
    (the caller's own) and free?"""
    try:
        fd = os.open(leaf, os.O_RDONLY | _FLAGS, dir_fd=dfd)
    except OSError:
        return False
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and not held(fd)
    except OSError:
        return False
    finally:
        os.close(fd)


def read_record(cfg: "Config", name: str) -> Record | None:
    """VM *name*'s owner record (``<name>.host``), None if there is none or
    it does not parse (a torn or foreign record: the caller says 'unknown').
    Whether it is current is the lease's to say (:func:`held`)."""
    try:
        dfd = _open_dir(cfg)
    except TreeError:
        return None
    if dfd is None:
        return None
    try:
        return _read_at(dfd, name + RECORD)[0]
    finally:
        os.close(dfd)


def _open_record(cfg: "Config", name: str) -> int | None:
    """VM *name*'s record file for writing (as its owner, or root); None
    if there is none or it is not a regular file."""
    dfd = _open_dir(cfg)
    if dfd is None:
        return None
    try:
        fd = os.open(name + RECORD, os.O_WRONLY | _FLAGS, dir_fd=dfd)
    except OSError:
        return None
    finally:
        os.close(dfd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def write_record(cfg: "Config", name: str, host: str, pid: int) -> None:
    """Write this host's owner record for VM *name* (whose lease the
    caller holds) into ``<name>.host``; nothing if that file is missing
    (a lease made before it: the record is informational).  OSError."""
    import time
    fd = _open_record(cfg, name)
    if fd is None:
        return
    try:
        os.pwrite(fd, Record(host, pid, boot_id(), int(time.time())).line(), 0)
    finally:
        os.close(fd)


def clear_record(cfg: "Config", name: str, host: str) -> None:
    """Empty VM *name*'s owner record if it names *host* (the VM ended
    here; the caller still holds its lease).  Never raises."""
    try:
        rec = read_record(cfg, name)
        if rec is None or rec.host != host:
            return
        fd = _open_record(cfg, name)
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
    except (OSError, TreeError):
        pass        # informational: a stale record only biases the placement


def take(cfg: "Config", vm: "VM", host: str, *, required: bool,
         several: bool | None = None, private: bool = True) -> int | None:
    """Take *vm*'s lease for a start on *host*; return its descriptor (the
    caller hands it to the supervisor and QEMU), or None when the VM has no
    lease and none is *required* (one host).  *several* (default:
    *required*): hosts share the tree, so a refusal names the host.  A
    *required* lease (a start on a host of the list) gets this start's
    record.  *private*: see :func:`open_lease`.

    Raises AlreadyRunning naming the host that runs it (from its record),
    TreeError if a required lease is missing, is not the owner's, or
    (*private*) others can open it."""
    import fcntl
    several = required if several is None else several
    fd = open_lease(cfg, vm.name, write=True, uid=vm.uid, private=private)
    if fd is None:
        if required:
            raise TreeError(f"VM {vm.name} has no lease in {directory(cfg)} "
                            + RENEW)
        return None
    try:
        _lk(fd, fcntl.F_OFD_SETLK, fcntl.F_WRLCK)
    except OSError as exc:
        os.close(fd)
        rec = read_record(cfg, vm.name) if several else None
        where = f" on host {rec.host}" if rec is not None else ""
        raise AlreadyRunning(f"VM {vm.name!r} is already running{where} "
                             f"(or being started or stopped{' there' if where else ''})") from exc
    if required:
        # Only a start where several hosts share the tree: alone, the record says
        # nothing, and a refused start leaves the tree as it was.
        try:
            write_record(cfg, vm.name, host, os.getpid())
        except OSError:
            pass        # informational: the lock is what counts
    return fd


def where(cfg: "Config", vm: "VM") -> str | None:
    """The host that runs *vm* (or is starting or stopping it), from its
    owner record while its lease is held; None if its lease is free (or it
    has none).  A held lease with an unreadable record: '?'.  TreeError if
    the lease is not the owner's 0600 file (:func:`open_lease`)."""
    fd = open_lease(cfg, vm.name, write=False, uid=vm.uid)
    if fd is None:
        return None
    try:
        if not held(fd):
            return None
    finally:
        os.close(fd)
    rec = read_record(cfg, vm.name)
    return rec.host if rec is not None else "?"


def running_per_host(cfg: "Config", but: str | None = None) -> dict[str, int]:
    """How many VMs each host runs, from every non-empty owner record but
    VM *but*'s (the one being placed: it is stopped); the placement rule's
    input, see docs/multihost.md.  The caller's own VMs count only while
    their leases are held; other users' leases cannot be tested (0600), so
    a record of theirs that a dead host left counts until its VM starts
    again.  Costs one open and one read of at most RECORD_BYTES per VM,
    and one open and lock test per VM of the caller's."""
    try:
        dfd = _open_dir(cfg)
    except TreeError:
        return {}
    if dfd is None:
        return {}
    out: dict[str, int] = {}
    try:
        for leaf in os.listdir(dfd):
            if not leaf.endswith(RECORD) or leaf.startswith(".") or leaf == f"{but}{RECORD}":
                continue
            rec, owner = _read_at(dfd, leaf)
            if rec is not None and owner == os.geteuid() and _free_at(dfd, leaf[:-len(RECORD)]):
                continue            # our own VM, stopped: the record is stale
            if rec is not None:
                out[rec.host] = out.get(rec.host, 0) + 1
    finally:
        os.close(dfd)
    return out


def _make(dfd: int, leaf: str, mode: int, uid: int, gid: int, *, hold: bool) -> int | None:
    """Make file *leaf* in *dfd* anew (*mode*, owned by *uid*:*gid*),
    replacing an old one by rename; with *hold*, return its descriptor
    with the lease's write lock taken before the rename (no moment where
    the new file is free)."""
    import fcntl
    tmp = f".{leaf}.new"
    try:
        os.unlink(tmp, dir_fd=dfd)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | _FLAGS, mode, dir_fd=dfd)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        if hold:
            _lk(fd, fcntl.F_OFD_SETLK, fcntl.F_WRLCK)
        os.rename(tmp, leaf, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        os.close(fd)
        raise
    if hold:
        return fd
    os.close(fd)
    return None


def create(cfg: "Config", name: str, uid: int, gid: int, *, hold: bool = False) -> int | None:
    """kvmadm (root): make VM *name*'s lease (owned by *uid*, 0600) and its
    empty owner record (``<name>.host``, 0644), in the lease directory
    (made root's 0755 if missing); old ones are replaced (a new VM of an
    old name, a lease of the wrong owner or mode: an old lease's open file
    descriptions, anyone's, are left on the old file).  *hold*: return the
    new lease's descriptor, its write lock taken before it is in place."""
    ldir = directory(cfg)
    if not os.path.lexists(ldir):
        os.mkdir(ldir, 0o755)
    dfd = _open_dir(cfg)
    assert dfd is not None
    try:
        _make(dfd, name + RECORD, RECORD_MODE, uid, gid, hold=False)
        return _make(dfd, name, MODE, uid, gid, hold=hold)
    finally:
        os.close(dfd)


def sound(cfg: "Config", name: str, uid: int) -> bool:
    """Is VM *name*'s lease as kvmadm makes it now: the owner's 0600 file,
    with its owner record file (the owner's, not group/world-writable)?
    TreeError if the lease directory is not root's."""
    dfd = _open_dir(cfg)
    if dfd is None:
        return False
    try:
        try:
            lst = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            rst = os.stat(name + RECORD, dir_fd=dfd, follow_symlinks=False)
        except OSError:
            return False
    finally:
        os.close(dfd)
    return (stat.S_ISREG(lst.st_mode) and lst.st_uid == uid
            and stat.S_IMODE(lst.st_mode) == MODE
            and stat.S_ISREG(rst.st_mode) and rst.st_uid == uid
            and not rst.st_mode & 0o022)


def remove(cfg: "Config", name: str) -> None:
    """kvmadm (root): remove VM *name*'s lease and owner record (its VM is gone)."""
    dfd = _open_dir(cfg)
    if dfd is None:
        return
    try:
        for leaf in (name, name + RECORD):
            try:
                os.unlink(leaf, dir_fd=dfd)
            except FileNotFoundError:
                pass
    finally:
        os.close(dfd)
