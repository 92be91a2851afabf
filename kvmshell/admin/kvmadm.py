"""``kvmadm``: the admin's side of the VM tree (runs as root).

    kvmadm [--config PATH] create NAME --owner USER [-- ADMIN-OPTIONS...]
    kvmadm [--config PATH] list
    kvmadm [--config PATH] show NAME
    kvmadm [--config PATH] set NAME [-- ADMIN-OPTIONS...]
    kvmadm [--config PATH] remove NAME [--purge]
    kvmadm [--config PATH] adduser USER [--key FILE|-] [--no-kvm]
    kvmadm [--config PATH] setkey USER FILE|-
    kvmadm [--config PATH] check [--json] [--sysconfdir DIR]
    kvmadm [--config PATH] usage [--json]
    kvmadm [--config PATH] slices [--dir DIR]

The admin's options are validated against the admin class of the option
table before they become a directory name, exactly as kvmshell will read
them back, and against this host (``max_smp``, KVM for ``-cpu host``, OVMF
for ``-firmware efi``).

``usage`` shows every VM owner's budgets, use and kernel limits (the
numbers of the user's ``quota``).  ``slices`` writes, for systemd hosts, one
drop-in per VM owner, ``DIR/user-UID.slice.d/50-kvmshell.conf`` (DIR:
``/etc/systemd/system``), with MemoryMax, CPUWeight, CPUQuota and TasksMax
from the owner's budget, removes the drop-ins it wrote for users who no
longer own VMs, and reloads systemd if it runs.  Run it after changing
budgets or creating/removing VMs.
"""

from __future__ import annotations

import os
import stat
import sys

from kvmshell.common import adminopts
from kvmshell.common import vmid
from kvmshell.common import vmtree
from kvmshell.common.config import DEFAULT_PATH, Config, load
from kvmshell.common.errors import KvmshellError, RuntimeFailure, TreeError, UsageError
from kvmshell.common.text import printable

USAGE = __doc__.split("\n\n")[1] if __doc__ else ""


def _out(text: str) -> None:
    # The last safety net: nothing from the tree reaches the terminal raw.
    sys.stdout.write("\n".join(printable(line, backslash=False)
                               for line in text.split("\n")) + "\n")


def _err(line: str) -> None:
    sys.stderr.write(f"kvmadm: {printable(line, backslash=False)}\n")


def _split_dashdash(args: list[str]) -> tuple[list[str], list[str]]:
    if "--" in args:
        i = args.index("--")
        return args[:i], args[i + 1:]
    return args, []


def ensure_top(cfg: Config) -> None:
    """Create the top directory (root, 0755) if missing, then check it."""
    if not os.path.lexists(cfg.vmdir):
        os.makedirs(cfg.vmdir, mode=0o755, exist_ok=True)
        os.chmod(cfg.vmdir, 0o755)
    vmtree.check_top(cfg)


def _owner(user: str) -> tuple[int, int]:
    import pwd
    try:
        pw = pwd.getpwnam(user)
    except KeyError as exc:
        raise UsageError(f"--owner: no such user {user!r}") from exc
    if pw.pw_uid == 0:
        raise UsageError("--owner: VMs may not be owned by root")
    return pw.pw_uid, pw.pw_gid


def _replace_link(cfg: Config, name: str, dirname: str) -> None:
    tmp = os.path.join(cfg.vmdir, f".{name}.link")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    os.symlink(dirname, tmp)
    os.rename(tmp, os.path.join(cfg.vmdir, name))  # atomic replace


