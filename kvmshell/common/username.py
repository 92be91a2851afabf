"""Login names, as kvmshell accepts them from a web login form or the
login helper's argv (parse, never filter)."""

from __future__ import annotations

from kvmshell.common.errors import UsageError

USER_NAME_MAX = 32
_FIRST = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_REST = _FIRST | frozenset("0123456789.-")


def check_user_name(name: str) -> str:
    """*name* if it is a plausible login name: 1-32 of ``[A-Za-z0-9_.-]``,
    not starting with a digit, ``.`` or ``-`` (Debian's adduser accepts
    less).  Raises UsageError naming it (repr, cut to 40) otherwise."""
    if not 1 <= len(name) <= USER_NAME_MAX or name[0] not in _FIRST \
            or any(c not in _REST for c in name):
        raise UsageError(f"invalid user name {name[:40]!r}")
    return name
