"""``kvmadm``: the admin's side of the VM tree (runs as root).

    kvmadm [--config PATH] COMMAND ARGS...

The commands are the table :data:`COMMAND_HELP` (read by ``kvmadm help``,
the man page kvmadm(8) and the bash completion).  The admin's options are
validated against the admin class of the option table before they become
a directory name, exactly as kvmshell will read them back, and against
this host (``max_smp``, KVM for ``-cpu host``, OVMF for ``-firmware
efi``).  ``usage`` shows every VM owner's budgets and use; ``slices``
writes systemd user-slice drop-ins from them.  Every change
to the tree (and every attempt) leaves one audit record (program
``kvmadm``, authpriv; :mod:`kvmshell.common.auditlog`).
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

TYPE_CHECKING = False
if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable

# The commands, as data: command -> (synopsis, summary).
COMMAND_HELP: dict[str, tuple[str, str]] = {
    "create": ("NAME --owner USER [-- ADMIN-OPTIONS...]",
               "create VM NAME for USER with the admin's options"),
    "list": ("[--json]", "list every VM: owner, state, admin options"),
    "show": ("NAME [--json]", "show one VM: owner, directory, options and the QEMU argv they give"),
    "set": ("NAME [-- ADMIN-OPTIONS...]", "replace a VM's admin options (refused while it runs)"),
    "remove": ("NAME [--purge]", "remove a VM; its files are kept in .removed/ unless --purge"),
    "adduser": ("USER [--key FILE|-] [--no-kvm]",
                "create a VM user (group, login shell, SSH key, /dev/kvm's group)"),
    "setkey": ("USER FILE|-", "install a VM user's SSH key(s), root-owned"),
    "check": ("[--json] [--sysconfdir DIR]",
              "check the host, like virt-host-validate: one line per check, PASS, WARN or FAIL"),
    "autostart": ("", "start every VM marked 'autostart on', as its owner (run at boot)"),
    "refresh": ("", "rebuild the tree's per-owner view (after changing the tree by hand)"),
    "usage": ("[--json]", "every VM owner's budgets, use and kernel limits"),
    "slices": ("[--dir DIR]", "write systemd user-slice drop-ins from the budgets (systemd hosts)"),
    "help": ("[COMMAND]", "list the commands, or show one (with 'create'/'set': the admin options)"),
}
# Commands that change the tree or the users: each run leaves an audit record.
CHANGES = frozenset({"create", "set", "remove", "adduser", "setkey", "refresh"})
# Commands after which the per-owner view is rebuilt (admin/ownerview.py)
# if the top directory changed, whatever their outcome (a half-done change
# counts too).
TREE_CHANGES = frozenset({"create", "set", "remove"})

USAGE = "usage: kvmadm [--config PATH] COMMAND [ARGS...]"

# Fields the running command adds to its audit record (vm, owner, options...).
_NOTE: dict[str, str] = {}


def _out(text: str) -> None:
    # The last safety net: nothing from the tree reaches the terminal raw.
    sys.stdout.write("\n".join(printable(line, backslash=False)
                               for line in text.split("\n")) + "\n")


def _err(line: str) -> None:
    sys.stderr.write(f"kvmadm: {printable(line, backslash=False)}\n")


def help_text(command: str | None = None) -> str:
    """``kvmadm help [COMMAND]``: every command of :data:`COMMAND_HELP` with
    its summary, or one command; ``create`` and ``set`` also list the admin
    options (the option table's admin class).  Raises UsageError for a
    command that does not exist."""
    from kvmshell.common import helptext, optable
    if command is None:
        return (f"{USAGE}\ncommands:\n"
                + helptext.table([(f"{c} {syn}".rstrip(), summary)
                                  for c, (syn, summary) in COMMAND_HELP.items()])
                + "\n'kvmadm help COMMAND' shows one command ('help create': the admin options).")
    if command not in COMMAND_HELP:
        raise UsageError(f"help: unknown command '{printable(command)}' (see 'kvmadm help')")
    syn, summary = COMMAND_HELP[command]
    text = f"usage: kvmadm [--config PATH] {command} {syn}".rstrip() + f"\n  {summary}"
    if command in ("create", "set"):
        text += "\nADMIN-OPTIONS:\n" + optable.option_help(optable.ADMIN)
    return text


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
    usage = "usage: kvmadm create NAME --owner USER [-- ADMIN-OPTIONS...]"
    if not head:
        raise UsageError(f"create: missing NAME ({usage})")
    if head[1:2] != ["--owner"]:
        what = f"unexpected argument '{printable(head[1])}'" if head[1:] else "missing --owner USER"
        raise UsageError(f"create: {what} ({usage})")
    if len(head) < 3:
        raise UsageError(f"create: --owner: missing USER ({usage})")
    if len(head) > 3:
        raise UsageError(f"create: unexpected argument '{printable(head[3])}' ({usage})")
    name, user = head[0], head[2]
    _NOTE.update(vm=name, owner=user, options=_join(words))
    plan = adminopts.parse_admin(words, cfg.max_smp)
    adminopts.check_host(plan, cfg)
    adminopts.check_hosts(plan, cfg)
    dirname = vmid.encode(name, words)
    uid, gid = _owner(user)
    ensure_top(cfg)
    if os.path.lexists(os.path.join(cfg.vmdir, name)):
        raise UsageError(f"{name}: a VM of that name exists")
    path = os.path.join(cfg.vmdir, dirname)
    os.mkdir(path, 0o700)
    os.chown(path, uid, gid)
    os.chmod(path, 0o700)
    from kvmshell.common import lease
    lease.create(cfg, name, uid, gid)      # before the name: a start finds both
    _replace_link(cfg, name, dirname)
    _out(f"created {name} for {user}: {path}")
    return 0


# The lease kvmadm holds while it changes a VM: kept open until kvmadm
# exits (one command per process), so that no host starts the VM meanwhile.
_LEASES: list[int] = []


def _lock(cfg: Config, vm: vmtree.VM) -> int:
    """Take the VM's lease (common/lease.py: no host may start it) and its
    lock (on its directory: common/runstate.py), so that nothing starts
    while we change it; refuse while anyone holds either, naming the host
    that runs it."""
    from kvmshell.common import lease, runstate
    from kvmshell.common.errors import AlreadyRunning
    try:
        try:
            from kvmshell.common import hosts
            several = hosts.load(cfg, need_self=False) is not None
            taken = lease.take(cfg, vm, cfg.host_name, required=False, several=several,
                               private=False)
        except TreeError:
            taken = None        # a lease of the wrong kind: 'set' makes a new one
        if taken is not None:
            _LEASES.append(taken)
            if not lease.sound(cfg, vm.name, vm.uid):
                # An old lease others can open (0644, before 0600 leases) or
                # without its record file: a new one, held before it is in
                # place; whoever had the old one open keeps only that.
                st = os.lstat(vm.path)
                new = lease.create(cfg, vm.name, st.st_uid, st.st_gid, hold=True)
                assert new is not None
                _LEASES.append(new)
        return runstate.lock(vm)
    except AlreadyRunning as exc:
        why = exc.message.partition(" is already running")[2].partition(" (")[0]
        if why:             # the lease: the VM runs on (or is held by) another host
            raise RuntimeFailure(f"{vm.name}: refused while the VM runs{why}, starts or "
                                 "stops (stop it first)") from exc
        # Why name the holders: the owner's code can hold the lock with any
        # process of its own, for ever; the admin must know what to end.
        held = sorted({pid for pid, _ in runstate.holders(vm)
                       if os.path.lexists(f"/proc/{pid}")} | _opened_by(vm))
        who = ", ".join(f"pid {pid} ({_exe(pid)})" for pid in held[:8])
        raise RuntimeFailure(f"{vm.name}: refused while the VM runs, starts or stops "
                             f"(stop it first{'; its lock is held by ' + who if who else ''})"
                             ) from exc


def _opened_by(vm: vmtree.VM) -> set[int]:
    """The owner's processes with a descriptor of *vm*'s directory (the
    lock's pid in /proc/locks is its taker's, which may have passed the
    descriptor on and exited)."""
    from kvmshell.common import runstate
    try:
        st = os.lstat(vm.path)
    except OSError:
        return set()
    return {pid for pid, got in runstate.open_files(vm.uid)
            if (got.st_dev, got.st_ino) == (st.st_dev, st.st_ino)}


def _exe(pid: int) -> str:
    """What process *pid* runs, for the admin (root may read any /proc/PID/exe)."""
    try:
        return printable(os.readlink(f"/proc/{pid}/exe"), backslash=False)
    except OSError:
        return "gone"


def _drop_taps(cfg: Config, vm: vmtree.VM) -> None:
    """Delete the taps of *vm* that exist (called with its lock held, so no
    kvmshell-run QEMU has them).  Why: the user's own code can ask the
    network helper for them and keep them without any QEMU or supervisor;
    a VM removed, or given another network, must not leave the user on
    its bridge or with its host-side address.  A link of a tap's name that
    is not a tap is left alone (the network helper refuses it too)."""
    import socket
    from kvmshell.common.errors import KvmshellError
    try:
        taps = adminopts.taps_of(cfg.vmdir, vm.name, adminopts.parse_admin(vm.admin_words))
    except KvmshellError:
        return                  # options kvmshell would not run: no taps were made
    present = []
    for tap in taps:
        try:
            socket.if_nametoindex(tap.ifname)
        except OSError:
            continue
        present.append(tap.ifname)
    if not present:
        return                  # the usual case: no netlink library to load
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        for ifname in present:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                continue
            kind = ipr.get_links(found[0])[0].get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
            if kind != "tun":
                _err(f"{vm.name}: {ifname} is not a tap ({kind or 'unknown kind'}): left alone")
                continue
            try:
                ipr.link("del", index=found[0])
            except OSError as exc:     # pyroute2's NetlinkError; ENODEV: gone meanwhile
                if exc.errno != 19:
                    raise
            _out(f"{vm.name}: deleted its tap {ifname}")


def cmd_set(cfg: Config, args: list[str]) -> int:
    head, words = _split_dashdash(args)
    if len(head) != 1:
        raise UsageError("usage: set NAME [-- ADMIN-OPTIONS...]")
    _NOTE.update(vm=head[0], options=_join(words))
    vm = vmtree.resolve(cfg, head[0])
    _NOTE["owner"] = _user(vm.uid)
    plan = adminopts.parse_admin(words, cfg.max_smp)
    adminopts.check_host(plan, cfg)
    adminopts.check_hosts(plan, cfg)
    dirname = vmid.encode(vm.name, words)
    lock = _lock(cfg, vm)
    try:
        if dirname != vm.dirname:
            _drop_taps(cfg, vm)
            os.rename(vm.path, os.path.join(cfg.vmdir, dirname))
            _replace_link(cfg, vm.name, dirname)
        if not _LEASES:             # a VM made before leases, or its lease lost
            from kvmshell.common import lease
            st = os.lstat(os.path.join(cfg.vmdir, dirname))
            lease.create(cfg, vm.name, st.st_uid, st.st_gid)
    finally:
        os.close(lock)
    _out(f"{vm.name}: options set")
    return 0


def _holding_dir(cfg: Config) -> str:
    """TOP/.removed: where removed VM directories go, root's alone."""
    keep = os.path.join(cfg.vmdir, ".removed")
    if not os.path.lexists(keep):
        os.mkdir(keep, 0o700)
    st = os.lstat(keep)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
        raise TreeError(f"{keep} must be a directory owned by root, mode 0700 "
                        f"(admin: chown root:root {keep}; chmod 700 {keep})")
    return keep


def cmd_remove(cfg: Config, args: list[str]) -> int:
    import time
    from kvmshell.admin import purge
    do_purge = "--purge" in args
    rest = [a for a in args if a != "--purge"]
    if len(rest) != 1:
        raise UsageError("usage: remove NAME [--purge]")
    name = rest[0]
    _NOTE["vm"] = name
    vmid.check_name(name)
    vmtree.check_top(cfg)
    keep = _holding_dir(cfg)
    leftover = purge.pending(keep, name) if do_purge else []
    if leftover and not os.path.lexists(os.path.join(cfg.vmdir, name)):
        for path in leftover:           # only a half-done purge is left
            purge.finish(path)
        _out(f"{name}: removed with its images (an earlier purge finished)")
        return 0
    vm = vmtree.resolve(cfg, name)
    _NOTE["owner"] = _user(vm.uid)
    lock = _lock(cfg, vm)
    try:
        _drop_taps(cfg, vm)
        # Out of the user's reach first (the directory keeps our lock), then
        # the name; the purge then works on a tree nobody else can find.
        dest = os.path.join(keep, f"{vm.dirname[:200]}.{time.time_ns()}"
                            + (purge.SUFFIX if do_purge else ""))
        os.rename(vm.path, dest)
        os.unlink(os.path.join(cfg.vmdir, vm.name))
        from kvmshell.common import lease
        lease.remove(cfg, vm.name)
        if do_purge:
            try:
                purge.finish(dest, lock)
            except RuntimeFailure as exc:
                raise RuntimeFailure(f"{vm.name}: {exc.message}; 'kvmadm remove {vm.name} "
                                     "--purge' finishes it") from exc
            for path in leftover:
                purge.finish(path)
            _out(f"{vm.name}: removed with its images")
        else:
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


def _autostart_state(cfg: Config, vm: vmtree.VM) -> tuple[str, list[str]]:
    """on, off, forbidden (marked, but the admin forbids it) or invalid
    (the owner's files are not kvmshell's), and the saved start options."""
    from kvmshell.common import autostart
    try:
        marked, words = autostart.read(vm)
    except RuntimeFailure:
        return "invalid", []
    if not marked:
        return "off", words
    if autostart.forbidden(cfg, adminopts.parse_admin(vm.admin_words)):
        return "forbidden", words
    return "on", words


def _json_flag(args: list[str]) -> tuple[bool, list[str]]:
    return "--json" in args, [a for a in args if a != "--json"]


def cmd_list(cfg: Config, args: list[str]) -> int:
    """Every healthy VM, then each broken entry of the tree with its reason
    and fix; exit status 1 if anything is broken."""
    from kvmshell.common import runstate
    as_json, args = _json_flag(args)
    if args:
        raise UsageError(f"{args[0]}: unexpected argument")
    vms = []
    tree = vmtree.scan_all(cfg)
    # Why from the kernel's lock table and /proc: root reads nothing the VM
    # user can write (a pid file could be a FIFO or a link to a device).
    table = runstate.lock_table()
    for vm in tree.vms:
        state, pid = runstate.state(vm, cfg.qemu, table)
        if as_json:
            vms.append({"name": vm.name, "owner": _user(vm.uid), "uid": vm.uid,
                        "state": state, "pid": pid,
                        "options": vm.admin_words, "autostart": _autostart_state(cfg, vm)[0]})
            continue
        if pid:
            state = f"running (pid {pid})"
        _out(f"{vm.name:<20} {_user(vm.uid):<12} {state:<22} {' '.join(vm.admin_words)}")
    if as_json:
        from kvmshell.common import jsonout
        jsonout.emit({"vms": vms, "broken": [{"name": printable(bad.name), "uid": bad.uid,
                                               "reason": bad.reason} for bad in tree.broken]})
        return 1 if tree.broken else 0
    for bad in tree.broken:
        _out(f"{printable(bad.name):<20} {_user(bad.uid):<12} {'BROKEN':<22} {bad.reason}")
    if tree.broken:
        _err(f"{len(tree.broken)} broken entr{'y' if len(tree.broken) == 1 else 'ies'} "
             f"in {cfg.vmdir} (BROKEN above)")
        return 1
    return 0


def cmd_show(cfg: Config, args: list[str]) -> int:
    as_json, args = _json_flag(args)
    if len(args) != 1:
        raise UsageError("usage: show NAME [--json]")
    vm = vmtree.resolve(cfg, args[0])
    plan = adminopts.parse_admin(vm.admin_words)
    fw = (-1, [-1, -1]) if plan.firmware == "efi" else None
    qemu = adminopts.admin_argv(plan, vm.name, [-1] * len(plan.taps), fw)
    auto, words = _autostart_state(cfg, vm)
    if as_json:
        from kvmshell.common import jsonout
        jsonout.emit({"name": vm.name, "owner": _user(vm.uid), "uid": vm.uid,
                      "directory": vm.path, "options": vm.admin_words, "qemu": qemu,
                      "autostart": auto, "start_options": words})
        return 0
    _out(f"name:      {vm.name}\nowner:     {_user(vm.uid)}\ndirectory: {vm.path}")
    _out(f"options:   {' '.join(vm.admin_words) or '(none)'}")
    _out(f"machine:   {plan.machine}, {plan.smp} vCPU(s), {plan.megs} MiB, firmware {plan.firmware}")
    _out(f"qemu:      {' '.join(qemu)}")
    _out(f"autostart: {auto}" + (f" (start {vm.name} {_join(words)})" if words else ""))
    return 0


def cmd_adduser(cfg: Config, args: list[str]) -> int:
    from kvmshell.admin import users
    rest = [a for a in args if a != "--no-kvm"]
    kvm = len(rest) == len(args)
    if (len(rest) not in (1, 3) or (len(rest) == 3 and rest[1] != "--key")
            or len(args) - len(rest) > 1):
        raise UsageError("usage: adduser USER [--key FILE|-] [--no-kvm]")
    name = rest[0]
    _NOTE["account"] = name
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
    _NOTE["account"] = args[0]
    path = users.setkey(cfg, args[0], args[1])
    _out(f"installed the key(s) of {args[0]} in {path}")
    return 0


def cmd_check(cfg: Config, args: list[str]) -> int:
    from kvmshell.admin import check
    return check.main(cfg, args)


def cmd_refresh(cfg: Config, args: list[str]) -> int:
    """Rebuild TOP/.owners from the tree (admin/ownerview.py): after a VM
    directory was made, renamed or given to another owner by hand."""
    from kvmshell.admin import ownerview
    if args:
        raise UsageError(f"{args[0]}: unexpected argument (usage: refresh)")
    vmtree.check_top(cfg)
    count = ownerview.refresh(cfg)
    _out(f"{os.path.join(cfg.vmdir, vmtree.OWNERS)}: {count} entries")
    return 0


def _top_mtime(cfg: Config) -> int | None:
    """The top directory's mtime (ns), None if there is none: it changes
    with every entry made, renamed or removed in it."""
    try:
        return os.stat(cfg.vmdir).st_mtime_ns
    except OSError:
        return None


def _refresh_view(cfg: Config) -> None:
    """After a change to the tree: rebuild the per-owner view.  A failure
    is said, not fatal: the change stands, and until the view is rebuilt
    users' commands scan the whole tree (correct, only slower)."""
    from kvmshell.admin import ownerview
    try:
        vmtree.check_top(cfg)
    except KvmshellError:
        return                      # no tree, or one the command has refused already
    try:
        if ownerview.stamped(cfg):
            return                  # nothing in the top directory changed
        ownerview.refresh(cfg)
    except (KvmshellError, OSError) as exc:
        why = exc.message if isinstance(exc, KvmshellError) else exc.strerror
        _err(f"the per-owner view was not rebuilt: {why} (fix it, then kvmadm refresh)")


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
        raise UsageError(f"usage: unexpected argument '{printable(args[1 if as_json else 0])}'"
                         " (usage: kvmadm usage [--json])")
    docs = []
    status = 0
    for uid, vms in sorted(_owners(cfg).items()):
        b = budgets.resolve(cfg, uid)
        t = budgets.totals(vms)
        disk, unmeasured = _disk_use(b.user, vms)
        status |= bool(unmeasured)
        used = {"max_running": len(t.running), "max_ram_mib": t.ram_mib,
                "max_vcpus": t.vcpus, "max_image_bytes": disk}
        rows = {}
        for key in budgets.KEYS:
            limit = b[key] or None
            rows[key.removeprefix("max_")] = {
                "used": used[key], "limit": limit, "source": b.sources[key],
                "left": None if limit is None else max(limit - used[key], 0)}
        docs.append({"user": b.user, "uid": uid, "vms": [v.name for v in vms],
                     "running": sorted(t.running), "budgets": rows,
                     "unmeasured": unmeasured, "kernel": cgroups.kernel_view(cfg, uid)})
    if as_json:
        import json
        _out(json.dumps(docs))
        return status
    _out(f"{'user':<14} {'running':>9} {'RAM MiB':>15} {'vCPUs':>9} {'image bytes':>25}  kernel")

    def cell(r: dict[str, object], at_least: object = None) -> str:
        return f"{'>=' if at_least else ''}{r['used']}/{r['limit'] if r['limit'] is not None else '-'}"
    for d in docs:
        r = d["budgets"]
        assert isinstance(r, dict)
        k = d["kernel"]
        assert isinstance(k, dict)
        mem = k.get("memory_usage_bytes")
        kern = (f"{k['mode']}: {int(mem) >> 20} MiB used" if isinstance(mem, int)
                else f"{k['mode']}: no group yet" if k["mode"] != "off" else "off")
        _out(f"{d['user']:<14} {cell(r['running']):>9} {cell(r['ram_mib']):>15} "
             f"{cell(r['vcpus']):>9} {cell(r['image_bytes'], d['unmeasured']):>25}  {kern}")
    return status


def _disk_use(user: str, vms: list[vmtree.VM]) -> tuple[int, dict[str, str]]:
    """The bytes *user*'s VM directories hold (with the unlinked files the
    user's processes keep open there: budgets.held_bytes), and the VMs
    that could not be measured in full, each with its reason (the bytes
    are then a lower bound).  Each of those is said in one line, as ``du`` does."""
    from kvmshell.common import budgets
    from kvmshell.common.errors import Unmeasured
    total, unmeasured = 0, {}
    for vm in vms:
        try:
            total += budgets.dir_bytes(vm.path)
        except Unmeasured as exc:
            total += exc.partial
            unmeasured[vm.name] = printable(exc.message, backslash=False)
            _err(f"{vm.name} ({user}): disk use not measured in full: {exc.message}; "
                 "its image bytes are a lower bound")
    # Files unlinked but still held open (a -snapshot overlay): kvmshell's
    # own count has them, so the admin's view must too.
    return total + budgets.held_bytes(vms), unmeasured


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



# ---- autostart (at boot, from kvmshell-autostart.service) ----------------

RUNUSER = "/usr/sbin/runuser"
START_TIMEOUT = 300


def _printable(text: str) -> str:
    """Text from a child for the admin's terminal: control characters and
    non-ASCII as \\xNN (the child's message may carry QEMU's or a name's bytes)."""
    return "".join(c if 0x20 <= ord(c) < 0x7F else f"\\x{ord(c):02x}" for c in text)


def start_as_owner(cfg: Config, vm: vmtree.VM, words: list[str],
                   timeout: float | None = None) -> tuple[bool, str]:
    """Run ``kvmshell start VM WORDS...`` as the VM's owner: the installed
    kvmshell (``shell`` in kvmshell.conf) through runuser, so the start takes
    the same validator, budgets and PAM limits as one over SSH.  Returns
    (started, kvmshell's one line).  Takes at most *timeout* seconds
    (default START_TIMEOUT; plus :data:`DRAIN_SECONDS`) and
    :data:`KEEP_BYTES` of each output, whatever the owner's code does to
    the pipes (see :func:`_collect`)."""
    import pwd
    import signal
    import subprocess
    try:
        owner = pwd.getpwuid(vm.uid).pw_name
    except KeyError:
        return False, f"its owner (uid {vm.uid}) has no account"
    argv = [RUNUSER, "-u", owner, "--", cfg.shell, "--config", cfg.path, "start", vm.name, *words]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
    try:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, cwd="/")
    except OSError as exc:
        return False, f"cannot run {RUNUSER}: {exc.strerror}"
    limit = START_TIMEOUT if timeout is None else timeout
    try:
        out_b, err_b, timed_out = _collect(proc, limit)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()
    if timed_out:
        return False, f"no answer from kvmshell start in {round(limit)} s"
    out = out_b.decode("utf-8", "replace")
    err = err_b.decode("utf-8", "replace")
    lines = (err.strip() or out.strip()).splitlines() if proc.returncode else out.strip().splitlines()
    line = lines[-1] if lines else f"exit status {proc.returncode}"
    if line.startswith("kvmshell: "):
        line = line[len("kvmshell: "):]
    return proc.returncode == 0, _printable(line)


