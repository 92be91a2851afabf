"""Host settings: one root-owned file, ``/etc/kvmshell/kvmshell.conf``.

Format: ``key = value`` lines, ``#`` comments.  Unknown keys are errors, so
a typo never silently weakens a limit.  Why root-owned: kvmshell runs as
the (hostile) VM user, and the file decides which directories that user may
read images from, so only a file the user cannot write is honoured.
"""

from __future__ import annotations

import os
import stat

from kvmshell.common.errors import ConfigError

DEFAULT_PATH = "/etc/kvmshell/kvmshell.conf"

_DEFAULTS: dict[str, str] = {
    "vmdir": "/var/lib/kvmshell/vms",
    "qemu": "/usr/bin/qemu-system-x86_64",
    "qemu_img": "/usr/bin/qemu-img",
    "accel": "kvm tcg",
    "image_dirs": "",
    "helper": "/usr/local/libexec/kvmshell/kvmshell-nethelper",
    "stop_timeout": "30",
    "console_log_bytes": "1048576",
    "max_running": "0",
    "max_image_bytes": "0",
    "upload_max_bytes": "4294967296",
    "group": "kvmusers",
    "authorized_keys": "/etc/kvmshell/authorized_keys",
    "shell": "/usr/local/bin/kvmshell",
}

_ACCELS = ("kvm", "tcg")


class Config:
    """Parsed host settings (all values validated)."""

    def __init__(self, path: str, values: dict[str, str]) -> None:
        self.path = path
        self.vmdir = _abs(values, "vmdir")
        self.qemu = _abs(values, "qemu")
        self.qemu_img = _abs(values, "qemu_img")
        self.helper = _abs(values, "helper")
        self.group = values["group"]
        self.authorized_keys = _abs(values, "authorized_keys")
        self.shell = _abs(values, "shell")
        self.accel = values["accel"].split()
        if not self.accel or any(a not in _ACCELS for a in self.accel):
            raise ConfigError(f"{path}: accel must be a list of {'/'.join(_ACCELS)}")
        self.image_dirs = [_checkdir(path, d) for d in values["image_dirs"].split()]
        self.stop_timeout = _int(values, "stop_timeout", path)
        self.console_log_bytes = _int(values, "console_log_bytes", path)
        self.max_running = _int(values, "max_running", path)
        self.max_image_bytes = _int(values, "max_image_bytes", path)
        self.upload_max_bytes = _int(values, "upload_max_bytes", path)


def _abs(values: dict[str, str], key: str) -> str:
    v = values[key]
    if not v.startswith("/") or "//" in v or "/../" in v + "/" or "," in v:
        raise ConfigError(f"{key}: must be a plain absolute path, got {v!r}")
    return v.rstrip("/") or "/"


def _checkdir(path: str, d: str) -> str:
    if not d.startswith("/") or "," in d or ":" in d or "/." in d:
        raise ConfigError(f"{path}: image_dirs: {d!r} is not a plain absolute path")
    return d.rstrip("/")


def _int(values: dict[str, str], key: str, path: str) -> int:
    try:
        n = int(values[key])
    except ValueError as exc:
        raise ConfigError(f"{path}: {key}: not a number: {values[key]!r}") from exc
    if n < 0:
        raise ConfigError(f"{path}: {key}: must not be negative")
    return n


def load(path: str = DEFAULT_PATH, *, require_root: bool = True) -> Config:
    """Read and validate the host config; a missing default file means defaults."""
    values = dict(_DEFAULTS)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        if path == DEFAULT_PATH:
            return Config(path, values)
        raise ConfigError(f"cannot read config {path}: no such file") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if require_root and (st.st_uid != 0 or st.st_mode & 0o022
                             or not stat.S_ISREG(st.st_mode)):
            # Why: a config the user can write would let them widen image_dirs.
            raise ConfigError(
                f"config {path} must be a regular file owned by root and not "
                "group/world-writable (admin: chown root:root; chmod 644)")
        data = os.read(fd, 65536).decode("utf-8", "replace")
    finally:
        os.close(fd)
    for lineno, raw in enumerate(data.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, eq, value = line.partition("=")
        key = key.strip()
        if not eq or key not in _DEFAULTS:
            raise ConfigError(f"{path}:{lineno}: unknown setting {key!r}")
        values[key] = value.strip()
    return Config(path, values)
