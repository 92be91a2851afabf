#!/usr/bin/python3 -IS
"""kvmshell-nethelper: the privileged network helper (runs as root via sudo).

Whole input: ``up VM`` or ``down VM``.  Everything else it needs it finds
itself, in places the caller cannot change: the host config at the fixed
path :data:`CONFIG`, the root-owned VM tree named there, and the VM's
identifier (the admin's word).  The caller is ``SUDO_UID``: sudo sets it,
and only root can run this program at all (it is not setuid), so only sudo
or root itself can have set it.

``up``   removes leftovers of an earlier run, creates one tap per ``-net tap``
         of the VM (names derived here, never given), attaches it to its
         bridge (locked to the guest's MAC: no learning, one static FDB
         entry) or gives it its host-side address, brings it up, and sends
         the open tap descriptors back over stdout (a unix socket: sudo
         closes every other descriptor) with SCM_RIGHTS.  The taps are not
         persistent, so the kernel deletes them, with their addresses, when
         the last descriptor closes: QEMU exiting or crashing, kvmshell or
         this helper being killed half way all clean up by themselves.
``down`` deletes the VM's taps (and so their addresses) if any remain.

Deliberately self-contained: stdlib only, no import of the rest of
kvmshell, so that what runs as root is this one file.  Netlink is spoken
directly (a few fixed messages) rather than through pyroute2: importing
pyroute2 0.7 costs ~110 ms and pulls asyncio, multiprocessing and
unittest.mock into a root process; the messages below are all it needs.
Refusals: one line on stderr, exit 2.  Failures: one line, exit 1.  Every
action and refusal goes to syslog (authpriv).
"""

from __future__ import annotations

import os
import stat
import struct
import sys
import syslog

import _socket as socket  # not "socket": its enum/selectors imports cost ~5 ms a run

CONFIG = "/etc/kvmshell/kvmshell.conf"
DEFAULT_VMDIR = "/var/lib/kvmshell/vms"
PROG = "kvmshell-nethelper"
VERBS = ("up", "down")
NAME_MAX = 32
MAX_TAPS = 16
_NAME_FIRST = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_NAME_REST = _NAME_FIRST + "_-"
_IFNAME_OK = _NAME_REST + "."
# What sudo (env_reset) may leave in the environment; anything else means
# someone is trying to steer a root process, so it is refused.
_ENV_OK = frozenset((
    "SUDO_UID", "SUDO_GID", "SUDO_USER", "SUDO_COMMAND", "SUDO_HOME", "SUDO_PS1",
    "PATH", "HOME", "SHELL", "LOGNAME", "USER", "USERNAME", "MAIL", "TERM",
    "LANG", "LANGUAGE", "TZ", "DISPLAY", "XAUTHORITY", "XAUTHORIZATION", "COLORS",
    "LS_COLORS", "HOSTNAME", "PS1", "PS2", "KRB5CCNAME", "XDG_CURRENT_DESKTOP"))

# netlink / tun constants (linux/netlink.h, rtnetlink.h, if_link.h, if_tun.h)
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_NEWADDR = 16, 17, 18, 20
IFLA_IFNAME, IFLA_MASTER, IFLA_LINKINFO, IFLA_INFO_KIND = 3, 10, 18, 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
AF_BRIDGE, RTM_SETLINK, RTM_NEWNEIGH = 7, 19, 28
IFLA_PROTINFO, NLA_F_NESTED, IFLA_BRPORT_LEARNING, IFLA_BRPORT_LOCKED = 12, 0x8000, 8, 39
NDA_LLADDR, NUD_NOARP, NTF_MASTER = 2, 0x40, 0x04
IFF_UP = 0x1
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000


class Refused(Exception):
    status = 2


class Failed(Exception):
    status = 1


def log(msg: str) -> None:
    syslog.syslog(syslog.LOG_NOTICE, msg)


# ---- the caller and the request --------------------------------------------