# What autostart keeps of a start's stdout and stderr (the last bytes: the
# answer is the last line), and how long it reads on once the start exited.
KEEP_BYTES = 65536
DRAIN_SECONDS = 1.0


def _collect(proc: "subprocess.Popen[bytes]", limit: float) -> tuple[bytes, bytes, bool]:
    """Read *proc*'s stdout and stderr until both end or the start is over:
    (stdout, stderr, timed out).  Why not communicate(): the pipes' writing
    ends are the owner's to copy (pidfd_getfd, ptrace), so they may never
    end, or pour out without end; root keeps the last KEEP_BYTES of each and
    stops reading DRAIN_SECONDS after the start exited, or *limit* seconds
    after it began."""
    import selectors
    import time
    start = time.monotonic()
    deadline = start + limit
    assert proc.stdout is not None and proc.stderr is not None
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            now = time.monotonic()
            if proc.poll() is not None:
                deadline = min(deadline, now + DRAIN_SECONDS)
            if now >= deadline:
                break
            for key, _ in sel.select(min(deadline - now, 0.1)):
                try:
                    data = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not data:
                    sel.unregister(key.fd)
                    continue
                buf = bufs[key.fd]
                buf += data
                del buf[:-KEEP_BYTES]
    timed_out = proc.poll() is None and time.monotonic() >= start + limit
    return bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()]), timed_out


