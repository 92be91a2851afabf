"""The bounded console log the supervisor keeps (see conmux.py).

The supervisor is QEMU's only serial peer: it keeps everything the guest
prints in ``console.log`` plus one rotated ``console.log.1`` in the VM
directory, so output is never lost before a user attaches and a flooding
guest cannot fill the disk.
"""

from __future__ import annotations

import os


def _open(path: str, extra: int) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                   | os.O_CLOEXEC | extra, 0o600)


def open_new(path: str) -> int:
    """Open the log for a new run of the VM, emptied: its descriptor."""
    return _open(path, os.O_TRUNC)


class BoundedLog:
    """Append-only log that rotates once it reaches *limit* bytes."""

    def __init__(self, path: str, limit: int, fd: int = -1) -> None:
        """*fd*: *path* already opened by :func:`open_new` (this takes it)."""
        self.path = path
        self.limit = max(limit, 4096)
        self.fd = fd if fd >= 0 else open_new(path)
        self.size = 0

    def _open(self, extra: int) -> int:
        return _open(self.path, extra)

    def write(self, data: bytes) -> None:
        if self.size + len(data) > self.limit:
            os.close(self.fd)
            os.replace(self.path, self.path + ".1")
            self.fd = self._open(os.O_TRUNC)
            self.size = 0
        os.write(self.fd, data)
        self.size += len(data)

    def close(self) -> None:
        os.close(self.fd)
