"""The ``disk`` and ``snapshot`` verbs: make, clone, reset, grow and inspect
images in the VM directory, and their qcow2 internal snapshots.

    disk create [VM] NAME SIZE      a new empty image: qcow2 if NAME ends in
                                    .qcow2, raw (sparse) otherwise
    disk clone [VM] NAME BASE       a qcow2 overlay (NAME must end in .qcow2)
                                    whose backing file is BASE: an image in
                                    the VM directory, or an absolute path in
                                    an image directory (the admin's golden
                                    images, read-only); constant time
    disk reset [VM] NAME            a clone goes back to its base
    disk resize [VM] NAME SIZE      grow only, VM stopped
    disk info [VM] NAME [--json]    format, virtual size, bytes allocated,
                                    backing chain, snapshots
    snapshot list [VM] DISK
    snapshot create|revert|delete [VM] DISK TAG
                                    qcow2 internal snapshots of a stopped VM's disk

SIZE is a number of bytes with an optional K, M, G or T suffix (binary:
KiB, MiB, GiB, TiB).  Names follow the rules of ``upload``.

Why this shape: the image work is qemu-img's (kvmshell/shell/imgtool.py), run
as the user on descriptors kvmshell opened confined, with an explicit
format and ``"backing": null``, so neither qemu-img nor QEMU opens a path
that a user or an image header chose.  A new image is made under a hidden
name and linked to NAME only once whole, as ``upload`` does.  Every size
counts against ``max_image_bytes`` by its virtual size (the worst case:
the guest writes the whole disk).
"""

from __future__ import annotations

import os

from kvmshell.common.errors import RefusedFile, RuntimeFailure, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kvmshell.common.config import Config
    from kvmshell.common.vmtree import VM
    from kvmshell.shell.useropts import Opened

SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MAX_SIZE = 64 << 40              # bytes; qemu-img's qcow2 limit is far above
MIN_SIZE = 512
TAG_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
TAG_MAX = 64

# sub-verb -> (synopsis, words after the optional VM, summary): 'help disk'
# and the parsers below read these.
DISK_VERBS = {
    "create": ("NAME SIZE", 2, "a new empty image: qcow2 if NAME ends in .qcow2, else raw"),
    "clone": ("NAME BASE", 2, "a qcow2 overlay of BASE (yours, or /IMAGE-DIR/golden.qcow2)"),
    "reset": ("NAME", 1, "drop a clone's changes: back to its base"),
    "resize": ("NAME SIZE", 2, "grow an image (the VM stopped)"),
    "info": ("NAME [--json]", 1, "format, sizes, backing chain, snapshots"),
}
SNAPSHOT_VERBS = {"list": ("DISK", 1, "list a qcow2 disk's snapshots"),
                  "create": ("DISK TAG", 2, "take a snapshot (the VM stopped)"),
                  "revert": ("DISK TAG", 2, "go back to a snapshot (the VM stopped)"),
                  "delete": ("DISK TAG", 2, "delete a snapshot")}


def help_text() -> str:
    """'help disk': every disk and snapshot sub-verb, from the tables."""
    from kvmshell.common import helptext
    rows = [(f"{verb} {sub} [VM] {syn}", summary)
            for verb, table in (("disk", DISK_VERBS), ("snapshot", SNAPSHOT_VERBS))
            for sub, (syn, _n, summary) in table.items()]
    return ("usage: disk SUBVERB [VM] ...  and  snapshot SUBVERB [VM] DISK [TAG]\n"
            + helptext.table(rows) + "\n"
            "SIZE: bytes, or a number with K, M, G or T (binary units).  Disks count\n"
            "  their virtual size against your image quota.")


