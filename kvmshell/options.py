"""The option table: the seed's three classes of QEMU option, as data.

Every option of the seed (QEMU 0.17 names) appears here exactly once with
its arity, the kind of value it takes, its class and what it becomes in
today's QEMU (7.2).  Code and tests both read :data:`TABLE`.

Classes (the seed's):
  user    options users are allowed to set on ``start``;
  admin   options only the admin sets; they live in the VM identifier;
  unused  options kvmshell does not use at all.

``qemu`` is the argv template.  Placeholders in braces are filled only
with values the wrapper made itself (descriptor-set numbers, formats it
chose, numbers it re-rendered, words from closed lists): user text never
lands inside a QEMU option string.  ``gone`` is set where the option no
longer exists in QEMU 7.2; such an option is refused with that message.
"""

from __future__ import annotations

from kvmshell.errors import RefusedOption

USER = "user"
ADMIN = "admin"
UNUSED = "unused"

# Kinds of value.
FLAG = "flag"            # no value
DISK = "disk"            # a file the user names, opened read-write
CDROM = "cdrom"          # a file the user names, opened read-only
BLOB = "blob"            # a file read whole by QEMU at start (kernel, initrd, ROM)
STATE = "state"          # a saved-state file (migration stream), read-only
BOOT = "boot"            # a boot order from [acdn]
CMDLINE = "cmdline"      # a kernel command line (one whole argv element)
GEOMETRY = "geometry"    # c,h,s[,t]
VNC = "vnc"              # a VNC display: the wrapper chooses where it goes
MEGS = "megs"            # a memory size in MiB
NET = "net"              # an admin network spec
USBDEV = "usbdevice"     # an emulated USB device name
DIR = "dir"              # an admin directory (tftp, smb)
REDIR = "redir"          # a port redirection
BALLOON = "balloon"      # a balloon device
WRAPPER = "wrapper"      # owned by kvmshell itself; never given by anyone
ANY = "any"              # unused options: value never looked at

FILE_KINDS = (DISK, CDROM, BLOB, STATE)


class Option:
    """One row of the table."""

    __slots__ = ("name", "arity", "kind", "cls", "qemu", "gone", "help", "example")

    def __init__(self, name: str, arity: int, kind: str, cls: str,
                 qemu: tuple[str, ...] = (), *, gone: str = "", help: str = "",
                 example: str | None = None) -> None:
        self.name = name
        self.arity = arity
        self.kind = kind
        self.cls = cls
        self.qemu = qemu
        self.gone = gone
        self.help = help
        self.example = example

    def __repr__(self) -> str:
        return f"Option({self.name!r}, {self.cls})"


_DRIVE = "format={format},file=/dev/fdset/{fdset}"

