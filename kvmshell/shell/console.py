"""``console [VM]``: attach the user's terminal to the VM's serial console.

The client side of :mod:`kvmshell.conmux`.  On a terminal it runs in raw
mode, detaches on the escape character (default Ctrl-], as in virsh) and
restores the terminal however it ends.  Without a terminal it is a plain,
transparent byte stream both ways (no escape character), so scripts can
drive the console; when its input ends it keeps copying the guest's output
until the console has been quiet for a moment (``--linger``), then leaves.

Window size: a serial line carries none.  kvmshell tells the user the
terminal's size and the ``stty rows R cols C`` line to type in the guest,
on attach and whenever the window changes; it never types into the guest
itself (the guest might be at a password prompt or in an editor).
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import stat
import sys

from kvmshell.common.errors import RuntimeFailure, UsageError
from kvmshell.common.text import printable

DEFAULT_REPLAY = 64 * 1024
DEFAULT_ESCAPE = 0x1D   # Ctrl-]
DEFAULT_LINGER = 2.0

# console's options, as data: option (with its value) -> what it does.
# 'help console' and kvmshell(1) read this; parse() below accepts them.
OPTIONS: dict[str, str] = {
    "--spy": "watch read-only; another session types",
    "--force": "take over the typing from the session that has it (it is told)",
    "--no-replay": "do not replay the console's recent output first",
    "--replay N": f"replay the last N bytes of output first (default {DEFAULT_REPLAY >> 10} KiB)",
    "--escape ^X": "detach with Ctrl-X instead of Ctrl-] (any control character)",
    "--linger S": "without a terminal: once the input ends, copy output until the "
                  f"console is quiet for S seconds (default {DEFAULT_LINGER:g})",
}
# What 'help console' says before and after the options (prose).
ABOUT = ("attach to the VM's serial console; the VM keeps running when you leave. "
         "Ctrl-] detaches.  One session types, the others watch.")
NOTES = ("Without a terminal the console is a plain byte stream (no escape character).  "
         "A serial line has no window size: type the 'stty rows R cols C' line shown "
         "on attach.")


def help_text() -> str:
    """'help console': the usage line, the options (OPTIONS) and the notes,
    in the layout of kvmshell.common.helptext (80 columns)."""
    import textwrap

    from kvmshell.common import helptext
    from kvmshell.shell.context import VERBS

    def para(text: str, indent: str) -> str:
        return "\n".join(textwrap.wrap(text, helptext.WIDTH, initial_indent=indent,
                                        subsequent_indent=indent, break_on_hyphens=False))
    return (f"usage: console {VERBS['console'][0]}\n{para(ABOUT, '  ')}\noptions:\n"
            + helptext.table(list(OPTIONS.items())) + "\n" + para(NOTES, ""))


class Options:
    def __init__(self) -> None:
        self.name: str | None = None
        self.mode = "writer"
        self.replay = DEFAULT_REPLAY
        self.escape = DEFAULT_ESCAPE
        self.linger = DEFAULT_LINGER


def _escape_char(value: str) -> int:
    if len(value) == 2 and value[0] == "^" and value[1].upper() in "@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_":
        return ord(value[1].upper()) ^ 0x40
    raise UsageError(f"--escape: {value!r}: expected ^X, a control character such as ^]")


def parse(args: list[str]) -> Options:
    o = Options()
    i = 0
    if args and not args[0].startswith("-"):
        o.name, i = args[0], 1
    while i < len(args):
        a = args[i]
        if a == "--spy":
            o.mode = "spy"
        elif a == "--force":
            o.mode = "force"
        elif a == "--no-replay":
            o.replay = 0
        elif a in ("--escape", "--replay", "--linger"):
            if i + 1 >= len(args):
                raise UsageError(f"{a}: missing value")
            v = args[i + 1]
            i += 1
            if a == "--escape":
                o.escape = _escape_char(v)
            elif a == "--replay":
                if not (v.isascii() and v.isdigit()) or len(v) > 9:
                    raise UsageError(f"--replay: {v!r}: expected a number of bytes")
                o.replay = int(v)
            else:
                if not (v.isascii() and v.isdigit()) or len(v) > 4 or int(v) > 3600:
                    raise UsageError(f"--linger: {v!r}: expected seconds (0-3600)")
                o.linger = float(v)
        else:
            raise UsageError(f"{a}: unexpected argument to 'console' (see 'help console')")
        i += 1
    if "--spy" in args and "--force" in args:
        raise UsageError("--force: cannot be combined with --spy")
    return o


def _who() -> str:
    tty = "notty"
    try:
        tty = os.ttyname(0).replace("/dev/", "")
    except OSError:
        pass
    who = f"pid {os.getpid()} on {tty}"
    client = os.environ.get("SSH_CLIENT", "").split(" ")[0]
    if client:
        who += f" from {client}"
    return who


def unix_connect(vmdir: str, leaf: str, what: str) -> socket.socket:
    """Connect to a socket in the VM directory, whose path may be longer
    than a socket address allows: connect relative to it."""
    from kvmshell.common.vmtree import in_dir
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with in_dir(vmdir):
            s.connect(leaf)
    except OSError as exc:
        s.close()
        raise RuntimeFailure(f"cannot reach the {what} ({exc.strerror})") from exc
    return s


def connect(vmdir: str, mode: str, replay: int) -> tuple[socket.socket, str]:
    """Connect and say hello; return the socket and the granted mode."""
    from kvmshell.shell.conmux import CONSOLE_SOCKET
    s = unix_connect(vmdir, CONSOLE_SOCKET, "console")
    s.sendall(f"attach {mode} {replay} {_who()}\n".encode())
    line = bytearray()
    while not line.endswith(b"\n"):
        b = s.recv(1)
        if not b:
            break
        line += b
        if len(line) > 512:
            break
    # The answer comes from whatever listens on console.sock in the user's
    # directory (the user's own QEMU could): shown escaped.
    answer = printable(line.decode("ascii", "surrogateescape").strip())
    if answer.startswith("ok "):
        return s, answer[3:]
    s.close()
    if answer.startswith("busy "):
        raise RuntimeFailure(f"the console is in use by {answer[5:]} "
                             "(--force takes it over, --spy only watches)")
    raise RuntimeFailure(f"the console refused the session ({answer or 'no answer'})")


def _winsize_hint() -> str:
    try:
        cols, rows = os.get_terminal_size(0)
    except OSError:
        return ""
    return f"window {cols}x{rows}: in the guest, 'stty rows {rows} cols {cols}' fits it"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def watch_stdin(sel: selectors.BaseSelector) -> bool:
    """Register stdin for reading; False if it cannot be waited on.  Only a
    tty, a pipe or a socket can: /dev/null, a regular file, a directory or a
    closed descriptor is treated as input that has already ended."""
    try:
        mode = os.fstat(0).st_mode
        if not (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            return False
        sel.register(0, selectors.EVENT_READ)
    except (OSError, ValueError):   # EPERM: /dev/null and the like; EBADF: closed
        return False
    return True


def relay(sock: socket.socket, escape: int | None, linger: float) -> str:
    """Copy stdin -> sock and sock -> stdout; return why it ended.  Raises
    RuntimeFailure if stdout cannot take the output."""
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    stdin_open = watch_stdin(sel)
    try:
        while True:
            events = sel.select(None if stdin_open else linger)
            if not events:
                return "input ended"
            for key, _ in events:
                if key.fileobj is sock:
                    data = sock.recv(65536)
                    if not data:
                        return "closed"
                    try:
                        _write_all(1, data)
                    except BrokenPipeError:
                        return "output closed"
                    except OSError as exc:
                        raise RuntimeFailure(f"console: cannot write to stdout: "
                                             f"{exc.strerror}") from exc
                else:
                    try:
                        data = os.read(0, 65536)
                    except OSError:
                        data = b""      # EIO: a terminal hung up
                    if not data:
                        stdin_open = False
                        sel.unregister(0)
                        continue   # no shutdown: the server ends a session on EOF
                    if escape is not None and escape in data:
                        data = data[:data.index(escape)]
                        if data:
                            sock.sendall(data)
                        return "detached"
                    sock.sendall(data)
    finally:
        sel.close()


def attach(vmdir: str, vm_name: str, o: Options) -> int:
    s, mode = connect(vmdir, o.mode, o.replay)
    if not os.isatty(0):
        try:
            relay(s, None, o.linger)
        finally:
            s.close()
        return 0
    import termios
    import tty

    esc = "^" + chr(o.escape ^ 0x40)
    err = sys.stderr
    err.write(f"Connected to the console of {vm_name} ({mode}"
              f"{', read-only' if mode == 'spy' else ''}).\r\n"
              f"Escape character is {esc}\r\n")
    hint = _winsize_hint()
    if hint:
        err.write(f"({hint})\r\n")
    err.flush()
    saved = termios.tcgetattr(0)

    def on_winch(_sig: int, _frame: object) -> None:
        h = _winsize_hint()
        if h:
            os.write(2, f"\r\n[kvmshell: {h}]\r\n".encode())

    old_winch = signal.signal(signal.SIGWINCH, on_winch)
    why = "closed"
    try:
        tty.setraw(0)
        why = relay(s, o.escape, o.linger)
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)
        signal.signal(signal.SIGWINCH, old_winch)
        s.close()
    if why == "detached":
        err.write(f"\nDetached from {vm_name}; the VM keeps running.\n")
    else:
        err.write(f"\nConsole of {vm_name} closed.\n")
    return 0


def main(ctx: object, args: list[str]) -> int:
    from kvmshell.shell.context import Context
    from kvmshell.shell import monitor
    from kvmshell.common import vmtree

    assert isinstance(ctx, Context)
    o = parse(args)
    vm = vmtree.pick(ctx.cfg, ctx.uid, o.name)
    if monitor.qemu_pid(vm, ctx.cfg.qemu) is None:
        raise RuntimeFailure(f"VM {vm.name!r} is not running (start it first)")
    return attach(vm.path, vm.name, o)
