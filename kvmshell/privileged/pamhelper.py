"""kvmshell-pamhelper: the web front door's login check (runs as root via sudo).

Whole input:

    argv   auth USER ADDR      USER a login name, ADDR the client's IP address
                               (or ``-`` when the web server does not know it)
    stdin  the password        at most 1024 bytes, one optional final newline

Whole output: one line on stdout, ``ok`` or ``denied``; exit 0 or 2.
Anything malformed is refused (one line on stderr, exit 2) before PAM is
asked; a failure of the helper itself exits 1.

Why a root helper: only root can check another user's password (the
shadow file), and the web server runs as its own unprivileged user
(``web_user``, kvmweb), which must not be able to read it.  So the web
server hands the password here, through sudo, and gets a yes or no.

Who may call: root through sudo only, with ``SUDO_UID`` the uid of
``web_user`` (the shipped sudoers drop-in lets only that user run it; the
helper checks again, so a wider sudoers line is not enough).  Everything
else comes from the root-owned config at the fixed path the stub gives:
the PAM service (``web_pam_service``, default ``kvmshell``: pam/kvmshell),
the VM users' group (``group``), the web user.

What passes: PAM authenticates USER (pam_authenticate: password, and the
stack's own pam_faildelay and pam_faillock, if configured) **and** accepts
the account (pam_acct_mgmt: a locked or expired account fails), with
``PAM_RHOST`` set to ADDR; and USER is a member of the group (checked here
too, not only by the PAM service).  The shipped service sets PAM's fail
delay before its (requisite) group check, so a refusal waits the same
delay (a member's also includes the password hash), and reads the same,
whatever the reason, while an account outside the group never reaches
the host's password stack (nor pam_faillock).  Root never passes.

Every attempt goes to syslog (authpriv): user, address, caller, answer and
PAM's reason.  The caller's descriptors never hold it
(:mod:`kvmshell.privileged.guard`: a deadline, which also bounds the read
of the password, and stdout and stderr written only if that does not
block).  Imports: the shared core, the stdlib and python-pam (an import
contract in setup.cfg says so).
"""

from __future__ import annotations

import grp
import os
import pwd
import sys

from kvmshell.common import auth, username
from kvmshell.common.errors import KvmshellError
from kvmshell.privileged import caller, guard
from kvmshell.privileged.guard import Failed, Refused, log

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kvmshell.common.config import Config

CONFIG = "/etc/kvmshell/kvmshell.conf"
PROG = "kvmshell-pamhelper"
VERBS = ("auth",)
PASSWORD_MAX = 1024
# What sudo (env_reset) may leave in the environment, less what python-pam
# would pass on to PAM (DISPLAY would become PAM_TTY) or none of this
# helper's callers has: anything else is refused.
_ENV_OK = caller.SUDO_ENV - {"DISPLAY", "XAUTHORITY", "XAUTHORIZATION", "PS1", "PS2",
                             "KRB5CCNAME", "XDG_CURRENT_DESKTOP"}


def check_request(argv: list[str], env: dict[str, str]) -> tuple[str, str, int]:
    """(user, address, caller uid) from a well-formed request; else Refused."""
    uid = caller.sudo_caller(env, _ENV_OK)
    _verb, user, addr = caller.request(argv, PROG, "auth USER ADDR", VERBS)
    try:
        username.check_user_name(user)
    except KvmshellError as exc:
        raise Refused(exc.message) from exc
    return user, parse_address(addr), uid


def parse_address(addr: str) -> str:
    """The client's address, re-rendered, or ``-`` (unknown)."""
    if addr == "-":
        return addr
    import ipaddress
    try:
        return str(ipaddress.ip_address(addr))
    except ValueError as exc:
        raise Refused(f"invalid address {addr[:60]!r}") from exc


def read_password(fd: int) -> str:
    """The password from *fd*: at most PASSWORD_MAX bytes of UTF-8, one
    optional final newline, no NUL, CR or other newline."""
    data = b""
    while len(data) <= PASSWORD_MAX + 1:
        chunk = os.read(fd, PASSWORD_MAX + 2 - len(data))
        if not chunk:
            break
        data += chunk
    if data.endswith(b"\n"):
        data = data[:-1]
    if len(data) > PASSWORD_MAX:
        raise Refused(f"password longer than {PASSWORD_MAX} bytes")
    if not data:
        raise Refused("no password on stdin")
    if any(b in data for b in (b"\0", b"\n", b"\r")):
        raise Refused("password with a NUL or line break")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refused("password is not UTF-8") from exc


def web_uid(cfg: "Config") -> int:
    try:
        return pwd.getpwnam(cfg.web.user).pw_uid
    except KeyError as exc:
        raise Failed(f"web_user {cfg.web.user!r} does not exist (admin: make install)") from exc


def in_group(user: str, group: str) -> bool:
    """*user* exists, is not root, and has *group* as its primary or a
    supplementary group (:func:`kvmshell.privileged.caller.in_group`)."""
    try:
        return caller.in_group(pwd.getpwnam(user), grp.getgrnam(group))
    except KeyError:
        return False


def run(argv: list[str], env: dict[str, str], config_path: str = CONFIG, out_fd: int = 1) -> int:
    user, addr, uid = check_request(argv, env)
    cfg = caller.host_config(config_path)
    try:
        service, group = cfg.web.pam_service, cfg.group
    except KvmshellError as exc:
        raise Failed(exc.message) from exc
    if uid != web_uid(cfg):
        # Why: sudoers lets only the web user run this; a wider sudoers line
        # (an admin's mistake) must not turn it into a password oracle.
        raise Refused(f"caller uid {uid} is not the web user {cfg.web.user!r}")
    password = read_password(0)
    who = f"auth {user} from {addr} (caller uid {uid})"
    ok, reason = auth.authenticate(user, password, service,
                                   rhost=None if addr == "-" else addr)
    member = in_group(user, group)
    if ok and member:
        log(f"{who}: accepted")
        guard.say(out_fd, b"ok\n")
        return 0
    log(f"{who}: denied ({'PAM: ' + reason if not ok else 'not in group ' + group})")
    guard.say(out_fd, b"denied\n")
    return 2


def main(config_path: str = CONFIG) -> int:
    """The helper's entry point (the installed stub calls it); the exit status."""
    return guard.main(PROG, lambda out_fd: run(list(sys.argv), dict(os.environ), config_path,
                                               out_fd))


if __name__ == "__main__":
    sys.exit(main())
