"""Launch a VM: build QEMU's argv, start it under a per-VM supervisor.

Steps, each explicit: lock, open files, limits, network up, spawn, wait
for QMP, detach.  The supervisor is a small process of the VM user's own
that outlives the SSH session: it holds the VM lock (on the VM directory,
see common/runstate.py; QEMU holds one of its own), keeps the bounded
console log, waits for QEMU and tears down what start set up, however
QEMU ends.
"""

from __future__ import annotations

import os
import sys
TYPE_CHECKING = False  # not "from typing": that import alone costs ~10 ms

from kvmshell.shell import limits
from kvmshell.common import adminopts
from kvmshell.common import optable
from kvmshell.common import runstate
from kvmshell.shell import useropts
from kvmshell.common.config import Config
from kvmshell.common.errors import RefusedOption, RuntimeFailure, TreeError, UsageError
from kvmshell.common.vmtree import VM

if TYPE_CHECKING:
    import subprocess

# The serial line is a pair of FIFOs, serial.in and serial.out (QEMU's
# "pipe" chardev).  Why not a socket: QEMU writes the UART byte by byte, and
# a unix socket holds only a few hundred one-byte writes before QEMU stalls
# the guest; a pipe packs them into 64 KiB, so the console never slows the
# guest down unless it is really flooding.
SERIAL_PIPE = "serial"
CONSOLE_SOCKET = "console.sock"   # kvmshell.conmux serves clients here
CONSOLE_LOG = "console.log"
QEMU_LOG = "qemu.log"
VNC_SOCKET = "vnc.sock"
# What one run of a VM leaves in its directory, removed before and after.
RUNTIME_FILES = ("qmp.sock", VNC_SOCKET, CONSOLE_SOCKET,
                 SERIAL_PIPE + ".in", SERIAL_PIPE + ".out")
READY_TIMEOUT = 60.0

SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


def admin_plan(vm: VM) -> adminopts.AdminPlan:
    try:
        return adminopts.parse_admin(vm.admin_words)
    except UsageError as exc:
        raise TreeError(f"VM {vm.name}: its identifier holds options kvmshell refuses: "
                        f"{exc.message} (admin: kvmadm set)") from exc


def host_check(cfg: Config, vm: VM, plan: adminopts.AdminPlan) -> None:
    """The admin's hardware options against this host, at start: -smp under
    max_smp (else the admin must act), -cpu host only where this user can
    use KVM (opened as QEMU would, common/kvmdev.py), the OVMF images present
    for -firmware efi."""
    kvm = None
    if plan.cpu == optable.CPU_HOST:
        from kvmshell.common import kvmdev
        kvm = kvmdev.open_error() is None
    try:
        adminopts.check_host(plan, cfg, kvm=kvm)
    except UsageError as exc:
        raise TreeError(f"VM {vm.name}: {exc.message} (admin: kvmadm set, or max_smp)") from exc


def wrapper_argv(cfg: Config, vm: VM, accels: list[str] | None = None,
                 plan: adminopts.AdminPlan | None = None) -> list[str]:
    """The wrapper's own options: sandbox, machine (the admin's -M, default
    pc), accelerators (*accels*, as :func:`kvmshell.shell.accel.choose`
    picked them; default: the config's), monitor, console."""
    argv = [cfg.qemu, "-name", f"guest={vm.name}",
            "-nodefaults", "-no-user-config",
            "-sandbox", SANDBOX,
            "-machine", plan.machine if plan is not None else "pc"]
    accels = cfg.accel if accels is None else accels
    if plan is not None and plan.cpu == optable.CPU_HOST:
        accels = [a for a in accels if a == "kvm"]  # never a silent fallback to TCG
    for accel in accels:
        # An explicit translation buffer: QEMU's default reserves 1 GiB of
        # address space, more than the cap limits.py puts on QEMU.
        argv += ["-accel", f"tcg,tb-size={limits.TB_SIZE_MIB}" if accel == "tcg" else accel]
    # Relative paths: QEMU runs in the VM directory, whose absolute path may
    # be longer than a unix socket address allows.  No -pidfile: QEMU is
    # found by its lock on the VM directory (runstate.py), not by a file.
    argv += ["-chardev", "socket,id=qmp,path=qmp.sock,server=on,wait=off",
             "-mon", "chardev=qmp,mode=control",
             "-chardev", f"pipe,id=serial0,path={SERIAL_PIPE}",
             "-serial", "chardev:serial0",
             "-display", "none"]
    return argv


