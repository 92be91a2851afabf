"""The ``kvmshell`` entry point: one parser and validator for every way in.

Ways in (all end in :func:`run_words`):
  * ``SSH_ORIGINAL_COMMAND``: sshd's ForceCommand;
  * ``kvmshell -c CMD``: login shell (``su - user -c CMD``, ssh without
    ForceCommand) -- and sshd's ForceCommand line when kvmshell is also the
    user's login shell;
  * ``kvmshell VERB ARGS...``: argv, for the admin and the tests;
  * no command on a terminal: the interactive prompt.

kvmshell's own options (``--config``) are honoured only from argv and from
the ForceCommand line, never from text the user sends.
"""

from __future__ import annotations

import os
import sys
TYPE_CHECKING = False  # not "from typing": that import alone costs ~10 ms

from kvmshell.common.errors import KvmshellError, RuntimeFailure, UsageError

from kvmshell.shell.context import JSON_VERBS, VERBS, Context

if TYPE_CHECKING:
    from kvmshell.common.vmtree import VM

def _out(text: str) -> None:
    """Print lines for a human: nothing from outside reaches the terminal
    unescaped (text.printable, the last safety net; names are escaped
    where they are formatted)."""
    from kvmshell.common.text import printable
    if sys.stdout is None:                   # descriptor 1 was closed
        raise RuntimeFailure("cannot write the result: stdout is closed")
    sys.stdout.write("\n".join(printable(line, backslash=False)
                               for line in text.split("\n")) + "\n")


def _split_vm(args: list[str]) -> tuple[str | None, list[str]]:
    if args and not args[0].startswith("-"):
        return args[0], args[1:]
    return None, args


def _no_more(verb: str, rest: list[str]) -> None:
    if rest:
        raise UsageError(f"{rest[0]}: unexpected argument to '{verb}'")


def cmd_help(ctx: Context, args: list[str]) -> int:
    if len(args) > 1:
        raise UsageError(f"{args[1]}: unexpected argument to 'help'")
    if args and args[0] not in VERBS:
        raise UsageError(f"{args[0]}: unknown verb (see 'help')")
    if ctx.json:
        from kvmshell.common import jsonout
        jsonout.emit(help_document(args[0] if args else None))
        return 0
    if args and args[0] == "start":
        from kvmshell.common import optable
        _out("usage: start [VM] [OPTIONS...]\noptions users may set:\n" + optable.user_help())
        _out(f"FILE: a name in your VM directory, or an absolute path in an image directory;\n"
             f"  letters, digits and '._+-' between slashes, at most {optable.COMPONENT_MAX}"
             f" characters there\n  and {optable.PATH_MAX} in all")
        return 0
    if args and args[0] == "console":
        from kvmshell.shell import console
        _out(console.help_text())
        return 0
    if args and args[0] in ("disk", "snapshot"):
        from kvmshell.shell import disks
        _out(disks.help_text())
        return 0
    if args:
        syn, summary = VERBS[args[0]]
        _out(f"usage: {args[0]} {syn}\n  {summary}")
        if args[0] in ("upload", "save", "rm", "images"):
            _out(_names_help())
        return 0
    from kvmshell.common import helptext
    _out("kvmshell: commands:\n" + helptext.table([(f"{verb} {syn}".rstrip(), summary)
                                                  for verb, (syn, summary) in VERBS.items()]))
    _out("VM may be left out when you own exactly one VM.  'help start' lists options.")
    _out(_names_help())
    return 0


def _names_help() -> str:
    from kvmshell.common.vmid import NAME_MAX as VM_MAX
    from kvmshell.shell.images import NAME_MAX
    return (f"VM: at most {VM_MAX} letters, digits, '_' and '-' (not first '_' or '-').\n"
            f"NAME (upload, save): letters, digits and '._+-', not first '.' or '-', at most\n"
            f"  {NAME_MAX} characters (255, less room for kvmshell's temporary name).  'images'\n"
            "  shows other bytes of a name as \\xNN; 'rm' takes that form: rm 'bad\\xff.img'")


