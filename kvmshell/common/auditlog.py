"""The audit record: one syslog line of ``key=value`` fields, for kvmshell and kvmadm.

Shared by the user's side (one record per kvmshell command,
:mod:`kvmshell.shell.audit`) and kvmadm (one record per change to the
tree).  Imported only once a command is over, so it costs nothing on the
way to QEMU.

The record (the syslog message, after ``program[pid]: ``) is a list of
``key=value`` fields separated by one space, keys ``[a-z_]+`` in a fixed
order.  A value made only of ``A-Za-z0-9`` and ``._-+:/@,%`` is written as
it is; any other value is written in double quotes, where ``"`` is ``\\"``,
``\\`` is ``\\\\``, and every byte of the value's UTF-8 form outside
printable ASCII (control characters, DEL, non-ASCII, and bytes of an
undecodable file name carried as surrogates) is ``\\xNN``.  So a record
is one line of printable ASCII whatever the user typed: no text can end it
early, forge a second record or put a terminal escape in front of the admin
(the class of sudo's CVE-2023-28486/28487).  :func:`parse` is the inverse.
Each value is cut to :data:`MAX_VALUE` characters before escaping; a cut
record carries ``truncated=yes``.

The frame is what glibc's ``syslog(3)`` writes to ``/dev/log`` (RFC 3164:
``<PRI>Mmm dd hh:mm:ss program[pid]: message``), so journald and rsyslog
file it under the program name; the facility is authpriv.

Why not the stdlib ``syslog`` module: it calls ``syslog(3)``, which sends
on a blocking socket.  When the log daemon stops reading (a stalled
journald, a full queue) the command would hang, and without a signal
handler that can interrupt it (measured: a ``SIGALRM`` does not).
:func:`send` uses its own non-blocking datagram socket instead: a log that
is down, missing or full drops the record and the command goes on.
"""

from __future__ import annotations

import os

FACILITY_AUTHPRIV = 10
INFO, NOTICE, WARNING = 6, 5, 4
# outcome -> severity
SEVERITY = {"ok": INFO, "refused": NOTICE, "skipped": NOTICE, "failed": WARNING}
MAX_VALUE = 512
DEFAULT_SOCKET = "/dev/log"

_BARE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-+:/@,%")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def quote(value: str) -> str:
    """One value as it appears in a record (see the module docstring)."""
    if value and all(c in _BARE for c in value):
        return value
    out = ['"']
    for b in value.encode("utf-8", "surrogateescape"):
        if b == 0x22:
            out.append('\\"')
        elif b == 0x5C:
            out.append("\\\\")
        elif 0x20 <= b < 0x7F:
            out.append(chr(b))
        else:
            out.append(f"\\x{b:02x}")
    out.append('"')
    return "".join(out)


def message(fields: "list[tuple[str, str | int | None]]") -> str:
    """The record's text: *fields* in order, ``None`` values left out."""
    parts = []
    cut = False
    for key, value in fields:
        if value is None:
            continue
        text = str(value)
        if len(text) > MAX_VALUE:
            text, cut = text[:MAX_VALUE], True
        parts.append(f"{key}={quote(text)}")
    if cut:
        parts.append("truncated=yes")
    return " ".join(parts)


def parse(record: str) -> dict[str, str]:
    """The fields of a record made by :func:`message` (the inverse of its
    quoting); raises ValueError on text it did not make."""
    out: dict[str, str] = {}
    i, n = 0, len(record)
    while i < n:
        if record[i] == " ":
            i += 1
            continue
        eq = record.find("=", i)
        if eq < 0:
            raise ValueError(f"no '=' after {record[i:i + 20]!r}")
        key = record[i:eq]
        i = eq + 1
        if i < n and record[i] == '"':
            raw = bytearray()
            i += 1
            while True:
                if i >= n:
                    raise ValueError(f"unterminated value of {key}")
                c = record[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\":
                    nxt = record[i + 1:i + 2]
                    if nxt == "x":
                        raw.append(int(record[i + 2:i + 4], 16))
                        i += 4
                        continue
                    if nxt not in ('"', "\\"):
                        raise ValueError(f"bad escape in {key}")
                    raw += nxt.encode()
                    i += 2
                    continue
                raw += c.encode("ascii")
                i += 1
            out[key] = raw.decode("utf-8", "surrogateescape")
        else:
            end = record.find(" ", i)
            end = n if end < 0 else end
            out[key] = record[i:end]
            i = end
    return out


def frame(program: str, text: str, severity: int, now: float | None = None) -> bytes:
    """The datagram for ``/dev/log``: ``<PRI>Mmm dd hh:mm:ss program[pid]: text``."""
    import time
    t = time.localtime(now)
    stamp = f"{_MONTHS[t.tm_mon - 1]} {t.tm_mday:2d} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
    pri = FACILITY_AUTHPRIV * 8 + severity
    return f"<{pri}>{stamp} {program}[{os.getpid()}]: {text}".encode("ascii")


def send(path: str, program: str, outcome: str,
         fields: "list[tuple[str, str | int | None]]") -> bool:
    """Send one record to the syslog socket *path*; True if it was taken.

    Never blocks and never raises: a missing socket, a refused connection
    or a full queue drops the record (the caller's command must not fail
    or hang because syslog is down).  Datagram sockets only, as journald's
    and rsyslog's ``/dev/log`` are.
    """
    # Why _socket: the socket module's import costs ~3 ms (enum, selectors)
    # on every command; the three calls needed here are _socket's own.
    import _socket
    data = frame(program, message(fields), SEVERITY.get(outcome, NOTICE))
    try:
        s = _socket.socket(_socket.AF_UNIX,
                           _socket.SOCK_DGRAM | _socket.SOCK_NONBLOCK | _socket.SOCK_CLOEXEC)
    except OSError:
        return False
    try:
        s.connect(path)
        s.send(data)
        return True
    except OSError:       # ENOENT, ECONNREFUSED, EAGAIN (queue full), EMSGSIZE...
        return False
    finally:
        s.close()


def join_words(words: "list[str]") -> str:
    """Words as one command line that kvmshell's lexer splits back into the
    same words: plain words as they are, others in single quotes."""
    out = []
    for w in words:
        if w and all(c in _BARE or c == "=" for c in w):
            out.append(w)
        else:
            out.append("'" + w.replace("'", "'\\''") + "'")
    return " ".join(out)
