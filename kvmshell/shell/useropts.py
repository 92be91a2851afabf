"""The user's ``start`` options: parsing against the table, and QEMU argv.

Runs as the VM user, inside kvmshell.  Everything a user types after
``start`` goes through :func:`parse_user`; :func:`user_argv` maps the
validated request to QEMU 7.2 argv using only descriptors the launcher
opened (never a path) and strings the wrapper spelled itself.
"""

from __future__ import annotations

from kvmshell.common.errors import RefusedOption
from kvmshell.common.optable import (
    BLOB, BOOT, BY_NAME, CDROM, CLOUDINIT, CMDLINE, DISK, FILE_KINDS, GEOMETRY, STATE, USER,
    USERDATA, VNC, Option, check_file_name, lookup, refuse_class, take_value)


def _check_boot(token: str, value: str) -> str:
    letters = {"a": "a", "c": "c", "d": "d", "n": "n"}
    if not 1 <= len(value) <= 4 or len(set(value)) != len(value) or any(c not in letters for c in value):
        raise RefusedOption(f"{token}: invalid boot order {value!r} (letters from a, c, d, n)")
    # Re-spelled from our own constants: the string QEMU sees is ours.
    return "".join(letters[c] for c in value)


def _check_cmdline(token: str, value: str) -> str:
    if len(value) > 2047:
        raise RefusedOption(f"{token}: kernel command line too long (at most 2047 bytes)")
    return value


_TRANS = {"none": "none", "lba": "lba", "auto": "auto"}


def _check_geometry(token: str, value: str) -> tuple[str, str, str, str]:
    parts = value.split(",")
    limits = ((1, 65535), (1, 16), (1, 63))
    if len(parts) not in (3, 4):
        raise RefusedOption(f"{token}: expected c,h,s[,t], got {value!r}")
    nums: list[str] = []
    for part, (lo, hi) in zip(parts[:3], limits):
        if not part.isdigit() or not lo <= int(part) <= hi:
            raise RefusedOption(f"{token}: invalid geometry {value!r}")
        nums.append(str(int(part)))
    trans = _TRANS.get(parts[3]) if len(parts) == 4 else "auto"
    if trans is None:
        raise RefusedOption(f"{token}: invalid translation {parts[3]!r} (none, lba or auto)")
    return nums[0], nums[1], nums[2], trans


def _check_vnc(token: str, value: str) -> str:
    if "," in value:
        raise RefusedOption(f"{token}: sub-options are set by kvmshell ({value!r})")
    if value == "on" or (value.startswith(":") and value[1:].isdigit() and len(value) <= 4):
        return value
    raise RefusedOption(f"{token}: invalid display {value!r} (use :0; kvmshell chooses where it goes)")


# ---- user options ----------------------------------------------------------

class UserRequest:
    """A validated ``start`` request: option name -> value (None for flags)."""

    def __init__(self) -> None:
        self.values: dict[str, str | None] = {}

    def has(self, name: str) -> bool:
        return name in self.values

    def files(self) -> list[tuple[Option, str]]:
        out = []
        for name, value in self.values.items():
            opt = BY_NAME[name]
            if opt.kind in FILE_KINDS and value is not None:
                out.append((opt, value))
        return out


def parse_user(words: list[str]) -> UserRequest:
    """Parse the option words of ``start``; raise RefusedOption on anything
    outside the user class."""
    req = UserRequest()
    i = 0
    while i < len(words):
        token = words[i]
        if not token.startswith("-") or token in ("-", "--"):
            raise RefusedOption(f"{token}: unexpected word (options start with '-')")
        opt = lookup(token)
        refuse_class(token, opt, USER)
        value, i = take_value(words, i, token, opt)
        if opt.name in req.values:
            raise RefusedOption(f"{token}: given twice")
        if value is not None:
            if opt.kind in FILE_KINDS:
                check_file_name(token, value)
            elif opt.kind == BOOT:
                value = _check_boot(token, value)
            elif opt.kind == CMDLINE:
                value = _check_cmdline(token, value)
            elif opt.kind == GEOMETRY:
                _check_geometry(token, value)
            elif opt.kind == VNC:
                value = _check_vnc(token, value)
            elif opt.kind == CLOUDINIT and value != "new":
                raise RefusedOption(f"{token}: unexpected value {value!r} (nothing, or 'new')")
        req.values[opt.name] = value
    if req.has("-hdachs") and not req.has("-hda"):
        raise RefusedOption("-hdachs: needs -hda")
    if req.has("-user-data") and not req.has("-cloud-init"):
        raise RefusedOption("-user-data: needs -cloud-init")
    if (req.has("-append") or req.has("-initrd")) and not req.has("-kernel"):
        raise RefusedOption(("-append" if req.has("-append") else "-initrd") + ": needs -kernel")
    return req


class Opened:
    """A file kvmshell opened for QEMU: its descriptor and the format it chose.

    For disk images also: ``size`` (virtual size in bytes), ``backing`` (the
    next layer down, opened read-only by kvmshell, or None), ``label`` (the
    name the user or the image header gave, for messages).
    """

    def __init__(self, fd: int, fmt: str, readonly: bool, ro_fd: int = -1, *,
                 size: int = 0, backing: "Opened | None" = None, label: str = "") -> None:
        self.fd = fd
        self.fmt = fmt
        self.readonly = readonly
        # QEMU opens a writable image read-only first: it needs both modes
        # in the descriptor set.
        self.ro_fd = ro_fd
        self.size = size
        self.backing = backing
        self.label = label

    @property
    def fds(self) -> list[int]:
        """This layer's descriptors (not the layers below)."""
        return [self.fd] + ([self.ro_fd] if self.ro_fd >= 0 else [])

    def chain(self) -> "list[Opened]":
        """This layer and every layer below it, top first."""
        out: list[Opened] = []
        layer: Opened | None = self
        while layer is not None:
            out.append(layer)
            layer = layer.backing
        return out

    def all_fds(self) -> list[int]:
        """The descriptors of the whole chain."""
        return [fd for layer in self.chain() for fd in layer.fds]


