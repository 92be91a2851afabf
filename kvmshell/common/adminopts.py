"""The admin's options: parsing against the table, and QEMU argv.

Shared: kvmadm (root) validates with :func:`parse_admin` before it writes
an identifier; kvmshell (the user) re-parses the decoded identifier at
every start and maps it with :func:`admin_argv`; the network helper (root)
re-parses it to find the VM's taps.  The words come from the root-owned
identifier, never from the VM user.
"""

from __future__ import annotations

from kvmshell.common.errors import RefusedOption, RuntimeFailure

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kvmshell.common.config import Config
    from kvmshell.common.guestnet import Tap
from kvmshell.common.optable import (
    FILE_CHARS, ADMIN, BALLOON, CPU_HOST, CPU_MODELS, CPUMODEL, CPUS, DIR, DISKIF, FIRMWARE,
    FIRMWARES, FLAG, HOSTS, MACHINE, MACHINES, MEGS, NET, REDIR, USBDEV, lookup, refuse_class,
    take_value)


# The NIC model where the admin names none: virtio, as Proxmox, Incus and
# virt-install choose for today's guests (QEMU's own default is e1000).  A
# guest without virtio drivers (Windows without virtio-win, very old Linux)
# needs model=e1000 written out.
DEFAULT_NIC_MODEL = "virtio"
# QEMU's -smp limit for both machine types (pc: 255; q35 allows 288).
SMP_MAX = 255
# Descriptor sets of the firmware images (the user's drives count up from 1).
FW_CODE_SET = 64
FW_VARS_SET = 65
NIC_MODELS = {"virtio": "virtio-net-pci", "e1000": "e1000", "rtl8139": "rtl8139",
              "ne2k_pci": "ne2k_pci", "pcnet": "pcnet", "i82559er": "i82559er"}
