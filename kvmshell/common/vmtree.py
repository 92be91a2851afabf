"""The VM tree: the filesystem as the only configuration store.

    TOP/                       root-owned, not group/world-writable
    TOP/<name> -> <name>.<id>  root-owned symlink: what users type
    TOP/<name>.<id>/           0700, owned by the VM user: images, sockets
    TOP/.owners/<uid>/<name>.<id> -> ../../<name>.<id>
                               root's per-owner view (derived, see below)

Why the checks: users cannot rename anything in TOP, so a directory name
there is the admin's word.  kvmshell refuses to act on a tree that does not
have that shape, and says what the admin must fix.

Whose problem a broken entry is: a VM user owns their VM directories and
(or their QEMU) can change those directories' modes, so one user can
always break their own entries.  That must never reach anyone else.  A
user's commands therefore look only at the entries that user owns: the
owner comes from one ``lstat`` of each VM directory, and only the caller's
own directories are decoded and checked.  Another user's entry, broken or
not, is never decoded and never named in a message (its directory name
holds that VM's admin options).  ``kvmadm`` (root) sees everything: every
healthy VM, and every broken entry with its reason.

The per-owner view, ``TOP/.owners``, lets a user's command find that
user's entries without an ``lstat`` of everyone else's, so ``list`` costs
the same at 10,000 VMs as at one.  It is derived, never a source: kvmadm
rebuilds it from the tree after each change it makes to the tree
(``create``, ``set``, ``remove``; ``kvmadm refresh`` after changes by hand,
``kvmadm autostart`` at boot; :mod:`kvmshell.admin.ownerview`), and stamps
it with the top directory's mtime as it was when it read the tree.  A
reader uses it only while that stamp still equals the top directory's
mtime (any entry created, renamed or removed in TOP changes that), and
otherwise scans the whole tree as before.  Each name it gives is checked
against the real entry exactly as a scan checks it (its owner from one
``lstat``), so a stale view can at worst leave a VM out, never show
another user's.  What the stamp cannot see is a ``chown`` of a VM
directory by hand: ``kvmadm refresh`` after that.
"""

from __future__ import annotations

import os
import stat

from kvmshell.common import vmid
from kvmshell.common.config import Config
from kvmshell.common.errors import NotYours, TreeError, UsageError
from kvmshell.common.text import printable


_TOP_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
OWNERS = ".owners"     # the per-owner view: OWNERS/<uid>/<entry> (see above)


class VM:
    """One VM, resolved through the tree and checked."""

    def __init__(self, top: str, name: str, dirname: str, uid: int, words: list[str]) -> None:
        self.top = top
        self.name = name
        self.dirname = dirname
        self.path = os.path.join(top, dirname)
        self.uid = uid
        self.admin_words = words

    def file(self, leaf: str) -> str:
        return os.path.join(self.path, leaf)


class Broken(VM):
    """An entry of the tree that fails a check.  *name* is the VM name the
    entry claims (the part before the first '.', unchecked: print it with
    :func:`printable`), *reason* the one-line message, naming the fix.
    Nothing is decoded: ``admin_words`` is empty.  *is_dir*: the entry is a
    real directory (so its files count against the owner's limits)."""

    def __init__(self, top: str, entry: str, uid: int, reason: str, is_dir: bool) -> None:
        super().__init__(top, entry.partition(".")[0], entry, uid, [])
        self.reason = reason
        self.is_dir = is_dir


class Scan:
    """The result of :func:`scan`: healthy VMs and broken entries, each
    sorted by name."""

    def __init__(self, vms: list[VM], broken: list[Broken]) -> None:
        self.vms = sorted(vms, key=lambda v: v.name)
        self.broken = sorted(broken, key=lambda b: b.dirname)

    @property
    def dirs(self) -> list[VM]:
        """Every VM directory of the scan, healthy or broken (for counting
        what they hold: a broken directory's files still take space)."""
        return [*self.vms, *(b for b in self.broken if b.is_dir)]


