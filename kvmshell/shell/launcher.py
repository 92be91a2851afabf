"""Launch a VM: build QEMU's argv, start it under a per-VM supervisor.

Steps, each explicit: lock, open files, limits, network up, spawn, wait
for QMP, detach.  The supervisor (:mod:`kvmshell.shell.supervisor`) is a
process of the VM user's own that outlives the SSH session: it holds the
VM lock (on the VM directory, see common/runstate.py; QEMU holds one of
its own), keeps the bounded console log, waits for QEMU and tears down
what start set up, however QEMU ends.

Everything before QEMU's exec is the start's critical path, so nothing
there loads what it need not: start lays out the run's files, forks the
supervisor, which forks QEMU at once, and only once QEMU's monitor has
answered does the supervisor exec its own small program for the VM's life.
"""

from __future__ import annotations

import os
import sys
TYPE_CHECKING = False  # not "from typing": that import alone costs ~10 ms
if TYPE_CHECKING:
    from collections.abc import Callable

from kvmshell.shell import limits
from kvmshell.common import adminopts
from kvmshell.common import optable
from kvmshell.common import runstate
from kvmshell.shell import useropts
from kvmshell.common.config import Config
from kvmshell.common.errors import RefusedOption, RuntimeFailure, TreeError, UsageError
from kvmshell.common.vmtree import VM, in_dir
from kvmshell.shell import supervisor

# The files of a run, named in one place (the supervisor's module).
from kvmshell.shell.supervisor import CONSOLE_LOG as CONSOLE_LOG
from kvmshell.shell.supervisor import CONSOLE_SOCKET as CONSOLE_SOCKET
from kvmshell.shell.supervisor import QEMU_LOG as QEMU_LOG
from kvmshell.shell.supervisor import QMP_SOCKET as QMP_SOCKET
from kvmshell.shell.supervisor import RUNTIME_FILES as RUNTIME_FILES
from kvmshell.shell.supervisor import SERIAL_PIPE as SERIAL_PIPE
from kvmshell.shell.supervisor import VNC_SOCKET as VNC_SOCKET

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


def wrapper_argv(cfg: Config, vm: VM, qmp_fd: int, accels: list[str] | None = None,
                 plan: adminopts.AdminPlan | None = None) -> list[str]:
    """The wrapper's own options: sandbox, machine (the admin's -M, default
    pc), accelerators (*accels*, as :func:`kvmshell.shell.accel.choose`
    picked them; default: the config's), monitor, console.  *qmp_fd*: the
    monitor's listening socket, bound by the launcher (:func:`_layout`)."""
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
    argv += ["-chardev", f"socket,id=qmp,fd={qmp_fd},server=on,wait=off",
             "-mon", "chardev=qmp,mode=control",
             "-chardev", f"pipe,id=serial0,path={SERIAL_PIPE}",
             "-serial", "chardev:serial0",
             "-display", "none"]
    return argv


