"""``kvmadm remove --purge``: delete a VM directory the (hostile) user filled.

The tree belongs to the VM user, whose code may still be changing it while
root deletes it (through a descriptor opened earlier, say).  So:

1. kvmadm renames the VM directory into ``TOP/.removed/`` (root, 0700)
   before anything else: the user can no longer reach it by any path, and
   the directory keeps the VM lock kvmadm holds on it;
2. removes the VM's symlink;
3. deletes the contents in a child whose effective uid and gid are the VM
   user's (no supplementary groups): whatever a race swaps in, the child
   can delete only what the user could.  Its real and saved uids stay
   root's, so the user can neither stop nor trace it (it runs no code but
   this module's).  The walk is iterative (no depth limit), opens
   directories with ``O_DIRECTORY|O_NOFOLLOW|O_NONBLOCK`` (a symlink or
   FIFO swapped in is refused, never followed or waited on), never reads a
   file, and checks each ``..`` it climbs against the directory it came
   from;
4. root removes the then empty directory.  If anything fails, the half-done
   purge stays in ``.removed/`` under a name ending in ``.purge``, and a
   later ``kvmadm remove NAME --purge`` finishes it.
"""

from __future__ import annotations

import errno
import os
import stat

from kvmshell.common.errors import RuntimeFailure

SUFFIX = ".purge"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# How many times the walk may look again (an entry swapped under it, a
# directory of the user's made readable) before the purge gives up; a
# later run goes on.
MAX_CHANGES = 1000
_GONE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


class _Changed(Exception):
    """The tree changed under the walk."""


def pending(keep: str, name: str) -> list[str]:
    """Half-done purges of VM *name* in the holding directory *keep*."""
    try:
        leaves = os.listdir(keep)
    except FileNotFoundError:
        return []
    return sorted(os.path.join(keep, leaf) for leaf in leaves
                  if leaf.startswith(name + ".") and leaf.endswith(SUFFIX))


def finish(path: str, fd: int | None = None) -> None:
    """Delete the directory *path* (inside root's holding directory) and all
    it holds, the contents as its owner.  *fd*: a descriptor of it already
    open (kvmadm's lock).  Raises RuntimeFailure naming what is left."""
    own = fd is None
    if fd is None:
        try:
            fd = os.open(path, _DIR_FLAGS)
        except OSError as exc:
            raise RuntimeFailure(f"{path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if st.st_uid == 0:
            raise RuntimeFailure(f"{path} is owned by root: not purged (admin: check it by hand)")
        _as_owner(fd, st.st_uid, st.st_gid, path)
    finally:
        if own:
            os.close(fd)
    try:
        os.rmdir(path)
    except OSError as exc:
        raise RuntimeFailure(f"{path}: {exc.strerror} (something of the user's refilled it)") from exc


def _as_owner(fd: int, uid: int, gid: int, path: str) -> None:
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(rfd)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(0, uid, 0)   # file access as the user; signals and ptrace as root's
            empty(fd)
            code = 0
        except BaseException as exc:
            why = (f"{exc.filename!r}: {exc.strerror}" if isinstance(exc, OSError)
                   else "the directory kept changing while it was deleted"
                   if isinstance(exc, _Changed) else type(exc).__name__)
            try:
                os.write(wfd, why.encode("ascii", "backslashreplace")[:512])
            except OSError:
                pass
        finally:
            os._exit(code)
    os.close(wfd)
    try:
        msg = os.read(rfd, 512).decode("ascii", "replace")
    finally:
        os.close(rfd)
        _, status = os.waitpid(pid, 0)
    if status != 0:
        raise RuntimeFailure(f"purge incomplete: {msg or 'the purging process died'}; "
                             f"the rest is in {path}")


def empty(top: int) -> None:
    """Delete everything below the directory open on *top*, with the rights
    of whoever calls it.  Iterative: one descriptor at a time, any depth."""
    fd = os.dup(top)
    above: list[tuple[int, int]] = []   # (dev, ino) of each directory over fd
    changes = 0
    try:
        while True:
            sub = _clear(fd)
            if sub in (_CHANGED, _AGAIN):
                changes += 1
                if changes > MAX_CHANGES:
                    raise _Changed()
            elif sub >= 0:                # descend into a non-empty directory
                st = os.fstat(fd)
                above.append((st.st_dev, st.st_ino))
                os.close(fd)
                fd = sub
            elif sub == _EMPTY:
                if not above:             # top is empty: done
                    return
                up = os.open("..", _DIR_FLAGS, dir_fd=fd)
                st = os.fstat(up)
                os.close(fd)
                fd = up
                if (st.st_dev, st.st_ino) != above.pop():
                    raise _Changed()      # moved away under us: stop, a rerun goes on
    finally:
        os.close(fd)


_EMPTY, _CHANGED, _AGAIN = -1, -2, -3


def _clear(fd: int) -> int:
    """Unlink what can be unlinked in *fd*.  Return _EMPTY when it is empty,
    a descriptor of a non-empty subdirectory to descend into, _CHANGED when
    an entry changed under us, or _AGAIN after making something deletable."""
    for name in os.listdir(fd):
        try:
            try:
                os.unlink(name, dir_fd=fd)
                continue
            except IsADirectoryError:
                pass
            os.rmdir(name, dir_fd=fd)
            continue
        except FileNotFoundError:
            continue
        except PermissionError:
            os.fchmod(fd, 0o700)          # the user's directory, made read-only
            return _AGAIN
        except OSError as exc:
            if exc.errno in _GONE:
                return _CHANGED
            if exc.errno != errno.ENOTEMPTY:
                raise
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=fd)
        except PermissionError:
            # A directory of the user's without read or search permission:
            # its owner may give them back (a symlink swapped in meanwhile
            # leads only to what the user could chmod itself).
            if not stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                return _CHANGED
            os.chmod(name, 0o700, dir_fd=fd)
            return _AGAIN
        except OSError as exc:
            if exc.errno in _GONE:
                return _CHANGED
            raise
    return _EMPTY