def build_argv(cfg: Config, vm: VM, plan: adminopts.AdminPlan, req: useropts.UserRequest,
               opened: dict[str, useropts.Opened], tap_fds: list[int],
               accels: list[str] | None = None,
               fw_fds: tuple[int, list[int]] | None = None) -> list[str]:
    return (wrapper_argv(cfg, vm, accels, plan)
            + adminopts.admin_argv(plan, vm.name, tap_fds, fw_fds)
            + useropts.user_argv(req, opened, VNC_SOCKET, plan.disk_interface, plan.machine))


def open_files(cfg: Config, vm: VM, req: useropts.UserRequest) -> dict[str, useropts.Opened]:
    """Open every file of *req* as the user (see files.py); under
    ``-snapshot``, disks are opened read-only and each gets a temporary
    qcow2 overlay on top, made here (QEMU's own -snapshot does not apply to
    a -blockdev graph)."""
    from kvmshell.shell import files

    opened: dict[str, useropts.Opened] = {}
    snapshot = req.has("-snapshot")
    seen: dict[tuple[int, int], tuple[str, bool]] = {}   # this start's images (files.open_file)
    try:
        for opt, value in req.files():
            write = opt.kind == optable.DISK and not snapshot
            image = opt.kind in (optable.DISK, optable.CDROM)
            of = files.open_file(opt.name, value, vmdir=vm.path, image_dirs=cfg.image_dirs,
                                 uid=os.getuid(), write=write, image=image, seen=seen)
            opened[opt.name] = of
            if snapshot and opt.kind == optable.DISK:
                from kvmshell.shell import imgtool
                fd, ro = imgtool.temp_overlay(cfg, vm.path, of.size)
                opened[opt.name] = useropts.Opened(fd, "qcow2", False, ro, size=of.size,
                                                   backing=of, label=f"{value} (-snapshot)")
    except BaseException:
        for of in opened.values():
            for fd in of.all_fds():
                os.close(fd)
        raise
    return opened


def clean_env(vm: VM) -> dict[str, str]:
    # Why: nothing of the user's environment (LD_PRELOAD, TMPDIR, ...) reaches QEMU.
    # MALLOC_ARENA_MAX: fewer malloc arenas keep QEMU well inside its RLIMIT_AS.
    return {"PATH": "/usr/bin:/bin", "HOME": vm.path, "TMPDIR": vm.path, "LC_ALL": "C",
            "MALLOC_ARENA_MAX": "2"}