def help_document(verb: str | None) -> dict[str, object]:
    """help --json (docs/json.md): the verbs and the user options, from the tables."""
    from kvmshell.common import optable
    verbs = [{"verb": v, "synopsis": syn, "summary": summary, "json": v in JSON_VERBS}
             for v, (syn, summary) in VERBS.items() if verb in (None, v)]
    # takes_value stays a bool (docs/json.md: a key's type never changes):
    # false for an optional value, which value_optional marks.
    options = [{"option": o.name, "takes_value": o.arity > 0,
                "value_optional": o.arity == optable.OPTIONAL,
                "value": o.kind if o.arity else None, "help": o.help, "example": o.example}
               for o in optable.TABLE if o.cls == optable.USER] if verb in (None, "start") else []
    return {"verbs": verbs, "options": options}


def _state(ctx: Context, vm: "VM", table: dict[str, list[tuple[int, bool]]] | None = None
           ) -> tuple[str, int | None]:
    """running (with QEMU's pid), busy (being started or stopped) or stopped:
    from the kernel's lock table and /proc (common/runstate.py)."""
    from kvmshell.common import runstate
    return runstate.state(vm, ctx.cfg.qemu, table)


def _running_text(pid: int | None, got: str | None) -> str:
    if not pid:
        return ""
    return f" (pid {pid}, {got})" if got else f" (pid {pid})"


def _autostart(vm: "VM") -> bool:
    from kvmshell.shell import autostart
    return autostart.marked(vm)


def cmd_list(ctx: Context, args: list[str]) -> int:
    """Your VMs and their state; a broken VM of yours is listed with the
    reason and the fix (exit status 1).  Other users' VMs are not looked at."""
    from kvmshell.common import runstate, vmtree
    from kvmshell.common.text import printable
    _no_more("list", args)
    vms: list[dict[str, object]] = []
    mine = vmtree.scan(ctx.cfg, ctx.uid)
    table = runstate.lock_table()
    several = _several(ctx)
    for vm in mine.vms:
        state, pid = _state(ctx, vm, table)
        got = None
        if pid:
            from kvmshell.shell import accel
            got = accel.running(vm)
        where = _where(ctx, vm, state) if several else None
        if where is not None and where != ctx.cfg.host_name:
            state = runstate.RUNNING          # on another host: its lease says so
        if ctx.json:
            vms.append(_status_doc(vm, state, pid, got, several, where))
        else:
            _out(f"{vm.name:<20} {state}" + _running_text(pid, got) + _on(where))
    for bad in mine.broken:
        if ctx.json:
            vms.append({"name": printable(bad.name), "state": "broken", "pid": None,
                        "accel": None, "reason": bad.reason})
        else:
            _out(f"{printable(bad.name):<20} broken: {bad.reason}")
    if ctx.json:
        # The document says what is broken (state "broken", with the reason).
        from kvmshell.common import jsonout
        jsonout.emit({"vms": vms})
        return 0
    return 1 if mine.broken else 0


def _several(ctx: Context) -> bool:
    """Do several hosts share the tree (docs/multihost.md)?"""
    from kvmshell.common import hosts
    return hosts.load(ctx.cfg) is not None


def _where(ctx: Context, vm: "VM", state: str) -> str | None:
    """The host running *vm*: this one if it runs here, else its lease's."""
    if state != "stopped":
        return ctx.cfg.host_name
    from kvmshell.common import lease
    return lease.where(ctx.cfg, vm)


def _on(where: str | None) -> str:
    return f" on host {where}" if where else ""


def _status_doc(vm: "VM", state: str, pid: int | None, got: str | None,
                several: bool = False, where: str | None = None) -> dict[str, object]:
    """status --json's object, one per VM in list --json's ``vms`` (the keys
    and their meaning: docs/json.md; ``host`` only where several hosts
    share the tree)."""
    started = None
    if pid:
        from kvmshell.shell import monitor
        started = monitor.started_at(pid)
    doc: dict[str, object] = {"name": vm.name, "state": state, "pid": pid, "accel": got,
                              "started": started, "autostart": _autostart(vm)}
    if several:
        doc["host"] = where
    return doc


def cmd_status(ctx: Context, args: list[str]) -> int:
    name, rest = _split_vm(args)
    _no_more("status", rest)
    vm = ctx.pick(name)
    state, pid = _state(ctx, vm)
    got = None
    if pid:
        # QEMU's word (QMP query-kvm), not the config's: see shell/accel.py.
        from kvmshell.shell import accel
        got = accel.running(vm)
    several = _several(ctx)
    where = _where(ctx, vm, state) if several else None
    if where is not None and where != ctx.cfg.host_name:
        state = "running"         # not routed here (a relayed command): its lease says so
    if ctx.json:
        from kvmshell.common import jsonout
        jsonout.emit(_status_doc(vm, state, pid, got, several, where))
    else:
        _out(f"{vm.name}: {state}" + _running_text(pid, got) + _on(where))
    return 0