TABLE: tuple[Option, ...] = (
    # ---- Options that users are allowed to set ---------------------------
    Option("-fda", 1, DISK, USER, ("-drive", "if=floppy,index=0," + _DRIVE),
           help="use FILE as floppy disk 0 image", example="floppy.img"),
    Option("-fdb", 1, DISK, USER, ("-drive", "if=floppy,index=1," + _DRIVE),
           help="use FILE as floppy disk 1 image", example="floppy.img"),
    Option("-hda", 1, DISK, USER, ("-drive", "if=ide,index=0,media=disk," + _DRIVE),
           help="use FILE as IDE hard disk 0 image", example="disk.qcow2"),
    Option("-hdb", 1, DISK, USER, ("-drive", "if=ide,index=1,media=disk," + _DRIVE),
           help="use FILE as IDE hard disk 1 image", example="disk.img"),
    Option("-cdrom", 1, CDROM, USER,
           ("-drive", "if=ide,index=2,media=cdrom,readonly=on," + _DRIVE),
           help="use FILE as IDE cdrom image (ide1 master)", example="x.iso"),
    Option("-boot", 1, BOOT, USER, ("-boot", "order={order}"),
           help="boot on floppy (a), hard disk (c), CD-ROM (d), or network (n)",
           example="d"),
    Option("-snapshot", 0, FLAG, USER, ("-snapshot",),
           help="write to temporary files instead of disk image files"),
    Option("-localtime", 0, FLAG, USER, ("-rtc", "base=localtime"),
           help="set the real time clock to local time (default: utc)"),
    Option("-kernel", 1, BLOB, USER, ("-kernel", "/proc/self/fd/{fd}"),
           help="use FILE as kernel image", example="vmlinuz"),
    Option("-append", 1, CMDLINE, USER, ("-append", "{cmdline}"),
           help="use CMDLINE as kernel command line", example="console=ttyS0"),
    Option("-initrd", 1, BLOB, USER, ("-initrd", "/proc/self/fd/{fd}"),
           help="use FILE as initial ramdisk", example="initrd.img"),
    Option("-hdachs", 1, GEOMETRY, USER,
           ("-device", "ide-hd,drive=hda,bus=ide.0,unit=0,"
            "cyls={c},heads={h},secs={s},bios-chs-trans={t}"),
           help="force hard disk 0 geometry c,h,s[,t] (t=none, lba or auto); needs -hda",
           example="1024,16,63,lba"),
    Option("-no-acpi", 0, FLAG, USER, ("-machine", "acpi=off"),
           help="disable ACPI"),
    Option("-no-reboot", 0, FLAG, USER, ("-no-reboot",),
           help="exit instead of rebooting"),
    Option("-loadvm", 1, STATE, USER, ("-incoming", "fd:{fd}"),
           help="start right away with a saved state read from FILE (written by 'save')",
           example="saved.state"),
    Option("-vnc", 1, VNC, USER, ("-vnc", "unix:{vnc_socket}"),
           help="turn on the VNC display (reach it with the 'vnc' verb)", example=":0"),
    Option("-option-rom", 1, BLOB, USER, ("-option-rom", "/proc/self/fd/{fd}"),
           help="load FILE into the option ROM space", example="rom.bin"),
    # ---- Options that users are not allowed to set (admin) ---------------
    Option("-m", 1, MEGS, ADMIN, ("-m", "{megs}"),
           help="guest RAM size in MiB", example="256"),
    Option("-nographic", 0, FLAG, ADMIN, (),
           help="no graphical output: the user may not turn on -vnc"),
    Option("-win2k-hack", 0, FLAG, ADMIN, ("-win2k-hack",),
           help="Windows 2000 install workaround"),
    Option("-usb", 0, FLAG, ADMIN, ("-usb",), help="enable the USB controller"),
    Option("-usbdevice", 1, USBDEV, ADMIN, ("-usb", "-device", "{usbdevice}"),
           help="emulated USB device: tablet, mouse or keyboard", example="tablet"),
    Option("-net", 1, NET, ADMIN, ("-netdev", "{netdev}", "-device", "{nic}"),
           help="nic[,macaddr=M][,model=T] | user[,hostname=H] | tap,br=BRIDGE | tap,ip=A/N"
                " | socket,listen=H:P|connect=H:P|mcast=A:P | none",
           example="nic,model=virtio"),
    Option("-tftp", 1, DIR, ADMIN, ("tftp={dir}",),
           help="TFTP root for the user-mode network", example="/srv/tftp"),
    Option("-smb", 1, DIR, ADMIN, ("smb={dir}",),
           help="SMB share for the user-mode network", example="/srv/smb"),
    Option("-redir", 1, REDIR, ADMIN, ("hostfwd={proto}:{haddr}:{hport}-:{gport}",),
           help="[tcp|udp]:host-port::guest-port redirect (user-mode network)",
           example="tcp:2222::22"),
    Option("-monitor", 1, WRAPPER, ADMIN, (),
           gone="the monitor is kvmshell's own (QMP socket in the VM directory)"),
    Option("-vmchannel", 1, ANY, ADMIN, (),
           gone="-vmchannel no longer exists in QEMU 7.2 (use virtio-serial)"),
    Option("-balloon", 1, BALLOON, ADMIN, ("-device", "virtio-balloon-pci"),
           help="memory balloon: only 'virtio' exists today", example="virtio"),
    Option("-serial", 1, WRAPPER, ADMIN, (),
           gone="the serial port is kvmshell's own (the 'console' verb)"),
    Option("-parallel", 1, WRAPPER, ADMIN, (),
           gone="kvmshell gives VMs no parallel port"),
    Option("-pidfile", 1, WRAPPER, ADMIN, (),
           gone="the pid file is kvmshell's own (qemu.pid in the VM directory)"),
    Option("-no-rtc", 0, FLAG, ADMIN, (),
           gone="-no-rtc no longer exists in QEMU 7.2 (host timers are always used)"),
    # ---- Options that are not used ---------------------------------------
    Option("-M", 1, ANY, UNUSED),
    Option("-hdc", 1, ANY, UNUSED),
    Option("-hdd", 1, ANY, UNUSED),
    Option("-no-quit", 0, ANY, UNUSED),
    Option("-no-fd-bootchk", 0, ANY, UNUSED),
    Option("-smp", 1, ANY, UNUSED),
    Option("-k", 1, ANY, UNUSED),
    Option("-audio-help", 0, ANY, UNUSED),
    Option("-soundhw", 1, ANY, UNUSED),
    Option("-full-screen", 0, ANY, UNUSED),
    Option("-S", 0, ANY, UNUSED),
    Option("-s", 0, ANY, UNUSED),
    Option("-p", 1, ANY, UNUSED),
    Option("-d", 1, ANY, UNUSED),
    Option("-L", 1, ANY, UNUSED),
    Option("-no-kvm", 0, ANY, UNUSED),
    Option("-std-vga", 0, ANY, UNUSED),
    Option("-daemonize", 0, ANY, UNUSED),
)