def parse_size(verb: str, text: str) -> int:
    """Bytes from ``N[K|M|G|T]`` (binary units).

    Raises:
        UsageError: not that form, or outside 512 bytes .. 64 TiB.
    """
    unit = text[-1:].upper() if text[-1:].isalpha() else ""
    digits = text[:-1] if unit else text
    if unit not in SUFFIXES or not digits.isdigit() or not digits.isascii() or len(digits) > 16:
        raise UsageError(f"{verb}: invalid size {text!r} (a number with K, M, G or T)")
    size = int(digits) * SUFFIXES[unit]
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise UsageError(f"{verb}: size {text!r} out of range (512 bytes to 64T)")
    return size


def _split(verb: str, args: list[str], want: int, synopsis: str) -> tuple[str | None, list[str]]:
    if len(args) == want:
        return None, args
    if len(args) == want + 1:
        return args[0], args[1:]
    if len(args) < want:
        raise UsageError(f"{verb}: missing argument (usage: {verb} [VM] {synopsis})")
    raise UsageError(f"{args[want + 1]}: unexpected argument to '{verb}'")


def _check_tag(verb: str, tag: str) -> str:
    if not 1 <= len(tag) <= TAG_MAX or any(c not in TAG_CHARS for c in tag) or tag[0] == "-":
        raise UsageError(f"{verb}: invalid snapshot tag {tag!r} "
                         f"(1-{TAG_MAX} of letters, digits, '._-', not '-' first)")
    return tag


def _room(cfg: "Config", uid: int, verb: str, need: int, what: str) -> None:
    """Refuse when *need* more bytes would not fit in max_image_bytes."""
    if not cfg.max_image_bytes:
        return
    from kvmshell.shell import images
    room = max(0, cfg.max_image_bytes - images.usage_bytes(cfg, uid))
    if need > room:
        raise UsageError(f"{verb}: {what} needs {need} bytes, {room} left of max_image_bytes "
                         "(a disk counts its virtual size)")


def _open(cfg: "Config", vm: "VM", verb: str, name: str, *, write: bool,
          lock: bool = True) -> "Opened":
    from kvmshell.shell import files
    return files.open_file(verb, name, vmdir=vm.path, image_dirs=cfg.image_dirs,
                           uid=os.getuid(), write=write, image=True, lock=lock)


def _close(opened: "Opened") -> None:
    for fd in opened.all_fds():
        os.close(fd)


def _new_image(cfg: "Config", vm: "VM", verb: str, name: str, args: list[str]) -> None:
    """Run ``qemu-img create ARGS /dev/fd/N [...]`` on a new hidden file and
    link it to NAME; ARGS holds ``{fd}`` where the file goes."""
    from kvmshell.shell import images, imgtool
    dfd = images.open_dir(vm)
    try:
        images.refuse_existing(verb, name, dfd)
        tmp, fd = images.create_tmp(verb, name, dfd)
        try:
            imgtool.run(cfg, [a.format(fd=fd) for a in args], [fd], f"{verb}: {name}")
            images.publish(verb, name, dfd, tmp, fd)
        finally:
            os.close(fd)
            os.unlink(tmp, dir_fd=dfd)
        os.fsync(dfd)
    finally:
        os.close(dfd)


def create(cfg: "Config", uid: int, args: list[str]) -> tuple["VM", str, int]:
    """``disk create``: return (vm, name, virtual size in bytes)."""
    from kvmshell.common import vmtree
    from kvmshell.shell import images
    vm_name, (name, size_text) = _split("disk create", args, 2, "NAME SIZE")
    images.check_name("disk create", name)
    size = parse_size("disk create", size_text)
    vm = vmtree.pick(cfg, uid, vm_name)
    _room(cfg, uid, "disk create", size, name)
    fmt = "qcow2" if name.endswith(".qcow2") else "raw"
    # raw: qemu-img makes it sparse (preallocation=off, its default).
    _new_image(cfg, vm, "disk create", name,
               ["create", "-q", "-f", fmt, "/dev/fd/{fd}", str(size)])
    return vm, name, size


