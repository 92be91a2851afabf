"""The per-owner view of the VM tree, ``TOP/.owners`` (root's; kvmadm).

    TOP/.owners/                       root, 0755; its mtime is the stamp
    TOP/.owners/<uid>/                 root, 0755, one per owner
    TOP/.owners/<uid>/<name>.<id> -> ../../<name>.<id>

Derived from the tree, never a source (the reader's side and the rules:
:mod:`kvmshell.common.vmtree`).  :func:`refresh` rebuilds it from the tree
as it is now and stamps it with the top directory's mtime as it was when
the tree was read; a reader trusts it only while the top directory's mtime
still equals that stamp.  kvmadm runs it after every change it makes to the
tree (create, set, remove), at boot (autostart), and on ``kvmadm refresh``.

Why a stamp and not "kvmadm keeps it in step": it also notices what
kvmadm did not do (a directory made or renamed by hand, an older kvmadm, a
crash half-way): the view is then simply not used until it is rebuilt.

Why wait for the clock before reading the tree: a filesystem stamps times
from a coarse clock (a few ms; whole seconds on some), so a change made in
the same tick as the last one would leave the mtime as it was.  Reading
the tree only once that tick is over means any later change gives the top
directory a new mtime, so the stamp no longer matches.  (On a tree shared
over NFS by several hosts the times are the server's: the hosts' clocks
must agree, as NFS needs anyway; the wait is bounded by :data:`MAX_WAIT`.)
"""

from __future__ import annotations

import os
import stat
import time

from kvmshell.common import vmtree
from kvmshell.common.config import Config
from kvmshell.common.errors import RuntimeFailure, TreeError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
TICK_NS = 20_000_000          # a filesystem's time stamps: coarser than a jiffy
SECOND_NS = 1_000_000_000     # ... or whole seconds (an mtime with no fraction)
MAX_WAIT = 2.0                # seconds, at most, for the tick to pass
TRIES = 3                     # rebuilds while the tree keeps changing under us


