"""The host list: which hosts share the VM tree, and where each is reached.

Format (``hosts_file``, default ``/etc/kvmshell/hosts``): one host a line,
``NAME ADDRESS``; ``#`` starts a comment.  NAME is a host name as
``host_name`` spells it (1-63 of ``[a-z0-9-]``), ADDRESS an IP address or
a DNS name (what ssh connects to).  Root-owned and not group/world-writable,
like the config: the list decides where kvmshell carries a user's command,
and which names kvmadm accepts in a ``-host`` pin.  Read by kvmshell
(placement, routing), the relay client and helper, and kvmadm (the pin).

A missing file means "this host is alone": no lease is required, nothing
is routed, and a ``-host`` pin is refused.
"""

from __future__ import annotations

from kvmshell.common.config import Config, is_host_name
from kvmshell.common.errors import ConfigError
from kvmshell.common.rootfile import read_root_file

_ADDR = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.:")
MAX_BYTES = 65536


def is_name(name: str) -> bool:
    """A host name of the list's form (1-63 of [a-z0-9-], not first '-')."""
    return is_host_name(name)


def load(cfg: Config, *, need_self: bool = True) -> dict[str, str] | None:
    """The host list, NAME -> ADDRESS in the file's order; None when the
    file does not exist (one host).  Raises ConfigError for a file that is
    not root's or is over :data:`MAX_BYTES` bytes
    (:func:`~kvmshell.common.rootfile.read_root_file`), or a bad line
    (naming it)."""
    path = cfg.hosts_file
    # Why root's: the list decides where a user's command is carried.
    data = read_root_file(path, MAX_BYTES, "host list")
    if data is None:
        return None
    out: dict[str, str] = {}
    for lineno, raw in enumerate(data.decode("ascii", "replace").splitlines(), 1):
        line = raw.partition("#")[0].split()
        if not line:
            continue
        if len(line) != 2 or not is_name(line[0]) or not _ADDR.issuperset(line[1]) \
                or line[1][0] in "-.:" and not line[1].startswith("::"):
            raise ConfigError(f"{path}:{lineno}: expected 'NAME ADDRESS' (NAME: a-z, 0-9, '-')")
        if line[0] in out:
            raise ConfigError(f"{path}:{lineno}: host {line[0]!r} listed twice")
        out[line[0]] = line[1]
    if need_self and cfg.host_name not in out:
        raise ConfigError(f"host list {path} does not name this host ({cfg.host_name}; "
                          "admin: add it, or set host_name)")
    return out
