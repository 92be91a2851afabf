"""``connect [VM] PORT``: one TCP connection to the guest's PORT over stdin/stdout.

Like ``vnc``, this makes SSH the transport; sshd itself still forwards
nothing.  From the user's machine:

    ssh -o ProxyCommand='ssh vmuser@host connect myvm %p' debian@myvm

The route depends on the VM's network, as the admin gave it:

* **A tap with ``guest=ADDR``** (routed ``ip=``, or bridged ``br=``):
  kvmshell, as the user, opens a TCP connection to ADDR:PORT bound
  (``SO_BINDTODEVICE``, unprivileged since Linux 5.7) to the VM's own tap
  (routed) or its bridge, so the connection leaves through that interface
  or not at all.
* **User-mode (slirp) networking**: QEMU 7.2 can forward only an IPv4 TCP
  or UDP port of the host to the guest: its ``hostfwd`` parser knows
  ``tcp`` and ``udp`` only (``hostfwd=unix:...`` and ``hostfwd_add
  unix:...`` answer "Bad protocol name"; tried on Debian 12's 7.2.22), and
  Debian's build calls libslirp's IPv4 ``slirp_add_hostfwd``, so libslirp
  4.7's unix-socket forwards are out of reach.  QEMU's ``hostfwd=unix:``
  came with the pull of 2025-10-05 (for QEMU 10.2).  The admin can turn
  this route off (``connect_user_mode = no``).  Otherwise the
  forward lives only for this one connection, over one QMP session:
  kvmshell sends ``hostfwd_add 127.0.0.1:R -> guest:PORT`` (R random) and,
  without waiting for QEMU's answer, keeps trying to connect to R, so its
  connection is made the moment QEMU listens; it sends ``hostfwd_remove``
  at once, waits until QEMU has accepted the connection (or the kernel
  reset it, the forward closing first: then it tries again on a new port),
  and checks that QEMU holds the other end (its inode among QEMU's
  descriptors; nothing was sent yet), with SIGINT/SIGTERM/SIGHUP held off
  throughout.  Then it checks
  ``/proc/net/tcp`` for any other connection that came through R; if one
  did (another local user won the race), it says so, logs it (authpriv,
  with that socket's uid) and closes its own.  SECURITY.md states this
  residual risk.

Refusals (exit 2, before anything is touched): PORT not a number from 1 to
65535 (decimal, no sign, no leading zero); a port outside the admin's
``connect_ports``; a VM that is not the caller's; a user-mode VM when the
admin set ``connect_user_mode = no``.  Failures (exit 1): the
VM is not running, or has no route kvmshell can use.
"""

from __future__ import annotations

import os
import signal
import socket
import time

from kvmshell.common.errors import MonitorError, RuntimeFailure, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable

    from kvmshell.common.adminopts import AdminPlan
    from kvmshell.shell.monitor import Session
    from kvmshell.common.config import Config
    from kvmshell.common.vmtree import VM

CONNECT_TIMEOUT = 10.0
ACCEPT_TIMEOUT = 5.0
# Forwarded host ports are drawn from here: below Linux's default ephemeral
# range (32768-60999), so they rarely collide with outgoing connections.
FWD_PORTS = (20000, 32000)
FWD_TRIES = 8
# Seconds to wait for QEMU to answer a late hostfwd_remove before saying so
# and waiting on, interruptibly (see _settle).
REMOVE_GRACE = 2.0
_HELD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE)
_LISTEN, _ESTABLISHED = "0A", "01"


def parse_port(word: str) -> int:
    """A TCP port: 1 to 65535 in plain decimal.  Raises UsageError naming *word*."""
    if (not word.isascii() or not word.isdigit() or len(word) > 5 or word[0] == "0"
            or not 1 <= int(word) <= 65535):
        raise UsageError(f"{word}: not a port (a number from 1 to 65535)")
    return int(word)


MISSING_PORT = "connect: missing PORT (usage: connect [VM] PORT)"