def _after_start() -> None:
    """What the end of start needs, loaded while QEMU starts (see
    launcher.start): the autostart record and the audit record."""
    from kvmshell.shell import audit, autostart  # noqa: F401


def cmd_start(ctx: Context, args: list[str]) -> int:
    from kvmshell.shell import launcher
    from kvmshell.shell import useropts
    name, rest = _split_vm(args)
    req = useropts.parse_user(rest)          # refuse before touching anything
    ctx.audit["options"] = [w for n, v in req.values.items() for w in (n, v) if w is not None]
    vm = ctx.pick(name)
    from kvmshell.shell import accel
    choice = accel.choose(ctx.cfg, vm)      # accel_fallback = no refuses here
    pid, got = launcher.start(ctx.cfg, vm, req, choice.accels, meanwhile=_after_start)
    _out(f"{vm.name}: started (pid {pid}); 'console {vm.name}' attaches to its serial console")
    note = choice.notice(got)
    if note:
        sys.stderr.write(f"kvmshell: {vm.name}: {note}\n")
    from kvmshell.shell import autostart
    try:
        autostart.remember(vm, req.values)   # the options for the next boot
    except KvmshellError as exc:             # QEMU runs: a warning, not a failure
        sys.stderr.write(f"kvmshell: {exc.message}\n")
    return 0


def _running(ctx: Context, verb: str, args: list[str]) -> tuple["VM", int]:
    from kvmshell.common.errors import RuntimeFailure
    name, rest = _split_vm(args)
    _no_more(verb, rest)
    vm = ctx.pick(name)
    state, pid = _state(ctx, vm)
    if pid is None:
        raise RuntimeFailure(f"VM {vm.name!r} is " + ("being started or stopped: try again"
                                                      if state == "busy" else "not running"))
    return vm, pid


def cmd_stop(ctx: Context, args: list[str]) -> int:
    from kvmshell.shell import monitor
    vm, pid = _running(ctx, "stop", args)
    _out(f"{vm.name}: {monitor.stop(vm, pid, ctx.cfg.stop_timeout)}")
    return 0


def cmd_kill(ctx: Context, args: list[str]) -> int:
    from kvmshell.shell import monitor
    vm, pid = _running(ctx, "kill", args)
    monitor.kill(vm, pid)
    _out(f"{vm.name}: killed")
    return 0


def cmd_reset(ctx: Context, args: list[str]) -> int:
    from kvmshell.shell import monitor
    vm, _pid = _running(ctx, "reset", args)
    monitor.qmp_command(vm, "system_reset")
    _out(f"{vm.name}: reset")
    return 0


def cmd_save(ctx: Context, args: list[str]) -> int:
    from kvmshell.shell import images
    vm, name, size = images.save(ctx.cfg, ctx.uid, args)
    ctx.audit["vm"] = vm.name
    _out(f"{vm.name}: saved to {name} ({size} bytes); restore with 'start {vm.name} -loadvm {name}'")
    return 0


def cmd_upload(ctx: Context, args: list[str]) -> int:
    from kvmshell.shell import images
    vm, name, size = images.upload(ctx.cfg, ctx.uid, args)
    ctx.audit["vm"] = vm.name
    _out(f"{vm.name}: stored {name} ({size} bytes)")
    return 0


def cmd_images(ctx: Context, args: list[str]) -> int:
    """One line per file: bytes on disk, virtual size, and the name in the
    form 'rm' takes back (text.printable)."""
    from kvmshell.common.text import printable
    from kvmshell.shell import images
    found = images.listing(ctx.cfg, ctx.uid, args)
    if ctx.json:
        from kvmshell.common import jsonout
        jsonout.emit({"images": [{**jsonout.file_name(name), "bytes": disk, "virtual_size": virtual}
                                 for name, disk, virtual in found]})
        return 0
    _out(f"{'ON-DISK':>14} {'VIRTUAL':>16}  NAME")
    for name, disk, virtual in found:
        _out(f"{disk:>14} {'-' if virtual is None else virtual:>16}  {printable(name)}")
    return 0