BY_NAME: dict[str, Option] = {o.name: o for o in TABLE}


def lookup(token: str) -> Option:
    """Classify an option token.  QEMU also accepts ``--opt``: so do we,
    so that spelling tricks get the same answer as the plain spelling."""
    name = token[1:] if token.startswith("--") else token
    opt = BY_NAME.get(name)
    if opt is None:
        raise RefusedOption(f"{token}: unknown option (see 'help')")
    return opt


def _refuse_class(token: str, opt: Option, want: str) -> None:
    if opt.cls == want:
        return
    if opt.cls == UNUSED:
        raise RefusedOption(f"{token}: not used by kvmshell")
    if opt.cls == ADMIN:
        raise RefusedOption(f"{token}: only the administrator may set this option")
    raise RefusedOption(f"{token}: a user option, not an admin option")


def _take(words: list[str], i: int, token: str, opt: Option) -> tuple[str | None, int]:
    if opt.arity == 0:
        return None, i + 1
    if i + 1 >= len(words):
        raise RefusedOption(f"{token}: missing value")
    value = words[i + 1]
    if value.startswith("-"):
        raise RefusedOption(f"{token}: missing value (got {value})")
    return value, i + 2


# ---- value checkers (parse, never filter) ---------------------------------

_FILE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+-")


def check_file_name(token: str, value: str) -> str:
    """A relative path of plain components, or an absolute one (confined later).
    Commas, colons, protocol prefixes, '..' and hidden names are refused."""
    if not value or len(value) > 1024:
        raise RefusedOption(f"{token}: invalid file name")
    comps = value[1:].split("/") if value.startswith("/") else value.split("/")
    for comp in comps:
        if not comp or comp[0] == "." or comp[0] == "-" or any(c not in _FILE_CHARS for c in comp):
            raise RefusedOption(
                f"{token}: invalid file name {value!r} (plain names only: letters, digits, '._+-')")
    return value


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
        _refuse_class(token, opt, USER)
        value, i = _take(words, i, token, opt)
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
        req.values[opt.name] = value
    if req.has("-hdachs") and not req.has("-hda"):
        raise RefusedOption("-hdachs: needs -hda")
    if (req.has("-append") or req.has("-initrd")) and not req.has("-kernel"):
        raise RefusedOption(("-append" if req.has("-append") else "-initrd") + ": needs -kernel")
    return req


class Opened:
    """A file kvmshell opened for QEMU: its descriptor and the format it chose."""

    def __init__(self, fd: int, fmt: str, readonly: bool, ro_fd: int = -1) -> None:
        self.fd = fd
        self.fmt = fmt
        self.readonly = readonly
        # QEMU opens a writable image read-only first: it needs both modes
        # in the descriptor set.
        self.ro_fd = ro_fd

    @property
    def fds(self) -> list[int]:
        return [self.fd] + ([self.ro_fd] if self.ro_fd >= 0 else [])


