"""What the web server logs: logins, failures, refusals, actions.

Each event is one line, to syslog (authpriv, ident ``kvmshell-web``) and to
stderr (the journal, under systemd).  The login failure line,

    authentication failure for 'USER' from ADDR

is what fail2ban's filter matches (fail2ban/kvmshell-web.conf).  User
names that are no valid login names are written as ``'-'``.  Other client
text (a URL path, an Origin) may reach a line: every control character in
it -- C0 (NUL and line feed end a journal record: what followed would be
a record of the client's making, e.g. a failure line for fail2ban), DEL,
C1, and the Unicode line and paragraph separators -- is written as
``\\xNN``/``\\uNNNN``, and a line is cut at :data:`LINE_MAX` characters
(journald also splits overlong lines into records of their own).
"""

from __future__ import annotations

import sys
import syslog

PROG = "kvmshell-web"
LINE_MAX = 2000
_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7f, 0xa0)]}
_ESCAPES.update({c: f"\\u{c:04x}" for c in (0x2028, 0x2029)})
_opened = False


def log(msg: str) -> None:
    """Log *msg* as one line: control characters escaped, cut at
    :data:`LINE_MAX` characters."""
    global _opened
    line = msg.translate(_ESCAPES).encode("utf-8", "backslashreplace").decode("utf-8")
    if len(line) > LINE_MAX:
        line = line[:LINE_MAX] + "..."
    if not _opened:
        syslog.openlog(PROG, syslog.LOG_PID, syslog.LOG_AUTHPRIV)
        _opened = True
    syslog.syslog(syslog.LOG_NOTICE, line)
    try:
        sys.stderr.write(f"{PROG}: {line}\n")
        sys.stderr.flush()
    except OSError:
        pass
