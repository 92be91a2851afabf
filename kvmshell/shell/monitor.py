"""Talking to a running VM: its pid, QMP, stop and kill.

Launch, QMP and shutdown are separate explicit steps (as in qemu.qmp's
machine class).  Cheap questions (is it running? which pid?) are answered
from /proc without QMP, so ``status`` stays fast.
"""

from __future__ import annotations

import os
import time

from kvmshell.common.errors import MonitorError
from kvmshell.common import runstate
from kvmshell.common.runstate import qemu_pid as qemu_pid
from kvmshell.common.runstate import started_at as started_at
from kvmshell.common.text import printable
from kvmshell.common.vmtree import VM

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

QMP_SOCKET = "qmp.sock"


def qmp_command(vm: VM, command: str, timeout: float = 5.0) -> object:
    """Run one QMP command through qemu.qmp's synchronous interface."""
    from qemu.qmp import QMPError
    from qemu.qmp.legacy import QEMUMonitorProtocol

    # The socket path may exceed sun_path's 108 bytes: use a relative name.
    os.chdir(vm.path)
    qmp = QEMUMonitorProtocol(QMP_SOCKET)
    try:
        qmp.connect(negotiate=True)
        qmp.settimeout(timeout)
        return qmp.cmd(command)
    except (QMPError, OSError, TimeoutError) as exc:
        raise MonitorError(f"{vm.name}: QMP {command} failed: {printable(str(exc))}") from exc
    finally:
        try:
            qmp.close()
        except Exception:  # closing a half-open socket must not hide the real error
            pass


def query(vm: VM, command: str, timeout: float = 2.0,
          arguments: dict[str, object] | None = None) -> object:
    """Run one QMP command (with *arguments*, if any) within *timeout*
    seconds in all; return its "return" value (a dict for query-* commands,
    a string for human-monitor-command).  Raises :class:`MonitorError`.

    Why not qemu.qmp, as :func:`qmp_command` uses: importing it (asyncio)
    costs ~65 ms, more than the rest of ``status`` together, and ``status``
    and ``list`` ask every running VM for its accelerator.  One query is
    the protocol's simplest exchange (QMP spec, docs/interop/qmp-spec.rst):
    the greeting, ``qmp_capabilities``, the command, each answered by one
    JSON object per line; asynchronous events in between are skipped.  The
    deadline covers connecting too: QMP serves one client at a time, so a
    long 'save' would otherwise hold a 'status' up.
    """
    import json
    import socket

    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    buf = b""

    def reply() -> dict[str, object]:
        nonlocal buf
        while True:
            line, nl, rest = buf.partition(b"\n")
            if nl:
                buf = rest
                msg = json.loads(line)
                if isinstance(msg, dict) and "event" not in msg:
                    return msg
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out")
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                raise EOFError("QEMU closed the monitor")
            buf += chunk

    try:
        sock.settimeout(timeout)
        os.chdir(vm.path)  # relative socket name, as in qmp_command
        sock.connect(QMP_SOCKET)
        if "QMP" not in reply():
            raise EOFError("no QMP greeting")
        for cmd in ("qmp_capabilities", command):
            req: dict[str, object] = {"execute": cmd}
            if cmd == command and arguments is not None:
                req["arguments"] = arguments
            sock.sendall(json.dumps(req).encode() + b"\n")
            msg = reply()
            if "return" not in msg:
                raise EOFError(f"{cmd}: {msg.get('error', msg)}")
        return msg["return"]
    except (OSError, EOFError, ValueError) as exc:  # TimeoutError is an OSError
        raise MonitorError(f"{vm.name}: QMP {command} failed: {exc}") from exc
    finally:
        sock.close()


SAVE_TIMEOUT = 300.0