def user_argv(req: UserRequest, opened: dict[str, Opened], vnc_socket: str) -> list[str]:
    """Map a validated request to QEMU 7.2 argv, using only descriptors for files."""
    argv: list[str] = []
    fdset = 0
    machine: list[str] = []
    geometry = None
    if req.has("-hdachs"):
        geometry = _check_geometry("-hdachs", req.values["-hdachs"] or "")
    for name, value in req.values.items():
        opt = BY_NAME[name]
        if opt.kind in (DISK, CDROM):
            of = opened[name]
            fdset += 1
            for fd in of.fds:
                argv += ["-add-fd", f"fd={fd},set={fdset}"]
            tmpl = opt.qemu[1]
            if name == "-hda" and geometry is not None:
                tmpl = "if=none,id=hda," + _DRIVE
            spec = tmpl.format(format=of.fmt, fdset=fdset)
            # No readonly=on for disks: under -snapshot kvmshell opens them
            # read-only and QEMU writes to a temporary overlay in the VM
            # directory (TMPDIR), so the device stays writable (IDE refuses a
            # read-only node); otherwise they are opened read-write.
            argv += [opt.qemu[0], spec]
        elif opt.kind in (BLOB, STATE):
            argv += [opt.qemu[0], opt.qemu[1].format(fd=opened[name].fd)]
        elif opt.kind == BOOT:
            argv += [opt.qemu[0], opt.qemu[1].format(order=value)]
        elif opt.kind == CMDLINE:
            argv += [opt.qemu[0], value or ""]
        elif opt.kind == GEOMETRY and geometry is not None:
            c, h, s, t = geometry
            argv += [opt.qemu[0], opt.qemu[1].format(c=c, h=h, s=s, t=t)]
        elif opt.kind == VNC:
            argv += [opt.qemu[0], opt.qemu[1].format(vnc_socket=vnc_socket),
                     "-device", "VGA"]
        elif opt.qemu and opt.qemu[0] == "-machine":
            machine.append(opt.qemu[1])
        else:
            argv += list(opt.qemu)
    return argv + (["-machine", ",".join(machine)] if machine else [])


# ---- admin options -----------------------------------------------------------

NIC_MODELS = {"virtio": "virtio-net-pci", "e1000": "e1000", "rtl8139": "rtl8139",
              "ne2k_pci": "ne2k_pci", "pcnet": "pcnet", "i82559er": "i82559er"}
USB_DEVICES = {"tablet": "usb-tablet", "mouse": "usb-mouse", "keyboard": "usb-kbd"}
_NET_KEYS = {
    "nic": ("macaddr", "model"),
    "user": ("hostname",),
    "tap": ("br", "ip"),
    "socket": ("listen", "connect", "mcast"),
    "none": (),
}
_NET_GONE = {
    "vlan": "vlan= no longer exists in QEMU 7.2: NICs pair with backends in order",
    "fd": "fd= is set by kvmshell's network helper",
    "ifname": "ifname= is chosen by kvmshell's network helper",
    "script": "script= no longer applies: kvmshell's network helper sets up taps",
    "downscript": "downscript= no longer applies: kvmshell's network helper tears down taps",
}


class NetSpec:
    """One admin ``-net`` option, parsed."""

    def __init__(self, kind: str, params: dict[str, str]) -> None:
        self.kind = kind
        self.params = params


class AdminPlan:
    """Validated admin options of one VM."""

    def __init__(self) -> None:
        self.words: list[str] = []
        self.megs = 128
        self.nographic = False
        self.argv: list[str] = []
        self.nets: list[NetSpec] = []
        self.user_net_extra: list[str] = []

    @property
    def nics(self) -> list[NetSpec]:
        return [n for n in self.nets if n.kind == "nic"]

    @property
    def backends(self) -> list[NetSpec]:
        return [n for n in self.nets if n.kind in ("user", "tap", "socket")]

    @property
    def taps(self) -> list[NetSpec]:
        return [n for n in self.nets if n.kind == "tap"]


def _hexbyte(s: str) -> bool:
    return len(s) == 2 and all(c in "0123456789abcdefABCDEF" for c in s)


def check_mac(mac: str) -> str:
    parts = mac.split(":")
    if len(parts) != 6 or not all(_hexbyte(p) for p in parts):
        raise RefusedOption(f"-net: invalid MAC address {mac!r}")
    if int(parts[0], 16) & 1:
        raise RefusedOption(f"-net: {mac!r} is a multicast MAC address")
    return mac.lower()