def cmd_rm(ctx: Context, args: list[str]) -> int:
    from kvmshell.common.text import printable
    from kvmshell.shell import images
    vm, name = images.remove(ctx.cfg, ctx.uid, args)
    ctx.audit["vm"] = vm.name
    _out(f"{vm.name}: removed {printable(name)}")
    return 0


def cmd_quota(ctx: Context, args: list[str]) -> int:
    from kvmshell.shell import quota
    _no_more("quota", args)
    doc = quota.report(ctx.cfg, ctx.uid)
    if ctx.json:
        from kvmshell.common import jsonout
        jsonout.emit(doc)
    else:
        _out(quota.text(doc))
    return 0


def cmd_console(ctx: Context, args: list[str]) -> int:
    from kvmshell.shell import console
    return console.main(ctx, args)


def cmd_vnc(ctx: Context, args: list[str]) -> int:
    from kvmshell.shell import vnc
    return vnc.main(ctx, args)


def cmd_autostart(ctx: Context, args: list[str]) -> int:
    from kvmshell.shell import autostart
    return autostart.main(ctx, args)


def cmd_disk(ctx: Context, args: list[str]) -> int:
    from kvmshell.shell import disks
    sub, rest = (args[0], args[1:]) if args else ("", [])
    if ctx.json and sub in disks.DISK_VERBS and "--json" not in disks.DISK_VERBS[sub][0]:
        raise UsageError(f"--json: unexpected argument to 'disk {sub}'")
    if sub == "create":
        vm, name, size = disks.create(ctx.cfg, ctx.uid, rest)
        ctx.audit["vm"] = vm.name
        _out(f"{vm.name}: created {name} ({size} bytes, "
             f"{'qcow2' if name.endswith('.qcow2') else 'raw, sparse'})")
    elif sub == "clone":
        vm, name, base = disks.clone(ctx.cfg, ctx.uid, rest)
        ctx.audit["vm"] = vm.name
        _out(f"{vm.name}: created {name}, a clone of {base}")
    elif sub == "reset":
        vm, name, base = disks.reset(ctx.cfg, ctx.uid, rest)
        ctx.audit["vm"] = vm.name
        _out(f"{vm.name}: {name} is back to its base {base}")
    elif sub == "resize":
        vm, name, size = disks.resize(ctx.cfg, ctx.uid, rest)
        ctx.audit["vm"] = vm.name
        _out(f"{vm.name}: {name} is {size} bytes")
    elif sub == "info":
        doc = disks.info(ctx.cfg, ctx.uid, rest)
        if ctx.json:
            from kvmshell.common import jsonout
            jsonout.emit(doc)
        else:
            chain = doc["backing_chain"]
            snaps = doc["snapshots"]
            assert isinstance(chain, list) and isinstance(snaps, list)
            _out(f"name:           {doc['name']}\nformat:         {doc['format']}\n"
                 f"virtual size:   {doc['virtual_size']} bytes\n"
                 f"allocated:      {doc['actual_size']} bytes\n"
                 f"backing chain:  {' -> '.join(str(c) for c in chain) or '(none)'}\n"
                 f"snapshots:      {', '.join(str(x['tag']) for x in snaps) or '(none)'}")
    else:
        from kvmshell.shell.disks import DISK_VERBS
        raise UsageError(f"{sub or 'disk'}: expected disk {'|'.join(DISK_VERBS)} (see 'help disk')")
    return 0


def cmd_snapshot(ctx: Context, args: list[str]) -> int:
    from kvmshell.shell import disks
    vm, sub, disk, result = disks.snapshot(ctx.cfg, ctx.uid, args)
    ctx.audit["vm"] = vm.name
    if sub == "list":
        assert isinstance(result, list)
        for snap in result:
            _out(f"{snap['tag']}")
    else:
        past = {"create": "created", "revert": "reverted to", "delete": "deleted"}[sub]
        _out(f"{vm.name}: {disk}: {past} snapshot {result}")
    return 0


def cmd_connect(ctx: Context, args: list[str]) -> int:
    from kvmshell.shell import connect
    return connect.main(ctx, args)


