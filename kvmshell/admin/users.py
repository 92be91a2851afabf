"""VM users, for ``kvmadm adduser`` and ``kvmadm setkey`` (runs as root).

A VM user is a local account in the VM users' group (``group`` in the
config) whose login shell is kvmshell and whose SSH keys live in a
root-owned file, ``<authorized_keys>/USER``, that the sshd drop-in
(sshd_config.d/kvmshell.conf) names as its AuthorizedKeysFile.  Why
root-owned: a key file the user could write would let them add keys with
options of their own; here every key is prefixed with ``restrict,pty``
(no forwarding, no ~/.ssh/rc, a terminal allowed) on top of the drop-in.

KVM, the Debian way: a user may open /dev/kvm by membership of the group
that owns the device (``kvm`` on Debian, set by udev's
50-udev-default.rules).  The group is read from the device itself, never
assumed; a device owned by group root is never a reason to put a user in
group root.  ``adduser_kvm = no`` in the config, or ``adduser --no-kvm``,
leaves it out.
"""

from __future__ import annotations

import binascii
import grp
import os
import pwd
import re
import stat
import subprocess
import sys

from kvmshell.common.config import Config
from kvmshell.common.errors import RuntimeFailure, TreeError, UsageError
from kvmshell.common.kvmdev import KVM_DEVICE
from kvmshell.common.sshkeys import KEY_TYPES, MAX_KEYS

_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}\Z")
KEY_OPTIONS = "restrict,pty"


def check_user(name: str) -> str:
    if not _USER_RE.match(name):
        raise UsageError(f"{name!r}: invalid user name (lower-case letters, digits, '_-')")
    return name


def _run(argv: list[str]) -> None:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeFailure(f"{argv[0]} failed: {r.stderr.strip() or r.returncode}")


def mode_text(st: os.stat_result) -> str:
    """'owner:group 0660' for a stat result (numbers where names are missing)."""
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{owner}:{group} {stat.S_IMODE(st.st_mode):04o}"


def kvm_group_fix(user: str = "USER") -> str:
    """How the admin gives /dev/kvm a group users can be put in (one line)."""
    return (f"groupadd --system kvm; chgrp kvm {KVM_DEVICE}; chmod 0660 {KVM_DEVICE} "
            "(udev does this at boot on Debian, /lib/udev/rules.d/50-udev-default.rules; "
            f"in a container, its host must); then usermod -aG kvm {user}")


def kvm_group(device: str = KVM_DEVICE) -> tuple[str | None, str]:
    """The name of the group that owns *device* (the gid as text if it has
    no name), or None and why no user can be given access through a group:
    missing, not a character device, or owned by group root."""
    try:
        st = os.stat(device)
    except FileNotFoundError:
        return None, f"no {device} on this host"
    except OSError as exc:
        return None, f"{device}: {exc.strerror}"
    if not stat.S_ISCHR(st.st_mode):
        return None, f"{device} is not a character device"
    if st.st_gid == 0:
        return None, f"{device} is root-only ({mode_text(st)})"
    try:
        return grp.getgrgid(st.st_gid).gr_name, ""
    except KeyError:
        return str(st.st_gid), ""


def adduser(cfg: Config, name: str, kvm: bool = True) -> tuple[str | None, str]:
    """Create *name* in the VM users' group with kvmshell as its shell and,
    when *kvm* and the config's ``adduser_kvm`` allow, in /dev/kvm's group.

    Returns (the /dev/kvm group the user joined, or None; why not: '' when
    joined or when a switch left it out).  Raises UsageError (bad or
    existing name), RuntimeFailure (no shell, useradd failed)."""
    check_user(name)
    try:
        pwd.getpwnam(name)
    except KeyError:
        pass
    else:
        raise UsageError(f"{name}: the user exists (use 'setkey' for its key)")
    if not os.access(cfg.shell, os.X_OK):
        raise RuntimeFailure(f"shell {cfg.shell} is not an executable (see 'shell' in {cfg.path})")
    try:
        grp.getgrnam(cfg.group)
    except KeyError:
        _run(["groupadd", "--system", cfg.group])
    groups = [cfg.group]
    kvm_grp, why = kvm_group() if kvm and cfg.adduser_kvm else (None, "")
    if kvm_grp and kvm_grp != cfg.group:
        groups.append(kvm_grp)
    # Home '/': nothing the user owns is read by sshd or login at log-in.
    _run(["useradd", "--no-create-home", "--home-dir", "/", "--shell", cfg.shell,
          "--groups", ",".join(groups), "--comment", "kvmshell VM user", name])
    return kvm_grp, why


def parse_keys(text: str, source: str) -> list[str]:
    """Validate public keys (one a line, no options); return them re-spelled."""
    out = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 2)
        if parts[0] not in KEY_TYPES or len(parts) < 2:
            raise UsageError(f"{source}:{lineno}: not a public key of a known type "
                             "(key options are not accepted)")
        try:
            blob = binascii.a2b_base64(parts[1].encode("ascii"))
        except (binascii.Error, UnicodeEncodeError) as exc:
            raise UsageError(f"{source}:{lineno}: the key is not valid base64") from exc
        kind = parts[0].encode()
        if blob[:4] != len(kind).to_bytes(4, "big") or blob[4:4 + len(kind)] != kind:
            raise UsageError(f"{source}:{lineno}: the key does not match its type {parts[0]}")
        comment = parts[2] if len(parts) > 2 else ""
        comment = "".join(c for c in comment if c.isascii() and c.isprintable())
        out.append(f"{parts[0]} {parts[1]} {comment}".rstrip())
    if not out:
        raise UsageError(f"{source}: no public key found")
    if len(out) > MAX_KEYS:
        raise UsageError(f"{source}: more than {MAX_KEYS} keys")
    return out


def _keys_dir(cfg: Config) -> str:
    d = cfg.authorized_keys
    if not os.path.lexists(d):
        os.makedirs(d, mode=0o755, exist_ok=True)
        os.chmod(d, 0o755)
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise TreeError(f"{d} must be a directory owned by root, not group/world-writable "
                        "(admin: chown root:root; chmod 755)")
    return d


def setkey(cfg: Config, name: str, source: str) -> str:
    """Install the public key(s) from *source* ('-' is stdin) for VM user *name*."""
    check_user(name)
    try:
        pw = pwd.getpwnam(name)
    except KeyError as exc:
        raise UsageError(f"{name}: no such user") from exc
    try:
        group = grp.getgrnam(cfg.group)
    except KeyError as exc:
        raise UsageError(f"group {cfg.group} does not exist (kvmadm adduser creates it)") from exc
    if name not in group.gr_mem and pw.pw_gid != group.gr_gid:
        raise UsageError(f"{name}: not in group {cfg.group} (the sshd drop-in would not apply)")
    if source == "-":
        text = sys.stdin.read(1 << 20)
    else:
        try:
            with open(source, encoding="ascii", errors="replace") as f:
                text = f.read(1 << 20)
        except OSError as exc:
            raise UsageError(f"--key: {source}: {exc.strerror}") from exc
    keys = parse_keys(text, source)
    d = _keys_dir(cfg)
    path = os.path.join(d, name)
    tmp = os.path.join(d, f".{name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.fchmod(fd, 0o644)
        os.write(fd, "".join(f"{KEY_OPTIONS} {k}\n" for k in keys).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    return path