def open_top(cfg: Config) -> int:
    """A descriptor of the top directory, checked (TreeError if users
    could change it, or it is missing)."""
    top = cfg.vmdir
    try:
        fd = os.open(top, _TOP_FLAGS)
    except FileNotFoundError as exc:
        raise TreeError(f"VM directory {top} does not exist (admin: kvmadm create ...)") from exc
    except OSError as exc:
        raise TreeError(f"{top}: {exc.strerror} (admin: it must be a directory owned by root, "
                        f"chmod 755)") from exc
    st = os.fstat(fd)
    if st.st_uid != 0 or st.st_mode & 0o022:
        os.close(fd)
        raise TreeError(
            f"{top} must be a directory owned by root and not group/world-writable "
            f"(admin: chown root:root {top}; chmod 755 {top})")
    return fd


def check_top(cfg: Config) -> None:
    """Refuse to run on a top directory users could change."""
    os.close(open_top(cfg))


def _lstat(dfd: int, leaf: str) -> os.stat_result | None:
    try:
        return os.stat(leaf, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _check_dir(cfg: Config, dirname: str, st: os.stat_result,
               link_target: str | None) -> VM:
    """Check a VM directory whose owner may see its details (its own user,
    or root): mode, identifier, and the symlink that names it.
    *link_target* is what TOP/<name> points to (None: missing)."""
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISDIR(st.st_mode) and st.st_uid and mode == 0o700:
        dname, words = vmid.decode(dirname)
        if link_target == dirname:
            return VM(cfg.vmdir, dname, dirname, st.st_uid, words)
    # Something is wrong: say what, naming the entry.
    name = dirname.partition(".")[0]
    path = printable(os.path.join(cfg.vmdir, dirname))
    shown = printable(name)
    if not stat.S_ISDIR(st.st_mode):
        raise TreeError(f"VM '{shown}': {path} is not a directory (admin: move it out of "
                        f"{printable(cfg.vmdir)})")
    if st.st_uid == 0:
        raise TreeError(f"VM '{shown}': {path} is owned by root, not by the VM user "
                        f"(admin: chown USER {path})")
    if mode != 0o700:
        raise TreeError(f"VM '{shown}': {path} has mode {mode:04o}; it must be mode 0700 and "
                        f"owned by the VM user (admin: chmod 700 {path})")
    link = printable(os.path.join(cfg.vmdir, name))
    raise TreeError(f"VM '{shown}': no symlink {link} points to {path} (admin: restore it, "
                    f"ln -sfn {printable(dirname)} {link}, or move the directory out)")


def _link_target(dfd: int, name: str) -> str | None:
    """Where the root-owned symlink TOP/<name> points, or None if there is
    no such symlink (or it is not root's)."""
    st = _lstat(dfd, name)
    if st is None or not stat.S_ISLNK(st.st_mode) or st.st_uid != 0:
        return None
    try:
        return os.readlink(name, dir_fd=dfd)
    except OSError:
        return None


def is_entry(leaf: str) -> bool:
    """May *leaf* (a name in the top directory) be a VM directory?  Not the
    symlinks (what users type: no '.'), nor hidden entries (kvmadm's own:
    .removed, .owners, .NAME.link)."""
    return bool(leaf) and leaf[0] != "." and "." in leaf


def _view_ok(fd: int) -> os.stat_result | None:
    """fstat of a directory of the view if only root can change it."""
    st = os.fstat(fd)
    return st if st.st_uid == 0 and not st.st_mode & 0o022 else None


def _viewed(dfd: int, uid: int) -> list[str] | None:
    """The entries of *uid* by the per-owner view, if it is fresh (see the
    module's docstring); None: no fresh view, scan the tree."""
    flags = _TOP_FLAGS | os.O_NONBLOCK
    try:
        ofd = os.open(OWNERS, flags, dir_fd=dfd)
    except OSError:
        return None
    try:
        st = _view_ok(ofd)
        if st is None or st.st_mtime_ns != os.fstat(dfd).st_mtime_ns:
            return None
        try:
            ufd = os.open(str(uid), flags, dir_fd=ofd)
        except FileNotFoundError:
            return []                   # fresh, and no entry of uid's
        except OSError:
            return None
        try:
            if _view_ok(ufd) is None:
                return None
            return [leaf for leaf in os.listdir(ufd) if is_entry(leaf)]
        finally:
            os.close(ufd)
    finally:
        os.close(ofd)


def owner_map(dfd: int) -> dict[int, set[str]]:
    """Every possible VM directory of the tree open as *dfd*, by the owner
    its ``lstat`` gives: what the per-owner view holds (for kvmadm)."""
    out: dict[int, set[str]] = {}
    with os.scandir(dfd) as it:
        leaves = [e.name for e in it if is_entry(e.name)]
    for leaf in leaves:
        st = _lstat(dfd, leaf)
        if st is not None:
            out.setdefault(st.st_uid, set()).add(leaf)
    return out


def scan(cfg: Config, uid: int) -> Scan:
    """The VM directories *uid* owns: healthy VMs and broken entries.

    Cost: *uid*'s own entries, found by the per-owner view while it is
    fresh (else one ``scandir`` of the top directory and one ``lstat`` per
    VM directory); only *uid*'s own entries are checked further (their
    symlink, mode and identifier).  Entries of other users are skipped
    unread."""
    dfd = open_top(cfg)
    vms: list[VM] = []
    broken: list[Broken] = []
    try:
        leaves = _viewed(dfd, uid)
        if leaves is None:
            with os.scandir(dfd) as it:
                leaves = [e.name for e in it if is_entry(e.name)]
        for leaf in leaves:
            # The same check whichever way the name came: the owner is the
            # real entry's, now.
            st = _lstat(dfd, leaf)
            if st is None or st.st_uid != uid:
                continue
            try:
                vms.append(_check_dir(cfg, leaf, st,
                                      _link_target(dfd, leaf.partition(".")[0])))
            except TreeError as exc:
                broken.append(Broken(cfg.vmdir, leaf, uid, exc.message,
                                     stat.S_ISDIR(st.st_mode)))
    finally:
        os.close(dfd)
    return Scan(vms, broken)


def scan_all(cfg: Config) -> Scan:
    """Every entry of the tree, for root (kvmadm list): healthy VMs, and
    each broken entry (wrong type, owner or mode, undecodable name, a
    symlink that is not root's or points nowhere) with its reason."""
    dfd = open_top(cfg)
    vms: list[VM] = []
    broken: list[Broken] = []
    try:
        with os.scandir(dfd) as it:
            leaves = [e.name for e in it if not e.name.startswith(".")]
        stats = {leaf: _lstat(dfd, leaf) for leaf in leaves}
        targets: dict[str, str] = {}           # root's symlinks: name -> target
        for leaf, st in stats.items():
            if st is not None and "." not in leaf and stat.S_ISLNK(st.st_mode) and not st.st_uid:
                try:
                    targets[leaf] = os.readlink(leaf, dir_fd=dfd)
                except OSError:
                    pass
        for leaf, st in stats.items():
            if st is None:
                continue
            if "." in leaf:
                try:
                    vms.append(_check_dir(cfg, leaf, st,
                                          targets.get(leaf.partition(".")[0])))
                except TreeError as exc:
                    broken.append(Broken(cfg.vmdir, leaf, st.st_uid, exc.message,
                                         stat.S_ISDIR(st.st_mode)))
                continue
            why = ""
            shown = printable(leaf)
            path = printable(os.path.join(cfg.vmdir, leaf))
            if not stat.S_ISLNK(st.st_mode):
                why = f"{path} must be a symlink to the VM directory (admin: remove it)"
            elif st.st_uid != 0:
                why = f"{path} is not owned by root (admin: chown -h root {path})"
            else:
                target = targets.get(leaf, "")
                tst = stats.get(target) if "/" not in target else None
                if tst is None:
                    why = (f"VM '{shown}': {path} -> {printable(target)}: its directory is "
                           f"missing (admin: rm {path}, or restore the directory)")
                elif target.partition(".")[0] != leaf:
                    why = (f"{path} -> {printable(target)}: the directory of another VM "
                           f"(admin: fix or remove {path})")
            if why:
                broken.append(Broken(cfg.vmdir, leaf, st.st_uid, why, False))
    finally:
        os.close(dfd)
    return Scan(vms, broken)


def resolve(cfg: Config, name: str, uid: int | None = None) -> VM:
    """Resolve a user-typed VM name; with *uid*, also check ownership.

    Raises UsageError (no such VM), NotYours (another user's VM: nothing
    more is read or said about it) or TreeError (the entry is broken; the
    details, with the directory's path, only to its owner or root)."""
    vmid.check_name(name)
    dfd = open_top(cfg)
    try:
        link = os.path.join(cfg.vmdir, name)
        st = _lstat(dfd, name)
        if st is None:
            raise UsageError(f"no VM named {name!r}")
        if not stat.S_ISLNK(st.st_mode):
            raise TreeError(f"{link} must be a symlink to the VM directory")
        if st.st_uid != 0:
            raise TreeError(f"{link} is not owned by root")
        target = os.readlink(name, dir_fd=dfd)
        # Messages below name no directory until the owner is known: the
        # directory name holds the VM's admin options.
        if "/" in target or target in ("", ".", ".."):
            raise TreeError(f"VM {name!r}: {link} must point to a sibling directory")
        tst = _lstat(dfd, target)
        if tst is None:
            raise TreeError(f"VM {name!r}: its directory is missing "
                            f"(admin: rm {link}, or restore the directory)")
        if not stat.S_ISDIR(tst.st_mode):
            raise TreeError(f"VM {name!r}: {link} does not point to a directory (not a directory)")
        if tst.st_uid == 0:
            raise TreeError(f"VM {name!r}: its directory must be owned by the VM user, not root "
                            f"(admin: kvmadm show {name}; chown USER)")
        if uid is not None and tst.st_uid != uid:
            raise NotYours(f"VM {name!r} is not yours")
        vm = _check_dir(cfg, target, tst, target)
    finally:
        os.close(dfd)
    if vm.name != name:
        raise TreeError(f"{link} -> {printable(target)}: symlink and identifier disagree")
    return vm


def owned(cfg: Config, uid: int) -> list[VM]:
    """The healthy VMs *uid* owns, sorted by name (see :func:`scan`)."""
    return scan(cfg, uid).vms


def pick(cfg: Config, uid: int, name: str | None) -> VM:
    """The named VM, or the caller's only VM when no name is given.  A
    broken VM of the caller's own is reported (TreeError, with the fix);
    other users' entries never matter."""
    if name is not None:
        return resolve(cfg, name, uid)
    mine = scan(cfg, uid)
    count = len(mine.vms) + len(mine.broken)
    if not count:
        raise UsageError("you have no VMs")
    if count > 1:
        raise UsageError("you have several VMs: name one (see 'list')")
    if mine.broken:
        raise TreeError(mine.broken[0].reason)
    return mine.vms[0]


class in_dir:
    """``with in_dir(path):`` work inside the directory *path* (a VM's:
    its sockets are named relative to it, as the absolute path may be
    longer than a unix socket address allows, 108 bytes), then go back to
    the working directory as it was, through a descriptor kept meanwhile
    (a working directory that was gone stays gone).  Raises OSError from
    the ``chdir``.  Unlike ``contextlib.chdir``, which goes back by name,
    this needs no name for the old directory and returns to the same one
    even if it was renamed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.here = -1

    def __enter__(self) -> None:
        try:
            self.here = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            self.here = -1
        try:
            os.chdir(self.path)
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *_: object) -> None:
        if self.here >= 0:
            try:
                os.fchdir(self.here)
            except OSError:
                pass
            os.close(self.here)
            self.here = -1
