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
   The walk is bounded (MAX_REFILLS, MAX_CHANGES, MAX_SECONDS: see
   :func:`empty`), since the user's code may refill a directory through
   a descriptor it kept, and goes at most MAX_HELD_DEPTH levels down
   (deeper directories are moved up to the top first), so that every
   run deletes something however deep the tree;
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
# How often the walk may find a directory refilled (a name it did not
# list before; full again after it was emptied) before it gives up: a
# tree nobody writes to is never refilled, and each round costs a fresh
# listing of a directory the user makes ever larger.
MAX_REFILLS = 16
# How long one purge may take at most: a user's code can also make
# directories deeper as fast as the walk goes down, which no listing shows.
MAX_SECONDS = 120.0
# How deep the walk goes before it moves the directory it would enter up
# to the top (a fresh random name there) instead: a run must reach a
# directory's bottom before it deletes anything, so a chain of directories
# deeper than one run can descend in MAX_SECONDS (a few hundred thousand
# levels, made in seconds) would leave every later run with nothing done.
# Cut into chains of at most this many levels, every run deletes some.
MAX_HELD_DEPTH = 1024
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
                   else f"the directory kept changing while it was deleted"
                   f"{' (' + str(exc) + ')' if str(exc) else ''}"
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
    of whoever calls it.  Iterative: one descriptor at a time, any depth.

    Bounded against a tree that is refilled while it is deleted (the
    user's code may hold a descriptor of any directory in it): a directory
    whose listing gained a name since the walk last listed it, or that is
    full again when the walk comes back from emptying it, is refilled;
    after MAX_REFILLS of those, MAX_CHANGES other changes (an entry
    swapped under the walk), or MAX_SECONDS in all, the walk stops with
    _Changed (the rest waits for a later run).  Without these bounds a user
    making directories as fast as the walk deletes them kept it going for
    ever.  Below MAX_HELD_DEPTH levels it moves the directory it would
    enter up to the top instead (:func:`_cut`): a chain deeper than one
    run could descend left every run with nothing deleted."""
    import time
    deadline = time.monotonic() + MAX_SECONDS
    fd = os.dup(top)
    # (dev, ino) of each directory over fd, and the names it held when it
    # was last listed
    above: list[tuple[tuple[int, int], set[str]]] = []
    listed: set[str] | None = None      # fd's names when it was last listed
    emptied: tuple[int, int] | None = None   # the directory the walk just came up from
    changes = refills = 0

    def refilled() -> None:
        nonlocal refills
        refills += 1
        if refills > MAX_REFILLS:
            raise _Changed("something of the user's kept filling it")
    try:
        while True:
            if time.monotonic() > deadline:
                raise _Changed(f"still not empty after {MAX_SECONDS:g} seconds")
            names = os.listdir(fd)
            if listed is not None and not listed.issuperset(names):
                refilled()                # since the walk last looked
            listed = set(names)
            picked: list[str] = []
            sub = _clear(fd, names, deadline, picked)
            if sub in (_CHANGED, _AGAIN):
                changes += 1
                if changes > MAX_CHANGES:
                    raise _Changed()
            elif sub >= 0 and above and len(above) >= MAX_HELD_DEPTH \
                    and _cut(fd, picked[0], sub, top, above[0][1]):
                continue                  # moved up to the top: look at fd again
            elif sub >= 0:                # descend into a non-empty directory
                st = os.fstat(fd)
                above.append(((st.st_dev, st.st_ino), listed))
                os.close(fd)
                st = os.fstat(sub)
                fd, listed, again = sub, None, (st.st_dev, st.st_ino) == emptied
                if again:
                    refilled()            # emptied a moment ago, full again
                emptied = None
            elif sub == _EMPTY:
                if not above:             # top is empty: done
                    return
                here = os.fstat(fd)
                up = os.open("..", _DIR_FLAGS, dir_fd=fd)
                st = os.fstat(up)
                os.close(fd)
                fd = up
                want, listed = above.pop()
                emptied = (here.st_dev, here.st_ino)
                if (st.st_dev, st.st_ino) != want:
                    raise _Changed()      # moved away under us: stop, a rerun goes on
    finally:
        os.close(fd)


_EMPTY, _CHANGED, _AGAIN = -1, -2, -3


def _cut(fd: int, name: str, sub: int, top: int, top_names: set[str]) -> bool:
    """Move the directory *name* in *fd*, open on *sub* (found by
    :func:`_clear`), into *top* under a fresh random name, added to
    *top_names* (the top's listing, so that the walk does not count it as
    a refill), and close *sub*.  False if it cannot (the name is gone or
    taken meanwhile): then the walk descends into *sub* as usual."""
    import secrets
    new = f".{secrets.token_hex(8)}{SUFFIX}"
    for _ in range(2):
        try:
            os.rename(name, new, src_dir_fd=fd, dst_dir_fd=top)
        except PermissionError:
            os.fchmod(top, 0o700)         # the user's top directory, made read-only
            continue
        except OSError:
            return False
        top_names.add(new)
        os.close(sub)
        return True
    return False


def _clear(fd: int, names: list[str], deadline: float, picked: list[str]) -> int:
    """Unlink what can be unlinked of *names* in *fd* (its listing).
    Return _EMPTY when all of them are gone, a descriptor of a non-empty
    subdirectory to descend into (its name appended to *picked*),
    _CHANGED when an entry changed under us, or _AGAIN after making something deletable.  Raises _Changed
    past *deadline* (time.monotonic)."""
    import time
    for i, name in enumerate(names):
        if i % 1024 == 1023 and time.monotonic() > deadline:
            raise _Changed(f"still not empty after {MAX_SECONDS:g} seconds")
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
            sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
            picked.append(name)
            return sub
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