def check_request(argv: list[str], env: dict[str, str]) -> tuple[str, str, int]:
    """Return (verb, VM name, caller uid) or raise Refused."""
    if os.getuid() != 0 or os.geteuid() != 0:
        raise Refused("must be run as root through sudo")
    uid_s = env.get("SUDO_UID", "")
    if not uid_s.isdigit() or not uid_s.isascii() or len(uid_s) > 10:
        raise Refused("must be run through sudo (no SUDO_UID)")
    extra = sorted(k for k in env if k not in _ENV_OK and not k.startswith("LC_"))
    if extra:
        raise Refused(f"unexpected environment variable {extra[0][:40]!r}")
    if len(argv) != 3:
        raise Refused(f"usage: {PROG} up|down VM (got {max(len(argv) - 1, 0)} arguments)")
    verb, name = argv[1], argv[2]
    if verb not in VERBS:
        raise Refused(f"unknown verb {verb[:20]!r} (up or down)")
    # Length and characters first, before the name touches any path
    # (qemu-bridge-helper's CVE-2019-13164 was an unchecked length).
    if not 1 <= len(name) <= NAME_MAX:
        raise Refused(f"invalid VM name (1 to {NAME_MAX} characters)")
    if name[0] not in _NAME_FIRST or any(c not in _NAME_REST for c in name):
        raise Refused(f"invalid VM name {name!r}")
    return verb, name, int(uid_s)


def _read_root_file(path: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise Failed(f"cannot read {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if st.st_uid != 0 or st.st_mode & 0o022 or not stat.S_ISREG(st.st_mode):
            raise Failed(f"{path} must be a root-owned file not writable by others")
        return os.read(fd, 65536).decode("utf-8", "replace")
    finally:
        os.close(fd)


def vmdir_of(config_text: str) -> str:
    vmdir = DEFAULT_VMDIR
    for raw in config_text.splitlines():
        key, eq, value = raw.strip().partition("=")
        if eq and key.strip() == "vmdir":
            vmdir = value.strip()
    if not vmdir.startswith("/") or "/../" in vmdir + "/" or "/./" in vmdir + "/":
        raise Failed(f"vmdir {vmdir!r} in {CONFIG} is not a plain absolute path")
    return vmdir.rstrip("/") or "/"


def _decode_words(name: str, dirname: str) -> list[str]:
    import binascii

    b64 = dirname[len(name) + 1:]
    try:
        padded = (b64 + "=" * (-len(b64) % 4)).encode("ascii").translate(
            bytes.maketrans(b"-_", b"+/"))
        parts = binascii.a2b_base64(padded, strict_mode=True).decode("ascii").split("\0")
    except (binascii.Error, ValueError) as exc:
        raise Failed(f"VM {name}: undecodable identifier") from exc
    if parts[0] != name:
        raise Failed(f"VM {name}: identifier names another VM")
    return parts[1:]


def resolve(vmdir: str, name: str, uid: int) -> list[str]:
    """Check the tree as kvmshell does; return the VM's admin words."""
    try:
        st = os.lstat(vmdir)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            raise Failed(f"{vmdir} must be a root-owned directory not writable by others")
        link = os.path.join(vmdir, name)
        st = os.lstat(link)
    except FileNotFoundError as exc:
        raise Refused(f"no VM named {name!r}") from exc
    if not stat.S_ISLNK(st.st_mode) or st.st_uid != 0:
        raise Failed(f"{link} must be a root-owned symlink")
    dirname = os.readlink(link)
    if "/" in dirname or not dirname.startswith(name + "."):
        raise Failed(f"{link} -> {dirname}: not this VM's directory")
    try:
        st = os.lstat(os.path.join(vmdir, dirname))
    except FileNotFoundError as exc:
        raise Failed(f"VM {name}: directory missing") from exc
    if not stat.S_ISDIR(st.st_mode) or st.st_uid == 0:
        raise Failed(f"VM {name}: directory has the wrong type or owner")
    if st.st_uid != uid:
        # Why: the one check that stops a user wiring taps of someone else's VM.
        raise Refused(f"VM {name!r} is not yours")
    return _decode_words(name, dirname)


def _sha256(data: bytes) -> bytes:
    try:
        from _sha256 import sha256  # type: ignore[import-not-found]  # builtin; hashlib loads OpenSSL
    except ImportError:
        from hashlib import sha256
    return bytes(sha256(data).digest())


class Tap:
    def __init__(self, ifname: str, bridge: str | None, addr: str | None,
                 mac: bytes = b"") -> None:
        self.ifname, self.bridge, self.addr, self.mac = ifname, bridge, addr, mac


def guest_mac(name: str, index: int) -> bytes:
    """The MAC kvmshell gives NIC *index* when the admin named none: locally
    administered, unicast (options.stable_mac, which QEMU's argv uses, calls this)."""
    return b"\x52\x54" + _sha256(f"kvmshell:{name}:{index}".encode())[:4]


def _nic_macs(name: str, words: list[str]) -> list[bytes]:
    """The MAC of each ``-net nic``, in order (NICs pair with backends in order)."""
    out: list[bytes] = []
    for i, word in enumerate(words[:-1]):
        if word not in ("-net", "--net") or words[i + 1].split(",")[0] != "nic":
            continue
        mac = b""
        for item in words[i + 1].split(",")[1:]:
            key, _, val = item.partition("=")
            if key == "macaddr":
                parts = val.split(":")
                if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdefABCDEF"
                                                                  for c in p) for p in parts):
                    raise Failed(f"VM {name}: bad MAC address {val[:20]!r}")
                mac = bytes.fromhex("".join(parts))
                if mac[0] & 1:
                    raise Failed(f"VM {name}: multicast MAC address {val!r}")
        out.append(mac or guest_mac(name, len(out)))
    return out