HANDLERS = {
    "help": cmd_help, "list": cmd_list, "status": cmd_status,
    "start": cmd_start, "stop": cmd_stop, "kill": cmd_kill, "reset": cmd_reset,
    "save": cmd_save,
    "upload": cmd_upload, "images": cmd_images, "rm": cmd_rm, "quota": cmd_quota,
    "console": cmd_console, "vnc": cmd_vnc, "connect": cmd_connect,
    "autostart": cmd_autostart,
    "disk": cmd_disk, "snapshot": cmd_snapshot,
}

def run_words(ctx: Context, words: list[str]) -> int:
    """Validate and run one command (already split into words)."""
    from kvmshell.shell import lexer
    lexer.check_words(words)
    if not words:
        raise UsageError("no command given (try 'help')")
    verb = words[0]
    handler = HANDLERS.get(verb)
    if handler is None:
        raise UsageError(f"{verb}: unknown verb (see 'help')")
    args = words[1:]
    if verb in JSON_VERBS and "--json" in args:
        ctx.json, args = True, [a for a in args if a != "--json"]
    from kvmshell.shell import route
    if verb in route.ROUTED:
        # Several hosts on one tree: the VM runs (or must run) elsewhere.
        targets, here_ok = route.decide(ctx, verb, args)
        if targets:
            status = route.relay(ctx, targets, words, here_ok)
            if status is not None:
                return status
    return handler(ctx, args)


def run_command(ctx: Context, command: "str | list[str] | None", *, prompt: bool = False,
                refused: KvmshellError | None = None) -> int:
    """Run one command from any way in and return its exit status: *command*
    is text (SSH_ORIGINAL_COMMAND, -c, a prompt line), argv words, or None
    (no command).  Errors become one ``kvmshell:`` line on stderr; every
    command, whatever its outcome, leaves one audit record
    (:mod:`kvmshell.shell.audit`).  *refused* is an error found before (the
    invocation itself), reported and recorded the same way."""
    from kvmshell.shell import lexer
    ctx.json, ctx.audit = False, {}
    words: list[str] | None = None
    status = 0
    failure: BaseException | None = None
    try:
        if refused is not None:
            raise refused
        if command is None:
            raise UsageError("no command given and no terminal (try 'help')")
        words = lexer.split(command) if isinstance(command, str) else list(command)
        status = run_words(ctx, words)
    except KvmshellError as exc:
        _err(exc.message)
        status, failure = exc.status, exc
    except KeyboardInterrupt as exc:
        _err("interrupted")
        status, failure = 130, exc
    except BrokenPipeError as exc:
        status, failure = 1, exc
    except Exception as exc:  # a bug: one line for the user, details for the admin
        status, failure = 1, exc
        if os.environ.get("KVMSHELL_DEBUG"):
            _audit(ctx, command, words, status, failure, prompt)
            raise
        _err(f"internal error ({type(exc).__name__}: {exc})")
    _audit(ctx, command, words, status, failure, prompt)
    return status


def _audit(ctx: Context, command: "str | list[str] | None", words: list[str] | None,
           status: int, failure: BaseException | None, prompt: bool) -> None:
    # The user's output is complete before the record is sent.
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    try:
        from kvmshell.shell import audit
        audit.record(ctx, command, words, status, failure, prompt)
    except Exception:  # the record never fails the command
        if os.environ.get("KVMSHELL_DEBUG"):
            raise


def _own_options(args: list[str]) -> tuple[str, list[str]]:
    """kvmshell's own options, from a trusted argv or ForceCommand line."""
    from kvmshell.common.config import DEFAULT_PATH
    path = DEFAULT_PATH
    # --config PATH or, as GNU long options, --config=PATH.
    while args and (args[0] == "--config" or args[0].startswith("--config=")):
        if args[0] != "--config":
            path, args = args[0][len("--config="):], args[1:]
        elif len(args) < 2:
            path, args = "", []
        else:
            path, args = args[1], args[2:]
        if not path:
            raise UsageError("--config: missing PATH "
                             "(usage: kvmshell [--config PATH] VERB [ARGS...])")
    return path, args


def _is_force_command(cmd_words: list[str]) -> bool:
    return bool(cmd_words) and os.path.basename(cmd_words[0]) == "kvmshell"


