"""Routing: carry a command to the host that runs (or must run) its VM.

When several hosts share the VM tree (``hosts_file`` exists), a command
about a VM that runs on another host -- its lease is held there
(common/lease.py) -- goes to that host; a ``start`` of a stopped VM goes to
the host the pin and the placement rule choose (:func:`placement`).
Everything else runs here, on the shared tree.

How it is carried (docs/multihost.md):

1. kvmshell, as the user, asks MUNGE for a credential (``munge``, the
   cluster's credential service: munged signs the caller's uid and gid,
   which the far host's munged checks) over a payload binding the target
   host, this host, the command's exact words and a nonce; decodable by
   root only (``--restrict-uid 0``), within :data:`TTL` seconds, once.
2. It runs the relay client through sudo as the relay account
   (``relay_user``), which alone can read the relay key; the client sends
   the credential (in the environment variable :data:`CRED_ENV`, never in
   an argv, which every user can read) with ssh's ``SendEnv`` to the far host's relay account, stdin, stdout
   and stderr passed through unchanged (a terminal when there is one).
3. There the key's forced command is the relay helper (root, through
   sudo): it decodes the credential, takes the user from it alone, checks
   that it is for this host, drops to that user and runs kvmshell with the
   credential's words, which checks everything again as for a direct login.

A relayed kvmshell never relays again (``KVMSHELL_RELAYED``, set by the
helper): if the VM has moved meanwhile, it says so.  A user who sets that
variable on a direct login only keeps their commands on that host.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kvmshell.common.config import Config
    from kvmshell.common.vmtree import VM
    from kvmshell.shell.context import Context

# Verbs about one VM: they go where the VM runs.  help, list and quota stay.
ROUTED = frozenset({"status", "start", "stop", "kill", "reset", "save", "upload", "images",
                    "rm", "disk", "snapshot", "console", "vnc", "connect", "autostart"})
RELAYED_ENV = "KVMSHELL_RELAYED"
CRED_ENV = "KVMSHELL_CREDENTIAL"     # relayclient.CRED_ENV
TTL = 60
SUDO = "/usr/bin/sudo"
SSH_FAILED = 255       # ssh's own failure (could not connect or authenticate)


def _vm(ctx: "Context", verb: str, args: list[str]) -> "VM | None":
    """The caller's VM the command is about (as the verb will pick it), or
    None (no such VM of the caller's: the verb reports it, here)."""
    from kvmshell.common import vmtree
    from kvmshell.common.errors import KvmshellError
    from kvmshell.shell.audit import typed_vm
    if verb in ("disk", "snapshot"):
        rest = [a for a in args[1:] if not a.startswith("-")]
        name = rest[0] if len(rest) > 1 else None
    else:
        name = typed_vm(verb, args)
    try:
        return vmtree.pick(ctx.cfg, ctx.uid, name)
    except KvmshellError:
        if name is not None and verb in ("disk", "snapshot"):
            try:                      # the word was a disk's name: the only VM
                return vmtree.pick(ctx.cfg, ctx.uid, None)
            except KvmshellError:
                return None
        return None


def placement(cfg: "Config", vm: "VM", known: dict[str, str]) -> list[str]:
    """The hosts *vm* may start on, best first: its ``-host`` pin (else
    every host of the list), by the rule: fewest running VMs (from the
    owner records but *vm*'s own, which is stopped), then this host (no
    hop), then by name."""
    from kvmshell.common import lease
    from kvmshell.shell.launcher import admin_plan
    allowed = [h for h in (admin_plan(vm).hosts or list(known)) if h in known]
    load = lease.running_per_host(cfg, but=vm.name)
    return sorted(allowed, key=lambda h: (load.get(h, 0), h != cfg.host_name, h))


def decide(ctx: "Context", verb: str, args: list[str]) -> tuple[list[str], bool]:
    """The hosts to carry this command to, in order (a start tries the next
    when one cannot be reached), and whether it may run here when none can
    be reached (a start that the rule ranks this host behind them); ([],
    True) to run it here."""
    here: tuple[list[str], bool] = ([], True)
    if verb not in ROUTED or os.environ.get(RELAYED_ENV):
        return here
    from kvmshell.common import hosts, lease
    known = hosts.load(ctx.cfg)
    if known is None:
        return here
    vm = _vm(ctx, verb, args)
    if vm is None:
        return here
    me = ctx.cfg.host_name
    where = lease.where(ctx.cfg, vm)
    if where is not None:
        return ([where], False) if where != me and where in known else here
    if verb != "start":
        return here
    order = placement(ctx.cfg, vm, known)
    if not order or order[0] == me:
        return here                    # here (or refused here: the pin's message)
    return (order[: order.index(me)], True) if me in order else (order, False)


def credential(cfg: "Config", target: str, words: list[str]) -> str:
    """A MUNGE credential of the caller for *words* on host *target*."""
    import json
    import subprocess
    from kvmshell.common.errors import RuntimeFailure
    payload = json.dumps({"v": 1, "host": target, "from": cfg.host_name, "words": words,
                          "nonce": os.urandom(16).hex()}).encode()
    try:
        r = subprocess.run([cfg.munge, "--restrict-uid", "0", "--ttl", str(TTL)],
                           input=payload, capture_output=True, timeout=20,
                           env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeFailure(f"cannot reach host {target}: MUNGE: {exc}") from exc
    cred = r.stdout.decode("ascii", "replace").strip()
    if r.returncode or not cred.startswith("MUNGE:"):
        why = r.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["failed"]
        raise RuntimeFailure(f"cannot reach host {target}: MUNGE: {why[0]}")
    return cred


def relay(ctx: "Context", targets: list[str], words: list[str],
          here_ok: bool = False) -> int | None:
    """Run *words* on the first of *targets* that can be reached; its exit
    status.  None when none can be and *here_ok*: the caller runs it here.
    Raises RuntimeFailure when none can be reached otherwise."""
    import subprocess
    from kvmshell.common.errors import RuntimeFailure
    cfg = ctx.cfg
    tty = os.isatty(0) and os.isatty(1)
    sys.stdout.flush()
    sys.stderr.flush()
    status = SSH_FAILED
    for i, target in enumerate(targets):
        ctx.audit["host"] = target
        # The credential is a bearer token until the far host's munged has
        # decoded it: never in an argv (any user reads /proc/PID/cmdline),
        # only in environments (readable by their process's owner alone):
        # sudo keeps this one variable for the relay client, which sends it
        # with ssh's SendEnv (sudoers.d/kvmshell-relay, the sshd drop-in).
        argv = [SUDO, "-n", "-u", cfg.relay_user, cfg.relay_client, target] \
            + (["tty"] if tty else [])
        env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C",
               CRED_ENV: credential(cfg, target, words)}
        try:
            status = subprocess.call(argv, env=env)
        except OSError as exc:
            raise RuntimeFailure(f"cannot run the relay client: {exc.strerror}") from exc
        if status != SSH_FAILED:
            return status
        nxt = targets[i + 1] if i + 1 < len(targets) else (cfg.host_name if here_ok else None)
        if nxt is not None:
            sys.stderr.write(f"kvmshell: host {target} cannot be reached; trying {nxt}\n")
            sys.stderr.flush()
    if here_ok:
        ctx.audit.pop("host", None)
        return None
    raise RuntimeFailure(f"host {targets[-1]} cannot be reached")
