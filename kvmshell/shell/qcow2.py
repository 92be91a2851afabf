"""Read a qcow2 image's header from a descriptor: what kvmshell must know
before it lets QEMU near the image.

Source: QEMU's ``docs/interop/qcow2.txt`` (header fields, big-endian;
header extensions from byte 72 in version 2 or from ``header_length`` in
version 3, each ``type:u32 length:u32 data`` padded to 8 bytes).  Only the
fields kvmshell decides on are read: the virtual size, the backing file
name and format, and the feature bits.  Everything else (and all image
work) is left to qemu-img and QEMU.

Why here, in kvmshell: the backing file name is a path the image chose.
kvmshell reads it, confines it and opens it itself, then hands QEMU an
explicit ``-blockdev`` graph of descriptors with ``"backing": null`` at the
bottom, so QEMU never opens a name read from a header.
"""

from __future__ import annotations

import os

from kvmshell.common.errors import RefusedFile

MAGIC = b"QFI\xfb"
HEADER_READ = 65536          # bytes read from the start of the image, at most
EXT_END, EXT_BACKING_FORMAT, EXT_DATA_FILE = 0, 0xE2792ACA, 0x44415441
# Incompatible feature bits QEMU 7.2 knows: dirty, corrupt, external data
# file, compression type, extended L2 entries.
KNOWN_INCOMPATIBLE = 0b11111
INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE = 1 << 1, 1 << 2
BACKING_NAME_MAX = 1023      # QEMU's own limit on the name


class Header:
    """The fields kvmshell uses: ``version`` (2 or 3), ``size`` (virtual
    size, bytes), ``backing`` (backing file name or None),
    ``backing_format`` (from the header extension, or None), ``incompatible``
    (feature bits)."""

    def __init__(self, version: int, size: int, backing: str | None,
                 backing_format: str | None, incompatible: int) -> None:
        self.version = version
        self.size = size
        self.backing = backing
        self.backing_format = backing_format
        self.incompatible = incompatible


def _u32(b: bytes, off: int) -> int:
    return int.from_bytes(b[off:off + 4], "big")


def _u64(b: bytes, off: int) -> int:
    return int.from_bytes(b[off:off + 8], "big")


def is_qcow2(fd: int) -> bool:
    """Whether the file behind *fd* starts with the qcow2 magic."""
    return os.pread(fd, 4, 0) == MAGIC


def read_header(fd: int, what: str) -> Header:
    """Parse the header of the qcow2 image open on *fd*; *what* names it in
    messages.

    Raises:
        RefusedFile: not qcow2, an unsupported version, an unknown
            incompatible feature, an external data file, a corrupt image,
            or a malformed header or backing name.
    """
    head = os.pread(fd, HEADER_READ, 0)
    if head[:4] != MAGIC or len(head) < 72:
        raise RefusedFile(f"{what} is not a qcow2 image")
    version = _u32(head, 4)
    if version not in (2, 3):
        raise RefusedFile(f"{what}: unsupported qcow2 version {version}")
    backing_off, backing_len = _u64(head, 8), _u32(head, 16)
    size = _u64(head, 24)
    incompatible, ext_off = 0, 72
    if version == 3:
        if len(head) < 104:
            raise RefusedFile(f"{what}: truncated qcow2 header")
        incompatible = _u64(head, 72)
        ext_off = _u32(head, 100)
    if incompatible & ~KNOWN_INCOMPATIBLE:
        raise RefusedFile(f"{what}: unknown incompatible qcow2 feature bits "
                          f"{incompatible & ~KNOWN_INCOMPATIBLE:#x} (refused)")
    if incompatible & INCOMPAT_DATA_FILE:
        raise RefusedFile(f"{what} has an external data file (refused)")
    if incompatible & INCOMPAT_CORRUPT:
        raise RefusedFile(f"{what} is marked corrupt (repair it with 'qemu-img check -r')")
    backing_format = None
    off = ext_off
    while off + 8 <= len(head):
        kind, length = _u32(head, off), _u32(head, off + 4)
        if kind == EXT_END:
            break
        data = head[off + 8:off + 8 + length]
        if len(data) != length:
            raise RefusedFile(f"{what}: malformed qcow2 header extension")
        if kind == EXT_DATA_FILE:
            raise RefusedFile(f"{what} names an external data file (refused)")
        if kind == EXT_BACKING_FORMAT:
            backing_format = data.decode("ascii", "replace")
        off += 8 + ((length + 7) & ~7)
    backing = None
    if backing_off:
        if not 0 < backing_len <= BACKING_NAME_MAX or backing_off + backing_len > len(head):
            raise RefusedFile(f"{what}: malformed backing file name in the qcow2 header")
        raw = head[backing_off:backing_off + backing_len]
        try:
            backing = raw.decode("ascii")
        except UnicodeDecodeError as exc:
            raise RefusedFile(f"{what}: backing file name is not ASCII (refused)") from exc
    return Header(version, size, backing, backing_format, incompatible)
