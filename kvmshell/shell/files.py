"""Open the files a user names, as the user, confined to allowed places.

Why: QEMU is assumed compromised and is handed descriptors, never paths.
kvmshell resolves the name one component at a time with O_NOFOLLOW from a
directory descriptor, so a symlink anywhere, a swap between check and use,
a device node or a FIFO never reaches QEMU.  The format is chosen here from
the file name and checked against the content, so QEMU never probes.
"""

from __future__ import annotations

import os
import stat

from kvmshell.common.errors import RefusedFile
from kvmshell.shell.useropts import Opened

QCOW2_MAGIC = b"QFI\xfb"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _walk(root: str, rel: list[str], token: str) -> int:
    """Open directory *root*/rel[0]/... without following symlinks."""
    try:
        fd = os.open(root, _DIR_FLAGS)
    except OSError as exc:
        raise RefusedFile(f"{token}: cannot open {root}: {exc.strerror}") from exc
    for comp in rel:
        try:
            nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            os.close(fd)
            raise RefusedFile(f"{token}: {comp!r} is not a plain directory") from exc
        os.close(fd)
        fd = nfd
    return fd


def _format(token: str, value: str, fd: int, st: os.stat_result) -> str:
    head = os.pread(fd, 512, 0)
    if value.endswith(".qcow2"):
        if head[:4] != QCOW2_MAGIC or len(head) < 72:
            raise RefusedFile(f"{token}: {value} is not a qcow2 image")
        version = int.from_bytes(head[4:8], "big")
        backing = int.from_bytes(head[8:16], "big")
        if version not in (2, 3):
            raise RefusedFile(f"{token}: {value}: unsupported qcow2 version {version}")
        if backing != 0:
            raise RefusedFile(f"{token}: {value} has a backing file (refused: it points elsewhere)")
        if version == 3 and len(head) >= 80:
            incompatible = int.from_bytes(head[72:80], "big")
            if incompatible & 0x4:
                raise RefusedFile(f"{token}: {value} has an external data file (refused)")
        return "qcow2"
    if head[:4] == QCOW2_MAGIC:
        # Why: a raw disk the guest wrote a qcow2 header into must not be read as qcow2.
        raise RefusedFile(f"{token}: {value} has a qcow2 header but is not named .qcow2")
    return "raw"


def open_file(token: str, value: str, *, vmdir: str, image_dirs: list[str],
              uid: int, write: bool, image: bool,
              seen: dict[tuple[int, int], tuple[str, bool]] | None = None) -> Opened:
    """Open *value* for option *token*; relative names are inside *vmdir*,
    absolute names must be inside one of *image_dirs* (read-only there).
    *seen* holds the images already opened for this start ((st_dev, st_ino)
    -> (option, opened for writing)); this one is added.  Raises
    RefusedFile."""
    if value.startswith("/"):
        for d in image_dirs:
            if value.startswith(d + "/"):
                root, rel = d, value[len(d) + 1:]
                break
        else:
            raise RefusedFile(f"{token}: {value} is outside your VM directory and the image directories")
        if write:
            raise RefusedFile(f"{token}: {value} is in a read-only image directory "
                              "(copy it into your VM directory, or use -snapshot)")
        shared = True
    else:
        root, rel, shared = vmdir, value, False
    comps = rel.split("/")
    if any(not c or c in (".", "..") for c in comps):
        raise RefusedFile(f"{token}: invalid path {value!r}")
    dfd = _walk(root, comps[:-1], token)
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
    try:
        fd = os.open(comps[-1], flags, dir_fd=dfd)
    except OSError as exc:
        raise RefusedFile(f"{token}: {value}: {exc.strerror}") from exc
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RefusedFile(f"{token}: {value} is not a regular file")
        if not shared and st.st_uid != uid:
            raise RefusedFile(f"{token}: {value} is not owned by you")
        if not shared and st.st_nlink != 1:
            raise RefusedFile(f"{token}: {value} has other hard links (refused)")
        os.set_blocking(fd, True)
        fmt = _format(token, value, fd, st) if image else "raw"
        if image:
            import fcntl
            if seen is not None:
                other = seen.get((st.st_dev, st.st_ino))
                if other is not None and (write or other[1]):
                    raise RefusedFile(f"{token}: {value} is given twice (also to {other[0]}): "
                                      "one image, one drive")
                seen[(st.st_dev, st.st_ino)] = (token, write)
            # Why: one writer per image across VMs; the lock lives on the open
            # file description, which QEMU inherits, so it lasts the VM's life.
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if write else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise RefusedFile(f"{token}: {value} is in use by another VM") from exc
        ro_fd = -1
        if write:
            # Reopening through our own descriptor reaches the same inode: no
            # path is looked up again, so nothing can be swapped in between.
            ro_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        os.close(fd)
        raise
    return Opened(fd, fmt, not write, ro_fd)
