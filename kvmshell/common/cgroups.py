"""Where the kernel holds a user's budget: which cgroup mechanism, and its numbers.

Shared by the cgroup helper (root, which makes the groups), kvmshell's
``quota`` and kvmadm's ``usage`` (which only read them).  The layout is the
helper's (:mod:`kvmshell.privileged.cgrouphelper`):

  cgroupfs  ``MOUNT/NAME/user-UID/vm-VM`` under the v1 memory, cpu and pids
            hierarchies (MOUNT from /proc/self/mountinfo, NAME = ``cgroup_name``);
  systemd   ``user.slice/user-UID.slice`` on the unified hierarchy
            (/sys/fs/cgroup), its limits from ``kvmadm slices``.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kvmshell.common.config import Config

CONTROLLERS = ("memory", "cpu", "pids")
UNIFIED = "/sys/fs/cgroup"


def mode(cfg: "Config") -> str:
    """The enforcement in use: ``cgroupfs``, ``systemd`` or ``off``.

    ``auto`` is systemd where systemd is the init system, else cgroupfs where
    the v1 memory, cpu and pids hierarchies are mounted, else off (a host
    with neither, e.g. a container on a cgroup v2 host: kvmshell's own
    checks only, and ``quota``/``kvmadm usage`` say so).  An explicit
    ``cgroupfs`` or ``systemd`` is strict: a start fails where it cannot be had.
    """
    if cfg.cgroup != "auto":
        return cfg.cgroup
    if os.path.isdir("/run/systemd/system"):
        return "systemd"
    mounts = v1_mounts()
    return "cgroupfs" if all(c in mounts for c in CONTROLLERS) else "off"


def v1_mounts(mountinfo: str = "/proc/self/mountinfo") -> dict[str, str]:
    """Controller -> mount point of each cgroup v1 hierarchy of
    :data:`CONTROLLERS` (format: proc(5), /proc/pid/mountinfo)."""
    out: dict[str, str] = {}
    try:
        with open(mountinfo, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return out
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-")
        except ValueError:
            continue
        if len(fields) < sep + 4 or fields[sep + 1] != "cgroup":
            continue
        for opt in fields[sep + 3].split(","):
            if opt in CONTROLLERS:
                out.setdefault(opt, fields[4].replace("\\040", " "))
    return out


def user_dirs(cfg: "Config", uid: int) -> dict[str, str]:
    """Controller -> the user's cgroupfs group (it may not exist yet)."""
    return {ctl: os.path.join(mount, cfg.cgroup_name, f"user-{uid}")
            for ctl, mount in v1_mounts().items()}


def _read_int(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            text = f.read(64).strip()
    except OSError:
        return None
    if text == b"max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def kernel_view(cfg: "Config", uid: int) -> dict[str, object]:
    """What the kernel holds the user to now, and what the user's group uses:
    ``mode`` and, where the group exists, ``memory_limit_bytes``,
    ``memory_usage_bytes``, ``cpu_quota_us``, ``cpu_period_us``, ``pids_max``,
    ``pids_current`` (None: no limit)."""
    how = mode(cfg)
    view: dict[str, object] = {"mode": how, "group": None}
    if how == "cgroupfs":
        dirs = user_dirs(cfg, uid)
        mem, cpu, pids = dirs.get("memory"), dirs.get("cpu"), dirs.get("pids")
        if not mem or not os.path.isdir(mem):
            return view
        limit = _read_int(os.path.join(mem, "memory.limit_in_bytes"))
        # v1 reports "no limit" as the largest page-aligned number.
        view["memory_limit_bytes"] = None if limit is None or limit >= 1 << 62 else limit
        view["memory_usage_bytes"] = _read_int(os.path.join(mem, "memory.usage_in_bytes"))
        quota = _read_int(os.path.join(cpu, "cpu.cfs_quota_us")) if cpu else None
        view["cpu_quota_us"] = quota if quota is not None and quota > 0 else None
        view["cpu_period_us"] = _read_int(os.path.join(cpu, "cpu.cfs_period_us")) if cpu else None
        view["pids_max"] = _read_int(os.path.join(pids, "pids.max")) if pids else None
        view["pids_current"] = _read_int(os.path.join(pids, "pids.current")) if pids else None
        view["group"] = f"{cfg.cgroup_name}/user-{uid}"
    elif how == "systemd":
        d = os.path.join(UNIFIED, "user.slice", f"user-{uid}.slice")
        if not os.path.isdir(d):
            return view
        view["memory_limit_bytes"] = _read_int(os.path.join(d, "memory.max"))
        view["memory_usage_bytes"] = _read_int(os.path.join(d, "memory.current"))
        try:
            with open(os.path.join(d, "cpu.max"), "rb") as f:
                q, _, period = f.read(64).decode().partition(" ")
            view["cpu_quota_us"] = None if q == "max" else int(q)
            view["cpu_period_us"] = int(period)
        except (OSError, ValueError):
            view["cpu_quota_us"] = view["cpu_period_us"] = None
        view["pids_max"] = _read_int(os.path.join(d, "pids.max"))
        view["pids_current"] = _read_int(os.path.join(d, "pids.current"))
        view["group"] = f"user.slice/user-{uid}.slice"
    return view
