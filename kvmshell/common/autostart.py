"""Autostart: which VMs start at boot, and with which options.

Shared by kvmshell (the owner marks a VM and, on every successful start,
keeps its options) and kvmadm (``kvmadm autostart`` reads them at boot, as
root).  Two files in the VM directory, both written by kvmshell as the
owner:

    autostart        the mark ('autostart on'): present or not, contents unused
    start-options    the options of the last successful start, one word per
                     line, ASCII (kvmshell's lexer allows nothing else in a
                     word); -loadvm is left out (a saved state is restored
                     once, by hand: restoring it at every boot would roll the
                     guest back over disks that have moved on)

Why root reads them carefully: they are the (hostile) user's files.  Root
opens nothing here but through the VM directory's descriptor, with
``O_NOFOLLOW|O_NONBLOCK|O_NOCTTY``, requires a regular file owned by the
VM's owner, reads at most :data:`MAX_OPTIONS_BYTES`, and never interprets
the words: it hands them, as argv, to kvmshell's own ``start`` running as
the owner, which validates them as it would an SSH command.  The mark is
only ``lstat``-ed.

The admin forbids autostart host-wide (``autostart = no`` in
kvmshell.conf) or per VM (the admin option ``-no-autostart``).
"""

from __future__ import annotations

import os
import stat

from kvmshell.common.errors import RuntimeFailure

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kvmshell.common.adminopts import AdminPlan
    from kvmshell.common.config import Config
    from kvmshell.common.vmtree import VM

FLAG = "autostart"
OPTIONS = "start-options"
FILES = (FLAG, OPTIONS)
MAX_OPTIONS_BYTES = 16384
MAX_WORDS = 64
ONE_SHOT = ("-loadvm",)    # options not kept for the next boot

_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def forbidden(cfg: "Config", plan: "AdminPlan") -> str | None:
    """Why the admin forbids autostart for a VM with *plan*, or None."""
    if not cfg.autostart:
        return "autostart is off on this host (autostart = no in kvmshell.conf)"
    if not plan.autostart:
        return "the administrator set -no-autostart for this VM"
    return None


def kept_words(values: "dict[str, str | None]") -> list[str]:
    """The words to keep from a parsed start request (option -> value)."""
    out: list[str] = []
    for name, value in values.items():
        if name in ONE_SHOT:
            continue
        out.append(name)
        if value is not None:
            out.append(value)
    return out


def encode(words: list[str]) -> bytes:
    """The contents of ``start-options`` for *words*."""
    return "".join(w + "\n" for w in words).encode("ascii")


def decode(data: bytes) -> list[str]:
    """The words of a ``start-options`` file; ValueError if it is not one
    kvmshell could have written (too big, not printable ASCII lines)."""
    if len(data) > MAX_OPTIONS_BYTES:
        raise ValueError(f"more than {MAX_OPTIONS_BYTES} bytes")
    if data and not data.endswith(b"\n"):
        raise ValueError("no final newline")
    words = data.decode("ascii").split("\n")[:-1] if data else []
    if len(words) > MAX_WORDS:
        raise ValueError(f"more than {MAX_WORDS} words")
    for w in words:
        if not w or any(not 0x20 <= ord(c) < 0x7F for c in w):
            raise ValueError("an empty word or a character outside printable ASCII")
    return words


def read(vm: "VM") -> tuple[bool, list[str]]:
    """As root: (marked?, saved words) of *vm*, read as user data (see the
    module docstring).  Raises RuntimeFailure for a file kvmshell would not
    have made (a symlink, a FIFO, another owner's, too big, not ASCII)."""
    try:
        dfd = os.open(vm.path, _DIR_FLAGS)
    except OSError as exc:
        raise RuntimeFailure(f"{vm.name}: cannot open the VM directory: {exc.strerror}") from exc
    try:
        if os.fstat(dfd).st_uid != vm.uid:
            raise RuntimeFailure(f"{vm.name}: the VM directory changed owner")
        try:
            st = os.stat(FLAG, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return False, []
        if not stat.S_ISREG(st.st_mode) or st.st_uid != vm.uid:
            raise RuntimeFailure(f"{vm.name}: {FLAG} is not a regular file of the VM's owner")
        try:
            fd = os.open(OPTIONS, _READ_FLAGS, dir_fd=dfd)
        except FileNotFoundError:
            return True, []      # marked, never started: no options
        except OSError as exc:   # ELOOP: a symlink
            raise RuntimeFailure(f"{vm.name}: cannot open {OPTIONS}: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != vm.uid:
                raise RuntimeFailure(
                    f"{vm.name}: {OPTIONS} is not a regular file of the VM's owner")
            data = os.read(fd, MAX_OPTIONS_BYTES + 1)
        finally:
            os.close(fd)
    finally:
        os.close(dfd)
    try:
        return True, decode(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RuntimeFailure(f"{vm.name}: {OPTIONS} is not kvmshell's: {exc}") from exc