def start(cfg: Config, vm: VM, req: useropts.UserRequest,
          accels: list[str] | None = None) -> tuple[int, str | None]:
    """Start *vm* with the accelerators *accels* (default: the config's);
    return QEMU's pid once QMP answers, and the accelerator QEMU reports
    (QMP query-kvm: 'kvm' or 'tcg'; None if it did not say).  Nothing is
    left running or locked when this raises."""
    plan = admin_plan(vm)
    if req.has("-vnc") and plan.nographic:
        raise RefusedOption("-vnc: the administrator turned graphics off for this VM")
    if req.has("-hdachs") and plan.disk_interface != "ide":
        raise RefusedOption(f"-hdachs: a geometry is for IDE disks; this VM's disks are "
                            f"{plan.disk_interface}")
    host_check(cfg, vm, plan)
    if plan.taps and not os.path.exists(cfg.helper):
        raise RuntimeFailure(f"VM {vm.name} needs tap networking but {cfg.helper} is not installed")
    from kvmshell.shell import cgclient
    placing = None
    # The VM lock first: a running VM is refused as running, before its
    # files (which its QEMU holds) are looked at.
    passed = [runstate.lock(vm)]
    try:
        # Files next: a refused file must leave the VM directory untouched.
        opened = open_files(cfg, vm, req)
        passed += [fd for of in opened.values() for fd in of.all_fds()]
        # Limits (limits.py), with the VM locked and its files open: every
        # concurrent start of the user sees this one, and the files QEMU
        # gets are counted from their descriptors.
        limits.admit(cfg, vm, passed[0], passed[1:])
        runstate.share(passed[0])
        # The kernel's budget (cgclient.py): this process joins the user's
        # cgroup before it forks the supervisor; the request overlaps with
        # the firmware and network set-up below.
        placing = cgclient.begin(cfg, vm)
        fw_fds = None
        if plan.firmware == "efi":
            from kvmshell.shell import firmware
            fw_fds = firmware.open_firmware(cfg, vm)
            passed += [fw_fds[0], *fw_fds[1]]
        tap_fds: list[int] = []
        if plan.taps:
            from kvmshell.shell import netclient
            tap_fds = netclient.up(cfg, vm, expect=len(plan.taps))
            passed += tap_fds
        placed, placing = placing, None
        cgclient.finish(placed)
        argv = build_argv(cfg, vm, plan, req, opened, tap_fds, accels, fw_fds)
        return _spawn(cfg, vm, argv, passed, len(plan.taps),
                      limits.qemu_rlimits(cfg, plan.megs, _file_size_cap(cfg, vm, req, opened),
                                         limits.image_limit(cfg, vm.uid)))
    finally:
        cgclient.cancel(placing)
        for fd in passed:
            os.close(fd)


def _file_size_cap(cfg: Config, vm: VM, req: useropts.UserRequest,
                   opened: dict[str, useropts.Opened]) -> int | None:
    """The file-size cap for this start's QEMU (limits.file_size_cap), from
    the descriptors it gets: every image opened for writing -- under
    -snapshot, that is kvmshell's own temporary qcow2 overlay on each disk
    (open_files), so no overlay needs counting apart."""
    if not limits.image_limit(cfg, vm.uid):
        return None
    writable = [(of.fmt, os.fstat(of.fd)) for of in opened.values() if not of.readonly]
    return limits.file_size_cap(cfg, vm, writable, 0)