def tap_name(vmdir: str, name: str, index: int) -> str:
    """Deterministic, per tree, VM and NIC; 14 bytes (IFNAMSIZ-1 is 15)."""
    h = _sha256(f"{vmdir}\0{name}".encode()).hex()[:10]
    return f"kvs{h}{index:x}"


def taps_of(vmdir: str, name: str, words: list[str]) -> list[Tap]:
    """The VM's ``-net tap`` backends, re-validated (the admin's words, but
    this program trusts nothing it did not check itself)."""
    out: list[Tap] = []
    macs = _nic_macs(name, words)
    backend = -1
    for i, word in enumerate(words[:-1]):
        kind = words[i + 1].split(",")[0]
        if word not in ("-net", "--net") or kind not in ("user", "tap", "socket"):
            continue
        backend += 1
        if kind != "tap":
            continue
        if backend >= len(macs):
            raise Failed(f"VM {name}: -net tap without a -net nic to pair with")
        params: dict[str, str] = {}
        for item in words[i + 1].split(",")[1:]:
            key, eq, val = item.partition("=")
            if not eq or key not in ("br", "ip") or key in params:
                raise Failed(f"VM {name}: bad -net tap parameter {item!r}")
            params[key] = val
        br = params.get("br")
        if br is not None and (not 1 <= len(br) <= 15 or br in (".", "..")
                               or any(c not in _IFNAME_OK for c in br)):
            raise Failed(f"VM {name}: bad bridge name {br!r}")
        addr = params.get("ip")
        if addr is not None:
            import ipaddress
            try:
                addr = str(ipaddress.ip_interface(addr))
            except ValueError as exc:
                raise Failed(f"VM {name}: bad address {addr!r}") from exc
        if (br is None) == (addr is None):
            raise Failed(f"VM {name}: -net tap needs br= or ip=")
        if len(out) >= MAX_TAPS:
            raise Failed(f"VM {name}: more than {MAX_TAPS} taps")
        out.append(Tap(tap_name(vmdir, name, len(out)), br, addr, macs[backend]))
    return out


# ---- netlink ---------------------------------------------------------------