def cmd_autostart(cfg: Config, args: list[str]) -> int:
    """Start every marked VM, in name order, each as its owner; one VM's
    failure is reported and logged and the next is tried.  Exit 1 if any
    marked VM did not start."""
    from kvmshell.common import autostart, runstate
    if args:
        raise UsageError(f"{args[0]}: unexpected argument (usage: autostart)")
    _refresh_view(cfg)              # at boot: whatever changed by hand meanwhile
    failed = 0
    # The seconds each owner's starts took.  Why: the owner's code can
    # stop (and resume) its own starts, so the owner's VMs share one
    # START_TIMEOUT between them; past it, the rest are not tried, and one
    # owner holds back everyone else's VMs by that much at most.
    import time
    spent: dict[int, float] = {}
    for name in [vm.name for vm in vmtree.scan_all(cfg).vms]:
        fields: dict[str, str] = {"vm": name}
        try:
            vm = vmtree.resolve(cfg, name)
            fields["owner"] = _user(vm.uid)
            marked, words = autostart.read(vm)
            if not marked:
                continue
            fields["options"] = _join(words)
            why_not = autostart.forbidden(cfg, adminopts.parse_admin(vm.admin_words))
            if why_not:
                outcome, line = "skipped", why_not
            elif runstate.state(vm, cfg.qemu)[0] != runstate.STOPPED:
                outcome, line = "skipped", "already running (or being started or stopped)"
            elif spent.get(vm.uid, 0.0) >= START_TIMEOUT:
                outcome, line = "failed", (f"not tried: the starts of {fields['owner']}'s VMs "
                                           f"took their {START_TIMEOUT} s")
            else:
                began = time.monotonic()
                ok, line = start_as_owner(cfg, vm, words, START_TIMEOUT - spent.get(vm.uid, 0.0))
                spent[vm.uid] = spent.get(vm.uid, 0.0) + time.monotonic() - began
                outcome = "ok" if ok else "failed"
        except KvmshellError as exc:
            outcome, line = "failed", exc.message
        failed += outcome == "failed"
        _out(f"{name}: {outcome}: {line}")
        _record(cfg, "autostart", {**fields, "outcome": outcome,
                                   "reason": None if outcome == "ok" else line,
                                   "result": line if outcome == "ok" else None})
    return 1 if failed else 0


