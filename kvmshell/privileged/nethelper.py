"""kvmshell-nethelper: the privileged network helper (runs as root via sudo).

Whole input: ``up VM`` or ``down VM``.  Everything else it needs it finds
itself, in places the caller cannot change: the host config at the fixed
path :data:`CONFIG` (read as kvmshell reads it:
:func:`kvmshell.common.config.load`), the root-owned VM tree named there,
and the VM's identifier (the admin's word).  The caller is ``SUDO_UID``,
and the VM must be the caller's (:mod:`kvmshell.privileged.caller`: sudo
sets it, and only root can run this program at all, so only sudo or root
itself can have set it).

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

What runs as root is this module, the helpers' shared checks and
envelope (:mod:`kvmshell.privileged.caller`, :mod:`kvmshell.privileged.guard`),
the shared core it imports (:mod:`kvmshell.common`: the config, the
identifier, the admin option parser, the tap/MAC derivation, all re-run
here on root-owned input) and pyroute2 for netlink.  It imports nothing from the user's side (an import contract in
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
import struct
import sys

from kvmshell.common import adminopts, guestnet
from kvmshell.common.errors import KvmshellError
from kvmshell.privileged import caller, guard
from kvmshell.privileged.guard import Failed, log

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pyroute2 import IPRoute

CONFIG = "/etc/kvmshell/kvmshell.conf"
PROG = "kvmshell-nethelper"
VERBS = ("up", "down")
# linux/if_tun.h, linux/neighbour.h
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
NUD_NOARP, NTF_MASTER = 0x40, 0x04
ENODEV = 19


# ---- the caller and the request --------------------------------------------

def check_request(argv: list[str], env: dict[str, str]) -> tuple[str, str, int]:
    """Return (verb, VM name, caller uid) or raise Refused (kvmshell.privileged.caller)."""
    uid = caller.sudo_caller(env)
    verb, name = caller.request(argv, PROG, "up|down VM", VERBS)
    return verb, caller.vm_name(name), uid


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
    vmdir = caller.host_config(config).vmdir
    taps = taps_of(vmdir, name, caller.owned_vm(vmdir, name, uid))
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
    out = caller.unix_socket(out_fd, "stdout")
    try:
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