def build_argv(cfg: Config, vm: VM, plan: adminopts.AdminPlan, req: useropts.UserRequest,
               opened: dict[str, useropts.Opened], tap_fds: list[int], qmp_fd: int,
               accels: list[str] | None = None,
               fw_fds: tuple[int, list[int]] | None = None,
               seed: useropts.Opened | None = None) -> list[str]:
    argv = (wrapper_argv(cfg, vm, qmp_fd, accels, plan)
            + adminopts.admin_argv(plan, vm.name, tap_fds, fw_fds)
            + useropts.user_argv(req, opened, VNC_SOCKET, plan.disk_interface, plan.machine))
    if seed is not None:
        from kvmshell.shell import cloudinit
        argv += cloudinit.seed_argv(seed, plan.machine)
    return argv


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
          accels: list[str] | None = None,
          meanwhile: "Callable[[], None] | None" = None) -> tuple[int, str | None]:
    """Start *vm* with the accelerators *accels* (default: the config's);
    return QEMU's pid once QMP answers, and the accelerator QEMU reports
    (QMP query-kvm: 'kvm' or 'tcg'; None if it did not say).  Nothing is
    left running or locked when this raises.  *meanwhile* runs while QEMU
    starts (after the fork, before the wait): the caller's preparations
    for what follows a start, off the start's critical path; what it
    raises is ignored."""
    plan = admin_plan(vm)
    if req.has("-vnc") and plan.nographic:
        raise RefusedOption("-vnc: the administrator turned graphics off for this VM")
    if req.has("-hdachs") and plan.disk_interface != "ide":
        raise RefusedOption(f"-hdachs: a geometry is for IDE disks; this VM's disks are "
                            f"{plan.disk_interface}")
    host_check(cfg, vm, plan)
    if plan.hosts and cfg.host_name not in plan.hosts:
        # Checked here, on the host that would run it: whoever routed the
        # command (docs/multihost.md), the pin holds.
        raise RuntimeFailure(f"VM {vm.name} runs only on host {', '.join(plan.hosts)} "
                             f"(its -host pin); this is {cfg.host_name}")
    if plan.taps and not os.path.exists(cfg.helper):
        raise RuntimeFailure(f"VM {vm.name} needs tap networking but {cfg.helper} is not installed")
    from kvmshell.shell import cgclient
    placing = None
    # The lease first (common/lease.py): a VM running on any host sharing
    # the tree is refused, naming that host.  Then this host's VM lock: a
    # running VM is refused as running, before its files (which its QEMU
    # holds) are looked at.
    from kvmshell.common import hosts, lease
    several = hosts.load(cfg) is not None
    held = lease.take(cfg, vm, cfg.host_name, required=several)
    spawning = False
    try:
        passed = [runstate.lock(vm)]
    except BaseException:
        if held is not None:
            os.close(held)
        raise
    try:
        # Files next: a refused file must leave the VM directory untouched.
        opened = open_files(cfg, vm, req)
        # The seed (cloudinit.py) takes -user-data's descriptor out of
        # *opened* and closes it: kvmshell's to read, never QEMU's.
        seed: useropts.Opened | None = None
        iid, store = "", False
        try:
            seed, iid, store = _cloud_init(cfg, vm, plan, req, opened)
        except BaseException:
            for of in opened.values():
                for fd in of.all_fds():
                    os.close(fd)
            raise
        passed += [fd for of in opened.values() for fd in of.all_fds()]
        files = passed[1:]
        passed += seed.fds if seed else []
        # Limits (limits.py), with the VM locked and its files open: every
        # concurrent start of the user sees this one, and the files QEMU
        # gets are counted from their descriptors (the seed is kvmshell's
        # sealed memfd, not the user's file: not counted).
        limits.admit(cfg, vm, passed[0], files)
        runstate.share(passed[0])
        if store:
            # Only now: a refused or concurrent start leaves the old id.
            from kvmshell.shell import cloudinit
            cloudinit.store_iid(vm, iid)
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
        with in_dir(vm.path):   # this process's business only: tests call start in theirs
            run = _layout(cfg, vm)
            try:
                try:
                    argv = build_argv(cfg, vm, plan, req, opened, tap_fds, run.qmp_listener,
                                      accels, fw_fds, seed)
                    rlimits = limits.qemu_rlimits(cfg, plan.megs,
                                                  _file_size_cap(cfg, vm, req, opened),
                                                  limits.image_limit(cfg, vm.uid))
                except BaseException:
                    supervisor.teardown(cfg.path, vm.name, 0)   # nothing forked yet
                    raise
                # Several hosts: QEMU shares the lease's open file
                # description, so that it stays held while QEMU runs,
                # whatever becomes of the supervisor.  Alone, the
                # supervisor holds it (it says nothing there).
                to_qemu = passed + ([held] if several and held is not None else [])
                spawning = True     # from here the supervisor clears the record
                return _spawn(cfg, vm, argv, to_qemu, run, len(plan.taps), rlimits,
                              meanwhile, (held, several))
            finally:
                run.close()
    finally:
        cgclient.cancel(placing)
        for fd in passed:
            os.close(fd)
        if held is not None:
            if several and not spawning:    # refused before QEMU: take()'s record goes
                lease.clear_record(cfg, vm.name, cfg.host_name)
            os.close(held)


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


def _cloud_init(cfg: Config, vm: VM, plan: adminopts.AdminPlan, req: useropts.UserRequest,
                opened: dict[str, useropts.Opened]) -> tuple[useropts.Opened | None, str, bool]:
    """The ``-cloud-init`` seed (or None), its instance-id and whether that
    id is new and must be stored.  The ``-user-data`` descriptor is taken
    out of *opened* and closed here: it is kvmshell's to read, never QEMU's."""
    ud = opened.pop("-user-data", None)
    try:
        if not req.has("-cloud-init"):
            return None, "", False
        from kvmshell.shell import cloudinit
        extra = cloudinit.parse_user_data(ud.fd, req.values["-user-data"] or "") if ud else None
        iid, store = cloudinit.instance_id(vm, req.values["-cloud-init"] == "new")
        return cloudinit.seed(cfg, vm, plan, iid, extra), iid, store
    finally:
        if ud is not None:
            for fd in ud.all_fds():
                os.close(fd)