def check_ifname(name: str, what: str = "bridge") -> str:
    ok = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"
    if not 1 <= len(name) <= 15 or name in (".", "..") or any(c not in ok for c in name):
        raise RefusedOption(f"-net: invalid {what} name {name!r} (1-15 of [A-Za-z0-9_.-])")
    return name


def check_cidr(value: str) -> str:
    import ipaddress
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError as exc:
        raise RefusedOption(f"-net: invalid address {value!r} (want ADDR/PREFIX)") from exc
    if "/" not in value:
        raise RefusedOption(f"-net: address {value!r} needs a prefix length")
    if iface.ip.is_multicast or iface.ip.is_unspecified or iface.ip.is_loopback:
        raise RefusedOption(f"-net: {value!r} cannot be an interface address")
    return str(iface)


def _check_hostport(key: str, value: str) -> str:
    host, colon, port = value.rpartition(":")
    ok = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-"
    if not colon or not port.isdigit() or not 0 < int(port) < 65536 or any(c not in ok for c in host):
        raise RefusedOption(f"-net: socket {key}= wants HOST:PORT, got {value!r}")
    return f"{host}:{int(port)}"


def _parse_net(value: str) -> NetSpec:
    kind, _, rest = value.partition(",")
    if kind not in _NET_KEYS:
        raise RefusedOption(f"-net: unknown type {kind!r} (nic, user, tap, socket or none)")
    params: dict[str, str] = {}
    for item in rest.split(",") if rest else []:
        key, eq, val = item.partition("=")
        if key in _NET_GONE:
            raise RefusedOption(f"-net {kind}: {_NET_GONE[key]}")
        if not eq or key not in _NET_KEYS[kind] or key in params:
            raise RefusedOption(f"-net {kind}: invalid parameter {item!r}")
        params[key] = val
    if kind == "nic":
        if "macaddr" in params:
            params["macaddr"] = check_mac(params["macaddr"])
        if params.get("model", "e1000") not in NIC_MODELS:
            raise RefusedOption(f"-net nic: unknown model {params['model']!r} "
                                f"({', '.join(NIC_MODELS)})")
    elif kind == "user" and "hostname" in params:
        h = params["hostname"]
        if not h or len(h) > 63 or any(c not in "abcdefghijklmnopqrstuvwxyz0123456789-" for c in h):
            raise RefusedOption(f"-net user: invalid hostname {h!r}")
    elif kind == "tap":
        # Bridged (br=) or routed (ip=, the host's end of a point-to-point
        # tap), not both: an address on a bridge port is never used, and the
        # bridge's own address is the admin's, shared by all its VMs.
        if "br" in params:
            check_ifname(params["br"])
        if "ip" in params:
            params["ip"] = check_cidr(params["ip"])
        if ("br" in params) == ("ip" in params):
            raise RefusedOption("-net tap: needs either br=BRIDGE or ip=ADDR/PREFIX, not both")
    elif kind == "socket":
        if len(params) != 1:
            raise RefusedOption("-net socket: needs exactly one of listen=, connect=, mcast=")
        for k, v in params.items():
            params[k] = _check_hostport(k, v)
    return NetSpec(kind, params)


def _check_dir(token: str, value: str) -> str:
    comps = value.split("/")
    if not value.startswith("/") or any(c and (c[0] == "." or any(x not in _FILE_CHARS for x in c))
                                         for c in comps[1:]):
        raise RefusedOption(f"{token}: invalid directory {value!r}")
    return value


def _check_redir(token: str, value: str) -> dict[str, str]:
    parts = value.split(":")
    if len(parts) == 3:
        parts.insert(0, "tcp")
    if (len(parts) != 4 or parts[0] not in ("tcp", "udp") or not parts[1].isdigit()
            or not parts[3].isdigit() or parts[2] not in ("", "10.0.2.15")):
        raise RefusedOption(f"{token}: expected [tcp|udp]:HOSTPORT::GUESTPORT, got {value!r}")
    for p in (parts[1], parts[3]):
        if not 0 < int(p) < 65536:
            raise RefusedOption(f"{token}: invalid port in {value!r}")
    return {"proto": parts[0], "haddr": "127.0.0.1", "hport": str(int(parts[1])),
            "gport": str(int(parts[3]))}


