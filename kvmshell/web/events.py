"""What the web server logs: logins, failures, refusals, actions.

Each event is one line, to syslog (authpriv, ident ``kvmshell-web``) and to
stderr (the journal, under systemd).  The login failure line,

    authentication failure for 'USER' from ADDR

is what fail2ban's filter matches (fail2ban/kvmshell-web.conf).  User
names are written with repr() and cut, so no client text can forge a line.
"""

from __future__ import annotations

import sys
import syslog

PROG = "kvmshell-web"
_opened = False


def log(msg: str) -> None:
    """Log one event line (newlines in *msg* are flattened)."""
    global _opened
    line = msg.replace("\n", " ").replace("\r", " ")
    if not _opened:
        syslog.openlog(PROG, syslog.LOG_PID, syslog.LOG_AUTHPRIV)
        _opened = True
    syslog.syslog(syslog.LOG_NOTICE, line)
    try:
        sys.stderr.write(f"{PROG}: {line}\n")
        sys.stderr.flush()
    except OSError:
        pass