# ---- the audit record of a change ------------------------------------------

def _join(words: list[str]) -> str:
    from kvmshell.common.auditlog import join_words
    return join_words(words)


def _admin_fields() -> "list[tuple[str, str | int | None]]":
    """Who runs kvmadm: root's name and uid, the login uid the kernel kept
    for the session (audit's loginuid: who logged in before becoming root),
    and sudo's SUDO_USER."""
    import pwd
    uid = os.geteuid()
    try:
        user: str | None = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = None
    loginuid: str | None = None
    try:
        with open("/proc/self/loginuid", "rb") as f:
            raw = f.read(16).strip().decode("ascii")
        loginuid = raw if raw.isdigit() and raw != "4294967295" else None
    except (OSError, UnicodeDecodeError):
        pass
    return [("user", user), ("uid", uid), ("loginuid", loginuid),
            ("sudo_user", os.environ.get("SUDO_USER"))]


def _record(cfg: Config | None, verb: str, fields: "dict[str, str | int | None]") -> None:
    """Send one kvmadm record (never raises, never blocks)."""
    from kvmshell.common import auditlog
    keys = ("vm", "owner", "account", "options", "outcome", "status", "reason", "result", "args")
    out = _admin_fields() + [("verb", verb)] + [(k, fields.get(k)) for k in keys]
    path = cfg.log_socket if cfg is not None else auditlog.DEFAULT_SOCKET
    auditlog.send(path, "kvmadm", str(fields.get("outcome", "ok")), out)