def _spawn(cfg: Config, vm: VM, argv: list[str], fds: list[int], taps: int,
           rlimits: list[tuple[int, int, int]] | None = None) -> tuple[int, str | None]:
    rfd, wfd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the supervisor
        code = 1
        try:
            os.close(rfd)
            os.setsid()
            code = _supervise(cfg, vm, argv, fds, taps, wfd, rlimits or [])
        except BaseException as exc:  # report, never unwind into the caller's code
            try:
                os.write(wfd, f"fail supervisor: {exc}".encode())
            except OSError:
                pass
        finally:
            os._exit(code)
    os.close(wfd)
    chunks = []
    while True:
        chunk = os.read(rfd, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(rfd)
    msg = b"".join(chunks).decode("utf-8", "replace")
    if msg.startswith("ok "):
        # The supervisor stays behind; it is re-parented when we exit.
        # "ok PID ACCEL": ACCEL is QMP's answer, "-" if it gave none.
        words = msg.split()
        accel = words[2] if len(words) > 2 and words[2] != "-" else None
        return int(words[1]), accel
    os.waitpid(pid, 0)
    raise RuntimeFailure(f"VM {vm.name} did not start: {msg[5:] if msg.startswith('fail ') else msg or 'supervisor died'}")


def _qemu_error(log: str, returncode: int | None = None) -> str:
    """QEMU's reason for exiting, from its log (qemulog.reason), escaped."""
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


def _supervise(cfg: Config, vm: VM, argv: list[str], fds: list[int], taps: int, ready_fd: int,
               rlimits: list[tuple[int, int, int]] | None = None) -> int:
    import subprocess
    import time

    os.chdir(vm.path)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    for leaf in RUNTIME_FILES:
        try:
            os.unlink(leaf)
        except FileNotFoundError:
            pass
    serial = []
    for leaf in (SERIAL_PIPE + ".out", SERIAL_PIPE + ".in"):
        os.mkfifo(leaf, 0o600)
        # O_RDWR: never blocks, and the pipe lives as long as the supervisor.
        serial.append(os.open(leaf, os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC))
    log = os.open(QEMU_LOG, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    caps = list(rlimits or [])

    def in_qemu() -> None:
        # Why here: the caps are set before exec, so QEMU never runs
        # uncapped; and QEMU's own share of the VM lock carries QEMU's pid.
        limits.apply(caps)
        runstate.take_own_share(fds[0])

    proc = subprocess.Popen(argv, pass_fds=fds, env=clean_env(vm), cwd=vm.path,
                            stdin=devnull, stdout=log, stderr=log, close_fds=True,
                            preexec_fn=in_qemu)
    for fd in fds:
        if fd != fds[0]:  # the supervisor keeps the lock, QEMU keeps the rest
            os.close(fd)
    deadline = time.monotonic() + READY_TIMEOUT
    try:
        from kvmshell.shell import conmux
        console = conmux.listen()   # before 'ok': 'start; console' must find it
        _wait_qmp(vm, proc, deadline, incoming="-incoming" in argv)
        from kvmshell.shell import accel
        got = accel.running(vm)   # for start's fallback notice
        try:
            os.write(ready_fd, f"ok {proc.pid} {got or '-'}".encode())
        except OSError:
            pass  # kvmshell (the SSH session) is gone: the VM runs on regardless
        os.close(ready_fd)
        ready_fd = -1
        conmux.serve(serial[0], serial[1], console, proc, vm.file(CONSOLE_LOG),
                     cfg.console_log_bytes)
        proc.wait()
        return 0
    except RuntimeFailure as exc:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if ready_fd >= 0:
            try:
                os.write(ready_fd, f"fail {exc.message}".encode())
            except OSError:
                pass  # nobody is left to tell
        return 1
    finally:
        if ready_fd >= 0:
            os.close(ready_fd)
        _teardown(cfg, vm, taps)


def _wait_qmp(vm: VM, proc: "subprocess.Popen[bytes]", deadline: float,
              incoming: bool = False) -> None:
    """QMP answering query-status means machine init finished.  With
    -loadvm (*incoming*), also wait until the saved state has been read, so
    that a state QEMU cannot load fails the start with QEMU's reason, and
    resume the guest: 'save' paused it, and the state carries that."""
    import time

    from kvmshell.common.errors import MonitorError
    from kvmshell.shell.monitor import qmp_command

    while True:
        if proc.poll() is not None:
            raise RuntimeFailure(_qemu_error(QEMU_LOG, proc.returncode))
        if time.monotonic() > deadline:
            raise RuntimeFailure("QEMU did not answer on its monitor"
                                 " (or did not finish loading the saved state)")
        try:
            status = qmp_command(vm, "query-status", timeout=2)
        except MonitorError:
            time.sleep(0.05)
            continue
        state = status.get("status") if isinstance(status, dict) else None
        if state == "inmigrate":
            time.sleep(0.05)
            continue
        if incoming and state == "paused":
            try:
                qmp_command(vm, "cont", timeout=10)
            except MonitorError as exc:
                raise RuntimeFailure(f"the saved state loaded but the VM did not resume: {exc}") from exc
        return


def _teardown(cfg: Config, vm: VM, taps: int) -> None:
    for leaf in RUNTIME_FILES:
        try:
            os.unlink(leaf)
        except FileNotFoundError:
            pass
    if taps:
        from kvmshell.shell import netclient
        try:
            # The taps are not persistent: QEMU's exit closed the last
            # descriptor and the kernel deleted them.  A root process runs
            # only if one is still there (a descriptor leaked to another
            # process, say), and then deletes it regardless of who holds it.
            if netclient.remaining(cfg, vm, taps):
                netclient.down(cfg, vm)
        except RuntimeFailure:
            pass  # logged by the helper; the next start's 'up' cleans up too
