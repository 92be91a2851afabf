"""The one reader of the admin's small files: the host config, the budget
files and the host list (:mod:`kvmshell.common.config`,
:mod:`kvmshell.common.budgets`, :mod:`kvmshell.common.hosts`).

Whoever reads them (kvmshell as the hostile VM user, kvmadm and the root
helpers as root) believes them only because no user can have written
them: so each is opened without following a link and without waiting
(a FIFO or a device answers at once), and read only if it is a regular
file owned by root that neither group nor others may write, and not
larger than its reader's cap.
"""

from __future__ import annotations

import os
import stat

from kvmshell.common.errors import ConfigError

# O_NONBLOCK: opening a FIFO (or a device) for reading never waits for a
# writer; O_NOCTTY: a terminal never becomes the reader's; O_NOFOLLOW: the
# last component is never a link (an earlier one is the admin's directory).
_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def read_root_file(path: str, max_bytes: int, what: str, *,
                   require_root: bool = True) -> bytes | None:
    """The whole contents of *path*, a root-owned regular file of at most
    *max_bytes* bytes; None when it does not exist (``ENOENT``: each reader
    says what a missing file means).

    *what* names the file in the errors (``config``, ``budget file``,
    ``host list``).  *require_root* False (tests reading a checkout's file)
    accepts any owner and mode; the file must still be a regular one,
    within the cap.

    Raises:
        ConfigError: ``cannot read WHAT PATH: REASON`` when the open fails
            (a symlink: ``Too many levels of symbolic links``);
            ``WHAT PATH must be a regular file owned by root and not
            group/world-writable (admin: ...)``; ``WHAT PATH: over
            MAX_BYTES bytes``.
    """
    try:
        fd = os.open(path, _FLAGS)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (require_root and (st.st_uid != 0
                                                              or st.st_mode & 0o022)):
            # Why: the file is believed because no user can have written it.
            raise ConfigError(f"{what} {path} must be a regular file owned by root and not "
                              "group/world-writable (admin: chown root:root; chmod 644)")
        chunks, got = [], 0
        while got <= max_bytes:
            chunk = os.read(fd, max_bytes + 1 - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if got > max_bytes:
        # Never cut short: a cut line would be a different setting.
        raise ConfigError(f"{what} {path}: over {max_bytes} bytes")
    return b"".join(chunks)
