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

from kvmshell.common.errors import KvmshellError, RefusedFile
from kvmshell.shell.useropts import Opened

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


MAX_CHAIN_DEPTH = 8   # backing layers below the top image, at most


def format_of(token: str, value: str, fd: int) -> str:
    """The format kvmshell gives the image *value* open on *fd*: qcow2 if
    the name ends in ``.qcow2`` (and the header agrees), raw otherwise (and
    no qcow2 header).  QEMU never probes.

    Raises:
        RefusedFile: the content disagrees with the name, or a qcow2 header
            kvmshell refuses (see :func:`kvmshell.shell.qcow2.read_header`).
    """
    from kvmshell.shell import qcow2

    if value.endswith(".qcow2"):
        qcow2.read_header(fd, f"{token}: {value}")
        return "qcow2"
    if qcow2.is_qcow2(fd):
        # Why: a raw disk the guest wrote a qcow2 header into must not be read as qcow2.
        raise RefusedFile(f"{token}: {value} has a qcow2 header but is not named .qcow2")
    return "raw"


def _confine(token: str, value: str, vmdir: str, image_dirs: list[str],
             write: bool) -> tuple[str, list[str], bool]:
    """(root directory, path components below it, shared?) for *value*."""
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
    return root, comps, shared


def _open_leaf(token: str, value: str, root: str, comps: list[str], shared: bool,
               uid: int, write: bool) -> int:
    dfd = _walk(root, comps[:-1], token)
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
    try:
        fd = os.open(comps[-1], flags | os.O_CLOEXEC, dir_fd=dfd)
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
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lock(token: str, value: str, fd: int, write: bool, layer: bool) -> None:
    import fcntl
    # Why: one writer per image across VMs; the lock lives on the open
    # file description, which QEMU inherits, so it lasts the VM's life.
    # Backing layers take a shared lock: a base in use cannot be rewritten.
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if write else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        what = "a base image in use" if layer else "in use by another VM"
        raise RefusedFile(f"{token}: {value} is {what} (being written by a running VM)"
                          if layer else f"{token}: {value} is {what}") from exc


def open_file(token: str, value: str, *, vmdir: str, image_dirs: list[str],
              uid: int, write: bool, image: bool, lock: bool = True,
              seen: dict[tuple[int, int], tuple[str, bool]] | None = None) -> Opened:
    """Open *value* for option *token*; relative names are inside *vmdir*,
    absolute names must be inside one of *image_dirs* (read-only there).

    For images (*image*), the format is chosen from the name, and a qcow2's
    backing chain is read from the headers and opened too, read-only, each
    layer confined the same way (see :func:`open_backing`): the result's
    ``backing`` links the layers.  *seen* holds the images already opened
    for this start ((st_dev, st_ino) -> (option, opened for writing)); this
    one is added, and the same image given twice is refused.

    Raises:
        RefusedFile: anything outside the rules above, or in use.
    """
    root, comps, shared = _confine(token, value, vmdir, image_dirs, write)
    fd = _open_leaf(token, value, root, comps, shared, uid, write)
    ro_fd = -1
    try:
        st = os.fstat(fd)
        if not image:
            return Opened(fd, "raw", not write, size=st.st_size, label=value)
        fmt = format_of(token, value, fd)
        if seen is not None:
            other = seen.get((st.st_dev, st.st_ino))
            if other is not None and (write or other[1]):
                raise RefusedFile(f"{token}: {value} is given twice (also to {other[0]}): "
                                  "one image, one drive")
            seen[(st.st_dev, st.st_ino)] = (token, write)
        if lock:
            _lock(token, value, fd, write, layer=False)
        if write:
            # Reopening through our own descriptor reaches the same inode: no
            # path is looked up again, so nothing can be swapped in between.
            ro_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        top = Opened(fd, fmt, not write, ro_fd, size=st.st_size, label=value)
        if fmt == "qcow2":
            open_backing(token, top, root=root, vmdir=vmdir, image_dirs=image_dirs, uid=uid,
                         seen={(st.st_dev, st.st_ino)}, lock=lock)
        return top
    except BaseException:
        os.close(fd)
        if ro_fd >= 0:
            os.close(ro_fd)
        raise


def open_backing(token: str, top: Opened, *, root: str, vmdir: str, image_dirs: list[str],
                 uid: int, seen: set[tuple[int, int]], lock: bool = True) -> None:
    """Open the backing chain below the qcow2 image *top* (already open),
    read-only, and link it through ``backing``; set each layer's ``size``.

    A backing name is a plain file name (resolved in the directory of the
    image that names it, inside the VM directory or an image directory) or an
    absolute path inside *image_dirs*.  Its format follows the same naming
    rule as the user's files and must agree with the header's backing
    format, if the header gives one.  At most :data:`MAX_CHAIN_DEPTH`
    layers; a loop is refused.  On error, the layers opened here are closed
    (*top* stays open: the caller owns it).

    Raises:
        RefusedFile: a name outside the allowed places, a format mismatch,
            an unknown feature, a chain too deep or looping.
    """
    from kvmshell.common import optable
    from kvmshell.shell import qcow2

    layer, layer_root, depth = top, root, 0
    try:
        while layer.fmt == "qcow2":
            hdr = qcow2.read_header(layer.fd, f"{token}: {layer.label}")
            layer.size = hdr.size
            if hdr.backing is None:
                return
            depth += 1
            if depth > MAX_CHAIN_DEPTH:
                raise RefusedFile(f"{token}: {top.label}: backing chain deeper than "
                                  f"{MAX_CHAIN_DEPTH} layers (refused)")
            name = hdr.backing
            if name.startswith("/"):
                value = name
            elif "/" in name:
                raise RefusedFile(f"{token}: {layer.label}: backing file {name!r} is not a plain "
                                  "name in the same directory (refused)")
            else:
                # Beside the image that names it (as QEMU resolves it).
                parent = os.path.dirname(layer.label)
                value = f"{parent}/{name}" if parent else name
            try:
                optable.check_file_name(token, value)
            except KvmshellError as exc:
                raise RefusedFile(f"{token}: {layer.label}: backing file {name!r} is not allowed "
                                  f"({exc.message})") from exc
            try:
                broot, comps, shared = _confine(token, value, vmdir, image_dirs, write=False)
            except RefusedFile as exc:
                raise RefusedFile(f"{token}: {layer.label}: backing file {name!r} is outside "
                                  "your VM directory and the image directories (refused)") from exc
            fd = _open_leaf(token, value, broot, comps, shared, uid, write=False)
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in seen:
                os.close(fd)
                raise RefusedFile(f"{token}: {top.label}: backing chain loops (refused)")
            seen.add((st.st_dev, st.st_ino))
            below = Opened(fd, "raw", True, size=st.st_size, label=value)
            layer.backing = below
            below.fmt = format_of(token, value, fd)
            if hdr.backing_format is not None and hdr.backing_format != below.fmt:
                raise RefusedFile(f"{token}: {layer.label}: its header says the backing file is "
                                  f"{hdr.backing_format}, but {value} is {below.fmt} (refused)")
            if lock:
                _lock(token, value, fd, write=False, layer=True)
            layer, layer_root = below, broot
    except BaseException:
        for opened in top.chain()[1:]:
            for fd in opened.fds:
                os.close(fd)
        top.backing = None
        raise