def clone(cfg: "Config", uid: int, args: list[str]) -> tuple["VM", str, str]:
    """``disk clone``: return (vm, name, base as written in the header)."""
    from kvmshell.common import vmtree
    from kvmshell.shell import images
    vm_name, (name, base) = _split("disk clone", args, 2, "NAME BASE")
    images.check_name("disk clone", name)
    if not name.endswith(".qcow2"):
        raise UsageError(f"disk clone: {name!r}: a clone is a qcow2 overlay; name it .qcow2")
    vm = vmtree.pick(cfg, uid, vm_name)
    from kvmshell.common import optable
    optable.check_file_name("disk clone", base)
    if not base.startswith("/"):
        images.check_name("disk clone", base)
    # Open BASE as start would (confined, its own chain checked), but only to
    # learn its format and size: the clone's header names it, and every start
    # checks the chain again.
    opened = _open(cfg, vm, "disk clone", base, write=False, lock=False)
    try:
        fmt, size = opened.fmt, opened.size
    finally:
        _close(opened)
    _room(cfg, uid, "disk clone", size, name)
    # -u: qemu-img must not open BASE by its name (kvmshell did, above).
    _new_image(cfg, vm, "disk clone", name,
               ["create", "-q", "-f", "qcow2", "-u", "-b", base, "-F", fmt,
                "/dev/fd/{fd}", str(size)])
    return vm, name, base


def _stopped(cfg: "Config", vm: "VM", verb: str, name: str) -> "Opened":
    """Open NAME read-write with the exclusive lock a running VM would hold."""
    try:
        return _open(cfg, vm, verb, name, write=True)
    except RefusedFile as exc:
        if "in use" in exc.message:
            raise RefusedFile(f"{verb}: {name} is in use by a running VM (stop it first)") from exc
        raise


def reset(cfg: "Config", uid: int, args: list[str]) -> tuple["VM", str, str]:
    """``disk reset``: a clone's changes dropped; return (vm, name, base)."""
    from kvmshell.common import vmtree
    from kvmshell.shell import images, imgtool, qcow2
    vm_name, (name,) = _split("disk reset", args, 1, "NAME")
    images.check_name("disk reset", name)
    vm = vmtree.pick(cfg, uid, vm_name)
    opened = _stopped(cfg, vm, "disk reset", name)
    try:
        if opened.fmt != "qcow2" or opened.backing is None:
            raise RefusedFile(f"disk reset: {name} is not a clone (no backing file)")
        hdr = qcow2.read_header(opened.fd, f"disk reset: {name}")
        assert hdr.backing is not None
        dfd = images.open_dir(vm)
        try:
            tmp, fd = images.create_tmp("disk reset", name, dfd)
            try:
                imgtool.run(cfg, ["create", "-q", "-f", "qcow2", "-u", "-b", hdr.backing,
                                  "-F", opened.backing.fmt, f"/dev/fd/{fd}", str(hdr.size)],
                            [fd], f"disk reset: {name}")
                os.fsync(fd)
                # Atomic: NAME is the old clone or the new one, never neither.
                os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                os.unlink(tmp, dir_fd=dfd)
                raise
            finally:
                os.close(fd)
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        _close(opened)
    return vm, name, hdr.backing


def resize(cfg: "Config", uid: int, args: list[str]) -> tuple["VM", str, int]:
    """``disk resize``: grow NAME to SIZE; return (vm, name, new size)."""
    from kvmshell.common import vmtree
    from kvmshell.shell import images, imgtool
    vm_name, (name, size_text) = _split("disk resize", args, 2, "NAME SIZE")
    images.check_name("disk resize", name)
    size = parse_size("disk resize", size_text)
    vm = vmtree.pick(cfg, uid, vm_name)
    opened = _stopped(cfg, vm, "disk resize", name)
    try:
        if size < opened.size:
            raise UsageError(f"disk resize: {name} is {opened.size} bytes; shrinking is refused "
                             "(it would cut the guest's data)")
        if size == opened.size:
            return vm, name, size
        _room(cfg, uid, "disk resize", size - opened.size, name)
        imgtool.run(cfg, ["resize", "-q", "-f", opened.fmt, f"/dev/fd/{opened.fd}", str(size)]
                    if opened.fmt == "raw" else
                    ["resize", "-q", imgtool.image_spec(opened.fd, "qcow2"), str(size)],
                    opened.fds, f"disk resize: {name}")
    finally:
        _close(opened)
    return vm, name, size


