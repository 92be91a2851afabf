"""The ``quota`` verb: the caller's budgets, what their running VMs use, what is left.

    quota [--json]

The numbers are the ones ``start`` checks (shell/limits.py): the budgets
resolved from kvmshell.conf and the files under ``budgets``
(common/budgets.py), running VMs found as ``status`` finds them, RAM and
vCPUs read from the admin's words of each running VM, image bytes counted
as limits.py counts them.  The kernel's side (common/cgroups.py) is shown
as the kernel reports it.

JSON (one document)::

    {"user": "alice",
     "budgets": {"running":     {"used": 1, "limit": 2, "left": 1, "source": "default"},
                 "ram_mib":     {...}, "vcpus": {...}, "image_bytes": {...}},
     "running": ["web"],
     "kernel": {"mode": "cgroupfs", "group": "kvmshell/user-1001",
                "memory_limit_bytes": ..., "memory_usage_bytes": ...,
                "cpu_quota_us": ..., "cpu_period_us": ..., "pids_max": ..., "pids_current": ...}}

``limit`` and ``left`` are null where the budget is unlimited; ``source``
is ``default``, ``user NAME`` or ``group NAME``.  ``kernel`` has only
``mode`` and ``group`` null until the kernel holds a group for the user.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kvmshell.common.config import Config

# JSON name -> budget key
ROWS = (("running", "max_running"), ("ram_mib", "max_ram_mib"), ("vcpus", "max_vcpus"),
        ("image_bytes", "max_image_bytes"))


def report(cfg: "Config", uid: int) -> dict[str, object]:
    """The caller's usage and budgets as :data:`ROWS` (the JSON document above)."""
    from kvmshell.common import budgets, cgroups, vmtree
    from kvmshell.shell import limits

    b = limits.budget(cfg, uid)
    mine = vmtree.owned(cfg, uid)
    t = budgets.totals(mine)
    used = {"running": len(t.running), "ram_mib": t.ram_mib, "vcpus": t.vcpus,
            "image_bytes": limits.image_bytes(mine)}
    rows: dict[str, object] = {}
    for name, key in ROWS:
        limit = b[key] or None
        rows[name] = {"used": used[name], "limit": limit,
                      "left": None if limit is None else max(limit - used[name], 0),
                      "source": b.sources[key]}
    return {"user": b.user, "budgets": rows, "running": sorted(t.running),
            "kernel": cgroups.kernel_view(cfg, uid)}


def _mib(n: object) -> str:
    return f"{int(n) >> 20} MiB" if isinstance(n, int) else "no limit"


def text(doc: dict[str, object]) -> str:
    """The report for a terminal."""
    lines = [f"{'budget':<12} {'used':>14} {'limit':>14} {'left':>14}  set by"]
    rows = doc["budgets"]
    assert isinstance(rows, dict)
    for name, _key in ROWS:
        r = rows[name]
        limit = "unlimited" if r["limit"] is None else str(r["limit"])
        left = "-" if r["left"] is None else str(r["left"])
        lines.append(f"{name:<12} {r['used']:>14} {limit:>14} {left:>14}  {r['source']}")
    running = doc["running"]
    assert isinstance(running, list)
    lines.append("running VMs: " + (", ".join(running) if running else "none"))
    k = doc["kernel"]
    assert isinstance(k, dict)
    if k["mode"] == "off":
        lines.append("kernel: no cgroup limits on this host (cgroup = off, or none available)")
    elif k["group"] is None:
        lines.append(f"kernel ({k['mode']}): no group yet (made at your first start)")
    else:
        quota, period = k.get("cpu_quota_us"), k.get("cpu_period_us")
        cpus = (f"{quota / period:g} CPUs" if isinstance(quota, int) and isinstance(period, int)
                else "no limit")
        lines.append(f"kernel ({k['mode']} {k['group']}): memory {_mib(k.get('memory_usage_bytes'))}"
                     f" of {_mib(k.get('memory_limit_bytes'))}, CPU time {cpus}, tasks "
                     f"{k.get('pids_current')} of {k.get('pids_max') or 'no limit'}")
    return "\n".join(lines)