def _spawn(cfg: Config, vm: VM, argv: list[str], fds: list[int], run: "_Run", taps: int,
           rlimits: list[tuple[int, int, int]],
           meanwhile: "Callable[[], None] | None" = None,
           lease: tuple[int | None, bool] = (None, False)) -> tuple[int, str | None]:
    """Fork the supervisor (:func:`_supervise`), QEMU its child (*lease*:
    the lease's descriptor, which the supervisor keeps, and whether several
    hosts share the tree, when it writes the owner record).  Return
    QEMU's pid and its accelerator (QMP query-kvm: 'kvm' or 'tcg'; None if
    it did not say) once the supervisor reports it ready; raise with QEMU's
    reason otherwise, with nothing left running."""
    rfd, wfd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    me = os.getpid()
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(rfd)
        os.close(wfd)
        supervisor.teardown(cfg.path, vm.name, 0)
        raise RuntimeFailure(f"VM {vm.name} did not start: cannot fork: {exc.strerror}") from exc
    if pid == 0:  # the supervisor
        try:
            _watch_parent(me)
            os.close(rfd)
            os.setsid()
            _supervise(cfg, vm, argv, fds, run, taps, wfd, rlimits, lease)
        except BaseException as exc:  # report, never unwind into the caller's code
            try:
                os.write(wfd, f"fail supervisor: {exc}".encode())
            except OSError:
                pass
        finally:
            os._exit(1)
    os.close(wfd)
    # The supervisor's report: "exec\n" once QEMU runs, then "ok PID ACCEL"
    # or "fail REASON"; only "fail ..." if QEMU never ran.
    data = b""
    while True:
        chunk = os.read(rfd, 4096)
        if not chunk:
            break
        data += chunk
        if meanwhile is not None and data.startswith(b"exec\n"):
            # Now, not before: until QEMU's exec this would take the CPU
            # from the supervisor.
            try:
                meanwhile()
            except Exception:  # a preparation only: the real step reports it
                pass
            meanwhile = None
    os.close(rfd)
    msg = data.removeprefix(b"exec\n").decode("utf-8", "replace")
    if msg.startswith("ok "):
        # The supervisor stays behind; it is re-parented when we exit.
        # "ok PID ACCEL": ACCEL is QMP's answer, "-" if it gave none.
        words = msg.split()
        accel = words[2] if len(words) > 2 and words[2] != "-" else None
        return int(words[1]), accel
    os.waitpid(pid, 0)
    raise RuntimeFailure(f"VM {vm.name} did not start: {msg[5:] if msg.startswith('fail ') else msg or 'supervisor died'}")


class _Run:
    """The descriptors of one run of a VM, made by :func:`_layout`."""

    def __init__(self) -> None:
        self.devnull = self.log = self.console = self.qmp_listener = self.qmp = -1
        self.console_log = -1
        self.serial: list[int] = []      # serial.out (the guest's output), serial.in

    def close(self) -> None:
        for fd in (self.devnull, *self.serial, self.log, self.console_log, self.console,
                   self.qmp_listener, self.qmp):
            if fd >= 0:
                os.close(fd)
        self.devnull = self.log = self.console = self.qmp_listener = self.qmp = -1
        self.console_log = -1
        self.serial = []


def _layout(cfg: Config, vm: VM) -> _Run:
    """Lay out the run's files in the VM directory, under the VM lock: the
    last run's files removed, the serial FIFOs, qemu.log, this run's empty
    console.log, console.sock (so that 'start; console' finds it) and
    qmp.sock with a connection to it.
    Done here, before the supervisor is forked, so that the forked
    supervisor runs as little as possible before QEMU's exec.  Called
    inside the VM directory (vmtree.in_dir): socket paths are relative, as
    the absolute one may be longer than a unix socket address allows."""
    run = _Run()
    try:
        run.devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        for leaf in RUNTIME_FILES:
            try:
                os.unlink(leaf)
            except FileNotFoundError:
                pass
        for leaf in (SERIAL_PIPE + ".out", SERIAL_PIPE + ".in"):
            os.mkfifo(leaf, 0o600)
            # O_RDWR: never blocks, and the pipe lives as long as the supervisor.
            run.serial.append(os.open(leaf, os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW
                                      | os.O_CLOEXEC))
        run.log = os.open(QEMU_LOG, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o600)
        # The console log of this run, empty, there once start returns.
        from kvmshell.shell import consolelog
        run.console_log = consolelog.open_new(CONSOLE_LOG)
        run.console = _unix_listener(CONSOLE_SOCKET)
        run.qmp_listener, run.qmp = _qmp_sockets()
    except BaseException:
        run.close()
        supervisor.teardown(cfg.path, vm.name, 0)
        raise
    return run


