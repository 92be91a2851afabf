"""The user's audit record: one syslog record per kvmshell command.

Imported by :mod:`kvmshell.shell.cli` once a command is over (accepted,
refused or failed), never before.  The fields, in this order (format and
quoting in :mod:`kvmshell.common.auditlog`; see also docs/operations.md):

    user uid        the caller (the real uid; kvmshell runs as the VM user)
    via             ssh (SSH_CONNECTION set), prompt (the interactive
                    prompt), tty (a local terminal), local (none of these:
                    a script, su -c without a terminal, kvmadm autostart)
    client          the client address and port from SSH_CONNECTION
    client_port
    tty             the terminal on stdin, if any
    verb vm         the verb; the VM (the one the verb resolved, else the
                    word the user typed in the VM's place)
    outcome         ok, refused (the request was turned down: bad input, a
                    budget) or failed (a valid request that did not work)
    status          the exit status
    reason          the one-line message the user saw, for refused/failed
    options         start: the options as parsed
    args            the words after the verb as typed, as one command line
                    kvmshell's lexer splits back into the same words
    command         only when the lexer refused the text itself (a control
                    character, a broken quote): the raw text

What a record proves: it is sent by a process running as the user (as is
the command), so like anything the user's own code can write to
``/dev/log`` it is the user's claim; journald's trusted fields (``_UID``,
``_PID``, ``_EXE``) say who really sent it.
"""

from __future__ import annotations

import os

from kvmshell.common import auditlog

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kvmshell.shell.context import Context

PROGRAM = "kvmshell"


def way_in(prompt: bool) -> "list[tuple[str, str | int | None]]":
    """The via, client, client_port and tty fields for this process."""
    ssh = os.environ.get("SSH_CONNECTION")
    client = port = None
    if ssh is not None:
        parts = ssh.split(" ")
        if len(parts) == 4:
            client, port = parts[0], parts[1]
        else:
            client = ssh          # not sshd's shape: kept whole (and escaped)
    tty = None
    try:
        if os.isatty(0):
            tty = os.ttyname(0)
    except OSError:
        pass
    via = "prompt" if prompt else "ssh" if ssh is not None else "tty" if tty else "local"
    return [("via", via), ("client", client), ("client_port", port), ("tty", tty)]


def typed_vm(verb: str, args: list[str]) -> str | None:
    """The word in the VM's place of *verb*'s synopsis, if the user gave one:
    the first of the leading plain words when there are more of them than
    the synopsis requires after [VM]."""
    from kvmshell.shell.context import VERBS
    syn = VERBS.get(verb, ("", ""))[0].split()
    if not syn or syn[0] != "[VM]":
        return None
    required = sum(1 for t in syn[1:] if t.isalpha() and t.isupper())
    lead = []
    for a in args:
        if a.startswith("-"):
            break
        lead.append(a)
    return lead[0] if len(lead) > required else None


def fields(ctx: "Context", command: "str | list[str] | None", words: list[str] | None,
           status: int, failure: BaseException | None,
           prompt: bool) -> "tuple[str, list[tuple[str, str | int | None]]]":
    """(outcome, fields) of the record for one command."""
    import pwd
    from kvmshell.shell import lexer
    uid = os.getuid()
    try:
        user: str | None = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = None
    raw = None
    if words is None and isinstance(command, str):
        raw = command
        words = lexer.split_for_the_record(command)
    verb = words[0] if words else None
    args = words[1:] if words else []
    vm = ctx.audit.get("vm") or (typed_vm(verb, args) if verb else None)
    if failure is None and status == 0:
        outcome, reason = "ok", None
    elif failure is None:
        outcome, reason = "failed", f"exit status {status}"
    elif isinstance(failure, KeyboardInterrupt):
        outcome, reason = "failed", "interrupted"
    elif isinstance(failure, BrokenPipeError):
        outcome, reason = "failed", "the output was closed"
    else:
        outcome = str(getattr(failure, "outcome", "failed"))
        reason = str(getattr(failure, "message", None)
                     or f"internal error ({type(failure).__name__}: {failure})")
    options = ctx.audit.get("options")
    out: "list[tuple[str, str | int | None]]" = [("user", user), ("uid", uid)]
    out += way_in(prompt)
    out += [("verb", verb), ("vm", vm if isinstance(vm, str) else None),
            ("outcome", outcome), ("status", status), ("reason", reason),
            ("options", auditlog.join_words(options) if isinstance(options, list) else None),
            ("args", auditlog.join_words(args) if args else None),
            ("command", raw)]
    # Several hosts (docs/multihost.md): where a front door carried the
    # command, and on the far host, which front door it came from.
    relayed_to = ctx.audit.get("host")
    if isinstance(relayed_to, str):
        out.append(("relayed_to", relayed_to))
    relayed_from = os.environ.get("KVMSHELL_RELAYED")
    if relayed_from:
        out.append(("relayed_from", relayed_from[:64]))
    return outcome, out


def record(ctx: "Context", command: "str | list[str] | None", words: list[str] | None,
           status: int, failure: BaseException | None, prompt: bool) -> bool:
    """Send the command's record to the configured syslog socket (the
    default one if the config cannot be read); True if syslog took it."""
    from kvmshell.common.errors import KvmshellError
    outcome, out = fields(ctx, command, words, status, failure, prompt)
    try:
        path = ctx.cfg.log_socket
    except KvmshellError:
        path = auditlog.DEFAULT_SOCKET
    return auditlog.send(path, PROGRAM, outcome, out)
