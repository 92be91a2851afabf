"""The option table: the seed's three classes of QEMU option, as data.

Shared by every runner: kvmshell (the user's parser and argv builder in
:mod:`kvmshell.shell.useropts`), kvmadm and the network helper (the admin's
parser and argv builder in :mod:`kvmshell.common.adminopts`).

Every option of the seed (QEMU 0.17 names) appears here exactly once with
its arity, the kind of value it takes, its class and what it becomes in
today's QEMU (7.2).  Code and tests both read :data:`TABLE`.

Classes (the seed's):
  user    options users are allowed to set on ``start``;
  admin   options only the admin sets; they live in the VM identifier;
  unused  options kvmshell does not use at all.

Every row says where it comes from (``origin``): ``seed`` (the seed's own
option) or ``extension`` (beyond the seed, added for today's hardware).  A
seed row whose class kvmshell changed keeps the seed's class in
``seed_cls`` and says why in ``reason`` (one line); ``-smp`` and ``-M``
are such rows.

``qemu`` is the argv template.  Placeholders in braces are filled only
with values the wrapper made itself (descriptor-set numbers, formats it
chose, numbers it re-rendered, words from closed lists): user text never
lands inside a QEMU option string.  ``gone`` is set where the option no
longer exists in QEMU 7.2; such an option is refused with that message.
"""

from __future__ import annotations

from kvmshell.common.errors import RefusedOption

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
CPUS = "cpus"            # a number of virtual CPUs
MACHINE = "machine"      # a machine type from a closed list
CPUMODEL = "cpumodel"    # a CPU model from a closed list
FIRMWARE = "firmware"    # bios (SeaBIOS) or efi (OVMF)
HOSTS = "hosts"          # host names from the host list (kvmshell.common.hosts)
NET = "net"              # an admin network spec
USBDEV = "usbdevice"     # an emulated USB device name
DIR = "dir"              # an admin directory (tftp, smb)
REDIR = "redir"          # a port redirection
BALLOON = "balloon"      # a balloon device
DISKIF = "diskif"        # the bus of the user's hard disks: ide or virtio
WRAPPER = "wrapper"      # owned by kvmshell itself; never given by anyone
CLOUDINIT = "cloudinit"  # kvmshell's NoCloud seed: no value, or "new"
USERDATA = "userdata"    # a cloud-init user-data file, read by kvmshell (never QEMU)
ANY = "any"              # unused options: value never looked at

FILE_KINDS = (DISK, CDROM, BLOB, STATE, USERDATA)

# Arity of an option whose value is optional: it takes the next word when
# there is one that does not start with '-' (VM names come before options,
# so the word cannot be anything else).
OPTIONAL = -1

SEED = "seed"
EXTENSION = "extension"

