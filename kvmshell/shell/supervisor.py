"""The per-VM supervisor: QEMU's parent for the VM's whole life.

It runs as the VM user and outlives kvmshell (the SSH session): it holds
the VM lock, relays the serial console and keeps its bounded log
(:mod:`kvmshell.shell.conmux`), and tears down what start set up once QEMU
is gone, however it ends.  Its life has two phases:

1. **Start** (:func:`wait_ready`), in the process ``start`` forked once
   it had laid out the run's files (:mod:`kvmshell.shell.launcher`): it
   forks QEMU, reports ``exec``, waits for QEMU's monitor to answer, then
   reports ``ok PID ACCEL`` (or ``fail REASON``) on a pipe to ``start``.
   Nothing new is loaded before QEMU's exec: this is the critical path of
   every start.
2. **Run** (:func:`main`): once QEMU is ready, that process execs this
   module as a program of its own, a fresh ``python3 -I -S`` that imports
   ``os`` and the console relay (and, at the very end, the network client),
   so each VM costs about 8 MB instead of the ~20 MB of a forked kvmshell.
   QEMU stays its child across the exec; the descriptors are inherited::

       python3 -I -S -c BOOT LIBDIR FIELDS...

   LIBDIR is the directory holding the ``kvmshell`` package this kvmshell
   was loaded from; FIELDS are :data:`FIELDS`, in order (:func:`command`).
   The working directory is the VM directory.
"""

from __future__ import annotations

import os
import time

from kvmshell.common.errors import RuntimeFailure

TYPE_CHECKING = False  # not "from typing": that import alone costs ~10 ms
if TYPE_CHECKING:
    from collections.abc import Callable

# What one run of a VM leaves in its directory, all relative to it: QEMU
# runs in the VM directory, whose absolute path may be longer than a unix
# socket address allows.
QMP_SOCKET = "qmp.sock"
# The serial line is a pair of FIFOs, serial.in and serial.out (QEMU's
# "pipe" chardev).  Why not a socket: QEMU writes the UART byte by byte, and
# a unix socket holds only a few hundred one-byte writes before QEMU stalls
# the guest; a pipe packs them into 64 KiB, so the console never slows the
# guest down unless it is really flooding.
SERIAL_PIPE = "serial"
CONSOLE_SOCKET = "console.sock"   # conmux serves clients here
CONSOLE_LOG = "console.log"
QEMU_LOG = "qemu.log"
VNC_SOCKET = "vnc.sock"
# Removed before and after each run.
RUNTIME_FILES = (QMP_SOCKET, VNC_SOCKET, CONSOLE_SOCKET,
                 SERIAL_PIPE + ".in", SERIAL_PIPE + ".out")
READY_TIMEOUT = 60.0          # seconds for QEMU to answer (and load a saved state)
INMIGRATE_POLL = 0.05         # seconds between query-status while a state loads

BACKLOG = 8                   # connections queued on console.sock and qmp.sock

# The supervisor's argv after LIBDIR, in this order.
FIELDS = ("lock_fd", "serial_out_fd", "serial_in_fd", "console_fd", "console_log_fd",
          "qemu_pid", "console_log_bytes", "taps", "config", "vm_name")
BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
        "from kvmshell.shell.supervisor import main; sys.exit(main(sys.argv[2:]))")


def libdir() -> str:
    """The directory the running ``kvmshell`` package was loaded from."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def command(python: str, fields: dict[str, str]) -> list[str]:
    """The supervisor's argv: *python* (the interpreter running kvmshell)
    isolated and without site, the boot line, LIBDIR, then *fields*
    (:data:`FIELDS`, every one present)."""
    return [python, "-I", "-S", "-c", BOOT, libdir()] + [fields[k] for k in FIELDS]


class Child:
    """QEMU, a child of this process (forked before the supervisor's exec,
    so ``subprocess`` never had it): what ``Popen`` offers that we use."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = 0   # reaped elsewhere: its status is unknown
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        while self.returncode is None:
            try:
                _, status = os.waitpid(self.pid, 0)
            except ChildProcessError:
                self.returncode = 0   # reaped elsewhere: its status is unknown
            except InterruptedError:
                continue
            else:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, 9)   # SIGKILL (the 'signal' module imports enum)
            except ProcessLookupError:
                pass


def qemu_error(log: str, returncode: int | None = None) -> str:
    """QEMU's reason for exiting, from its log (qemulog.reason: its fatal
    line, not its notices), escaped; *returncode* as Child.wait gives it."""
    from kvmshell.common.text import printable
    from kvmshell.shell import qemulog
    how = "QEMU exited"
    if returncode is not None and returncode < 0:
        import signal
        try:
            how = f"QEMU was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"QEMU was killed by signal {-returncode}"
    elif returncode:
        how = f"QEMU exited with status {returncode}"
    return printable(qemulog.reason(qemulog.read_lines(log), how), backslash=False)


