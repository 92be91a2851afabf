"""kvmshell-relay: the front door's half of routing (the relay account, via sudo).

Whole input: ``HOST [tty]`` and the environment variable :data:`CRED_ENV`
(a MUNGE credential), from kvmshell run by a VM user (``sudo -n -u
kvmrelay``; sudoers.d/kvmshell-relay keeps that one variable).  It runs as
the relay account, which alone can read the relay key, and does one thing:
``exec`` OpenSSH to HOST's relay account with the MUNGE credential sent as
that variable (``SendEnv``; the far sshd accepts it for the relay account
alone), stdin, stdout and stderr passed through unchanged.  The credential
is never in an argv: /proc/PID/cmdline is every user's to read, and
whoever reads a credential before the far host has decoded it can send it
first and have the command run as its maker.  Everything else it
takes from root-owned files: the host's address from the host list
(``hosts_file``), the key (``relay_key``), the hosts' keys
(``relay_known_hosts``, checked strictly), from the config at the fixed
path :data:`CONFIG`.

It cannot make anyone's credential: the caller brings its own, which only
MUNGE can have made, for the caller's uid; the far host believes nothing
else (kvmshell.privileged.relayhelper).  So the relay key in a VM user's
hands would gain nothing either; the sudo rule keeps it out of them anyway.

Refusals: one line on stderr, exit 2; syslog (authpriv).  Connections to
each host are shared (OpenSSH's ControlMaster, sockets in the relay
account's own directory :data:`MUX_DIR`), so a relayed command costs one
new session, not a new key exchange.
"""

from __future__ import annotations

import os
import sys

from kvmshell.privileged.guard import Refused, log

CONFIG = "/etc/kvmshell/kvmshell.conf"
PROG = "kvmshell-relay"
SSH = "/usr/bin/ssh"
MUX_DIR = "/run/kvmshell-relay"
CRED_MAX = 16384
CRED_ENV = "KVMSHELL_CREDENTIAL"
_CRED_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=:")


def check_credential(cred: str) -> str:
    """MUNGE's text form (``MUNGE:`` base64 ``:``), bounded; else Refused."""
    if (not cred.startswith("MUNGE:") or not cred.endswith(":") or len(cred) > CRED_MAX
            or not _CRED_CHARS.issuperset(cred)):
        raise Refused("the credential is not a MUNGE credential")
    return cred


def ssh_argv(user: str, address: str, tty: bool,
             key: str, known: str, mux: str | None) -> list[str]:
    """OpenSSH's argv: no config file but these options; the host's key
    checked against *known* only; no escape character (console and display
    bytes pass as they are); a terminal only when the user has one; the
    credential goes as the environment variable :data:`CRED_ENV` (no
    command: the far side's forced command is the relay helper)."""
    argv = [SSH, "-F", "/dev/null", "-i", key, "-l", user,
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "CheckHostIP=no",
            "-o", "ConnectTimeout=5", "-o", "ServerAliveInterval=2",
            "-o", "ServerAliveCountMax=3",
            "-o", "LogLevel=ERROR", "-o", "ForwardAgent=no", "-o", "ForwardX11=no",
            "-o", "ClearAllForwardings=yes", "-o", f"SendEnv={CRED_ENV}",
            "-e", "none", "-tt" if tty else "-T"]
    if mux is not None:
        argv += ["-o", "ControlMaster=auto", "-o", f"ControlPath={mux}/%C",
                 "-o", "ControlPersist=60"]
    return argv + ["--", address]


def _mux_dir() -> str | None:
    """The relay account's directory for shared connections, made 0700 if
    missing; None (no sharing) if it is not this account's alone."""
    import stat
    try:
        os.mkdir(MUX_DIR, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    st = os.lstat(MUX_DIR)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return MUX_DIR


def run(argv: list[str], config: str = CONFIG) -> int:
    from kvmshell.common import config as cfgmod, hosts
    from kvmshell.common.errors import ConfigError
    if not 2 <= len(argv) <= 3 or (len(argv) == 3 and argv[2] != "tty"):
        raise Refused(f"usage: {CRED_ENV}=CREDENTIAL kvmshell-relay HOST [tty]")
    host, cred, tty = argv[1], check_credential(os.environ.get(CRED_ENV, "")), len(argv) == 3
    try:
        cfg = cfgmod.load(config)
        known = hosts.load(cfg)
    except ConfigError as exc:
        raise Refused(exc.message) from exc
    import pwd
    if pwd.getpwuid(os.getuid()).pw_name != cfg.relay_user:
        raise Refused(f"must run as {cfg.relay_user} (through sudo)")
    if known is None or host not in known:
        raise Refused(f"{host[:64]!r} is not in the host list")
    if host == cfg.host_name:
        raise Refused("the host is this one")
    log(f"uid={os.environ.get('SUDO_UID', '?')} relay to {host}")
    args = ssh_argv(cfg.relay_user, known[host], tty, cfg.relay_key,
                    cfg.relay_known_hosts, _mux_dir())
    os.execve(SSH, args, {"PATH": "/usr/bin:/bin", "LC_ALL": "C", CRED_ENV: cred,
                          "HOME": pwd.getpwuid(os.getuid()).pw_dir or "/"})
    return 1  # not reached


def main(config: str = CONFIG) -> int:
    import syslog
    syslog.openlog(PROG, syslog.LOG_PID, syslog.LOG_AUTHPRIV)
    try:
        return run(sys.argv, config)
    except Refused as exc:
        log(f"uid={os.environ.get('SUDO_UID', '?')}: refused: {exc}")
        sys.stderr.write(f"{PROG}: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"{PROG}: {exc.strerror}\n")
        return 1