# Machine types offered (QEMU 7.2 aliases of pc-i440fx-7.2 and pc-q35-7.2).
MACHINES = ("pc", "q35")
# CPU models: 'host' (KVM only: the host's own CPU), 'max' (everything the
# accelerator can give) and QEMU 7.2's named x86 models, from
# ``qemu-system-x86_64 -cpu help``.  A closed list: anything else is refused
# by kvmadm, not passed on for QEMU to judge.
CPU_HOST = "host"
CPU_MODELS = frozenset((
    "host max base 486 486-v1 athlon athlon-v1 core2duo core2duo-v1 coreduo coreduo-v1 "
    "kvm32 kvm32-v1 kvm64 kvm64-v1 n270 n270-v1 pentium pentium-v1 pentium2 pentium2-v1 "
    "pentium3 pentium3-v1 phenom phenom-v1 qemu32 qemu32-v1 qemu64 qemu64-v1 "
    "Broadwell Broadwell-IBRS Broadwell-noTSX Broadwell-noTSX-IBRS Broadwell-v1 Broadwell-v2 "
    "Broadwell-v3 Broadwell-v4 Cascadelake-Server Cascadelake-Server-noTSX "
    "Cascadelake-Server-v1 Cascadelake-Server-v2 Cascadelake-Server-v3 Cascadelake-Server-v4 "
    "Cascadelake-Server-v5 Conroe Conroe-v1 Cooperlake Cooperlake-v1 Cooperlake-v2 "
    "Denverton Denverton-v1 Denverton-v2 Denverton-v3 Dhyana Dhyana-v1 Dhyana-v2 "
    "EPYC EPYC-IBPB EPYC-Milan EPYC-Milan-v1 EPYC-Rome EPYC-Rome-v1 EPYC-Rome-v2 EPYC-v1 "
    "EPYC-v2 EPYC-v3 Haswell Haswell-IBRS Haswell-noTSX Haswell-noTSX-IBRS Haswell-v1 "
    "Haswell-v2 Haswell-v3 Haswell-v4 Icelake-Server Icelake-Server-noTSX Icelake-Server-v1 "
    "Icelake-Server-v2 Icelake-Server-v3 Icelake-Server-v4 Icelake-Server-v5 "
    "Icelake-Server-v6 IvyBridge IvyBridge-IBRS IvyBridge-v1 IvyBridge-v2 KnightsMill "
    "KnightsMill-v1 Nehalem Nehalem-IBRS Nehalem-v1 Nehalem-v2 Opteron_G1 Opteron_G1-v1 "
    "Opteron_G2 Opteron_G2-v1 Opteron_G3 Opteron_G3-v1 Opteron_G4 Opteron_G4-v1 Opteron_G5 "
    "Opteron_G5-v1 Penryn Penryn-v1 SandyBridge SandyBridge-IBRS SandyBridge-v1 "
    "SandyBridge-v2 Skylake-Client Skylake-Client-IBRS Skylake-Client-noTSX-IBRS "
    "Skylake-Client-v1 Skylake-Client-v2 Skylake-Client-v3 Skylake-Client-v4 Skylake-Server "
    "Skylake-Server-IBRS Skylake-Server-noTSX-IBRS Skylake-Server-v1 Skylake-Server-v2 "
    "Skylake-Server-v3 Skylake-Server-v4 Skylake-Server-v5 Snowridge Snowridge-v1 "
    "Snowridge-v2 Snowridge-v3 Snowridge-v4 Westmere Westmere-IBRS Westmere-v1 Westmere-v2"
).split())
FIRMWARES = ("bios", "efi")


class Option:
    """One row of the table."""

    __slots__ = ("name", "arity", "kind", "cls", "qemu", "gone", "help", "example",
                 "origin", "seed_cls", "reason")

    def __init__(self, name: str, arity: int, kind: str, cls: str,
                 qemu: tuple[str, ...] = (), *, gone: str = "", help: str = "",
                 example: str | None = None, origin: str = SEED, seed_cls: str | None = None,
                 reason: str = "") -> None:
        self.name = name
        self.arity = arity
        self.kind = kind
        self.cls = cls
        self.qemu = qemu
        self.gone = gone
        self.help = help
        self.example = example
        self.origin = origin
        # The seed's class where kvmshell changed it, with the one-line reason.
        self.seed_cls = cls if seed_cls is None else seed_cls
        self.reason = reason

    def __repr__(self) -> str:
        return f"Option({self.name!r}, {self.cls})"


