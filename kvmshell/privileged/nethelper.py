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

What runs as root is this module, the shared core it imports
(:mod:`kvmshell.common`: the identifier, the admin option parser, the
tap/MAC derivation, all re-run here on root-owned input) and pyroute2 for
netlink.  It imports nothing from the user's side (an import contract in
setup.cfg, checked by the test suite, says so).  pyroute2's import costs
about 0.2 s per ``up``: paid once per start of a VM with taps.

Installed as a root-owned stub (see :mod:`kvmshell.admin.install`) that
sudo runs with ``python3 -I``; the stub fixes the config path.
Refusals: one line on stderr, exit 2.  Failures: one line, exit 1.  Every
action and refusal goes to syslog (authpriv).

The caller's descriptors never hold this root process (see
:mod:`kvmshell.privileged.guard`: a deadline, stdout and stderr set aside,
a bounded number of runs per user).  It never reads stdin, sends the reply
on stdout's socket without waiting (a full socket fails the run), and
deletes the taps it made unless that reply went whole.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import sys

from kvmshell.common import adminopts, guestnet, vmid
from kvmshell.common.errors import KvmshellError
from kvmshell.common.text import printable
from kvmshell.privileged import guard
from kvmshell.privileged.guard import Failed, Refused, log

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pyroute2 import IPRoute

CONFIG = "/etc/kvmshell/kvmshell.conf"
DEFAULT_VMDIR = "/var/lib/kvmshell/vms"
PROG = "kvmshell-nethelper"
VERBS = ("up", "down")
NAME_MAX = vmid.NAME_MAX
_NAME_FIRST = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_NAME_REST = _NAME_FIRST + "_-"
# What sudo (env_reset) may leave in the environment; anything else means
# someone is trying to steer a root process, so it is refused.
_ENV_OK = frozenset((
    "SUDO_UID", "SUDO_GID", "SUDO_USER", "SUDO_COMMAND", "SUDO_HOME", "SUDO_PS1",
    "PATH", "HOME", "SHELL", "LOGNAME", "USER", "USERNAME", "MAIL", "TERM",
    "LANG", "LANGUAGE", "TZ", "DISPLAY", "XAUTHORITY", "XAUTHORIZATION", "COLORS",
    "LS_COLORS", "HOSTNAME", "PS1", "PS2", "KRB5CCNAME", "XDG_CURRENT_DESKTOP"))

# linux/if_tun.h, linux/neighbour.h
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
NUD_NOARP, NTF_MASTER = 0x40, 0x04
ENODEV = 19


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
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
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


def vmdir_of(config_text: str, config: str) -> str:
    vmdir = DEFAULT_VMDIR
    for raw in config_text.splitlines():
        key, eq, value = raw.strip().partition("=")
        if eq and key.strip() == "vmdir":
            vmdir = value.strip()
    if not vmdir.startswith("/") or "/../" in vmdir + "/" or "/./" in vmdir + "/":
        raise Failed(f"vmdir {vmdir!r} in {config} is not a plain absolute path")
    return vmdir.rstrip("/") or "/"


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
        raise Failed(f"{link} -> {printable(dirname)}: not this VM's directory")
    try:
        st = os.lstat(os.path.join(vmdir, dirname))
    except FileNotFoundError as exc:
        raise Failed(f"VM {name}: directory missing") from exc
    if not stat.S_ISDIR(st.st_mode) or st.st_uid == 0:
        raise Failed(f"VM {name}: directory has the wrong type or owner")
    if st.st_uid != uid:
        # Why: the one check that stops a user wiring taps of someone else's VM.
        raise Refused(f"VM {name!r} is not yours")
    try:
        decoded, words = vmid.decode(dirname)
    except KvmshellError as exc:
        raise Failed(f"VM {name}: {exc}") from exc
    if decoded != name:
        raise Failed(f"VM {name}: identifier names another VM")
    return words


def taps_of(vmdir: str, name: str, words: list[str]) -> list[guestnet.Tap]:
    """The VM's taps, from its admin words re-parsed here with kvmadm's own
    parser (the admin's words, but root trusts nothing it did not check)."""
    try:
        return adminopts.taps_of(vmdir, name, adminopts.parse_admin(words))
    except KvmshellError as exc:
        raise Failed(f"VM {name}: {exc}") from exc


# ---- netlink, through pyroute2 ---------------------------------------------