# ---- bash completion ---------------------------------------------------------

FILES = "@files"   # tells the completion script: complete file names


def complete(cword: int, words: list[str]) -> list[str]:
    """Candidates for word *cword* of a kvmadm command line *words* (bash's
    COMP_CWORD and COMP_WORDS), for completion/kvmadm.bash: commands, VM
    names, VM users, admin options, or :data:`FILES`.  Reads only what any
    user may read (the config, the top directory, the group)."""
    cur = words[cword] if cword < len(words) else ""
    path, i = DEFAULT_PATH, 1
    while i < len(words) and i < cword and (words[i] == "--config"
                                             or words[i].startswith("--config=")):
        if words[i] != "--config":
            path, i = words[i][len("--config="):] or path, i + 1
            continue
        if cword == i + 1:
            return [FILES]
        path = words[i + 1] if i + 1 < len(words) else path
        i += 2
    if cword == i:
        first = list(COMMAND_HELP) + ["help"] + (["--config"] if i == 1 else [])
        return [w for w in first if w.startswith(cur)]
    if i >= len(words):
        return []
    cmd, pos, prev = words[i], cword - i, words[cword - 1]

    def vms() -> list[str]:
        try:
            return [vm.name for vm in vmtree.scan_all(load(path)).vms]
        except (KvmshellError, OSError):
            return []

    def users() -> list[str]:
        import grp
        import pwd
        try:
            cfg = load(path)
            out = set(grp.getgrnam(cfg.group).gr_mem)
            for vm in vmtree.scan_all(cfg).vms:
                try:
                    out.add(pwd.getpwuid(vm.uid).pw_name)
                except KeyError:
                    pass
            return sorted(out)
        except (KvmshellError, OSError, KeyError):
            return []

    pool: list[str] = []
    if cmd in ("create", "set") and "--" in words[i + 1:cword]:
        from kvmshell.common import optable
        pool = [o.name for o in optable.TABLE if o.cls == optable.ADMIN and not o.gone]
        if prev in optable.BY_NAME and optable.BY_NAME[prev].arity:
            pool = []               # the option's value: the admin's to type
    elif cmd == "create":
        pool = users() if prev == "--owner" else [] if pos == 1 else ["--owner", "--"]
    elif cmd == "set":
        pool = vms() if pos == 1 else ["--"]
    elif cmd in ("show", "remove"):
        pool = vms() if pos == 1 else ["--json"] if cmd == "show" else ["--purge"]
    elif cmd == "list":
        pool = ["--json"]
    elif cmd == "adduser":
        pool = [FILES] if prev == "--key" else [] if pos == 1 else ["--key"]
    elif cmd == "setkey":
        pool = users() if pos == 1 else [FILES] if pos == 2 else []
    elif cmd == "help":
        pool = list(COMMAND_HELP) if pos == 1 else []
    if pool == [FILES]:
        return pool
    return [w for w in pool if w.startswith(cur)]


