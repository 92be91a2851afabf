"""The VM tree: the filesystem as the only configuration store.

    TOP/                       root-owned, not group/world-writable
    TOP/<name> -> <name>.<id>  root-owned symlink: what users type
    TOP/<name>.<id>/           0700, owned by the VM user: images, sockets

Why the checks: users cannot rename anything in TOP, so a directory name
there is the admin's word.  kvmshell refuses to act on a tree that does not
have that shape, and says what the admin must fix.
"""

from __future__ import annotations

import os
import stat

from kvmshell.common import vmid
from kvmshell.common.config import Config
from kvmshell.common.errors import NotYours, TreeError, UsageError


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


def check_top(cfg: Config) -> None:
    """Refuse to run on a top directory users could change."""
    top = cfg.vmdir
    try:
        st = os.lstat(top)
    except FileNotFoundError as exc:
        raise TreeError(f"VM directory {top} does not exist (admin: kvmadm create ...)") from exc
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise TreeError(
            f"{top} must be a directory owned by root and not group/world-writable "
            f"(admin: chown root:root {top}; chmod 755 {top})")


def _resolve_link(cfg: Config, name: str) -> str:
    link = os.path.join(cfg.vmdir, name)
    try:
        st = os.lstat(link)
    except FileNotFoundError as exc:
        raise UsageError(f"no VM named {name!r}") from exc
    if not stat.S_ISLNK(st.st_mode):
        raise TreeError(f"{link} must be a symlink to the VM directory")
    if st.st_uid != 0:
        raise TreeError(f"{link} is not owned by root")
    target = os.readlink(link)
    if "/" in target:
        raise TreeError(f"{link} -> {target}: must point to a sibling directory")
    return target


def load(cfg: Config, name: str, dirname: str) -> VM:
    """Check one VM directory and decode its identifier."""
    path = os.path.join(cfg.vmdir, dirname)
    try:
        st = os.lstat(path)
    except FileNotFoundError as exc:
        raise TreeError(f"{name}: {path} is missing") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise TreeError(f"{path} is not a directory")
    if stat.S_IMODE(st.st_mode) != 0o700 or st.st_uid == 0:
        raise TreeError(
            f"{path} must be mode 0700 and owned by the VM user (admin: chmod 700; chown USER)")
    dname, words = vmid.decode(dirname)
    if dname != name:
        raise TreeError(f"{name} -> {dirname}: symlink and identifier disagree")
    return VM(cfg.vmdir, name, dirname, st.st_uid, words)


def resolve(cfg: Config, name: str, uid: int | None = None) -> VM:
    """Resolve a user-typed VM name; with *uid*, also check ownership."""
    vmid.check_name(name)
    check_top(cfg)
    vm = load(cfg, name, _resolve_link(cfg, name))
    if uid is not None and vm.uid != uid:
        raise NotYours(f"VM {name!r} is not yours")
    return vm


def names(cfg: Config) -> list[str]:
    """All VM names (symlinks) in the tree, sorted."""
    check_top(cfg)
    out = []
    for entry in os.scandir(cfg.vmdir):
        if entry.is_symlink() and "." not in entry.name:
            out.append(entry.name)
    return sorted(out)


def owned(cfg: Config, uid: int) -> list[VM]:
    """The VMs *uid* owns; a broken entry is an error, not skipped silently."""
    out = []
    for name in names(cfg):
        vm = load(cfg, name, _resolve_link(cfg, name))
        if vm.uid == uid:
            out.append(vm)
    return out


def pick(cfg: Config, uid: int, name: str | None) -> VM:
    """The named VM, or the caller's only VM when no name is given."""
    if name is not None:
        return resolve(cfg, name, uid)
    mine = owned(cfg, uid)
    if len(mine) == 1:
        return mine[0]
    if not mine:
        raise UsageError("you have no VMs")
    raise UsageError("you have several VMs: name one (see 'list')")