def link(ipr: "IPRoute", ifname: str) -> tuple[int, str] | None:
    """(index, kind) of *ifname*, or None if there is no such link."""
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        return None
    msg = ipr.get_links(found[0])[0]
    return found[0], str(msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") or "")


def lock_port(ipr: "IPRoute", index: int, mac: bytes) -> None:
    """Let bridge port *index* send frames from *mac* only: learning off,
    the port locked (a source MAC must have a bridge FDB entry on this
    port), and one static entry for the guest's own MAC."""
    ipr.brport("set", index=index, learning=0, locked=1)
    # Static (NUD_NOARP), not permanent: a permanent entry is a "local"
    # one, which a locked port refuses as a source.  'add' is CREATE|EXCL:
    # a MAC already on the bridge elsewhere is a conflict, not ours to move.
    ipr.fdb("add", ifindex=index, lladdr=guestnet.mac_text(mac), state=NUD_NOARP,
            flags=NTF_MASTER)


def add_addr(ipr: "IPRoute", index: int, addr: str) -> None:
    """Give link *index* the host-side address *addr* (``ADDR/PREFIX``)."""
    ip, _, prefix = addr.partition("/")
    ipr.addr("add", index=index, address=ip, prefixlen=int(prefix))


# ---- the verbs ---------------------------------------------------------------

def remove(ipr: "IPRoute", taps: list[guestnet.Tap], who: str) -> int:
    """Delete the VM's taps that exist; refuse to touch a non-tap link."""
    n = 0
    for tap in taps:
        found = link(ipr, tap.ifname)
        if found is None:
            continue
        index, kind = found
        if kind != "tun":
            raise Failed(f"{tap.ifname} exists and is not a tap ({kind or 'unknown kind'}): not touching it")
        try:
            ipr.link("del", index=index)
        except OSError as exc:  # pyroute2's NetlinkError is an OSError
            if exc.errno != ENODEV:
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


def up(ipr: "IPRoute", taps: list[guestnet.Tap], who: str, out: socket.socket) -> None:
    remove(ipr, taps, who)  # idempotent: whatever an earlier run left goes first
    fds: list[int] = []
    try:
        for tap in taps:
            master = None
            if tap.bridge is not None:
                found = link(ipr, tap.bridge)
                if found is None or found[1] != "bridge":
                    raise Failed(f"bridge {tap.bridge} does not exist (admin: create it)"
                                 if found is None else f"{tap.bridge} is not a bridge")
                master = found[0]
            fds.append(open_tap(tap.ifname))
            index = socket.if_nametoindex(tap.ifname)
            if tap.addr is not None:
                add_addr(ipr, index, tap.addr)
            if master is None:
                ipr.link("set", index=index, state="up")
            else:
                ipr.link("set", index=index, state="up", master=master)
            if master is not None:
                # Why: the guest must not send as another guest on the bridge.
                # Set before QEMU holds the tap, so no frame goes out unchecked.
                try:
                    lock_port(ipr, index, tap.mac)
                except OSError as exc:
                    mac = guestnet.mac_text(tap.mac)
                    raise Failed(f"{tap.ifname}: cannot lock the bridge port to {mac}: "
                                 f"{exc.strerror}") from exc
            log(f"{who}: created {tap.ifname}"
                + (f" on bridge {tap.bridge}" if tap.bridge else f" with address {tap.addr}"))
        # The descriptors are the only handle on the taps: closing ours
        # after sending leaves QEMU (through kvmshell) as their owner.
        hand_over(out, fds)
    except BaseException:
        # Why explicitly: a copy of a descriptor may be on its way (a reply
        # sent in part), and would keep the tap, and its address, alive.
        undo(taps, who)
        raise
    finally:
        for fd in fds:
            os.close(fd)


def hand_over(out: socket.socket, fds: list[int]) -> None:
    """Send ``ok N`` with the N descriptors, whole, without waiting."""
    reply = f"ok {len(fds)}\n".encode()
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
    try:
        sent = out.sendmsg([reply], rights if fds else [], socket.MSG_DONTWAIT)
    except BlockingIOError as exc:
        raise Failed("the caller's socket is full: the taps were not handed over") from exc
    if sent != len(reply):
        raise Failed("the caller's socket took part of the reply: the taps were not handed over")


def undo(taps: list[guestnet.Tap], who: str) -> None:
    """Delete *taps*, on a netlink socket of its own (the run's may be the
    one that failed); whatever happens, the caller's error is the one told."""
    from pyroute2 import IPRoute

    try:
        with IPRoute() as ipr:
            remove(ipr, taps, who)
    except Exception as exc:  # logged: the original failure goes on up
        log(f"{who}: could not delete the taps after a failure: {exc}")


def run(argv: list[str], env: dict[str, str], config: str = CONFIG, out_fd: int = 1) -> int:
    verb, name, uid = check_request(argv, env)
    guard.hold_slot(PROG, uid)
    who = f"uid={uid} {verb} {name}"
    vmdir = vmdir_of(_read_root_file(config), config)
    taps = taps_of(vmdir, name, resolve(vmdir, name, uid))
    if verb == "down" and not any(_exists(tap.ifname) for tap in taps):
        # Nothing to delete: skip pyroute2's import (~0.2 s) altogether.
        log(f"{who}: done, 0 tap(s) removed")
        return 0
    if verb == "up" and not taps:
        # Nothing to create (kvmshell does not ask for such a VM): no netlink either.
        return _up_to_stdout(None, taps, who, out_fd)
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        if verb == "down":
            n = remove(ipr, taps, who)
            log(f"{who}: done, {n} tap(s) removed")
            return 0
        return _up_to_stdout(ipr, taps, who, out_fd)


def _exists(ifname: str) -> bool:
    try:
        socket.if_nametoindex(ifname)
    except OSError:
        return False
    return True


def _up_to_stdout(ipr: "IPRoute | None", taps: list[guestnet.Tap], who: str, out_fd: int) -> int:
    try:
        out = socket.socket(fileno=os.dup(out_fd))
    except OSError as exc:
        raise Refused("stdout must be a unix socket (kvmshell passes one)") from exc
    try:
        if out.family != socket.AF_UNIX:
            raise Refused("stdout must be a unix socket (kvmshell passes one)")
        if ipr is None:
            hand_over(out, [])
        else:
            up(ipr, taps, who, out)
    finally:
        out.close()
    log(f"{who}: done, {len(taps)} tap(s) handed over")
    return 0


def main(config: str = CONFIG) -> int:
    """The helper's entry point (the installed stub calls it); the exit status."""
    return guard.main(PROG, lambda out_fd: run(list(sys.argv), dict(os.environ), config, out_fd))


if __name__ == "__main__":
    sys.exit(main())
