"""``vnc [VM]``: connect stdin/stdout to the VM's VNC socket.

QEMU's display, when the user turns it on with ``-vnc``, listens only on
``vnc.sock`` in the 0700 VM directory (see optable.py): never a TCP port
that others could reach.  This verb makes ``ssh vmuser@host vnc`` a byte
transport that any VNC client can use through a local relay, e.g.

    socat TCP-LISTEN:5901,bind=127.0.0.1,reuseaddr,fork EXEC:'ssh vmuser@host vnc'
    vncviewer 127.0.0.1::5901

or ``bin/kvmshell-vncviewer vmuser@host [VM]``, which does both.
"""

from __future__ import annotations

import os
import selectors
import socket

from kvmshell.common.errors import RuntimeFailure, UsageError


def relay(sock: socket.socket) -> None:
    """Copy until either side closes.  Bytes are not interpreted.  A stdin
    that cannot be waited on (console.watch_stdin) is a client already gone."""
    from kvmshell.shell.console import watch_stdin
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    try:
        if not watch_stdin(sel):
            return
        while True:
            for key, _ in sel.select():
                if key.fileobj is sock:
                    data = sock.recv(65536)
                    if not data:
                        return
                    view = memoryview(data)
                    try:
                        while view:
                            view = view[os.write(1, view):]
                    except BrokenPipeError:
                        return
                    except OSError as exc:
                        raise RuntimeFailure(f"vnc: cannot write to stdout: {exc.strerror}") from exc
                else:
                    try:
                        data = os.read(0, 65536)
                    except OSError:
                        data = b""
                    if not data:
                        return    # the client went away: so does the session
                    sock.sendall(data)
    finally:
        sel.close()


def main(ctx: object, args: list[str]) -> int:
    from kvmshell.shell.context import Context
    from kvmshell.shell import launcher
    from kvmshell.shell import monitor
    from kvmshell.common import vmtree
    from kvmshell.shell.console import unix_connect

    assert isinstance(ctx, Context)
    name = args[0] if args and not args[0].startswith("-") else None
    rest = args[1:] if name is not None else args
    if rest:
        raise UsageError(f"{rest[0]}: unexpected argument to 'vnc'")
    vm = vmtree.pick(ctx.cfg, ctx.uid, name)
    if monitor.qemu_pid(vm, ctx.cfg.qemu) is None:
        raise RuntimeFailure(f"VM {vm.name!r} is not running (start it with -vnc :0)")
    if not os.path.exists(vm.file(launcher.VNC_SOCKET)):
        raise RuntimeFailure(f"VM {vm.name!r} has no display (start it with -vnc :0)")
    if os.isatty(1):
        raise UsageError("vnc: stdout is a terminal; this verb is a transport for a VNC "
                         "client (see the README: kvmshell-vncviewer)")
    sock = unix_connect(vm.path, launcher.VNC_SOCKET, "VNC display")
    try:
        relay(sock)
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        sock.close()
    return 0