def parse_admin(words: list[str]) -> AdminPlan:
    """Parse admin option words (kvmadm input, or decoded from a directory name)."""
    plan = AdminPlan()
    plan.words = list(words)
    seen: set[str] = set()
    i = 0
    while i < len(words):
        token = words[i]
        if not token.startswith("-"):
            raise RefusedOption(f"{token}: unexpected word (options start with '-')")
        opt = lookup(token)
        _refuse_class(token, opt, ADMIN)
        if opt.gone:
            raise RefusedOption(f"{token}: {opt.gone}")
        value, i = _take(words, i, token, opt)
        if opt.name not in ("-net", "-usbdevice", "-redir") and opt.name in seen:
            raise RefusedOption(f"{token}: given twice")
        seen.add(opt.name)
        if opt.kind == MEGS:
            assert value is not None
            if not value.isdigit() or not 16 <= int(value) <= 1048576:
                raise RefusedOption(f"{token}: invalid size {value!r} (16 to 1048576 MiB)")
            plan.megs = int(value)
        elif opt.name == "-nographic":
            plan.nographic = True
        elif opt.kind == FLAG:
            plan.argv += list(opt.qemu)
        elif opt.kind == USBDEV:
            assert value is not None
            dev = USB_DEVICES.get(value)
            if dev is None:
                raise RefusedOption(
                    f"{token}: {value!r} no longer exists in QEMU 7.2 or is not offered "
                    f"(tablet, mouse or keyboard; host passthrough is not offered)")
            if "-usb" not in plan.argv:
                plan.argv.append("-usb")
            plan.argv += ["-device", dev]
        elif opt.kind == BALLOON:
            if value != "virtio":
                raise RefusedOption(
                    f"{token}: the hypercall balloon no longer exists in QEMU 7.2; use -balloon virtio")
            plan.argv += list(opt.qemu)
        elif opt.kind == NET:
            assert value is not None
            plan.nets.append(_parse_net(value))
        elif opt.kind == DIR:
            assert value is not None
            plan.user_net_extra.append(opt.qemu[0].format(dir=_check_dir(token, value)))
        elif opt.kind == REDIR:
            assert value is not None
            plan.user_net_extra.append(opt.qemu[0].format(**_check_redir(token, value)))
    kinds = [n.kind for n in plan.nets]
    if "none" in kinds and len(kinds) > 1:
        raise RefusedOption("-net none: must be the only -net option")
    if len(plan.nics) != len(plan.backends):
        raise RefusedOption(
            f"-net: {len(plan.nics)} nic(s) but {len(plan.backends)} backend(s): "
            "each nic pairs with one user/tap/socket backend, in order")
    if plan.user_net_extra and kinds.count("user") != 1:
        raise RefusedOption("-tftp/-smb/-redir: need exactly one -net user")
    return plan


def stable_mac(name: str, index: int) -> str:
    """A locally administered unicast MAC, stable per VM name and NIC index:
    the network helper's derivation, so the MAC QEMU gives the NIC is the
    one the helper locks its bridge port to."""
    from kvmshell.helper import guest_mac

    return ":".join(f"{b:02x}" for b in guest_mac(name, index))


def admin_argv(plan: AdminPlan, vm_name: str, tap_fds: list[int]) -> list[str]:
    """Map the admin plan to QEMU 7.2 argv.  *tap_fds* come from the helper."""
    argv = ["-m", str(plan.megs)] + plan.argv
    taps = iter(tap_fds)
    for index, (nic, backend) in enumerate(zip(plan.nics, plan.backends)):
        nid = f"net{index}"
        if backend.kind == "user":
            spec = f"user,id={nid},restrict=off"
            if "hostname" in backend.params:
                spec += f",hostname={backend.params['hostname']}"
            for extra in plan.user_net_extra:
                spec += "," + extra
        elif backend.kind == "tap":
            spec = f"tap,id={nid},fd={next(taps)}"
        else:
            (key, val), = backend.params.items()
            spec = f"socket,id={nid},{key}={val}"
        mac = nic.params.get("macaddr") or stable_mac(vm_name, index)
        model = NIC_MODELS[nic.params.get("model", "e1000")]
        argv += ["-netdev", spec, "-device", f"{model},netdev={nid},mac={mac}"]
    return argv


def user_help() -> str:
    lines = []
    for o in TABLE:
        if o.cls == USER:
            arg = {0: ""}.get(o.arity, " " + o.kind.upper())
            lines.append(f"  {o.name}{arg:<10} {o.help}")
    return "\n".join(lines)