USB_DEVICES = {"tablet": "usb-tablet", "mouse": "usb-mouse", "keyboard": "usb-kbd"}
_NET_KEYS = {
    "nic": ("macaddr", "model"),
    "user": ("hostname",),
    "tap": ("br", "ip", "guest"),
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


DISK_INTERFACES = {"ide": "ide", "virtio": "virtio"}


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
        self.autostart = True      # False: -no-autostart
        self.argv: list[str] = []
        self.nets: list[NetSpec] = []
        self.user_net_extra: list[str] = []
        self.disk_interface = "ide"
        self.smp = 1                  # -smp: virtual CPUs
        self.cpu: str | None = None   # -cpu: a model from optable.CPU_MODELS
        self.machine = "pc"           # -M: pc or q35
        self.firmware = "bios"        # -firmware: bios (SeaBIOS) or efi (OVMF)
        self.hosts: list[str] = []    # -host: the hosts it may run on ([]: any)

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


def check_guest_addr(value: str, host_cidr: str | None) -> str:
    """The guest's own address on a tap (``guest=``), as kvmshell's
    ``connect`` and cloud-init seed use it: a plain unicast address; on a
    routed tap (*host_cidr*, the ``ip=`` value) inside that subnet and
    neither the host's address nor the subnet's network or broadcast
    address."""
    import ipaddress
    try:
        addr = ipaddress.ip_address(value)
    except ValueError as exc:
        raise RefusedOption(f"-net tap: invalid guest address {value!r}") from exc
    # Why: Python 3.11 checks ::ffff:127.0.0.1 and ::ffff:0.0.0.0 as IPv6
    # values (neither loopback nor unspecified); the host reaches them as IPv4.
    if (isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None
            or addr.is_multicast or addr.is_unspecified or addr.is_loopback
            or addr.is_link_local or addr == ipaddress.IPv4Address("255.255.255.255")):
        raise RefusedOption(f"-net tap: {value!r} cannot be a guest address")
    if host_cidr is not None:
        iface = ipaddress.ip_interface(host_cidr)
        net = iface.network
        special = {iface.ip}
        if net.num_addresses > 2:
            special |= {net.network_address, net.broadcast_address}
        if addr not in net or addr in special:
            raise RefusedOption(f"-net tap: guest={value} is not a guest address in {net} "
                                f"(the tap's subnet, host {iface.ip})")
    return str(addr)


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
        if params.get("model", DEFAULT_NIC_MODEL) not in NIC_MODELS:
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
        if "guest" in params:
            params["guest"] = check_guest_addr(params["guest"], params.get("ip"))
    elif kind == "socket":
        if len(params) != 1:
            raise RefusedOption("-net socket: needs exactly one of listen=, connect=, mcast=")
        for k, v in params.items():
            params[k] = _check_hostport(k, v)
    return NetSpec(kind, params)


def _check_dir(token: str, value: str) -> str:
    comps = value.split("/")
    if not value.startswith("/") or any(c and (c[0] == "." or any(x not in FILE_CHARS for x in c))
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


def _parse_hardware(plan: AdminPlan, token: str, kind: str, value: str,
                    max_smp: int | None = None) -> None:
    """-smp, -M, -cpu, -firmware: each value from a closed form; *max_smp*:
    the host's limit to name in a refusal (None: QEMU's, SMP_MAX)."""
    if kind == CPUS:
        if not value.isdigit() or not 1 <= int(value) <= SMP_MAX or value[0] == "0":
            limit = (f"1 to {min(max_smp, SMP_MAX)}, this host's max_smp" if max_smp
                     else f"1 to {SMP_MAX}")
            raise RefusedOption(f"{token}: invalid number of CPUs {value!r} ({limit})")
        plan.smp = int(value)
    elif kind == MACHINE:
        if value not in MACHINES:
            raise RefusedOption(f"{token}: unknown machine type {value!r} ({' or '.join(MACHINES)})")
        plan.machine = value
    elif kind == CPUMODEL:
        if value not in CPU_MODELS:
            raise RefusedOption(f"{token}: unknown CPU model {value!r} (host, max, or a model "
                                "of 'qemu-system-x86_64 -cpu help')")
        plan.cpu = value
    elif kind == FIRMWARE:
        if value not in FIRMWARES:
            raise RefusedOption(f"{token}: unknown firmware {value!r} ({' or '.join(FIRMWARES)})")
        plan.firmware = value


def check_host(plan: AdminPlan, cfg: "Config", *, kvm: bool | None = None) -> None:
    """Check *plan* against this host's settings (kvmadm before it writes,
    kvmshell at every start).  *kvm*: whether the caller can use KVM
    (kvmshell knows at start; None: judge from ``accel`` alone).

    Raises:
        RefusedOption: ``-smp`` above ``max_smp``.
        RuntimeFailure: ``-cpu host`` where guests cannot run under KVM; ``-firmware
            efi`` without the OVMF images (Debian's ``ovmf`` package).
    """
    if plan.smp > cfg.max_smp:
        raise RefusedOption(f"-smp: {plan.smp} CPUs is over this host's limit of {cfg.max_smp}"
                            " (max_smp)")
    if plan.cpu == CPU_HOST and ("kvm" not in cfg.accel or kvm is False):
        why = ("this host runs guests with TCG only (accel = " + " ".join(cfg.accel) + ")"
               if "kvm" not in cfg.accel else "KVM (/dev/kvm) is not usable here")
        raise RuntimeFailure(f"-cpu host: the host CPU model needs KVM, and {why}; "
                             "use -cpu max (admin: kvmadm set)")
    if plan.firmware == "efi":
        import os
        for path in (cfg.uefi_code, cfg.uefi_vars):
            if not os.path.isfile(path):
                raise RuntimeFailure(f"-firmware efi: {path} is missing (admin: apt install ovmf,"
                                     " or set uefi_code/uefi_vars)")


def _parse_hosts(token: str, value: str) -> list[str]:
    """``NAME[,NAME...]``: distinct host names of the host list's form (that
    each is in the list is kvmadm's check, :func:`check_hosts`)."""
    from kvmshell.common.hosts import is_name
    names = value.split(",")
    for name in names:
        if not is_name(name):
            raise RefusedOption(f"{token}: {name!r} is not a host name (a-z, 0-9, '-')")
    if len(set(names)) != len(names):
        raise RefusedOption(f"{token}: a host is named twice")
    return names


def check_hosts(plan: AdminPlan, cfg: "Config") -> None:
    """kvmadm: every host of *plan*'s ``-host`` pin is in the host list.
    Raises RefusedOption naming the first that is not (or the missing list)."""
    if not plan.hosts:
        return
    from kvmshell.common import hosts
    known = hosts.load(cfg, need_self=False)
    if known is None:
        raise RefusedOption(f"-host: there is no host list ({cfg.hosts_file})")
    for name in plan.hosts:
        if name not in known:
            raise RefusedOption(f"-host: {name!r} is not in the host list {cfg.hosts_file}")


def parse_admin(words: list[str], max_smp: int | None = None) -> AdminPlan:
    """Parse admin option words (kvmadm input, or decoded from a directory
    name).  *max_smp*: the host's ``max_smp``, named when ``-smp`` is not a
    number of CPUs (kvmadm passes it; the limit itself is check_host's)."""
    plan = AdminPlan()
    plan.words = list(words)
    seen: set[str] = set()
    i = 0
    while i < len(words):
        token = words[i]
        if not token.startswith("-"):
            raise RefusedOption(f"{token}: unexpected word (options start with '-')")
        opt = lookup(token)
        refuse_class(token, opt, ADMIN)
        if opt.gone:
            raise RefusedOption(f"{token}: {opt.gone}")
        value, i = take_value(words, i, token, opt)
        if opt.name not in ("-net", "-usbdevice", "-redir") and opt.name in seen:
            raise RefusedOption(f"{token}: given twice")
        seen.add(opt.name)
        if opt.kind == MEGS:
            assert value is not None
            if not value.isdigit() or not 16 <= int(value) <= 1048576:
                raise RefusedOption(f"{token}: invalid size {value!r} (16 to 1048576 MiB)")
            plan.megs = int(value)
        elif opt.kind in (CPUS, MACHINE, CPUMODEL, FIRMWARE):
            assert value is not None
            _parse_hardware(plan, token, opt.kind, value, max_smp)
        elif opt.name == "-nographic":
            plan.nographic = True
        elif opt.name == "-no-autostart":
            plan.autostart = False
        elif opt.kind == HOSTS:
            assert value is not None
            plan.hosts = _parse_hosts(token, value)
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
        elif opt.kind == DISKIF:
            if value not in DISK_INTERFACES:
                raise RefusedOption(f"{token}: {value!r} is not a disk interface "
                                    f"({' or '.join(DISK_INTERFACES)})")
            plan.disk_interface = DISK_INTERFACES[value]
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


def firmware_argv(code_fd: int, vars_fds: list[int]) -> list[str]:
    """UEFI (OVMF) as two pflash drives from descriptors: the shared code
    image read-only, the VM's own variable store writable.  *vars_fds*: a
    read-write descriptor, then a read-only one (QEMU opens the store
    read-only under -snapshot)."""
    argv = ["-add-fd", f"fd={code_fd},set={FW_CODE_SET}"]
    for fd in vars_fds:
        argv += ["-add-fd", f"fd={fd},set={FW_VARS_SET}"]
    return argv + [
        "-drive", f"if=pflash,unit=0,format=raw,readonly=on,file=/dev/fdset/{FW_CODE_SET}",
        "-drive", f"if=pflash,unit=1,format=raw,file=/dev/fdset/{FW_VARS_SET}"]


def admin_argv(plan: AdminPlan, vm_name: str, tap_fds: list[int],
               fw_fds: tuple[int, list[int]] | None = None) -> list[str]:
    """Map the admin plan to QEMU 7.2 argv.  *tap_fds* come from the helper;
    *fw_fds* (code, [vars read-write, vars read-only]) from the launcher
    when the VM boots UEFI.  The machine type is the wrapper's (``-machine``
    carries kvmshell's own properties too)."""
    from kvmshell.common.guestnet import stable_mac

    argv = ["-m", str(plan.megs)] + plan.argv
    if plan.smp != 1:
        argv += ["-smp", str(plan.smp)]
    if plan.cpu is not None:
        argv += ["-cpu", plan.cpu]
    if fw_fds is not None:
        argv += firmware_argv(*fw_fds)
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
        model = NIC_MODELS[nic.params.get("model", DEFAULT_NIC_MODEL)]
        argv += ["-netdev", spec, "-device", f"{model},netdev={nid},mac={mac}"]
    return argv


def taps_of(vmdir: str, name: str, plan: AdminPlan) -> "list[Tap]":
    """The VM's taps, in ``-net tap`` order, from its parsed admin options.

    Raises:
        RefusedOption: more than :data:`MAX_TAPS` taps.
    """
    from kvmshell.common.guestnet import MAX_TAPS, Tap, guest_mac, tap_name

    out: list[Tap] = []
    for index, (nic, backend) in enumerate(zip(plan.nics, plan.backends)):
        if backend.kind != "tap":
            continue
        if len(out) >= MAX_TAPS:
            raise RefusedOption(f"-net tap: more than {MAX_TAPS} taps")
        given = nic.params.get("macaddr")
        mac = bytes.fromhex(given.replace(":", "")) if given else guest_mac(name, index)
        out.append(Tap(tap_name(vmdir, name, len(out)), backend.params.get("br"),
                       backend.params.get("ip"), mac))
    return out