# Disks are an explicit -blockdev graph that kvmshell builds from the
# descriptors it opened (see kvmshell.shell.useropts.blockdev_argv); the
# table gives the guest device that takes the top node, {node}.
TABLE: tuple[Option, ...] = (
    # ---- Options that users are allowed to set ---------------------------
    Option("-fda", 1, DISK, USER, ("-device", "floppy,id=fda,unit=0,drive={node}"),
           help="use FILE as floppy disk 0 image", example="floppy.img"),
    Option("-fdb", 1, DISK, USER, ("-device", "floppy,id=fdb,unit=1,drive={node}"),
           help="use FILE as floppy disk 1 image", example="floppy.img"),
    Option("-hda", 1, DISK, USER, ("-device", "ide-hd,id=hda,bus=ide.0,unit=0,drive={node}"),
           help="use FILE as IDE hard disk 0 image", example="disk.qcow2"),
    Option("-hdb", 1, DISK, USER, ("-device", "ide-hd,id=hdb,bus=ide.0,unit=1,drive={node}"),
           help="use FILE as IDE hard disk 1 image", example="disk.img"),
    Option("-cdrom", 1, CDROM, USER, ("-device", "ide-cd,id=cdrom,bus=ide.1,unit=0,drive={node}"),
           help="use FILE as IDE cdrom image (ide1 master)", example="x.iso"),
    Option("-boot", 1, BOOT, USER, ("-boot", "order={order}"),
           help="boot on floppy (a), hard disk (c), CD-ROM (d), or network (n)",
           example="d"),
    # kvmshell puts its own temporary qcow2 overlay on each disk: QEMU's
    # -snapshot does not apply to the -blockdev graph kvmshell builds.  It is
    # still passed, as the mark 'save' reads from QEMU's argv.
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
           ("-device", "ide-hd,id=hda,bus=ide.0,unit=0,drive={node},"
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
    # ---- kvmshell's extensions beyond the seed (user class) --------------
    # The NoCloud seed is a wrapper-owned drive: its argv comes from
    # kvmshell.shell.cloudinit, not from this table.
    Option("-cloud-init", OPTIONAL, CLOUDINIT, USER, (),
           help="(kvmshell extension) attach a cloud-init NoCloud seed: your SSH keys,"
                " hostname = VM name; 'new' gives the guest a new instance-id (first boot again)",
           example="new", origin=EXTENSION),
    Option("-user-data", 1, USERDATA, USER, (),
           help="(kvmshell extension) add FILE, a '#cloud-config' YAML file, to the seed;"
                " needs -cloud-init", example="user-data.yaml", origin=EXTENSION),
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
           help="nic[,macaddr=M][,model=T] | user[,hostname=H] | tap,br=BRIDGE[,guest=G] | tap,ip=A/N[,guest=G]"
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
    # Beyond the seed (not in QEMU 0.17's list): the admin picks the bus of
    # the user's -hda/-hdb, as libvirt's <target bus=...>.  The seed's -hda is IDE.
    Option("-disk-interface", 1, DISKIF, ADMIN, (),
           help="bus of the user's hard disks -hda/-hdb: ide (default) or virtio"
                " (beyond the seed)", example="virtio"),
    Option("-balloon", 1, BALLOON, ADMIN, ("-device", "virtio-balloon-pci"),
           help="memory balloon: only 'virtio' exists today", example="virtio"),
    Option("-serial", 1, WRAPPER, ADMIN, (),
           gone="the serial port is kvmshell's own (the 'console' verb)"),
    Option("-parallel", 1, WRAPPER, ADMIN, (),
           gone="kvmshell gives VMs no parallel port"),
    Option("-pidfile", 1, WRAPPER, ADMIN, (),
           gone="kvmshell finds QEMU by its lock on the VM directory ('status' shows the pid)"),
    Option("-no-rtc", 0, FLAG, ADMIN, (),
           gone="-no-rtc no longer exists in QEMU 7.2 (host timers are always used)"),
    # ---- Seed options re-classified (the seed's class kept in seed_cls) ---
    Option("-smp", 1, CPUS, ADMIN, ("-smp", "{cpus}"), seed_cls=UNUSED,
           reason="a VM with several CPUs is the norm today; bounded by max_smp",
           help="number of virtual CPUs (1 to the host's max_smp)", example="2"),
    Option("-M", 1, MACHINE, ADMIN, ("-machine", "{machine}"), seed_cls=UNUSED,
           reason="today's guests expect a modern machine type (q35: PCIe, AHCI)",
           help="machine type: pc (i440FX, the default) or q35", example="q35"),
    # ---- Extensions beyond the seed (admin) -------------------------------
    Option("-cpu", 1, CPUMODEL, ADMIN, ("-cpu", "{model}"), origin=EXTENSION,
           help="CPU model: host (KVM only), max, or a QEMU named model (qemu64, Skylake-Client...)",
           example="max"),
    Option("-firmware", 1, FIRMWARE, ADMIN, (), origin=EXTENSION,
           help="bios (SeaBIOS, the default) or efi (OVMF; the VM keeps its UEFI variables"
                " in nvram.fd)", example="efi"),
    # Beyond the seed: not a QEMU option but kvmshell's own, kept in the
    # identifier with the admin's others (so only the admin sets it).
    Option("-no-autostart", 0, FLAG, ADMIN, (),
           help="the owner may not mark this VM to start at boot ('autostart')"),
    # kvmshell's own too: where the VM may run when hosts share the tree
    # (docs/multihost.md); kvmadm checks the names against the host list.
    Option("-host", 1, HOSTS, ADMIN, (), origin=EXTENSION,
           help="run only on these hosts of the host list; default: any, by the placement rule",
           example="node1,node2"),
    # ---- Options that are not used ---------------------------------------
    Option("-hdc", 1, ANY, UNUSED),
    Option("-hdd", 1, ANY, UNUSED),
    Option("-no-quit", 0, ANY, UNUSED),
    Option("-no-fd-bootchk", 0, ANY, UNUSED),
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


def refuse_class(token: str, opt: Option, want: str) -> None:
    if opt.cls == want:
        return
    if opt.cls == UNUSED:
        raise RefusedOption(f"{token}: not used by kvmshell")
    if opt.cls == ADMIN:
        raise RefusedOption(f"{token}: only the administrator may set this option")
    raise RefusedOption(f"{token}: a user option, not an admin option")


def take_value(words: list[str], i: int, token: str, opt: Option) -> tuple[str | None, int]:
    if opt.arity == 0:
        return None, i + 1
    if opt.arity == OPTIONAL:
        if i + 1 < len(words) and not words[i + 1].startswith("-"):
            return words[i + 1], i + 2
        return None, i + 1
    if i + 1 >= len(words):
        raise RefusedOption(f"{token}: missing value")
    value = words[i + 1]
    if value.startswith("-"):
        raise RefusedOption(f"{token}: missing value (got {value})")
    return value, i + 2


# ---- value checkers (parse, never filter) ---------------------------------

# A path a user names: at most PATH_MAX characters, each component at most
# COMPONENT_MAX (Linux's NAME_MAX): longer names no filesystem can hold.
PATH_MAX = 1024
COMPONENT_MAX = 255
FILE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+-")


def check_file_name(token: str, value: str) -> str:
    """A relative path of plain components, or an absolute one (confined later).
    Commas, colons, protocol prefixes, '..' and hidden names are refused."""
    if not value:
        raise RefusedOption(f"{token}: invalid file name")
    if len(value) > PATH_MAX:
        raise RefusedOption(f"{token}: file name too long: {value[:24]}... ({len(value)} "
                            f"characters, at most {PATH_MAX})")
    comps = value[1:].split("/") if value.startswith("/") else value.split("/")
    for comp in comps:
        if len(comp) > COMPONENT_MAX:
            raise RefusedOption(f"{token}: file name too long: {comp[:24]}... ({len(comp)} "
                                f"characters, at most {COMPONENT_MAX} between slashes)")
        if not comp or comp[0] == "." or comp[0] == "-" or any(c not in FILE_CHARS for c in comp):
            raise RefusedOption(
                f"{token}: invalid file name {value!r} (plain names only: letters, digits, '._+-')")
    return value


# What an option's value is called in help and in the man pages: QEMU's
# own words where it has them (a file is FILE, a geometry c,h,s[,t]).  A
# lower-case word is a value typed as it stands ('-cloud-init new').
VALUE_NAMES = {DISK: "FILE", CDROM: "FILE", BLOB: "FILE", STATE: "FILE", USERDATA: "FILE",
               BOOT: "ORDER", CMDLINE: "CMDLINE", GEOMETRY: "c,h,s[,t]", VNC: "DISPLAY",
               MEGS: "MIB", NET: "SPEC", USBDEV: "DEVICE", DIR: "DIR", REDIR: "REDIR",
               BALLOON: "MODEL", CLOUDINIT: "new", CPUS: "N", MACHINE: "TYPE", CPUMODEL: "MODEL",
               DISKIF: "BUS", HOSTS: "NAME[,NAME...]"}


def value_name(opt: Option) -> str:
    """What *opt*'s value is called (:data:`VALUE_NAMES`, else its kind in
    capitals); '' for an option that takes none."""
    return VALUE_NAMES.get(opt.kind, opt.kind.upper()) if opt.arity else ""


def usage(opt: Option) -> str:
    """*opt* as help and the man pages show it: ``-snapshot``, ``-hda FILE``,
    and an optional value in brackets, ``-cloud-init [new]``."""
    value = value_name(opt)
    if not value:
        return opt.name
    return f"{opt.name} [{value}]" if opt.arity == OPTIONAL else f"{opt.name} {value}"


def option_help(cls: str) -> str:
    """The options of class *cls* (USER or ADMIN; not those that are gone)
    as a help table (common/helptext.py): usage, then the help text."""
    from kvmshell.common import helptext
    return helptext.table([(usage(o), o.help) for o in TABLE if o.cls == cls and not o.gone])


def user_help() -> str:
    """The user options as a help table (``help start``)."""
    return option_help(USER)
