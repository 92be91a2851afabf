"""The exception tree.

Every error a user or admin can cause is a :class:`KvmshellError`; the
entry points turn it into one line on stderr and an exit status.  Anything
else is a bug and is reported as such (still without a traceback unless
KVMSHELL_DEBUG is set by the admin in the ForceCommand line).

    KvmshellError                  exit 1 unless said otherwise
    +-- UsageError                 exit 2: the request itself is refused
    |   +-- RefusedOption          an option not in the user class
    |   +-- RefusedFile            a file outside the allowed places (a --config too)
    |   +-- NotYours               a VM the caller does not own
    +-- ConfigError                the host config is wrong (admin must fix)
    +-- TreeError                  the VM tree is broken (admin must fix)
    +-- RuntimeFailure             QEMU or the system failed at run time
        +-- AlreadyRunning         (exit 1) the VM lock is held
        +-- MonitorError           QMP failed

Each class also says how the audit record files it (``outcome``):
``refused`` for a request turned down (usage errors, budgets), ``failed``
for everything else.
"""

from __future__ import annotations


class KvmshellError(Exception):
    """Base class: carries a one-line message and an exit status."""

    status = 1
    outcome = "failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message.replace("\n", " ").strip()


class UsageError(KvmshellError):
    """The request is refused before anything runs."""

    status = 2
    outcome = "refused"


class RefusedOption(UsageError):
    """A QEMU option the user may not set, or an invalid value."""


class RefusedFile(UsageError):
    """A file name or file that falls outside the user's allowed places, or
    a ``--config`` outside the admin's (common/config.py check_place)."""


class NotYours(UsageError):
    """The VM exists but belongs to another user."""


class ConfigError(KvmshellError):
    """The host configuration file is missing, unsafe or malformed."""


class TreeError(KvmshellError):
    """The VM tree has wrong ownership, modes or names: always says who must act."""

    def __init__(self, message: str) -> None:
        if "admin" not in message:
            message += " (admin: fix the VM tree)"
        super().__init__(message)


class RuntimeFailure(KvmshellError):
    """Something failed while acting on a valid request."""


class Unmeasured(RuntimeFailure):
    """A walk of a VM directory could not count everything below it:
    *rel* is what it could not read (a path below the directory, '' for
    the directory itself; the user's text), *why* the reason (strerror, or
    the depth limit), *partial* the bytes counted before it stopped."""

    def __init__(self, rel: str, why: str, partial: int = 0) -> None:
        super().__init__(f"cannot count {rel or 'its directory'} ({why})")
        self.rel, self.why, self.partial = rel, why, partial


class AlreadyRunning(RuntimeFailure):
    """The VM's lock is held by a running QEMU (or a start in progress)."""


class MonitorError(RuntimeFailure):
    """Talking to QEMU's QMP monitor failed."""