_parent_pidfd = -1


def _watch_parent(pid: int) -> None:
    """In the forked supervisor: keep a pidfd of kvmshell (*pid*), if it
    still runs, for :func:`_parent_gone`."""
    global _parent_pidfd
    if os.getppid() == pid:    # else kvmshell is already gone (we were re-parented)
        try:
            _parent_pidfd = os.pidfd_open(pid)
        except OSError:
            pass


def _parent_gone(timeout: float = 0.2) -> None:
    """Wait (at most *timeout* s) until kvmshell, told 'ok', has exited.
    Why: its last steps (print, exit) are the end of the user's wait, and
    the supervisor's exec of a fresh interpreter should not compete with
    them for the CPU.  Bounded: at the interactive prompt kvmshell stays,
    and the console waits for the supervisor's program meanwhile."""
    import select

    if _parent_pidfd >= 0:
        p = select.poll()
        p.register(_parent_pidfd, select.POLLIN)
        p.poll(int(timeout * 1000))
        os.close(_parent_pidfd)


def _unix_listener(path: str) -> int:
    """A unix stream socket bound to *path* (mode 0600) and listening: its fd."""
    import _socket

    old = os.umask(0o077)
    try:
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            s.bind(path)
            s.listen(supervisor.BACKLOG)
        except BaseException:
            s.close()
            raise
    finally:
        os.umask(old)
    return s.detach()


def _qmp_sockets() -> tuple[int, int]:
    """QMP's listening socket (QEMU gets it: ``fd=``) and a connection to it,
    made now, before QEMU runs (the supervisor's): (listener, client).

    Why: the supervisor learns that QEMU is ready from the greeting and the
    answers on a connection that already waits in the backlog, with no
    polling for the socket to appear and no connect retries."""
    import _socket

    lfd = _unix_listener(QMP_SOCKET)
    c = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        c.connect(QMP_SOCKET)   # a listening unix socket queues it at once
    except BaseException:
        c.close()
        os.close(lfd)
        raise
    return lfd, c.detach()


def _close_all_but(keep: list[int]) -> None:
    """Close every descriptor above 2 but *keep* (a close_range(2) per gap),
    whatever this process inherited from its caller."""
    low = 3
    for fd in sorted(set(keep)):
        if low < fd:
            os.closerange(low, fd)
        low = max(low, fd + 1)
    os.closerange(low, 1 << 20)   # fs.nr_open's default: no descriptor is higher


