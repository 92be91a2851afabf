"""kvmshell-cgrouphelper: puts a starting VM in its owner's cgroup (root, via sudo).

Whole input: ``attach VM``, with stdin one end of a unix socketpair that the
calling process made.  Everything else it finds itself, in places the
caller cannot change: the host config at the fixed path :data:`CONFIG`, the
root-owned VM tree, the budget files under ``budgets``
(:mod:`kvmshell.common.budgets`), the group database, and the kernel:

* **who asks**: ``SUDO_UID`` (only sudo or root can have set it: this is
  not setuid), and the VM must be that user's;
* **which process**: the one that made the socketpair on stdin, as the
  kernel recorded it (``SO_PEERCRED``), never a number from the caller.  It
  must run as the user, and it is held by a pidfd from check to move, so a
  pid reused meanwhile is never moved.  kvmshell's ``start`` process asks
  before it forks the VM's supervisor, so the supervisor, QEMU and
  everything they start are born inside;
* **the limits**: from the user's budget (:class:`budgets.KernelLimits`).

``attach`` on a cgroup v1 host (``cgroup = cgroupfs``, or ``auto`` without
systemd) makes, under each of the memory, cpu and pids hierarchies,

    NAME/                     cpu.shares 1024: all VMs weigh as one busy process
    NAME/user-UID/            the user's budget: memory.limit_in_bytes,
                              cpu.shares, cpu.cfs_quota_us, pids.max
    NAME/user-UID/vm-VM/      the VM's group; the process goes here

(``NAME``: ``cgroup_name``), writes the limits at every attach (budget
files may have changed), moves the process, then removes the user's empty
VM groups.  The directories and their files are root's, so the user can
neither leave the group nor change a limit, whatever it does to kvmshell's
own files.  On a systemd host (``cgroup = systemd``, or ``auto`` when
``/run/systemd/system`` exists) it starts a transient scope
``kvmshell-VM-PID.scope`` in ``user-UID.slice`` holding the process, through
systemd's own ``busctl``; the slice's limits are the drop-ins ``kvmadm
slices`` writes from the same budgets.

Installed as a root-owned stub (see :mod:`kvmshell.admin.install`) that
sudo runs with ``python3 -I``; the stub fixes the config path.  Refusals:
one line on stderr, exit 2.  Failures: one line, exit 1.  Every action and
refusal goes to syslog (authpriv).  The caller's descriptors never hold it
(:mod:`kvmshell.privileged.guard`: a deadline, stdout and stderr set aside,
a bounded number of runs per user); stdin is never read.
"""

from __future__ import annotations

import os
import socket
import struct
import sys

from kvmshell.common import budgets, cgroups
from kvmshell.common.errors import KvmshellError
from kvmshell.privileged import caller, guard
from kvmshell.privileged.guard import Failed, Refused, log

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kvmshell.common.config import Config

CONFIG = "/etc/kvmshell/kvmshell.conf"
PROG = "kvmshell-cgrouphelper"
VERBS = ("attach",)
CONTROLLERS = cgroups.CONTROLLERS
BUSCTL = "/usr/bin/busctl"


# ---- the caller and the request --------------------------------------------

def check_request(argv: list[str], env: dict[str, str]) -> tuple[str, str, int]:
    """Return (verb, VM name, caller uid) or raise Refused (kvmshell.privileged.caller)."""
    uid = caller.sudo_caller(env)
    verb, name = caller.request(argv, PROG, "attach VM", VERBS)
    return verb, caller.vm_name(name), uid


def _uids(pid: int) -> list[int]:
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f.read(8192).split(b"\n"):
            if line.startswith(b"Uid:"):
                return [int(x) for x in line.split()[1:]]
    return []