def _rta(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _attrs(data: bytes, off: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while off + 4 <= len(data):
        ln, kind = struct.unpack_from("=HH", data, off)
        if ln < 4:
            break
        out[kind & 0x3FFF] = data[off + 4:off + ln]
        off += (ln + 3) & ~3
    return out


def _ifinfo(index: int, flags: int = 0, change: int = 0) -> bytes:
    return struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, flags, change)


class Netlink:
    """A NETLINK_ROUTE socket that sends one request at a time and waits
    for its acknowledgement."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        self.sock.bind((0, 0))
        self.seq = 0

    def request(self, mtype: int, body: bytes, flags: int = 0) -> list[bytes]:
        self.seq += 1
        head = struct.pack("=LHHLL", 16 + len(body), mtype, flags | NLM_F_REQUEST | NLM_F_ACK,
                           self.seq, 0)
        self.sock.send(head + body)
        out: list[bytes] = []
        while True:
            data = self.sock.recv(1 << 17)
            off = 0
            while off + 16 <= len(data):
                ln, kind, _, seq, _ = struct.unpack_from("=LHHLL", data, off)
                if ln < 16:
                    raise Failed("malformed netlink reply")
                if seq == self.seq:
                    if kind == NLMSG_ERROR:
                        err = struct.unpack_from("=i", data, off + 16)[0]
                        if err:
                            raise OSError(-err, os.strerror(-err))
                        return out
                    if kind == NLMSG_DONE:
                        return out
                    out.append(data[off + 16:off + ln])
                off += (ln + 3) & ~3

    def link(self, ifname: str) -> tuple[int, str] | None:
        """(index, kind) of *ifname*, or None if there is no such link."""
        try:
            msgs = self.request(RTM_GETLINK, _ifinfo(0) + _rta(IFLA_IFNAME, ifname.encode() + b"\0"))
        except OSError as exc:
            if exc.errno == 19:  # ENODEV
                return None
            raise
        for msg in msgs:
            index = struct.unpack_from("=BxHiII", msg, 0)[2]
            info = _attrs(msg, 16).get(IFLA_LINKINFO, b"")
            kind = _attrs(info, 0).get(IFLA_INFO_KIND, b"").rstrip(b"\0").decode("ascii", "replace")
            return index, kind
        return None

    def delete(self, index: int) -> None:
        self.request(RTM_DELLINK, _ifinfo(index))

    def set_up(self, index: int, master: int | None) -> None:
        extra = _rta(IFLA_MASTER, struct.pack("=I", master)) if master is not None else b""
        self.request(RTM_NEWLINK, _ifinfo(index, IFF_UP, IFF_UP) + extra)

    def lock_port(self, index: int, mac: bytes) -> None:
        """Let bridge port *index* send frames from *mac* only: learning off,
        the port locked (a source MAC must have a bridge FDB entry on this
        port), and one static entry for the guest's own MAC."""
        flags = _rta(IFLA_BRPORT_LEARNING, b"\0") + _rta(IFLA_BRPORT_LOCKED, b"\1")
        self.request(RTM_SETLINK, struct.pack("=BxHiII", AF_BRIDGE, 0, index, 0, 0)
                     + _rta(IFLA_PROTINFO | NLA_F_NESTED, flags))
        # Static (NUD_NOARP), not permanent: a permanent entry is a "local"
        # one, which a locked port refuses as a source.  EXCL: a MAC already
        # on the bridge elsewhere is a conflict, not ours to move.
        self.request(RTM_NEWNEIGH, struct.pack("=BBHiHBB", AF_BRIDGE, 0, 0, index, NUD_NOARP,
                                               NTF_MASTER, 0) + _rta(NDA_LLADDR, mac),
                     NLM_F_CREATE | NLM_F_EXCL)

    def add_addr(self, index: int, addr: str) -> None:
        import ipaddress

        iface = ipaddress.ip_interface(addr)
        fam = socket.AF_INET if iface.version == 4 else socket.AF_INET6
        packed = iface.ip.packed
        body = struct.pack("=BBBBI", fam, iface.network.prefixlen, 0, 0, index)
        body += _rta(IFA_LOCAL, packed) + _rta(IFA_ADDRESS, packed)
        self.request(RTM_NEWADDR, body, NLM_F_CREATE | NLM_F_EXCL)


# ---- the verbs ---------------------------------------------------------------

def remove(nl: Netlink, taps: list[Tap], who: str) -> int:
    """Delete the VM's taps that exist; refuse to touch a non-tap link."""
    n = 0
    for tap in taps:
        found = nl.link(tap.ifname)
        if found is None:
            continue
        index, kind = found
        if kind != "tun":
            raise Failed(f"{tap.ifname} exists and is not a tap ({kind or 'unknown kind'}): not touching it")
        try:
            nl.delete(index)
        except OSError as exc:
            if exc.errno != 19:
                raise
        log(f"{who}: deleted {tap.ifname}")
        n += 1
    return n


def open_tap(ifname: str) -> int:
    import fcntl

    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", ifname.encode(), IFF_TAP | IFF_NO_PI))
    except BaseException:
        os.close(fd)
        raise
    return fd


def up(nl: Netlink, taps: list[Tap], who: str, out: socket.socket) -> None:
    remove(nl, taps, who)  # idempotent: whatever an earlier run left goes first
    fds: list[int] = []
    try:
        for tap in taps:
            master = None
            if tap.bridge is not None:
                found = nl.link(tap.bridge)
                if found is None or found[1] != "bridge":
                    raise Failed(f"bridge {tap.bridge} does not exist (admin: create it)"
                                 if found is None else f"{tap.bridge} is not a bridge")
                master = found[0]
            fds.append(open_tap(tap.ifname))
            index = socket.if_nametoindex(tap.ifname)
            if tap.addr is not None:
                nl.add_addr(index, tap.addr)
            nl.set_up(index, master)
            if master is not None:
                # Why: the guest must not send as another guest on the bridge.
                # Set before QEMU holds the tap, so no frame goes out unchecked.
                try:
                    nl.lock_port(index, tap.mac)
                except OSError as exc:
                    mac = ":".join(f"{b:02x}" for b in tap.mac)
                    raise Failed(f"{tap.ifname}: cannot lock the bridge port to {mac}: "
                                 f"{exc.strerror}") from exc
            log(f"{who}: created {tap.ifname}"
                + (f" on bridge {tap.bridge}" if tap.bridge else f" with address {tap.addr}"))
        # The descriptors are the only handle on the taps: closing ours
        # after sending leaves QEMU (through kvmshell) as their owner.
        out.sendmsg([f"ok {len(fds)}\n".encode()],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
    finally:
        for fd in fds:
            os.close(fd)


def run(argv: list[str], env: dict[str, str]) -> int:
    verb, name, uid = check_request(argv, env)
    who = f"uid={uid} {verb} {name}"
    vmdir = vmdir_of(_read_root_file(CONFIG))
    taps = taps_of(vmdir, name, resolve(vmdir, name, uid))
    nl = Netlink()
    if verb == "down":
        n = remove(nl, taps, who)
        log(f"{who}: done, {n} tap(s) removed")
        return 0
    try:
        out = socket.socket(fileno=os.dup(1))
    except OSError as exc:
        raise Refused("stdout must be a unix socket (kvmshell passes one)") from exc
    try:
        if out.family != socket.AF_UNIX:
            raise Refused("stdout must be a unix socket (kvmshell passes one)")
        up(nl, taps, who, out)
    finally:
        out.close()
    log(f"{who}: done, {len(taps)} tap(s) handed over")
    return 0


def main() -> int:
    syslog.openlog(PROG, syslog.LOG_PID, syslog.LOG_AUTHPRIV)
    try:
        return run(list(sys.argv), dict(os.environ))
    except (Refused, Failed) as exc:
        msg = str(exc).replace("\n", " ")
        status = exc.status
    except OSError as exc:
        msg, status = f"system error: {exc.strerror or exc}", 1
    except BaseException as exc:  # never a traceback from a root program
        msg, status = f"internal error: {type(exc).__name__}", 1
    log(f"uid={os.environ.get('SUDO_UID', '?')} argv={[a[:40] for a in sys.argv[1:4]]!r}: "
        f"{'refused' if status == 2 else 'failed'}: {msg}")
    try:
        sys.stderr.write(f"{PROG}: {msg}\n")
        sys.stderr.flush()
    except OSError:
        pass
    return status


if __name__ == "__main__":
    sys.exit(main())
