"""The serial console multiplexer, run by the per-VM supervisor.

The supervisor is QEMU's only serial peer.  It keeps the bounded
``console.log`` (see :mod:`kvmshell.consolelog`) and serves console clients
on ``console.sock`` in the VM directory, conserver-style:

  * guest output goes to the log, to an in-memory replay ring, and to every
    client;
  * one client is the *writer*: only its bytes reach the guest.  Any number
    of *spies* only watch.  A second writer is refused and told who holds
    the console, unless it asks to ``force``: then the old writer is told
    who took over and is disconnected;
  * nothing blocks on a client: each has a bounded output buffer, and a
    client that falls behind loses output (it is told so), never the guest
    or the other clients;
  * a guest that floods is rate-limited by not reading its serial line
    for a moment (QEMU then stalls the guest's UART), and the log rotates,
    so neither the host's CPU nor its disk is the guest's to take.

Protocol, on ``console.sock``: the client sends one line

    attach writer|spy|force REPLAY WHO\\n

(REPLAY: bytes of recent output wanted; WHO: free text naming the session).
The server answers ``ok writer|spy\\n`` followed by up to REPLAY bytes of
replay and then live output, or ``busy WHO\\n`` and closes.  After the
answer the stream is raw bytes both ways.
"""

from __future__ import annotations

import _socket
import os
import select
import struct
import time
TYPE_CHECKING = False

from kvmshell.shell.consolelog import BoundedLog

if TYPE_CHECKING:
    from typing import Protocol

    class Process(Protocol):
        """QEMU as the supervisor holds it (``Popen`` would do too)."""
        pid: int

        def poll(self) -> int | None: ...

# Why _socket and poll(2), not socket and selectors: this runs in every VM's
# supervisor for the VM's whole life, and those two modules (enum, collections)
# would cost each one about 1 MB.  The subset used here is the same calls.
CONSOLE_SOCKET = "console.sock"
EVENT_READ = 1                    # selectors' values
EVENT_WRITE = 2
RING_BYTES = 256 * 1024           # replay ring: the most a client can ask for
CLIENT_BUFFER = 1024 * 1024       # per-client backlog before output is dropped
TO_GUEST_BUFFER = 64 * 1024       # writer bytes queued for the guest
MAX_CLIENTS = 32
HELLO_MAX = 512
HELLO_TIMEOUT = 5.0
FLOOD_RATE = 32 * 1024 * 1024     # bytes/s read from the guest at most
FLOOD_WINDOW = 0.05               # seconds: granularity of the rate limit
CHUNK = 65536


def clean_who(text: str) -> str:
    """Client-supplied text shown on other sessions' terminals: escaped
    (text.printable) and bounded, so no session can send escapes to another."""
    from kvmshell.common.text import printable
    return printable(text[:120]) or "?"


class Key:
    """A registered descriptor, as selectors.SelectorKey."""

    __slots__ = ("fileobj", "fd", "events", "data")

    def __init__(self, fileobj: "_socket.socket | int", fd: int, events: int,
                 data: object) -> None:
        self.fileobj = fileobj
        self.fd = fd
        self.events = events
        self.data = data