# The guest device for -hda/-hdb when the admin chose virtio disks
# (-disk-interface virtio).  The CD-ROM and floppies stay where they are.
VIRTIO_DEVICE = "virtio-blk-pci,id={id},drive={node}"
# On q35 (the admin's -M q35) the IDE buses are AHCI ports, one device
# each, and there is no floppy controller unless one is added.
Q35_DEVICES = {"-hda": "ide-hd,id=hda,bus=ide.0,drive={node}",
               "-hdb": "ide-hd,id=hdb,bus=ide.1,drive={node}",
               "-cdrom": "ide-cd,id=cdrom,bus=ide.2,drive={node}"}
Q35_HDACHS = "ide-hd,id=hda,bus=ide.0,drive={node},cyls={c},heads={h},secs={s},bios-chs-trans={t}"
Q35_FDC = "isa-fdc,id=fdc"


def blockdev_argv(node: str, top: Opened, fdsets: "list[int]") -> list[str]:
    """QEMU 7.2 argv for the image chain below *top*: per layer, the
    descriptors in a new fdset (``-add-fd``), a ``file`` node on
    ``/dev/fdset/N`` and a format node over it; each qcow2 layer names the
    layer below as ``backing``, and the bottom one ``"backing": null``, so
    QEMU opens nothing by a name from an image header.  The top format node
    is *node*; *fdsets* holds the last fdset number used (updated).

    Every value is kvmshell's own: node names from the table, fdset numbers,
    formats from a closed set.  Source: QEMU's qapi/block-core.json
    (BlockdevOptions, BlockdevRefOrNull).
    """
    import json

    argv: list[str] = []
    layers = top.chain()
    names = [node] + [f"{node}-{i}" for i in range(1, len(layers))]
    # Bottom first: a node's backing must exist when QEMU creates the node.
    for i in reversed(range(len(layers))):
        layer = layers[i]
        fdsets[0] += 1
        for fd in layer.fds:
            argv += ["-add-fd", f"fd={fd},set={fdsets[0]}"]
        ro = layer.readonly
        fmt_node: dict[str, object] = {"driver": layer.fmt, "node-name": names[i],
                                       "file": names[i] + "-file", "read-only": ro}
        if layer.fmt == "qcow2":
            fmt_node["backing"] = names[i + 1] if i + 1 < len(layers) else None
        argv += ["-blockdev", json.dumps({"driver": "file", "node-name": names[i] + "-file",
                                          "filename": f"/dev/fdset/{fdsets[0]}",
                                          "read-only": ro}, separators=(",", ":")),
                 "-blockdev", json.dumps(fmt_node, separators=(",", ":"))]
    return argv


def user_argv(req: UserRequest, opened: dict[str, Opened], vnc_socket: str,
              disk_interface: str = "ide", machine: str = "pc") -> list[str]:
    """Map a validated request to QEMU 7.2 argv, using only descriptors for
    files.  *disk_interface* (``ide`` or ``virtio``, the admin's choice)
    decides the device of -hda and -hdb; *machine* (``pc`` or ``q35``) where
    IDE devices and floppies go."""
    argv: list[str] = []
    q35 = machine == "q35"
    if q35 and (req.has("-fda") or req.has("-fdb")):
        argv += ["-device", Q35_FDC]
    fdsets = [0]
    machine_opts: list[str] = []
    geometry = None
    if req.has("-hdachs"):
        geometry = _check_geometry("-hdachs", req.values["-hdachs"] or "")
    for name, value in req.values.items():
        opt = BY_NAME[name]
        if opt.kind in (DISK, CDROM):
            node = name[1:]
            argv += blockdev_argv(node, opened[name], fdsets)
            if name == "-hda" and geometry is not None:
                c, h, s, t = geometry
                tmpl = Q35_HDACHS if q35 else BY_NAME["-hdachs"].qemu[1]
                spec = tmpl.format(node=node, c=c, h=h, s=s, t=t)
            elif name in ("-hda", "-hdb") and disk_interface == "virtio":
                spec = VIRTIO_DEVICE.format(id=node, node=node)
            elif q35 and name in Q35_DEVICES:
                spec = Q35_DEVICES[name].format(node=node)
            else:
                spec = opt.qemu[1].format(node=node)
            argv += [opt.qemu[0], spec]
        elif opt.kind in (BLOB, STATE):
            argv += [opt.qemu[0], opt.qemu[1].format(fd=opened[name].fd)]
        elif opt.kind == BOOT:
            argv += [opt.qemu[0], opt.qemu[1].format(order=value)]
        elif opt.kind == CMDLINE:
            argv += [opt.qemu[0], value or ""]
        elif opt.kind == GEOMETRY:
            pass  # on -hda's device, above
        elif opt.kind == VNC:
            argv += [opt.qemu[0], opt.qemu[1].format(vnc_socket=vnc_socket),
                     "-device", "VGA"]
        elif opt.kind in (CLOUDINIT, USERDATA):
            continue  # the seed drive is the launcher's (kvmshell.shell.cloudinit)
        elif opt.qemu and opt.qemu[0] == "-machine":
            machine_opts.append(opt.qemu[1])
        else:
            argv += list(opt.qemu)
    return argv + (["-machine", ",".join(machine_opts)] if machine_opts else [])