def save(vm: VM, fd: int, commit: "Callable[[], None]", timeout: float = SAVE_TIMEOUT,
         paused: "Callable[[], object] | None" = None,
         resuming: "Callable[[], object] | None" = None) -> None:
    """Pause the VM and migrate its state into *fd*; then *commit* (which
    names the file) and have QEMU quit.  If anything fails the VM is
    resumed, so a failed save loses nothing.  *paused* runs once the guest
    is stopped, *resuming* before a failed save lets it run again."""
    from qemu.qmp import QMPError
    from qemu.qmp.legacy import QEMUMonitorProtocol

    os.chdir(vm.path)
    qmp = QEMUMonitorProtocol(QMP_SOCKET)
    stopped = False
    try:
        qmp.connect(negotiate=True)
        qmp.settimeout(10)
        qmp.send_fd_scm(fd)
        qmp.cmd("getfd", fdname="kvmshell-save")
        # A local file: no need for QEMU's network-friendly 128 MiB/s cap.
        qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        qmp.cmd("stop")
        stopped = True
        if paused is not None:
            paused()
        qmp.cmd("migrate", uri="fd:kvmshell-save")
        deadline = time.monotonic() + timeout
        while True:
            r = qmp.cmd("query-migrate")
            status = r.get("status") if isinstance(r, dict) else None
            if status == "completed":
                break
            if status in ("failed", "cancelled") or time.monotonic() > deadline:
                if status not in ("failed", "cancelled"):
                    qmp.cmd("migrate_cancel")
                why = r.get("error-desc", status or "no answer") if isinstance(r, dict) else r
                raise MonitorError(f"{vm.name}: saving the state failed: {printable(str(why))}")
            time.sleep(0.05)
        commit()
        stopped = False
        qmp.cmd("quit")
    except (QMPError, OSError, TimeoutError) as exc:
        raise MonitorError(f"{vm.name}: saving the state failed: {printable(str(exc))}") from exc
    finally:
        if stopped:
            if resuming is not None:
                resuming()
            try:
                qmp.cmd("cont")
            except Exception:  # the original error is the one to report
                pass
        try:
            qmp.close()
        except Exception:  # closing a half-open socket must not hide the real error
            pass


def wait_gone(vm: VM, timeout: float) -> bool:
    """Wait until nobody holds the VM's lock: QEMU has exited and its
    supervisor has cleaned up.  False if that takes over *timeout* s."""
    deadline = time.monotonic() + timeout
    while runstate.holders(vm):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop(vm: VM, pid: int, timeout: float) -> str:
    """ACPI power-down through QMP; a hard stop after *timeout* seconds."""
    qmp_command(vm, "system_powerdown")
    if wait_gone(vm, timeout):
        return "powered off"
    kill(vm, pid)
    return f"did not power off within {timeout:g}s: killed"


def kill(vm: VM, pid: int) -> None:
    import signal

    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    wait_gone(vm, 10)


class Session:
    """One QMP connection kept open for several commands, with the protocol
    of :func:`query` (greeting, ``qmp_capabilities``, one JSON object per
    line; events skipped).  ``connect`` uses it to add a forward, connect
    and remove the forward without reconnecting in between.  Raises
    :class:`MonitorError`."""

    def __init__(self, vm: VM, timeout: float = 5.0) -> None:
        import socket

        self.vm = vm
        self.buf = b""
        # Commands sent whose answers are not read yet (QMP answers in
        # order, one reply per command).
        self.owed = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        deadline = time.monotonic() + timeout
        try:
            self.sock.settimeout(timeout)
            os.chdir(vm.path)  # relative socket name, as in qmp_command
            self.sock.connect(QMP_SOCKET)
            if "QMP" not in self.reply(deadline):
                raise MonitorError(f"{vm.name}: no QMP greeting")
            self.send("qmp_capabilities")
            self.result(deadline)
        except BaseException:
            self.sock.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, command: str, arguments: dict[str, object] | None = None) -> None:
        import json
        req: dict[str, object] = {"execute": command}
        if arguments is not None:
            req["arguments"] = arguments
        try:
            self.sock.sendall(json.dumps(req).encode() + b"\n")
        except OSError as exc:
            raise MonitorError(f"{self.vm.name}: QMP {command} failed: {exc}") from exc
        self.owed += 1

    def pending(self) -> bool:
        """Whether a whole line is already buffered."""
        return b"\n" in self.buf

    def reply(self, deadline: float) -> dict[str, object]:
        """The next message that is not an event."""
        import json
        while True:
            line, nl, rest = self.buf.partition(b"\n")
            if nl:
                self.buf = rest
                try:
                    msg = json.loads(line)
                except ValueError as exc:
                    raise MonitorError(f"{self.vm.name}: QMP sent no JSON") from exc
                if isinstance(msg, dict) and "event" not in msg:
                    self.owed = max(self.owed - 1, 0)   # the greeting was owed nothing
                    return msg
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise MonitorError(f"{self.vm.name}: QMP timed out")
            try:
                self.sock.settimeout(left)
                chunk = self.sock.recv(65536)
            except OSError as exc:
                raise MonitorError(f"{self.vm.name}: QMP failed: {exc}") from exc
            if not chunk:
                raise MonitorError(f"{self.vm.name}: QEMU closed the monitor")
            self.buf += chunk

    def result(self, deadline: float) -> object:
        """The ``return`` of the next reply; MonitorError for an ``error``."""
        msg = self.reply(deadline)
        if "return" not in msg:
            raise MonitorError(f"{self.vm.name}: QMP: {msg.get('error', msg)}")
        return msg["return"]

    def close(self) -> None:
        self.sock.close()
