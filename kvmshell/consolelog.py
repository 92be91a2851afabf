"""The VM's serial console, as seen by its supervisor.

The supervisor is QEMU's only serial peer: it reads everything the guest
prints and keeps it in a bounded log in the VM directory (``console.log``
plus one rotated ``console.log.1``), so output is never lost before a user
attaches and a flooding guest cannot fill the disk.
"""

from __future__ import annotations

import os
import socket
TYPE_CHECKING = False  # not "from typing": that import alone costs ~10 ms

if TYPE_CHECKING:
    import subprocess


class BoundedLog:
    """Append-only log that rotates once it reaches *limit* bytes."""

    def __init__(self, path: str, limit: int) -> None:
        self.path = path
        self.limit = max(limit, 4096)
        self.fd = self._open(os.O_TRUNC)
        self.size = 0

    def _open(self, extra: int) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                       | os.O_CLOEXEC | extra, 0o600)

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


def pump(conn: socket.socket, proc: "subprocess.Popen[bytes]", path: str, limit: int) -> None:
    """Copy the guest's serial output into the bounded log until QEMU goes."""
    log = BoundedLog(path, limit)
    try:
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                break
            if not data:
                break
            log.write(data)
    finally:
        log.close()
        conn.close()