COMMANDS: "dict[str, Callable[[Config, list[str]], int]]" = {
    "create": cmd_create, "set": cmd_set, "remove": cmd_remove,
    "list": cmd_list, "show": cmd_show, "adduser": cmd_adduser,
    "setkey": cmd_setkey, "check": cmd_check, "autostart": cmd_autostart,
    "usage": cmd_usage, "slices": cmd_slices, "refresh": cmd_refresh}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv if argv is None else argv)[1:]
    if args[:1] == ["_complete"]:       # for completion/kvmadm.bash; any user
        try:
            cands = complete(int(args[1]), args[2:])
        except (ValueError, IndexError):
            return 2
        sys.stdout.write("".join(c + "\n" for c in cands))
        return 0
    path = DEFAULT_PATH
    cfg: Config | None = None
    cmd_name = ""
    _NOTE.clear()
    try:
        while args[:1] == ["--config"] or args[:1] and args[0].startswith("--config="):
            if args[0] != "--config":          # as GNU long options: --config=PATH
                path, args = args[0][len("--config="):], args[1:]
            elif len(args) < 2 or args[1].startswith("-"):
                path, args = "", args[1:]
            else:
                path, args = args[1], args[2:]
            if not path:
                raise UsageError(f"--config: missing PATH ({USAGE})")
        if args[:1] in (["help"], ["-h"], ["--help"]):
            if len(args) > 2:
                raise UsageError(f"{args[2]}: unexpected argument to 'help'")
            _out(help_text(args[1] if len(args) == 2 else None))
            return 0
        if not args:
            raise UsageError("no command given (see 'kvmadm help')")
        if args[0] not in COMMANDS:
            raise UsageError(f"unknown command '{printable(args[0])}' (see 'kvmadm help')")
        cmd_name = args[0]
        cmd = COMMANDS[cmd_name]
        if os.geteuid() != 0:
            raise UsageError("must be run as root")
        cfg = load(path)
        before = _top_mtime(cfg) if cmd_name in TREE_CHANGES else None
        try:
            status = cmd(cfg, args[1:])
        finally:
            # Only if the command changed the tree: a refused one leaves
            # the tree (the view included) as it was.
            if cmd_name in TREE_CHANGES and _top_mtime(cfg) != before:
                _refresh_view(cfg)
        if cmd_name in CHANGES:
            _record(cfg, cmd_name, {**_NOTE, "outcome": "ok", "status": status})
        return status
    except KvmshellError as exc:
        _err(exc.message)
        if cmd_name in CHANGES:
            _record(cfg, cmd_name, {**_NOTE, "outcome": exc.outcome, "status": exc.status,
                                    "reason": exc.message, "args": _join(args[1:])})
        return exc.status
    except OSError as exc:
        _err(f"{printable(str(exc.filename or ''))}: {exc.strerror}")
        if cmd_name in CHANGES:
            _record(cfg, cmd_name, {**_NOTE, "outcome": "failed", "status": 1,
                                    "reason": f"{exc.filename or ''}: {exc.strerror}",
                                    "args": _join(args[1:])})
        return 1
    except Exception as exc:  # a bug: one line, never a traceback from root's tool
        _err(f"internal error ({type(exc).__name__}: {printable(str(exc))})")
        return 1


if __name__ == "__main__":
    sys.exit(main())
