"""The ``autostart`` verb, and keeping a start's options for the next boot.

    autostart [VM]           say whether the VM is marked, and with what
    autostart [VM] on|off    mark it to start at boot as you, or clear the mark

Runs as the VM user.  The files and the admin's switches are described in
:mod:`kvmshell.common.autostart`; the boot side is ``kvmadm autostart``.
A VM named ``on`` or ``off`` is named explicitly: ``autostart on off``.
"""

from __future__ import annotations

import os
import sys

from kvmshell.common import autostart as files
from kvmshell.common.errors import RuntimeFailure, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kvmshell.common.vmtree import VM
    from kvmshell.shell.context import Context

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TMP = "." + files.OPTIONS + ".tmp"


def _open_dir(vm: "VM") -> int:
    try:
        return os.open(vm.path, _DIR_FLAGS)
    except OSError as exc:
        raise RuntimeFailure(f"{vm.name}: cannot open the VM directory: {exc.strerror}") from exc


def marked(vm: "VM") -> bool:
    """Is *vm* marked for autostart (a regular file, as kvmshell makes it)?"""
    import stat
    try:
        return stat.S_ISREG(os.lstat(vm.file(files.FLAG)).st_mode)
    except OSError:
        return False


def _saved(dfd: int) -> list[str] | None:
    try:
        fd = os.open(files.OPTIONS, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dfd)
    except OSError:
        return None
    try:
        return files.decode(os.read(fd, files.MAX_OPTIONS_BYTES + 1))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    finally:
        os.close(fd)


def remember(vm: "VM", values: "dict[str, str | None]") -> None:
    """After a successful start: keep its options for autostart (atomically:
    a new file under a hidden name, fsync'd, renamed over the old one).
    Unchanged options are not rewritten.  Raises RuntimeFailure if they
    cannot be written (the VM runs all the same)."""
    words = files.kept_words(values)
    dfd = _open_dir(vm)
    try:
        if _saved(dfd) == words:
            return
        try:
            os.unlink(_TMP, dir_fd=dfd)
        except FileNotFoundError:
            pass
        try:
            fd = os.open(_TMP, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=dfd)
            try:
                os.write(fd, files.encode(words))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(_TMP, files.OPTIONS, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError as exc:
            try:
                os.unlink(_TMP, dir_fd=dfd)
            except OSError:
                pass
            raise RuntimeFailure(
                f"{vm.name}: started, but its options were not kept for autostart: "
                f"{exc.strerror}") from exc
    finally:
        os.close(dfd)


def _parse(args: list[str]) -> tuple[str | None, str | None]:
    if len(args) > 2:
        raise UsageError(f"{args[2]}: unexpected argument to 'autostart'")
    if len(args) == 2:
        if args[1] not in ("on", "off"):
            raise UsageError(f"{args[1]}: expected on or off")
        return args[0], args[1]
    if len(args) == 1 and args[0] in ("on", "off"):
        return None, args[0]
    if args and args[0].startswith("-"):
        raise UsageError(f"{args[0]}: unexpected argument to 'autostart'")
    return (args[0] if args else None), None


def main(ctx: "Context", args: list[str]) -> int:
    """The verb: show, set or clear the mark of one of the caller's VMs."""
    from kvmshell.common import adminopts
    name, want = _parse(args)
    vm = ctx.pick(name)
    why_not = files.forbidden(ctx.cfg, adminopts.parse_admin(vm.admin_words))
    if want == "on" and why_not:
        raise UsageError(f"autostart: {why_not}")
    dfd = _open_dir(vm)
    try:
        if want == "on":
            try:
                fd = os.open(files.FLAG, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600, dir_fd=dfd)
            except OSError as exc:
                raise RuntimeFailure(f"{vm.name}: cannot mark it: {exc.strerror}") from exc
            os.close(fd)
        elif want == "off":
            try:
                os.unlink(files.FLAG, dir_fd=dfd)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise RuntimeFailure(f"{vm.name}: cannot clear the mark: {exc.strerror}") from exc
        saved = _saved(dfd)
    finally:
        os.close(dfd)
    on = marked(vm)
    line = f"{vm.name}: autostart {'on' if on else 'off'}"
    if on and why_not:
        line += f" (but it will not start: {why_not})"
    elif on:
        from kvmshell.common.auditlog import join_words
        line += ("; at boot it starts with: start " + vm.name
                 + ("" if not saved else " " + join_words(saved))
                 + ("" if saved is not None else " (no start kept yet)"))
    sys.stdout.write(line + "\n")
    return 0
