"""Who calls a root helper, and what the caller may name: the checks the
helpers share, made before any verb runs (each helper keeps its own verb
table and calls these; nothing here decides what a verb does).

This module owns:

* **the caller** (:func:`sudo_caller`): root only through sudo, the uid
  sudo recorded (``SUDO_UID``), and an environment with nothing but what
  sudo's ``env_reset`` leaves (:data:`SUDO_ENV`, or a helper's narrower set);
* **the request's shape** (:func:`request`): exactly the words of the
  helper's usage line, the first one a verb of the helper's own
  deny-by-default table;
* **a VM name** (:func:`vm_name`), checked before it touches any path,
  and **the VM's owner** (:func:`owned_vm`), read from the root-owned tree;
* **the caller's socket** on a standard descriptor (:func:`unix_socket`);
* **membership** of the VM users' group (:func:`in_group`);
* **the host config** at the helper's fixed path, as kvmshell reads it
  (:func:`host_config`).

Every refusal is :class:`~kvmshell.privileged.guard.Refused` (exit 2) and
names the offending token; a tree that is not as kvmadm makes it is
:class:`~kvmshell.privileged.guard.Failed` (exit 1).  Imports: the stdlib
and the shared core (the import contracts in setup.cfg).
"""

from __future__ import annotations

import os
import stat

from kvmshell.common import vmid
from kvmshell.common.errors import KvmshellError
from kvmshell.common.text import printable
from kvmshell.privileged.guard import Failed, Refused

TYPE_CHECKING = False
if TYPE_CHECKING:
    import grp
    import pwd
    import socket
    from collections.abc import Mapping

    from kvmshell.common.config import Config

# What sudo (env_reset) may leave in the environment; anything else means
# someone is trying to steer a root process, so it is refused.
SUDO_ENV = frozenset((
    "SUDO_UID", "SUDO_GID", "SUDO_USER", "SUDO_COMMAND", "SUDO_HOME", "SUDO_PS1",
    "PATH", "HOME", "SHELL", "LOGNAME", "USER", "USERNAME", "MAIL", "TERM",
    "LANG", "LANGUAGE", "TZ", "DISPLAY", "XAUTHORITY", "XAUTHORIZATION", "COLORS",
    "LS_COLORS", "HOSTNAME", "PS1", "PS2", "KRB5CCNAME", "XDG_CURRENT_DESKTOP"))

NAME_MAX = vmid.NAME_MAX


def require_root() -> None:
    """Refused unless the real and effective uid are root's."""
    if os.getuid() != 0 or os.geteuid() != 0:
        raise Refused("must be run as root through sudo")


def sudo_caller(env: "Mapping[str, str]", allowed: frozenset[str] = SUDO_ENV) -> int:
    """The uid that ran the helper through sudo (``SUDO_UID``), after
    :func:`require_root`; Refused when ``SUDO_UID`` is not a number of at
    most 10 digits, or *env* holds a variable outside *allowed* (``LC_*``
    aside)."""
    require_root()
    # Why SUDO_UID is believed: only root can run a helper at all (none is
    # setuid), so only sudo or root itself can have set it.
    uid_s = env.get("SUDO_UID", "")
    if not uid_s.isdigit() or not uid_s.isascii() or len(uid_s) > 10:
        raise Refused("must be run through sudo (no SUDO_UID)")
    extra = sorted(k for k in env if k not in allowed and not k.startswith("LC_"))
    if extra:
        raise Refused(f"unexpected environment variable {extra[0][:40]!r}")
    return int(uid_s)


def request(argv: list[str], prog: str, usage: str, verbs: tuple[str, ...]) -> list[str]:
    """The words after the program's name in *argv*: exactly as many as
    *usage* (``VERB ARG...``, as the usage line shows them) has, the first
    one of *verbs*.  Refused otherwise, naming the count or the verb."""
    want = len(usage.split())
    if len(argv) != want + 1:
        raise Refused(f"usage: {prog} {usage} (got {max(len(argv) - 1, 0)} arguments)")
    if argv[1] not in verbs:
        raise Refused(f"unknown verb {argv[1][:20]!r} ({' or '.join(verbs)})")
    return argv[1:]