def parse_args(args: list[str]) -> tuple[str | None, int]:
    """``[VM] PORT`` -> (VM name or None, port).  Raises UsageError; a lone
    word that is a VM name and not a number is a missing PORT, as ``connect
    myvm`` means."""
    if len(args) == 1:
        if not args[0].isdigit() and _vm_name(args[0]):
            raise UsageError(MISSING_PORT)
        return None, parse_port(args[0])
    if len(args) == 2:
        if args[0].startswith("-"):
            raise UsageError(f"{args[0]}: unexpected option to 'connect'")
        return args[0], parse_port(args[1])
    if not args:
        raise UsageError(MISSING_PORT)
    raise UsageError(f"{args[2]}: unexpected argument to 'connect'")


def _vm_name(word: str) -> bool:
    """Could *word* be a VM's name (common/vmid.py)?"""
    from kvmshell.common import vmid
    try:
        vmid.check_name(word)
    except UsageError:
        return False
    return True


def check_allowed(cfg: "Config", port: int) -> None:
    if cfg.connect_ports is not None and port not in cfg.connect_ports:
        raise UsageError(f"{port}: guest port not allowed here (admin: connect_ports)")


# ---- taps ------------------------------------------------------------------------

def tap_route(cfg: "Config", vm: "VM", plan: "AdminPlan") -> tuple[str, str] | None:
    """(guest address, interface to bind to) of the first tap with
    ``guest=``: its own tap when routed, its bridge when bridged."""
    from kvmshell.common.adminopts import taps_of
    specs = [b for b in plan.backends if b.kind == "tap"]
    for spec, tap in zip(specs, taps_of(cfg.vmdir, vm.name, plan)):
        if "guest" in spec.params:
            return spec.params["guest"], tap.bridge or tap.ifname
    return None


def _host_own(family: int, addr: str, ifname: str) -> bool:
    """Whether *addr*, reached through *ifname*, is this host's own address
    (a local route: the kernel picks *addr* itself as the source).  A UDP
    connect looks the route up and sends nothing."""
    probe = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
        probe.connect((addr, 9))
        return (socket.inet_pton(family, probe.getsockname()[0].partition("%")[0])
                == socket.inet_pton(family, addr))
    except OSError:
        return False   # no route: the TCP connect says so
    finally:
        probe.close()