def cmd_create(cfg: Config, args: list[str]) -> int:
    head, words = _split_dashdash(args)
    if len(head) != 3 or head[1] != "--owner":
        raise UsageError("usage: create NAME --owner USER [-- ADMIN-OPTIONS...]")
    name, user = head[0], head[2]
    adminopts.check_host(adminopts.parse_admin(words), cfg)
    dirname = vmid.encode(name, words)
    uid, gid = _owner(user)
    ensure_top(cfg)
    if os.path.lexists(os.path.join(cfg.vmdir, name)):
        raise UsageError(f"{name}: a VM of that name exists")
    path = os.path.join(cfg.vmdir, dirname)
    os.mkdir(path, 0o700)
    os.chown(path, uid, gid)
    os.chmod(path, 0o700)
    lock = os.open(os.path.join(path, "lock"), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    os.fchown(lock, uid, gid)
    os.close(lock)
    _replace_link(cfg, name, dirname)
    _out(f"created {name} for {user}: {path}")
    return 0


def _running(vm: vmtree.VM) -> int:
    """Take the VM's lock as root, so nothing starts while we change it."""
    import fcntl

    path = vm.file("lock")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        # Why fchown: a root-owned lock file would stop the user's own start.
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.fchown(fd, vm.uid, -1)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TreeError(f"{path} is not a regular file")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise RuntimeFailure(f"{vm.name}: refused while the VM runs (stop it first)") from exc
    return fd


def cmd_set(cfg: Config, args: list[str]) -> int:
    head, words = _split_dashdash(args)
    if len(head) != 1:
        raise UsageError("usage: set NAME [-- ADMIN-OPTIONS...]")
    vm = vmtree.resolve(cfg, head[0])
    adminopts.check_host(adminopts.parse_admin(words), cfg)
    dirname = vmid.encode(vm.name, words)
    lock = _running(vm)
    try:
        if dirname != vm.dirname:
            os.rename(vm.path, os.path.join(cfg.vmdir, dirname))
            _replace_link(cfg, vm.name, dirname)
    finally:
        os.close(lock)
    _out(f"{vm.name}: options set")
    return 0


def cmd_remove(cfg: Config, args: list[str]) -> int:
    purge = "--purge" in args
    rest = [a for a in args if a != "--purge"]
    if len(rest) != 1:
        raise UsageError("usage: remove NAME [--purge]")
    vm = vmtree.resolve(cfg, rest[0])
    lock = _running(vm)
    try:
        os.unlink(os.path.join(cfg.vmdir, vm.name))
        if purge:
            import shutil
            shutil.rmtree(vm.path)
            _out(f"{vm.name}: removed with its images")
        else:
            import time
            keep = os.path.join(cfg.vmdir, ".removed")
            os.makedirs(keep, mode=0o700, exist_ok=True)
            dest = os.path.join(keep, f"{vm.dirname[:200]}.{int(time.time())}")
            os.rename(vm.path, dest)
            _out(f"{vm.name}: removed; its files are kept in {dest}")
    finally:
        os.close(lock)
    return 0


def _user(uid: int) -> str:
    import pwd
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def cmd_list(cfg: Config, args: list[str]) -> int:
    """Every healthy VM, then each broken entry of the tree with its reason
    and fix; exit status 1 if anything is broken."""
    from kvmshell.common import runstate
    if args:
        raise UsageError(f"{args[0]}: unexpected argument")
    tree = vmtree.scan_all(cfg)
    for vm in tree.vms:
        pid = runstate.qemu_pid(vm)
        state = f"running (pid {pid})" if pid else "stopped"
        _out(f"{vm.name:<20} {_user(vm.uid):<12} {state:<22} {' '.join(vm.admin_words)}")
    for bad in tree.broken:
        _out(f"{printable(bad.name):<20} {_user(bad.uid):<12} {'BROKEN':<22} {bad.reason}")
    if tree.broken:
        _err(f"{len(tree.broken)} broken entr{'y' if len(tree.broken) == 1 else 'ies'} "
             f"in {cfg.vmdir} (BROKEN above)")
        return 1
    return 0


def cmd_show(cfg: Config, args: list[str]) -> int:
    if len(args) != 1:
        raise UsageError("usage: show NAME")
    vm = vmtree.resolve(cfg, args[0])
    plan = adminopts.parse_admin(vm.admin_words)
    _out(f"name:      {vm.name}\nowner:     {_user(vm.uid)}\ndirectory: {vm.path}")
    _out(f"options:   {' '.join(vm.admin_words) or '(none)'}")
    fw = (-1, [-1, -1]) if plan.firmware == "efi" else None
    _out(f"machine:   {plan.machine}, {plan.smp} vCPU(s), {plan.megs} MiB, firmware {plan.firmware}")
    _out(f"qemu:      {' '.join(adminopts.admin_argv(plan, vm.name, [-1] * len(plan.taps), fw))}")
    return 0


def cmd_adduser(cfg: Config, args: list[str]) -> int:
    from kvmshell.admin import users
    rest = [a for a in args if a != "--no-kvm"]
    kvm = len(rest) == len(args)
    if (len(rest) not in (1, 3) or (len(rest) == 3 and rest[1] != "--key")
            or len(args) - len(rest) > 1):
        raise UsageError("usage: adduser USER [--key FILE|-] [--no-kvm]")
    name = rest[0]
    kvm_grp, why = users.adduser(cfg, name, kvm)
    _out(f"created VM user {name} (group {cfg.group}, shell {cfg.shell})")
    if kvm_grp:
        _out(f"{name} may open /dev/kvm: member of {kvm_grp}, the device's group")
    elif not why:
        switch = "--no-kvm" if not kvm else f"adduser_kvm = no in {cfg.path}"
        _out(f"{name}: not put in /dev/kvm's group ({switch}); its VMs run under TCG")
    else:
        sys.stderr.write(f"kvmadm: warning: {why}: {name} cannot use KVM, its VMs run "
                         f"under TCG; fix: {users.kvm_group_fix(name)}\n")
    if len(rest) == 3:
        path = users.setkey(cfg, name, rest[2])
        _out(f"installed the key(s) of {name} in {path}")
    return 0


def cmd_setkey(cfg: Config, args: list[str]) -> int:
    from kvmshell.admin import users
    if len(args) != 2:
        raise UsageError("usage: setkey USER FILE|-")
    path = users.setkey(cfg, args[0], args[1])
    _out(f"installed the key(s) of {args[0]} in {path}")
    return 0


def cmd_check(cfg: Config, args: list[str]) -> int:
    from kvmshell.admin import check
    return check.main(cfg, args)


def _owners(cfg: Config) -> dict[int, list[vmtree.VM]]:
    """Every healthy VM, by owner (broken entries are 'list''s to report)."""
    out: dict[int, list[vmtree.VM]] = {}
    for vm in vmtree.scan_all(cfg).vms:
        out.setdefault(vm.uid, []).append(vm)
    return out


def cmd_usage(cfg: Config, args: list[str]) -> int:
    from kvmshell.common import budgets, cgroups
    as_json = args[:1] == ["--json"]
    if args[1 if as_json else 0:]:
        raise UsageError("usage: usage [--json]")
    docs = []
    for uid, vms in sorted(_owners(cfg).items()):
        b = budgets.resolve(cfg, uid)
        t = budgets.totals(vms)
        used = {"max_running": len(t.running), "max_ram_mib": t.ram_mib,
                "max_vcpus": t.vcpus, "max_image_bytes": sum(budgets.dir_bytes(v.path) for v in vms)}
        rows = {}
        for key in budgets.KEYS:
            limit = b[key] or None
            rows[key.removeprefix("max_")] = {
                "used": used[key], "limit": limit, "source": b.sources[key],
                "left": None if limit is None else max(limit - used[key], 0)}
        docs.append({"user": b.user, "uid": uid, "vms": [v.name for v in vms],
                     "running": sorted(t.running), "budgets": rows,
                     "kernel": cgroups.kernel_view(cfg, uid)})
    if as_json:
        import json
        _out(json.dumps(docs))
        return 0
    _out(f"{'user':<14} {'running':>9} {'RAM MiB':>15} {'vCPUs':>9} {'image bytes':>25}  kernel")

    def cell(r: dict[str, object]) -> str:
        return f"{r['used']}/{r['limit'] if r['limit'] is not None else '-'}"
    for d in docs:
        r = d["budgets"]
        assert isinstance(r, dict)
        k = d["kernel"]
        assert isinstance(k, dict)
        mem = k.get("memory_usage_bytes")
        kern = (f"{k['mode']}: {int(mem) >> 20} MiB used" if isinstance(mem, int)
                else f"{k['mode']}: no group yet" if k["mode"] != "off" else "off")
        _out(f"{d['user']:<14} {cell(r['running']):>9} {cell(r['ram_mib']):>15} "
             f"{cell(r['vcpus']):>9} {cell(r['image_bytes']):>25}  {kern}")
    return 0


SLICE_DROPIN = "50-kvmshell.conf"


def cmd_slices(cfg: Config, args: list[str]) -> int:
    from kvmshell.common import budgets
    if args and (len(args) != 2 or args[0] != "--dir"):
        raise UsageError("usage: slices [--dir DIR]")
    top = args[1] if args else "/etc/systemd/system"
    if not top.startswith("/"):
        raise UsageError(f"--dir: {top!r} is not an absolute path")
    owners = _owners(cfg)
    wanted: dict[str, str] = {}
    for uid, vms in owners.items():
        lim = budgets.KernelLimits(budgets.resolve(cfg, uid), len(vms))
        wanted[f"user-{uid}.slice.d"] = budgets.slice_dropin(lim)
    for d, text in sorted(wanted.items()):
        path = os.path.join(top, d)
        os.makedirs(path, mode=0o755, exist_ok=True)
        tmp = os.path.join(path, f".{SLICE_DROPIN}.new")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, os.path.join(path, SLICE_DROPIN))
        _out(f"wrote {os.path.join(path, SLICE_DROPIN)}")
    # Drop-ins this command wrote earlier for users who own no VM now.
    for entry in sorted(os.listdir(top)) if os.path.isdir(top) else []:
        if entry.startswith("user-") and entry.endswith(".slice.d") and entry not in wanted:
            old = os.path.join(top, entry, SLICE_DROPIN)
            try:
                with open(old, encoding="utf-8") as f:
                    ours = f.readline().startswith("# Written by kvmadm slices")
            except OSError:
                continue
            if ours:
                os.unlink(old)
                _out(f"removed {old}")
    if not args and os.path.isdir("/run/systemd/system"):
        import subprocess
        subprocess.run(["systemctl", "daemon-reload"], check=False)
    return 0


COMMANDS = {"create": cmd_create, "set": cmd_set, "remove": cmd_remove,
            "list": cmd_list, "show": cmd_show, "adduser": cmd_adduser,
            "setkey": cmd_setkey, "check": cmd_check, "usage": cmd_usage,
            "slices": cmd_slices}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv if argv is None else argv)[1:]
    path = DEFAULT_PATH
    try:
        while args[:1] == ["--config"] and len(args) >= 2:
            path, args = args[1], args[2:]
        if not args or args[0] not in COMMANDS:
            if args and args[0] in ("help", "-h", "--help"):
                _out("usage:\n" + USAGE)
                return 0
            raise UsageError(f"{args[0] if args else '(nothing)'}: unknown command\nusage:\n{USAGE}")
        cmd = COMMANDS[args[0]]
        if os.geteuid() != 0:
            raise UsageError("must be run as root")
        return cmd(load(path), args[1:])
    except KvmshellError as exc:
        _err(exc.message)
        return exc.status
    except OSError as exc:
        _err(f"{printable(str(exc.filename or ''))}: {exc.strerror}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