# ---- the start handshake on QMP ---------------------------------------------------

class _JSONContext:
    """What CPython's C JSON scanner reads from its context: json.loads'
    defaults.  Why not ``json``: it imports ``re`` and costs ~1.4 MB in every
    supervisor; the scanner itself is the same C code json.loads runs."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name: str) -> float:
        return float(name.lower().replace("infinity", "inf"))


_JSON_SPACE = " \t\n\r"


def json_decoder() -> "Callable[[str], object]":
    """json.loads for one QMP line, from CPython's C scanner (ValueError
    on anything that is not one JSON value)."""
    try:
        from _json import make_scanner
    except ImportError:  # another Python: the json module then
        import json
        return json.loads
    # typeshed types the context as the scanner itself ("ducktype").
    scan = make_scanner(_JSONContext)  # type: ignore[arg-type]

    def loads(text: str) -> object:
        # As json.loads: JSON's whitespace around one value, nothing else.
        start = len(text) - len(text.lstrip(_JSON_SPACE))
        try:
            obj, end = scan(text, start)
        except StopIteration as exc:
            raise ValueError(f"not JSON at {exc.value}") from None
        if text[end:].strip(_JSON_SPACE):
            raise ValueError("text after the JSON value")
        return obj

    return loads


class _QMP:
    """The three exchanges ``start`` needs, on a connection made before QEMU
    ran: the greeting, ``qmp_capabilities``, ``query-status`` (and ``cont``
    after a saved state).  Blocking on poll(2) with QEMU's pidfd, so an
    answer or QEMU's exit wakes it at once: no polling interval.  Everything
    else on QMP goes through qemu.qmp (:mod:`kvmshell.shell.monitor`); its
    asyncio would cost every supervisor ~20 ms and ~10 MB."""

    def __init__(self, fd: int, qemu: Child, deadline: float) -> None:
        import select

        self.fd = fd
        self.qemu = qemu
        self.deadline = deadline
        self.buf = b""
        self.loads = json_decoder()
        self.poll = select.poll()
        self.poll.register(fd, select.POLLIN)
        self.pidfd = os.pidfd_open(qemu.pid)
        self.poll.register(self.pidfd, select.POLLIN)
        os.set_blocking(fd, False)

    def close(self) -> None:
        os.close(self.pidfd)
        os.close(self.fd)

    def _gone(self) -> RuntimeFailure:
        return RuntimeFailure(qemu_error(QEMU_LOG, self.qemu.wait()))

    def wait(self, seconds: float) -> bool:
        """Sleep up to *seconds*; True if QMP has bytes (False on timeout).
        Raises RuntimeFailure once QEMU is gone or the deadline passed."""
        left = min(seconds, self.deadline - time.monotonic())
        if left <= 0:
            raise RuntimeFailure("QEMU did not answer on its monitor"
                                  " (or did not finish loading the saved state)")
        events = self.poll.poll(int(left * 1000) + 1)
        if any(fd == self.pidfd for fd, _ in events):
            raise self._gone()
        return bool(events)

    def message(self) -> dict[str, object]:
        """The next JSON object QEMU sends (one per line)."""
        while b"\n" not in self.buf:
            if not self.wait(READY_TIMEOUT):
                continue
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                # QEMU closed the monitor: it is exiting.  Wait for that
                # alone (wait() raises once QEMU is gone, or at the deadline).
                self.poll.unregister(self.fd)
                while True:
                    self.wait(READY_TIMEOUT)
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            msg = self.loads(line.decode("utf-8", "replace"))
        except ValueError as exc:
            raise RuntimeFailure(f"QEMU's monitor sent something not QMP: {exc}") from None
        if not isinstance(msg, dict):
            raise RuntimeFailure("QEMU's monitor sent something not QMP")
        return msg

    def send(self, *commands: str) -> None:
        """Queue *commands* (no arguments), in order, without waiting."""
        os.write(self.fd, b"".join(b'{"execute": "%s"}\n' % c.encode() for c in commands))

    def answer(self, command: str) -> object:
        """The ``return`` value of the next reply (to *command*, the oldest
        one sent and not yet answered: QMP answers in order)."""
        while True:
            msg = self.message()
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                err = msg["error"]
                desc = err.get("desc") if isinstance(err, dict) else err
                raise RuntimeFailure(f"QMP {command}: {desc}")
            # an event ({"event": ...}): not the answer

    def execute(self, command: str) -> object:
        """Run *command* (no arguments); its ``return`` value."""
        self.send(command)
        return self.answer(command)

    def ready(self, incoming: bool) -> object:
        """Return once QEMU's machine init is done (QMP answers query-status);
        with *incoming*, once the saved state has been read, and the guest
        resumed: 'save' paused it, and the state carries that.  Returns
        QEMU's answer to ``query-kvm`` (None if it gave none), for start's
        accelerator notice (:mod:`kvmshell.shell.accel`).

        The three first commands are sent at once, before the greeting: QMP
        reads them in order once it has greeted, so the answers come back
        to back, with no round trip each (the spec's negotiation still
        holds: qmp_capabilities is the first command QEMU reads)."""
        self.send("qmp_capabilities", "query-status", "query-kvm")
        while "QMP" not in self.message():   # the greeting
            pass
        self.answer("qmp_capabilities")
        status = self.answer("query-status")
        try:
            kvm = self.answer("query-kvm")
        except RuntimeFailure:
            kvm = None      # the VM runs; start just cannot say which accelerator
        while True:
            state = status.get("status") if isinstance(status, dict) else None
            if state != "inmigrate":
                break
            self.wait(INMIGRATE_POLL)
            status = self.execute("query-status")
        if incoming and state == "paused":
            try:
                self.execute("cont")
            except RuntimeFailure as exc:
                raise RuntimeFailure(f"the saved state loaded but the VM did not resume: {exc}") \
                    from None
        return kvm


# ---- the two phases ---------------------------------------------------------------

def wait_ready(qmp_fd: int, qemu: Child, incoming: bool) -> object:
    """Phase 1's wait: return once QEMU's monitor answered on *qmp_fd* (a
    connection made before QEMU ran; closed here), with QEMU's answer to
    ``query-kvm`` (None if none); raise RuntimeFailure with the reason,
    QEMU killed and reaped, otherwise."""
    try:
        qmp = _QMP(qmp_fd, qemu, time.monotonic() + READY_TIMEOUT)
        try:
            return qmp.ready(incoming)
        finally:
            qmp.close()
    except BaseException:
        qemu.kill()
        qemu.wait()
        raise


def teardown(config_path: str, vm_name: str, taps: int) -> None:
    """Remove the run's files (the working directory is the VM directory);
    have the helper delete any tap of the VM still there."""
    for leaf in RUNTIME_FILES:
        try:
            os.unlink(leaf)
        except FileNotFoundError:
            pass
    if not taps:
        return
    from kvmshell.common import config
    from kvmshell.common.errors import KvmshellError
    from kvmshell.common.vmtree import VM
    from kvmshell.shell import netclient
    try:
        cfg = config.load(config_path)
        vm = VM(cfg.vmdir, vm_name, os.path.basename(os.getcwd()), os.getuid(), [])
        # The taps are not persistent: QEMU's exit closed the last
        # descriptor and the kernel deleted them.  A root process runs
        # only if one is still there (a descriptor leaked to another
        # process, say), and then deletes it regardless of who holds it.
        if netclient.remaining(cfg, vm, taps):
            netclient.down(cfg, vm)
    except (KvmshellError, OSError):
        pass  # logged by the helper; the next start's 'up' cleans up too


def main(argv: list[str]) -> int:
    """Phase 2, the VM's life (see the module's docstring for *argv*):
    relay the console until QEMU goes, reap it, tear down.  The lock (its
    descriptor) is held by staying open until this process exits."""
    if len(argv) != len(FIELDS):
        return 2
    a = dict(zip(FIELDS, argv))
    qemu = Child(int(a["qemu_pid"]))
    try:
        from kvmshell.shell import conmux
        conmux.serve(int(a["serial_out_fd"]), int(a["serial_in_fd"]), int(a["console_fd"]),
                     qemu, CONSOLE_LOG, int(a["console_log_bytes"]), int(a["console_log_fd"]))
        qemu.wait()
        return 0
    except BaseException:  # a bug: QEMU must not run on unsupervised
        qemu.kill()
        qemu.wait()
        return 1
    finally:
        teardown(a["config"], a["vm_name"], int(a["taps"]))
        _clear_record(a["config"], a["vm_name"])


def _clear_record(config_path: str, vm_name: str) -> None:
    """Several hosts: empty the VM's owner record (common/lease.py) if it
    names this host; its lease is still held (this process has it open)."""
    from kvmshell.common import config, hosts, lease
    from kvmshell.common.errors import KvmshellError
    try:
        cfg = config.load(config_path)
        if hosts.load(cfg) is not None:
            lease.clear_record(cfg, vm_name, cfg.host_name)
    except (KvmshellError, OSError):
        pass    # informational: a stale record only biases the placement