def tap_connect(addr: str, ifname: str, port: int) -> socket.socket:
    """A TCP connection to the guest's *addr*:*port* through *ifname* only.
    RuntimeFailure if it fails, or if *addr* is the host's own (the
    bridge's address given as guest=: the host's services, not a guest)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    if _host_own(family, addr, ifname):
        raise RuntimeFailure(f"connect: {addr} is this host's own address on {ifname}, not "
                             "a guest's (admin: the VM's guest=)")
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        # Why: whatever the routing table says, only the VM's interface.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
        sock.settimeout(CONNECT_TIMEOUT)
        sock.connect((addr, port))
        sock.settimeout(None)
    except OSError as exc:
        sock.close()
        raise RuntimeFailure(f"connect: {addr} port {port} via {ifname}: "
                             f"{exc.strerror or exc}") from exc
    return sock


# ---- user-mode networking --------------------------------------------------------

def _hex_v4(addr: str, port: int) -> str:
    """/proc/net/tcp's spelling of an IPv4 address and port: the address's
    four bytes as one native-endian %08X, the port as %04X."""
    import sys
    return f"{int.from_bytes(socket.inet_aton(addr), sys.byteorder):08X}:{port:04X}"


def tcp_table() -> list[tuple[str, str, str, int, int]]:
    """/proc/net/tcp and tcp6 of this network namespace: (local, remote,
    state, uid, inode) each, addresses as the kernel spells them."""
    rows = []
    for leaf in ("tcp", "tcp6"):
        try:
            with open(f"/proc/net/{leaf}", encoding="ascii") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            w = line.split()
            if len(w) >= 10:
                rows.append((w[1], w[2], w[3], int(w[7]), int(w[9])))
    return rows


def qemu_sockets(pid: int) -> set[int]:
    """Inodes of the sockets QEMU (*pid*, the caller's own process) holds."""
    out = set()
    base = f"/proc/{pid}/fd"
    try:
        leaves = os.listdir(base)
    except OSError as exc:
        raise RuntimeFailure(f"connect: cannot look at QEMU's descriptors: {exc.strerror}") from exc
    for leaf in leaves:
        try:
            target = os.readlink(f"{base}/{leaf}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def user_netdev(plan: "AdminPlan") -> str | None:
    """QEMU's id of the VM's first user-mode backend (admin_argv's naming)."""
    for index, backend in enumerate(plan.backends):
        if backend.kind == "user":
            return f"net{index}"
    return None


def _wait_accepted(hport: int, lport: int) -> None:
    """Until QEMU has taken our connection off the forward's accept queue:
    removing the forward earlier would reset it.  A connection still queued
    shows in /proc/net/tcp as the server end (127.0.0.1:hport ->
    127.0.0.1:lport) with inode 0; accepted, it has an inode (QEMU's: the
    listener was QEMU's); if the guest refused it, slirp has closed it
    already and our end is no longer ESTABLISHED.  RuntimeFailure on timeout."""
    local, remote = _hex_v4("127.0.0.1", hport), _hex_v4("127.0.0.1", lport)
    deadline = time.monotonic() + ACCEPT_TIMEOUT
    while True:
        rows = tcp_table()
        server = [ino for (l, r, _st, _uid, ino) in rows if l == local and r == remote]
        mine = [st for (l, r, st, _uid, _ino) in rows if l == remote and r == local]
        if any(server) or (mine and mine[0] != _ESTABLISHED) or (not server and not mine):
            return
        if time.monotonic() > deadline:
            raise RuntimeFailure("connect: QEMU did not take the connection")
        time.sleep(0.0002)


def _v6(v4: str) -> str:
    return "0000000000000000FFFF0000" + v4  # ::ffff:a.b.c.d, as tcp6 spells it


def port_rows(hport: int) -> set[tuple[str, str]]:
    """(local, remote) of every TCP socket on 127.0.0.1:hport, either end."""
    fwd = _hex_v4("127.0.0.1", hport)
    return {(l, r) for (l, r, _s, _u, _i) in tcp_table() if fwd in (l, r) or _v6(fwd) in (l, r)}


def intruders(hport: int, lport: int, before: set[tuple[str, str]]) -> list[int]:
    """uids of connections through 127.0.0.1:hport other than ours (lport),
    leaving out sockets that were there *before* the forward (TIME_WAIT of
    an earlier connection on the same port)."""
    fwd, ours = _hex_v4("127.0.0.1", hport), _hex_v4("127.0.0.1", lport)
    v6fwd = _v6(fwd)
    out = []
    for local, remote, state, uid, _ino in tcp_table():
        if state == _LISTEN or (local, remote) in before:
            continue
        if local == fwd and remote != ours:
            out.append(uid)            # QEMU's end of someone else's connection
        elif remote in (fwd, v6fwd) and local != ours:
            out.append(uid)            # their end: the uid is theirs
    return out


def _connect_as_soon_as_listening(hport: int, qmp: "Session", deadline: float
                                  ) -> tuple[socket.socket | None, dict[str, object] | None]:
    """Connect to 127.0.0.1:hport the moment it listens, while QEMU's answer
    to ``hostfwd_add`` is on its way.  Returns (our socket, QEMU's reply if
    it was read meanwhile, else None) once connected, or (None, QEMU's
    reply) if QEMU said the forward failed.
    Nothing is sent on the socket before the caller has checked whose
    listener it reached."""
    import errno
    import select

    sock = None
    reply: dict[str, object] | None = None
    poller = select.poll()
    poller.register(qmp.fileno(), select.POLLIN)
    while sock is None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        err = s.connect_ex(("127.0.0.1", hport))
        if err == 0:
            sock = s
            break
        s.close()
        if err != errno.ECONNREFUSED:
            raise RuntimeFailure(f"connect: 127.0.0.1:{hport}: {os.strerror(err)}")
        if reply is None and (qmp.pending() or poller.poll(0)):
            reply = qmp.reply(deadline)
            said = reply.get("return")
            if not isinstance(said, str) or said.strip():
                return None, reply     # QEMU did not set the forward up
        if time.monotonic() > deadline:
            raise RuntimeFailure(f"connect: 127.0.0.1:{hport} never listened")
    return sock, reply


def slirp_connect(vm: "VM", pid: int, netdev: str, port: int) -> socket.socket:
    """One connection to guest *port* through a forward that lives only
    until QEMU has accepted it (see the module docstring)."""
    import secrets

    from kvmshell.shell.monitor import Session

    old = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        try:
            qmp = Session(vm)
        except MonitorError as exc:
            raise RuntimeFailure(f"connect: {exc.message}") from exc
        try:
            return _through_forward(vm, pid, netdev, port, qmp, secrets.randbelow)
        except MonitorError as exc:
            raise RuntimeFailure(f"connect: {exc.message}") from exc
        finally:
            qmp.close()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _through_forward(vm: "VM", pid: int, netdev: str, port: int, qmp: "Session",
                     randbelow: "Callable[[int], int]") -> socket.socket:
    """The forward's life: ``hostfwd_add``; connect the moment QEMU listens;
    ``hostfwd_remove`` sent at once; then whose connection it was, and who
    else came in.  Only a port with no socket on it at all is used.  QEMU's main loop usually runs slirp's accept of a
    connection already queued before the next monitor command, but not
    always (the command's bottom half and slirp's poll handler can fall in
    the same iteration, the command first): then the listener closes with
    our connection still queued and the kernel resets it.  That is seen
    (ECONNRESET on our socket, nothing sent yet) and tried again on a new
    port, up to FWD_TRIES forwards in all."""
    hmp = "human-monitor-command"
    for _ in range(FWD_TRIES):
        hport = FWD_PORTS[0] + randbelow(FWD_PORTS[1] - FWD_PORTS[0])
        before = port_rows(hport)
        if before:
            # Why: a pair that was there before is left out of the intruder
            # check, and another local user can make one (a TIME_WAIT), then
            # come through the forward on that same 4-tuple unseen.
            continue
        deadline = time.monotonic() + CONNECT_TIMEOUT
        remove: dict[str, object] = {"command-line": f"hostfwd_remove {netdev} tcp:127.0.0.1:{hport}"}
        qmp.send(hmp, {"command-line": f"hostfwd_add {netdev} tcp:127.0.0.1:{hport}-:{port}"})
        try:
            sock, reply = _connect_as_soon_as_listening(hport, qmp, deadline)
        except BaseException:
            # Why: QEMU may carry the add out late (stopped, slow): a forward
            # left behind would be open to every local user until the VM stops.
            _remove_late(qmp, hmp, remove, hport)
            raise
        removed: dict[str, object] = {}
        if sock is not None:
            # Sent before anything else happens: this is the window's end.
            qmp.send(hmp, remove)
            try:
                if reply is None:   # QEMU's answer to the add, unless read while connecting
                    reply = qmp.reply(deadline)
                removed = qmp.reply(deadline)
            except BaseException:
                sock.close()
                _settle(qmp, hport)
                raise
        assert reply is not None
        said = reply.get("return")
        if not (isinstance(said, str) and not said.strip()):
            if sock is not None:
                sock.close()   # not QEMU's forward: nothing was sent on it
            if not isinstance(said, str) or "Could not set up" not in said:
                raise RuntimeFailure(f"connect: QEMU: {str(said or reply).strip().splitlines()[0]}")
            continue           # the port is taken: another one
        assert sock is not None
        try:
            reset = _check_forward(pid, hport, sock, removed)
        except BaseException:
            sock.close()
            raise
        others = intruders(hport, sock.getsockname()[1], before)
        if others:
            sock.close()
            import syslog
            syslog.openlog("kvmshell", 0, syslog.LOG_AUTHPRIV)
            syslog.syslog(syslog.LOG_WARNING, f"connect {vm.name} {port}: another connection "
                          f"(uid {sorted(set(others))}) came through 127.0.0.1:{hport}")
            raise RuntimeFailure(f"connect: another local connection (uid {others[0]}) came "
                                 f"through the VM's temporary forward 127.0.0.1:{hport}; yours "
                                 "was closed (logged; see SECURITY.md)")
        if not reset:
            return sock
        sock.close()
    raise RuntimeFailure("connect: no forward on 127.0.0.1 took the connection "
                         f"({FWD_TRIES} tries)")


def _remove_late(qmp: "Session", hmp: str, remove: dict[str, object], hport: int) -> None:
    """Send *remove* after a failed wait for the forward, and wait for the
    answers QEMU still owes (:func:`_settle`): the add's, if it was not read
    while connecting, then the remove's (QMP answers in order, so an add
    QEMU carries out late is undone before we go)."""
    try:
        qmp.send(hmp, remove)
    except (MonitorError, OSError):
        return
    _settle(qmp, hport)


def _settle(qmp: "Session", hport: int) -> None:
    """Read every answer QEMU still owes before the session may close: QEMU
    7.2 drops the commands it has not carried out when the session closes,
    so a remove sent just before connect gave up was lost while the add
    stood (measured: the user stopped its QEMU with SIGSTOP once it
    listened, until connect had gone; the forward then stayed, open to
    every local user until the VM stopped).  Waits REMOVE_GRACE seconds,
    then says so on stderr and waits for as long as QEMU takes, with
    SIGINT, SIGTERM and SIGHUP let through: only one of those (or QEMU's
    end) stops the wait, and then the forward may stay, as after a
    SIGKILL (SECURITY.md).  Waits for no answer that is not owed."""
    import sys
    end = time.monotonic() + REMOVE_GRACE
    old = None
    try:
        while qmp.owed:
            try:
                qmp.reply(end)
            except MonitorError:
                if time.monotonic() < end:
                    return          # QEMU closed the monitor (gone: so is the forward)
                if old is None:
                    sys.stderr.write(
                        f"kvmshell: connect: waiting for QEMU to remove the forward on "
                        f"127.0.0.1:{hport} (open until QEMU does; ^C leaves it until "
                        "the VM stops)\n")
                    sys.stderr.flush()
                    old = signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD[:3])
                end = time.monotonic() + 3600.0
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _check_forward(pid: int, hport: int, sock: socket.socket, removed: dict[str, object]) -> bool:
    """After ``hostfwd_remove``: QEMU said it removed the forward, QEMU (or
    nobody any more) holds the server end of our connection.  Returns True
    if the connection was reset before QEMU accepted it (see
    :func:`_through_forward`).  Raises RuntimeFailure."""
    import errno

    said = removed.get("return")
    # QEMU 7.2 (net/slirp.c): "host forwarding rule for ... removed", or "... not found".
    if not isinstance(said, str) or not said.strip().endswith("removed"):
        raise RuntimeFailure(f"connect: QEMU did not remove the forward: {said or removed}")
    lport = sock.getsockname()[1]
    _wait_accepted(hport, lport)
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET:
        return True
    # Whose end is it?  A live server end must be one of QEMU's sockets
    # (an end that is gone was closed: nothing can be sent to anyone).
    # QEMU's sockets first, then the table: an end QEMU closes in between
    # shows inode 0 (no file any more), never an inode missing from *held*.
    held = qemu_sockets(pid)
    ends = [ino for (l, r, _st, _u, ino) in tcp_table()
            if l == _hex_v4("127.0.0.1", hport) and r == _hex_v4("127.0.0.1", lport) and ino]
    if ends and not set(ends) <= held:
        raise RuntimeFailure(f"connect: 127.0.0.1:{hport} was answered by a process "
                             "other than the VM's QEMU")
    return False


# ---- the relay ---------------------------------------------------------------------

def relay(sock: socket.socket, rfd: int = 0, wfd: int = 1, bufsize: int = 65536) -> None:
    """Copy *rfd* -> *sock* and *sock* -> *wfd* until the socket closes.

    The end of *rfd* is passed on as a half-close (``shutdown(SHUT_WR)``),
    as ``nc -N`` and socat do, so ``echo x | connect VM 7`` still reads the
    answer.  poll(2), not epoll: stdin may be a file or /dev/null, which
    epoll refuses.
    """
    import select

    poller = select.poll()
    sfd = sock.fileno()
    poller.register(sfd, select.POLLIN)
    poller.register(rfd, select.POLLIN)
    stdin_open = True
    while True:
        for fd, _ev in poller.poll():
            if fd == sfd:
                data = sock.recv(bufsize)
                if not data:
                    return
                view = memoryview(data)
                while view:
                    view = view[os.write(wfd, view):]
            elif stdin_open:
                data = os.read(rfd, bufsize)
                if data:
                    sock.sendall(data)
                else:
                    stdin_open = False
                    poller.unregister(rfd)
                    sock.shutdown(socket.SHUT_WR)


# ---- the verb ---------------------------------------------------------------------

def route(cfg: "Config", vm: "VM") -> tuple[str, str] | str:
    """How ``connect`` reaches *vm*'s guest, from the admin's options: (guest
    address, interface) for a tap with ``guest=``, or the user-mode
    backend's QEMU id.  Raises UsageError if that backend is user-mode and
    the admin set ``connect_user_mode = no``, RuntimeFailure if there is
    no route."""
    from kvmshell.shell import launcher
    plan = launcher.admin_plan(vm)
    tap = tap_route(cfg, vm, plan)
    if tap is not None:
        return tap
    netdev = user_netdev(plan)
    if netdev is not None:
        if not cfg.connect_user_mode:
            raise UsageError(f"connect: VM {vm.name} has user-mode networking, which the "
                             "administrator closed to connect (connect_user_mode = no; "
                             "a tap with guest= is reachable)")
        return netdev
    raise RuntimeFailure(f"connect: VM {vm.name} has no network kvmshell can reach the guest "
                         "through (user-mode, or a tap with guest=; admin: kvmadm set)")


def open_connection(vm: "VM", pid: int, port: int, via: tuple[str, str] | str) -> socket.socket:
    """One TCP connection to the guest's *port* by :func:`route`'s *via*;
    *pid* is the VM's QEMU.  Raises RuntimeFailure."""
    if isinstance(via, tuple):
        return tap_connect(via[0], via[1], port)
    return slirp_connect(vm, pid, via, port)


def main(ctx: object, args: list[str]) -> int:
    from kvmshell.common import runstate
    from kvmshell.shell.context import Context

    assert isinstance(ctx, Context)
    name, port = parse_args(args)
    check_allowed(ctx.cfg, port)
    vm = ctx.pick(name)
    via = route(ctx.cfg, vm)
    # Running as stop/kill decide it (runstate.py): a QEMU of the user's
    # holding the VM directory's lock, found from /proc.
    state, pid = runstate.state(vm, ctx.cfg.qemu)
    if pid is None:
        raise RuntimeFailure(f"VM {vm.name!r} is " + ("being started or stopped: try again"
                                                      if state == runstate.BUSY else "not running"))
    if os.isatty(1):
        raise UsageError("connect: stdout is a terminal; this verb is a transport "
                         "(e.g. ssh's ProxyCommand; see the README)")
    sock = open_connection(vm, pid, port, via)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        relay(sock)
    except (BrokenPipeError, ConnectionResetError):
        pass   # either side hung up: the connection is over
    finally:
        sock.close()
    return 0