def _exec_qemu(argv: list[str], env: dict[str, str], keep: list[int], devnull: int, log: int,
               rlimits: list[tuple[int, int, int]], report: int) -> None:
    """In the forked child: cap, hand over exactly *keep*, exec QEMU.  Never
    returns.  *report* (close-on-exec) carries the reason if the exec fails."""
    try:
        # As subprocess does (restore_signals): Python ignores SIGPIPE and
        # SIGXFSZ, and an ignored signal stays ignored across exec.
        import _signal  # type: ignore[import-not-found]  # 'signal' imports enum: ~3 ms before QEMU
        for sig in (_signal.SIGPIPE, _signal.SIGXFSZ):
            _signal.signal(sig, _signal.SIG_DFL)
        # Why: the caps are set in the child before exec, so QEMU never runs
        # uncapped (with a file-size cap, apply ignores SIGXFSZ again).
        limits.apply(rlimits)
        # QEMU's own share of the VM lock (keep[0]), whose pid is QEMU's:
        # how runstate.py finds the VM's QEMU.
        runstate.take_own_share(keep[0])
        os.dup2(devnull, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        for fd in keep:
            os.set_inheritable(fd, True)
        _close_all_but(keep + [report])   # nothing else reaches QEMU
        os.execve(argv[0], argv, env)
    except BaseException as exc:
        try:
            os.write(report, f"cannot run QEMU ({argv[0]}): {exc}".encode())
        finally:
            os._exit(127)


def _fork_qemu(argv: list[str], env: dict[str, str], keep: list[int], devnull: int, log: int,
               rlimits: list[tuple[int, int, int]]) -> int:
    """Fork and exec QEMU (:func:`_exec_qemu`); return its pid once the exec
    has happened.  Why wait for it: as subprocess does, an exec failure is
    reported here, and while this process waits the child has the CPU to
    itself, which counts on a busy host."""
    rfd, wfd = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:
            _exec_qemu(argv, env, keep, devnull, log, rlimits, wfd)
        os.close(wfd)
        wfd = -1
        why = os.read(rfd, 4096)      # EOF: the exec closed the pipe
    finally:
        if wfd >= 0:
            os.close(wfd)
        os.close(rfd)
    if why:
        os.waitpid(pid, 0)
        raise RuntimeFailure(why.decode("utf-8", "replace"))
    return pid


def _supervise(cfg: Config, vm: VM, argv: list[str], fds: list[int], run: _Run, taps: int,
               ready_fd: int, rlimits: list[tuple[int, int, int]],
               lease: tuple[int | None, bool] = (None, False)) -> None:
    """The supervisor's start (in the forked child, in the VM directory):
    fork QEMU, wait until its monitor answers, report ``ok PID ACCEL`` on
    *ready_fd*, then exec the supervisor's program for the VM's life
    (:mod:`kvmshell.shell.supervisor`).  Reports ``fail REASON`` (QEMU
    killed, the run's files removed) if QEMU does not become ready."""
    qemu: supervisor.Child | None = None
    try:
        for fd in (0, 1, 2):
            os.dup2(run.devnull, fd)
        pid = _fork_qemu(argv, clean_env(vm), fds + [run.qmp_listener], run.devnull, run.log,
                         rlimits)
        qemu = supervisor.Child(pid)
        try:
            os.write(ready_fd, b"exec\n")
        except OSError:
            pass  # kvmshell (the SSH session) is gone: the VM starts regardless
        lease_fd, several = lease
        for fd in fds[1:] + [run.qmp_listener, run.log]:   # QEMU's now; the lock (fds[0]) stays
            if fd != lease_fd:                              # and so does the lease
                os.close(fd)
        if lease_fd is not None and several:                # say who runs the VM
            from kvmshell.common import lease as leases
            try:
                leases.write_record(cfg, vm.name, cfg.host_name, pid)
            except (OSError, TreeError):
                pass    # informational: the lock is what counts
        kvm = supervisor.wait_ready(run.qmp, qemu, incoming="-incoming" in argv)
    except BaseException as exc:
        if qemu is not None:
            qemu.kill()
            qemu.wait()
        supervisor.teardown(cfg.path, vm.name, taps)
        if lease[0] is not None and lease[1]:   # still held here: the record goes first
            from kvmshell.common import lease as leases
            leases.clear_record(cfg, vm.name, cfg.host_name)
        if isinstance(exc, RuntimeFailure):
            os.write(ready_fd, f"fail {exc.message}".encode())
            os._exit(1)
        raise
    try:
        # "ok PID ACCEL": ACCEL is QMP's answer (query-kvm, asked on the
        # same connection), "-" if it gave none.
        from kvmshell.shell import accel
        got = accel.from_query_kvm(kvm) if kvm is not None else None
        os.write(ready_fd, f"ok {pid} {got or '-'}".encode())
    except OSError:
        pass  # kvmshell (the SSH session) is gone: the VM runs on regardless
    os.close(ready_fd)
    _parent_gone()
    fields = {"lock_fd": str(fds[0]), "serial_out_fd": str(run.serial[0]),
              "serial_in_fd": str(run.serial[1]), "console_fd": str(run.console),
              "console_log_fd": str(run.console_log),
              "qemu_pid": str(pid),
              "console_log_bytes": str(cfg.console_log_bytes), "taps": str(taps),
              "config": cfg.path, "vm_name": vm.name}
    keep = [fds[0], run.serial[0], run.serial[1], run.console, run.console_log]
    if lease[0] is not None:
        # The lease (common/lease.py) stays open in the supervisor's
        # program for the VM's life; nothing there needs to know it.
        keep.append(lease[0])
    for fd in keep:
        os.set_inheritable(fd, True)
    sup = supervisor.command(sys.executable or "/usr/bin/python3", fields)
    _close_all_but(keep)      # what kvmshell inherited from its caller stays behind
    try:
        # Why a clean environment: a fresh interpreter takes nothing from
        # the user's session (-I: no PYTHON* variables either).
        os.execve(sup[0], sup, {"PATH": "/usr/bin:/bin", "LC_ALL": "C"})
    except OSError:
        # The VM runs: supervise it from this (larger) process instead.
        os._exit(supervisor.main(sup[len(sup) - len(fields):]))