def _open_dir(parent: int, leaf: str, path: str) -> int:
    """*leaf* beneath *parent*, a directory of root's, 0755: made if
    missing, its mode put right if it is root's; TreeError if it is not a
    directory of root's (the admin's to look at)."""
    try:
        os.mkdir(leaf, 0o755, dir_fd=parent)
    except FileExistsError:
        pass
    try:
        fd = os.open(leaf, _DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        raise TreeError(f"{path}: {exc.strerror}: it must be a directory of root's "
                        f"(admin: rm -r {path}; kvmadm refresh)") from exc
    st = os.fstat(fd)
    if st.st_uid != 0:
        os.close(fd)
        raise TreeError(f"{path} is not root's (admin: rm -r {path}; kvmadm refresh)")
    if stat.S_IMODE(st.st_mode) != 0o755:
        os.fchmod(fd, 0o755)
    return fd


def _settled(dfd: int) -> int:
    """The top directory's mtime (ns), once the filesystem's clock has
    moved past it (see the module's docstring)."""
    waited = 0.0
    while True:
        mtime = os.fstat(dfd).st_mtime_ns
        tick = SECOND_NS if mtime % SECOND_NS == 0 else TICK_NS
        left = (mtime + tick - time.time_ns()) / 1e9
        if left <= 0 or waited >= MAX_WAIT:
            return mtime
        time.sleep(min(left, MAX_WAIT - waited))
        waited += left


def _sync(ofd: int, want: dict[int, set[str]]) -> None:
    """Make the view under *ofd* hold exactly *want* (uid -> entries)."""
    for name in os.listdir(ofd):
        uid = int(name) if name.isdigit() and name == str(int(name)) else -1
        if uid not in want:
            _drop(ofd, name)
    for uid, leaves in want.items():
        ufd = _open_dir(ofd, str(uid), f"{vmtree.OWNERS}/{uid}")
        try:
            have = set(os.listdir(ufd))
            for leaf in have - leaves:
                os.unlink(leaf, dir_fd=ufd)
            for leaf in sorted(leaves - have):
                os.symlink(f"../../{leaf}", leaf, dir_fd=ufd)
        finally:
            os.close(ufd)


def _drop(ofd: int, name: str) -> None:
    """Remove *name* (an owner's directory of links, or a stray) from the view."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=ofd)
    except NotADirectoryError:
        os.unlink(name, dir_fd=ofd)
        return
    except OSError:
        # A symlink (O_NOFOLLOW refuses it) or something else that is no directory.
        os.unlink(name, dir_fd=ofd)
        return
    try:
        for leaf in os.listdir(fd):
            os.unlink(leaf, dir_fd=fd)   # only links live there; anything else: the admin's
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=ofd)


def refresh(cfg: Config) -> int:
    """Rebuild the per-owner view from the tree, and stamp it; return the
    number of entries it holds.  Serialised by an ``flock`` on
    ``TOP/.owners`` (concurrent kvmadm runs).  Raises TreeError (the top
    directory or the view is not root's, with the fix) or RuntimeFailure
    (the tree kept changing meanwhile: the view stays unstamped, unused)."""
    import fcntl

    dfd = vmtree.open_top(cfg)
    try:
        ofd = _open_dir(dfd, vmtree.OWNERS, os.path.join(cfg.vmdir, vmtree.OWNERS))
        try:
            fcntl.flock(ofd, fcntl.LOCK_EX)
            # Unstamped while it changes: 0 is no top directory's mtime.
            os.utime(ofd, ns=(time.time_ns(), 0))
            for _ in range(TRIES):
                mtime = _settled(dfd)
                want = vmtree.owner_map(dfd)
                _sync(ofd, want)
                if os.fstat(dfd).st_mtime_ns == mtime:
                    os.utime(ofd, ns=(time.time_ns(), mtime))
                    return sum(len(v) for v in want.values())
        finally:
            os.close(ofd)
    finally:
        os.close(dfd)
    raise RuntimeFailure(f"{cfg.vmdir} kept changing while its per-owner view was rebuilt "
                         "(run kvmadm refresh again)")


def stamped(cfg: Config) -> bool:
    """Does the view carry the top directory's mtime (nothing was made,
    renamed or removed in it since the view was built)?"""
    dfd = vmtree.open_top(cfg)
    try:
        try:
            st = os.stat(vmtree.OWNERS, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return st.st_mtime_ns == os.fstat(dfd).st_mtime_ns
    finally:
        os.close(dfd)


def stale(cfg: Config) -> str | None:
    """Why the view does not serve readers now (None: it does): missing,
    unstamped (the tree changed since it was built), or not what the tree
    holds (a VM directory given to another owner by hand).  Reads only
    root's directories and lstat's the entries, as the readers do."""
    dfd = vmtree.open_top(cfg)
    try:
        try:
            ofd = os.open(vmtree.OWNERS, _DIR_FLAGS, dir_fd=dfd)
        except FileNotFoundError:
            return "there is none yet (a tree from before it)"
        try:
            st = os.fstat(ofd)
            if st.st_uid != 0 or st.st_mode & 0o022:
                return "it is not root's alone"
            if st.st_mtime_ns != os.fstat(dfd).st_mtime_ns:
                return "the tree changed since it was built"
            have: dict[int, set[str]] = {}
            for name in os.listdir(ofd):
                if not name.isdigit():
                    return f"{name}: not an owner's uid"
                ufd = os.open(name, _DIR_FLAGS, dir_fd=ofd)
                try:
                    ust = os.fstat(ufd)
                    if ust.st_uid != 0 or ust.st_mode & 0o022:
                        return f"{name}: it is not root's alone"
                    have[int(name)] = set(os.listdir(ufd))
                finally:
                    os.close(ufd)
            if have != vmtree.owner_map(dfd):
                return "an entry's owner is not the one it lists"
            return None
        finally:
            os.close(ofd)
    finally:
        os.close(dfd)