def vm_name(name: str) -> str:
    """*name* if it is a VM name (:func:`kvmshell.common.vmid.check_name`:
    1 to :data:`NAME_MAX` of ``[A-Za-z0-9_-]``, not first ``_`` or ``-``);
    else Refused."""
    # Length first, before the name touches anything else
    # (qemu-bridge-helper's CVE-2019-13164 was an unchecked length).
    if not 1 <= len(name) <= NAME_MAX:
        raise Refused(f"invalid VM name (1 to {NAME_MAX} characters)")
    try:
        return vmid.check_name(name)
    except KvmshellError as exc:
        raise Refused(f"invalid VM name {name!r}") from exc


def owned_vm(vmdir: str, name: str, uid: int) -> list[str]:
    """The admin's words of VM *name* (a checked :func:`vm_name`) in the tree
    *vmdir*, checked as kvmshell checks it (root's top directory and link,
    the link naming this VM's directory, the identifier decoding to this
    name), when the VM is *uid*'s.  Refused: no such VM, or another user's;
    Failed: a tree kvmadm would not have made."""
    try:
        st = os.lstat(vmdir)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            raise Failed(f"{vmdir} must be a root-owned directory not writable by others")
        link = os.path.join(vmdir, name)
        st = os.lstat(link)
    except FileNotFoundError as exc:
        raise Refused(f"no VM named {name!r}") from exc
    if not stat.S_ISLNK(st.st_mode) or st.st_uid != 0:
        raise Failed(f"{link} must be a root-owned symlink")
    dirname = os.readlink(link)
    if "/" in dirname or not dirname.startswith(name + "."):
        raise Failed(f"{link} -> {printable(dirname)}: not this VM's directory")
    try:
        st = os.lstat(os.path.join(vmdir, dirname))
    except FileNotFoundError as exc:
        raise Failed(f"VM {name}: directory missing") from exc
    if not stat.S_ISDIR(st.st_mode) or st.st_uid == 0:
        raise Failed(f"VM {name}: directory has the wrong type or owner")
    if st.st_uid != uid:
        # Why: the one check that stops a user acting on someone else's VM
        # (wiring its taps, choosing its cgroup).
        raise Refused(f"VM {name!r} is not yours")
    try:
        decoded, words = vmid.decode(dirname)
    except KvmshellError as exc:
        raise Failed(f"VM {name}: {exc}") from exc
    if decoded != name:
        raise Failed(f"VM {name}: identifier names another VM")
    return words


def unix_socket(fd: int, which: str) -> "socket.socket":
    """A socket object on a copy of the caller's descriptor *fd* (*which*:
    ``stdin`` or ``stdout``), which must be a unix socket (kvmshell passes
    one end of a socketpair); Refused otherwise.  The caller closes it."""
    import socket
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError as exc:
        raise Refused(f"{which} must be a unix socket (kvmshell passes one)") from exc
    if sock.family != socket.AF_UNIX:
        sock.close()
        raise Refused(f"{which} must be a unix socket (kvmshell passes one)")
    return sock


def in_group(pw: "pwd.struct_passwd", gr: "grp.struct_group") -> bool:
    """The account *pw* is not root and has *gr* as its primary or a
    supplementary group (the group database, as sudo's and sshd's ``Match
    Group`` read it)."""
    if pw.pw_uid == 0:
        return False
    return pw.pw_gid == gr.gr_gid or pw.pw_name in gr.gr_mem


def host_config(path: str) -> "Config":
    """The host config at *path* (the helper's fixed path, from its stub),
    read and checked by :func:`kvmshell.common.config.load`; Failed with
    its one line when it is unsafe or wrong (the admin must fix it)."""
    from kvmshell.common.config import load
    try:
        return load(path)
    except KvmshellError as exc:
        raise Failed(exc.message) from exc