def info(cfg: "Config", uid: int, args: list[str]) -> dict[str, object]:
    """``disk info``: a dict with ``name``, ``format``, ``virtual_size``
    (bytes), ``actual_size`` (bytes allocated), ``backing_chain`` (names, top
    first, below NAME) and ``snapshots`` (list of dicts: ``tag``,
    ``vm_state_size`` bytes, ``date`` seconds since the epoch)."""
    import json

    from kvmshell.common import vmtree
    from kvmshell.shell import images, imgtool
    args = [a for a in args if a != "--json"]
    vm_name, (name,) = _split("disk info", args, 1, "NAME [--json]")
    images.check_name("disk info", name)
    vm = vmtree.pick(cfg, uid, vm_name)
    opened = _open(cfg, vm, "disk info", name, write=False, lock=False)
    try:
        # -U: a running VM holds the image's lock; reading its metadata is safe.
        out = imgtool.run(cfg, ["info", "-U", "--output=json", "-f", opened.fmt,
                                f"/dev/fd/{opened.fd}"] if opened.fmt == "raw" else
                          ["info", "-U", "--output=json", imgtool.image_spec(opened.fd, "qcow2")],
                          [opened.fd], f"disk info: {name}")
        data = json.loads(out)
        chain = [layer.label for layer in opened.chain()[1:]]
    except ValueError as exc:
        raise RuntimeFailure(f"disk info: {name}: unreadable answer from qemu-img") from exc
    finally:
        _close(opened)
    snaps = [{"tag": s.get("name"), "vm_state_size": s.get("vm-state-size", 0),
              "date": s.get("date-sec", 0)} for s in data.get("snapshots", [])]
    return {"name": name, "format": data.get("format"),
            "virtual_size": data.get("virtual-size"), "actual_size": data.get("actual-size"),
            "backing_chain": chain, "snapshots": snaps}


def snapshot(cfg: "Config", uid: int, args: list[str]) -> tuple["VM", str, str, object]:
    """``snapshot SUB ...``: return (vm, sub-verb, disk, result); the result
    of ``list`` is the snapshots as :func:`info` gives them."""
    from kvmshell.common import vmtree
    from kvmshell.shell import images, imgtool
    if not args or args[0] not in SNAPSHOT_VERBS:
        raise UsageError(f"{args[0] if args else 'snapshot'}: expected "
                         f"snapshot {'|'.join(SNAPSHOT_VERBS)} [VM] DISK [TAG]")
    sub, rest = args[0], args[1:]
    synopsis, want, _ = SNAPSHOT_VERBS[sub]
    vm_name, words = _split(f"snapshot {sub}", rest, want, synopsis)
    disk = words[0]
    images.check_name(f"snapshot {sub}", disk)
    vm = vmtree.pick(cfg, uid, vm_name)
    if sub == "list":
        return vm, sub, disk, info(cfg, uid, ([vm.name] if vm_name else []) + [disk])["snapshots"]
    tag = _check_tag(f"snapshot {sub}", words[1])
    if not disk.endswith(".qcow2"):
        raise RefusedFile(f"snapshot {sub}: {disk} is raw; snapshots need a qcow2 disk")
    opened = _stopped(cfg, vm, f"snapshot {sub}", disk)
    try:
        flag = {"create": "-c", "revert": "-a", "delete": "-d"}[sub]
        imgtool.run(cfg, ["snapshot", flag, tag, imgtool.image_spec(opened.fd, "qcow2")],
                    opened.fds, f"snapshot {sub}: {disk}")
    finally:
        _close(opened)
    return vm, sub, disk, tag