def caller_process(uid: int, fd: int = 0) -> tuple[int, int]:
    """(pid, pidfd) of the process that made the socketpair on *fd*, as the
    kernel recorded it; it must run as *uid* (real, effective, saved, fs)."""
    sock = caller.unix_socket(fd, "stdin")
    try:
        pid, puid, _gid = struct.unpack("3i", sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    finally:
        sock.close()
    if pid <= 1 or puid != uid:
        raise Refused("the socket on stdin was not made by the calling user")
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        raise Refused(f"the process that made the socket (pid {pid}) is gone") from exc
    try:
        uids = _uids(pid)
    except OSError as exc:
        os.close(pidfd)
        raise Refused(f"the process that made the socket (pid {pid}) is gone") from exc
    if not uids or any(u != uid for u in uids):
        os.close(pidfd)
        raise Refused(f"pid {pid} does not run as uid {uid}")
    return pid, pidfd


def _alive(pidfd: int) -> bool:
    import signal
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        return False
    return True


# ---- cgroup v1 (cgroupfs) -------------------------------------------------------

def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _mkdir(path: str) -> None:
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if st.st_uid != 0:
        raise Failed(f"{path} is not root's")


def user_groups(mounts: dict[str, str], cfg: "Config", uid: int) -> dict[str, str]:
    """Controller -> the user's group directory (made if missing)."""
    out = {}
    for ctl in CONTROLLERS:
        base = os.path.join(mounts[ctl], cfg.cgroup_name)
        _mkdir(base)
        if ctl == "cpu":
            _write(os.path.join(base, "cpu.shares"), str(budgets.CPU_SHARES))
        out[ctl] = os.path.join(base, f"user-{uid}")
        _mkdir(out[ctl])
    return out


def set_limits(groups: dict[str, str], lim: budgets.KernelLimits) -> None:
    """Write the user's limits (v1 files; -1 / max: none)."""
    mem = os.path.join(groups["memory"], "memory.limit_in_bytes")
    try:
        _write(mem, str(lim.memory_bytes if lim.memory_bytes is not None else -1))
    except OSError as exc:
        # EBUSY: the user's VMs already use more than the new limit.
        raise Failed(f"cannot set the memory limit: {exc.strerror}") from exc
    cpu = groups["cpu"]
    _write(os.path.join(cpu, "cpu.shares"), str(lim.cpu_shares))
    _write(os.path.join(cpu, "cpu.cfs_period_us"), str(lim.cpu_period_us))
    _write(os.path.join(cpu, "cpu.cfs_quota_us"),
           str(lim.cpu_quota_us if lim.cpu_quota_us is not None else -1))
    _write(os.path.join(groups["pids"], "pids.max"), str(lim.pids))


def attach_cgroupfs(cfg: "Config", uid: int, name: str, pid: int, pidfd: int,
                    lim: budgets.KernelLimits) -> str:
    mounts = cgroups.v1_mounts()
    missing = [c for c in CONTROLLERS if c not in mounts]
    if missing:
        raise Failed(f"no cgroup v1 {missing[0]} hierarchy is mounted (admin: cgroup = systemd"
                     " on a systemd host, or cgroup = off)")
    groups = user_groups(mounts, cfg, uid)
    set_limits(groups, lim)
    leaf = f"vm-{name}"
    for ctl in CONTROLLERS:
        vmg = os.path.join(groups[ctl], leaf)
        _mkdir(vmg)
        if not _alive(pidfd):
            raise Refused(f"pid {pid} exited before it was placed")
        _write(os.path.join(vmg, "cgroup.procs"), str(pid))
    # The pidfd still names a live process, so the pid written was that
    # process's all along (a pid is reused only after its process is reaped).
    if not _alive(pidfd):
        raise Refused(f"pid {pid} exited while it was placed")
    for ctl in CONTROLLERS:
        _prune(groups[ctl], leaf)
    return f"{cfg.cgroup_name}/user-{uid}/{leaf}"


def _prune(user_dir: str, keep: str) -> None:
    """Remove the user's empty VM groups (a group with tasks is busy: EBUSY)."""
    for entry in os.scandir(user_dir):
        if entry.name.startswith("vm-") and entry.name != keep and entry.is_dir(follow_symlinks=False):
            try:
                os.rmdir(entry.path)
            except OSError:
                pass


# ---- systemd ---------------------------------------------------------------------

def scope_argv(uid: int, name: str, pid: int) -> list[str]:
    """busctl's call of systemd's StartTransientUnit (org.freedesktop.systemd1(5)):
    a scope holding *pid* in ``user-UID.slice``, as ``systemd-run --scope`` makes."""
    return [BUSCTL, "call", "--quiet", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager", "StartTransientUnit", "ssa(sv)a(sa(sv))",
            f"kvmshell-{name}-{pid}.scope", "fail", "3",
            "PIDs", "au", "1", str(pid),
            "Slice", "s", f"user-{uid}.slice",
            "Description", "s", f"kvmshell VM {name}",
            "0"]


def attach_systemd(uid: int, name: str, pid: int, pidfd: int) -> str:
    import subprocess
    r = subprocess.run(scope_argv(uid, name, pid), capture_output=True, text=True, timeout=30,
                       env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"}, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise Failed(f"systemd refused the scope: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    if not _alive(pidfd):
        raise Refused(f"pid {pid} exited while it was placed")
    return f"user-{uid}.slice/kvmshell-{name}-{pid}.scope"


# ---- the verb ----------------------------------------------------------------------

def run(argv: list[str], env: dict[str, str], config: str = CONFIG) -> int:
    verb, name, uid = check_request(argv, env)
    guard.hold_slot(PROG, uid)
    who = f"uid={uid} {verb} {name}"
    cfg = caller.host_config(config)
    caller.owned_vm(cfg.vmdir, name, uid)     # the VM exists and is the caller's
    how = cgroups.mode(cfg)
    if how == "off":
        raise Refused("kernel budgets are off on this host (cgroup = off)")
    pid, pidfd = caller_process(uid)
    try:
        try:
            lim = budgets.KernelLimits(budgets.resolve(cfg, uid), budgets.owned_count(cfg, uid))
        except KvmshellError as exc:
            raise Failed(exc.message) from exc
        if how == "systemd":
            where = attach_systemd(uid, name, pid, pidfd)
        else:
            where = attach_cgroupfs(cfg, uid, name, pid, pidfd, lim)
    finally:
        os.close(pidfd)
    log(f"{who}: pid {pid} placed in {where} ({lim.as_dict()})")
    return 0


def main(config: str = CONFIG) -> int:
    """The helper's entry point (the installed stub calls it); the exit status."""
    return guard.main(PROG, lambda _out: run(list(sys.argv), dict(os.environ), config))


if __name__ == "__main__":
    sys.exit(main())