class Poller:
    """selectors.PollSelector's semantics, in the subset the multiplexer uses."""

    def __init__(self) -> None:
        self._poll = select.poll()
        self._map: dict[int, Key] = {}

    @staticmethod
    def _fd(fileobj: "_socket.socket | int") -> int:
        return fileobj if isinstance(fileobj, int) else fileobj.fileno()

    @staticmethod
    def _mask(events: int) -> int:
        return (select.POLLIN if events & EVENT_READ else 0) | \
            (select.POLLOUT if events & EVENT_WRITE else 0)

    def register(self, fileobj: "_socket.socket | int", events: int, data: object = None) -> None:
        fd = self._fd(fileobj)
        if fd in self._map:
            raise KeyError(f"{fd} is already registered")
        self._poll.register(fd, self._mask(events))
        self._map[fd] = Key(fileobj, fd, events, data)

    def unregister(self, fileobj: "_socket.socket | int") -> None:
        fd = self._fd(fileobj)
        del self._map[fd]
        self._poll.unregister(fd)

    def modify(self, fileobj: "_socket.socket | int", events: int, data: object = None) -> None:
        key = self._map[self._fd(fileobj)]
        self._poll.modify(key.fd, self._mask(events))
        key.events, key.data = events, data

    def get_map(self) -> dict[int, Key]:
        return self._map

    def select(self, timeout: float) -> list[tuple[Key, int]]:
        ms = max(0, -int(-timeout * 1000 // 1))     # rounded up, as selectors does
        ready = []
        for fd, event in self._poll.poll(ms):
            key = self._map.get(fd)
            if key is None:
                continue
            events = 0
            if event & ~select.POLLIN:
                events |= EVENT_WRITE
            if event & ~select.POLLOUT:
                events |= EVENT_READ
            if events & key.events:
                ready.append((key, events & key.events))
        return ready

    def close(self) -> None:
        self._map.clear()


class Client:
    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.mode = ""                # "" until the hello line is read
        self.who = "?"
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.closing = False          # close once outbuf is flushed
        self.since = time.monotonic()


class Mux:
    def __init__(self, serial_out: int, serial_in: int, listener: _socket.socket,
                 log: BoundedLog) -> None:
        self.serial = serial_out          # the guest's output (FIFO, read end)
        self.serial_in = serial_in        # the guest's input (FIFO, write end)
        self.listener = listener
        self.log = log
        self.ring = bytearray()
        self.to_guest = bytearray()
        self.clients: dict[int, Client] = {}
        self.writer: Client | None = None
        self.sel = Poller()
        self.uid = os.getuid()
        self.window_start = time.monotonic()
        self.window_bytes = 0
        self.paused_until = 0.0
        listener.setblocking(False)
        self.sel.register(listener, EVENT_READ)
        self.serial_events = 0
        self._serial_interest()

    # ---- selector bookkeeping ------------------------------------------
    def _serial_interest(self) -> None:
        ev = 0
        if time.monotonic() >= self.paused_until:
            ev |= EVENT_READ
        if self.to_guest:
            ev |= EVENT_WRITE
        if ev == self.serial_events:
            return
        for bit, fd in ((EVENT_READ, self.serial), (EVENT_WRITE, self.serial_in)):
            if ev & bit and not self.serial_events & bit:
                self.sel.register(fd, bit)
            elif self.serial_events & bit and not ev & bit:
                self.sel.unregister(fd)
        self.serial_events = ev

    def _client_interest(self, c: Client) -> None:
        ev = EVENT_WRITE if c.outbuf else 0
        # Back-pressure on the writer's keystrokes only (never on output).
        if not c.closing and (c.mode != "writer" or len(self.to_guest) < TO_GUEST_BUFFER):
            ev |= EVENT_READ
        key = self.sel.get_map().get(c.sock.fileno())
        if key is None:
            if ev:
                self.sel.register(c.sock, ev, c)
        elif not ev:
            self.sel.unregister(c.sock)
        elif key.events != ev:
            self.sel.modify(c.sock, ev, c)

    def _drop(self, c: Client) -> None:
        if c.sock.fileno() in self.sel.get_map():
            self.sel.unregister(c.sock)
        self.clients.pop(c.sock.fileno(), None)
        if self.writer is c:
            self.writer = None
        c.sock.close()

    # ---- output --------------------------------------------------------
    def _queue(self, c: Client, data: bytes) -> None:
        if len(c.outbuf) + len(data) > CLIENT_BUFFER:
            # Why: a client that does not read must not cost the guest or the
            # other sessions anything; it loses output and is told so.
            c.outbuf.clear()
            c.outbuf += b"\r\n[kvmshell: console output dropped: this session is too slow]\r\n"
        c.outbuf += data

    def _flush(self, c: Client) -> None:
        try:
            sent = c.sock.send(c.outbuf)
        except BlockingIOError:
            return
        except OSError:
            self._drop(c)
            return
        del c.outbuf[:sent]
        if c.closing and not c.outbuf:
            self._drop(c)

    def _from_guest(self) -> bool:
        try:
            data = os.read(self.serial, CHUNK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        now = time.monotonic()
        if now - self.window_start >= FLOOD_WINDOW:
            self.window_start, self.window_bytes = now, 0
        self.window_bytes += len(data)
        if self.window_bytes >= FLOOD_RATE * FLOOD_WINDOW:
            self.paused_until = self.window_start + FLOOD_WINDOW
        self.log.write(data)
        self.ring += data
        if len(self.ring) > RING_BYTES:
            del self.ring[:len(self.ring) - RING_BYTES]
        for c in list(self.clients.values()):
            if not c.mode or c.closing:
                continue
            if c.outbuf:
                self._queue(c, data)
                self._flush(c)
            else:
                try:
                    sent = c.sock.send(data)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    self._drop(c)
                    continue
                if sent < len(data):
                    self._queue(c, data[sent:])
            if c.outbuf and c.sock.fileno() in self.clients:
                self._client_interest(c)
        if self.paused_until:
            self._serial_interest()
        return True

    def _to_guest(self) -> bool:
        try:
            sent = os.write(self.serial_in, self.to_guest)
        except BlockingIOError:
            return True
        except OSError:
            return False
        del self.to_guest[:sent]
        if self.writer is not None:
            self._client_interest(self.writer)
        return True

    # ---- clients -------------------------------------------------------
    def _accept(self) -> None:
        try:
            # _socket's accept (socket.socket.accept wraps it the same way).
            fd, _ = getattr(self.listener, "_accept")()
        except (BlockingIOError, InterruptedError):
            return
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM, 0, fd)
        # Why: the VM directory is 0700, so only its owner can connect; check
        # the peer anyway, so a mode slip cannot hand the console to others.
        cred = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", cred)
        if uid != self.uid or len(self.clients) >= MAX_CLIENTS:
            sock.close()
            return
        sock.setblocking(False)
        c = Client(sock)
        self.clients[sock.fileno()] = c
        self._client_interest(c)

    def _hello(self, c: Client, line: bytes) -> None:
        words = line.decode("ascii", "surrogateescape").split(" ", 3)
        if len(words) < 3 or words[0] != "attach" or words[1] not in ("writer", "spy", "force") \
                or not (words[2].isascii() and words[2].isdigit()):
            c.outbuf += b"error bad hello\n"
            c.closing = True
            return
        want, replay = words[1], min(int(words[2]), RING_BYTES)
        c.who = clean_who(words[3] if len(words) > 3 else "")
        if want == "writer" and self.writer is not None:
            c.outbuf += f"busy {self.writer.who}\n".encode()
            c.closing = True
            return
        if want == "force" and self.writer is not None:
            old = self.writer
            # Announced to every watcher, as conserver does: the displaced
            # writer, and each spy (who sees the keystrokes change hands).
            self._queue(old, f"\r\n[kvmshell: console taken over by {c.who}]\r\n".encode())
            for spy in list(self.clients.values()):
                if spy.mode == "spy" and not spy.closing:
                    self._queue(spy, f"\r\n[kvmshell: console taken over by {c.who} "
                                     f"from {old.who}]\r\n".encode())
                    self._client_interest(spy)
            old.closing = True
            self.writer = None
            self._client_interest(old)
        c.mode = "spy" if want == "spy" else "writer"
        if c.mode == "writer":
            self.writer = c
        c.outbuf += f"ok {c.mode}\n".encode()
        if replay:
            c.outbuf += self.ring[-replay:]
        rest = bytes(c.inbuf)
        c.inbuf.clear()
        if rest and c.mode == "writer":
            self.to_guest += rest

    def _from_client(self, c: Client) -> None:
        try:
            data = c.sock.recv(CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(c)
            return
        if not c.mode:
            c.inbuf += data
            nl = c.inbuf.find(b"\n")
            if nl < 0:
                if len(c.inbuf) > HELLO_MAX:
                    self._drop(c)
                return
            line, rest = bytes(c.inbuf[:nl]), bytes(c.inbuf[nl + 1:])
            c.inbuf[:] = rest
            self._hello(c, line)
            return
        if c is self.writer:
            self.to_guest += data
        # A spy's keystrokes are read and discarded: only the writer types.

    # ---- main loop -----------------------------------------------------
    def run(self, proc: "Process") -> None:
        last_chores = 0.0
        # The FIFOs never reach EOF (the supervisor holds both ends), so
        # QEMU's exit is watched through a pidfd: teardown (and the lock's
        # release) follows at once.
        try:
            pidfd = os.pidfd_open(proc.pid)
        except OSError:
            pidfd = -1
        else:
            self.sel.register(pidfd, EVENT_READ)
        try:
            self._loop(proc, pidfd, last_chores)
        finally:
            if pidfd >= 0:
                self.sel.unregister(pidfd)
                os.close(pidfd)

    def _loop(self, proc: "Process", pidfd: int, last_chores: float) -> None:
        while True:
            now = time.monotonic()
            timeout = 0.5
            if self.paused_until > now:
                timeout = min(timeout, self.paused_until - now)
            chores = False
            for key, mask in self.sel.select(timeout):
                if key.fileobj == self.serial:
                    if not self._from_guest():
                        return
                    continue
                if key.fileobj == pidfd:
                    last_chores = 0.0          # run the chores now: they see QEMU gone
                    continue
                if key.fileobj == self.serial_in:
                    chores = True
                    if not self._to_guest():
                        return
                    continue
                chores = True
                if key.fileobj is self.listener:
                    self._accept()
                    continue
                c = key.data
                assert isinstance(c, Client)
                if c.sock.fileno() < 0 or c.sock.fileno() not in self.clients:
                    continue
                if mask & EVENT_WRITE:
                    self._flush(c)
                if mask & EVENT_READ and c.sock.fileno() in self.clients:
                    self._from_client(c)
            now = time.monotonic()
            # The hot path is guest output alone: it keeps its own selector
            # state up to date, so the chores run only when something else
            # happened, or twice a second (hello timeouts, QEMU gone, pauses).
            if chores or self.to_guest or now - last_chores >= 0.5 or self.paused_until \
                    or last_chores == 0.0:
                last_chores = now
                for c in list(self.clients.values()):
                    if c.sock.fileno() < 0:
                        continue
                    if not c.mode and now - c.since > HELLO_TIMEOUT:
                        self._drop(c)
                        continue
                    if c.outbuf and c.closing:
                        self._flush(c)
                    if c.sock.fileno() in self.clients:
                        self._client_interest(c)
                if self.paused_until and now >= self.paused_until:
                    self.paused_until = 0.0
                self._serial_interest()
                if proc.poll() is not None:
                    self.paused_until = 0.0
                    for _ in range(64):        # QEMU's last words, still in the pipe
                        try:
                            if not select_readable(self.serial) or not self._from_guest():
                                break
                        except OSError:
                            break
                    return

    def close(self) -> None:
        for c in list(self.clients.values()):
            try:
                c.sock.setblocking(True)
                c.sock.settimeout(0.5)
                c.sock.sendall(bytes(c.outbuf) + b"\r\n[kvmshell: the VM has stopped]\r\n")
            except OSError:
                pass
            self._drop(c)
        self.sel.close()
        self.listener.close()
        os.close(self.serial)
        os.close(self.serial_in)


def select_readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def serve(serial_out: int, serial_in: int, listener: int, proc: "Process", path: str,
          limit: int, log_fd: int = -1) -> None:
    """Multiplex the console until QEMU goes; the log is always kept.
    *listener*: the listening ``console.sock`` (a descriptor; this takes
    it); *log_fd*: *path* opened by consolelog.open_new, if it was."""
    log = BoundedLog(path, limit, log_fd)
    mux = Mux(serial_out, serial_in,
              _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM, 0, listener), log)
    try:
        mux.run(proc)
    finally:
        mux.close()
        log.close()