def read_invocation(argv: list[str]) -> tuple[str, "str | list[str] | None"]:
    """Return (config path, the user's command): text still to be split
    (SSH_ORIGINAL_COMMAND, -c), argv words, or None for 'no command'."""
    from kvmshell.shell import lexer
    config_path, args = _own_options(argv[1:])
    original = os.environ.get("SSH_ORIGINAL_COMMAND")
    if args[:1] == ["-c"]:
        if len(args) != 2:
            raise UsageError("-c: expects exactly one command string")
        try:
            forced = lexer.split(args[1])
        except UsageError:
            forced = []          # not a ForceCommand line: the user's text
        if original is not None:
            # sshd ran our login shell with the admin's ForceCommand line:
            # that line is trusted, the user's text is SSH_ORIGINAL_COMMAND.
            if _is_force_command(forced):
                config_path, extra = _own_options(forced[1:])
                if extra:
                    raise UsageError(f"{extra[0]}: unexpected word in ForceCommand")
                return config_path, original
        else:
            # sshd with ForceCommand and no command from the client runs
            # exactly the admin's line, with no SSH_ORIGINAL_COMMAND: that is
            # "no command" (prompt on a tty, refusal otherwise).  Only a line
            # of kvmshell's own options qualifies; anything more is user words.
            # Why the config stays argv's: without SSH_ORIGINAL_COMMAND this
            # -c text may be the user's own (su -c, ssh without the drop-in),
            # and a config of the user's choosing could drop the admin's limits.
            if _is_force_command(forced):
                _, extra = _own_options(forced[1:])
                if not extra:
                    return config_path, None
        return config_path, args[1]
    if args:
        return config_path, list(args)
    if original is not None:
        return config_path, original
    return config_path, None


def _err(line: str) -> None:
    """One line on stderr, escaped; a closed or broken stderr loses it."""
    from kvmshell.common.text import printable
    try:
        if sys.stderr is not None:
            sys.stderr.write(f"kvmshell: {printable(line, backslash=False)}\n")
            sys.stderr.flush()
    except OSError:
        pass


def _flush_stdout() -> int:
    """Flush the result; a stdout that cannot take it (a full disk,
    /dev/full, a reader gone) is one line on stderr, never a traceback."""
    if sys.stdout is None:
        return 0
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    except OSError as exc:
        _err(f"cannot write the result to stdout: {exc.strerror}")
    else:
        return 0
    # What is still buffered would fail again when Python exits.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    return 1


def _std_fds() -> None:
    """Open /dev/null on stdin, stdout or stderr if the caller closed it.
    Why: the next file kvmshell opens would get that number, and a console
    socket opened as "stdout" would be sent its own output (as OpenSSH's
    sanitise_stdfd).  A closed stdin is then input that has ended, a closed
    stdout a place where output goes unseen."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)


def parse_invocation(argv: list[str]) -> tuple[str, list[str] | None]:
    """Return (config path, user words); None words means 'no command'."""
    from kvmshell.shell import lexer
    config_path, command = read_invocation(argv)
    return config_path, lexer.split(command) if isinstance(command, str) else command


def main(argv: list[str] | None = None) -> int:
    from kvmshell.common.config import DEFAULT_PATH
    argv = list(sys.argv if argv is None else argv)
    _std_fds()
    config_path, command, refused = DEFAULT_PATH, None, None
    try:
        if os.getuid() == 0:
            raise UsageError("refusing to run as root: QEMU runs as the VM user")
        config_path, command = read_invocation(argv)
    except KvmshellError as exc:
        refused = exc
    ctx = Context(config_path)
    if refused is None and command is None and os.isatty(0) and os.isatty(1):
        try:
            from kvmshell.shell import interactive
        except ImportError:
            refused = UsageError("no command given (try 'help')")
        else:
            return int(interactive.loop(ctx, lambda line: run_command(ctx, line, prompt=True)))
    status = run_command(ctx, command, refused=refused)
    return _flush_stdout() or status


def run() -> None:
    """The installed entry point: :func:`main`, then leave at once.

    Why os._exit: the interpreter's teardown costs a few ms of CPU on every
    command (on ``start`` it is the last thing between QEMU being ready and
    the user's prompt) and does nothing here: every file kvmshell opens is
    closed by the time main returns (with-blocks, finally), it starts no
    thread and registers no atexit handler.  Only the standard streams hold
    buffered output, and they are flushed first."""
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:        # the reader went away (a closed pipe)
        code = code or 1
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
