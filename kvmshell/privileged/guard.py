"""What every root helper does around its one verb, so that the caller's
descriptors never hold a root process.

A helper runs as root for a caller it does not trust, and root's processes
do not count against that caller's process limit: a helper waiting on
something the caller controls would park root processes for as long as the
caller likes.  So, whatever the verb does (:func:`main`):

* **a deadline**: after :data:`DEADLINE` seconds SIGALRM unwinds the verb
  (so that it can undo what it made), and 2 seconds later kills it;
* **no stops**: the job-control stop signals (SIGTSTP, SIGTTIN, SIGTTOU)
  are ignored, so a caller that runs the helper as the foreground job of a
  terminal of its own cannot have the kernel stop it (^Z), which would
  keep the deadline's handler from ever running (the stub ignores them
  before its first import; only the interpreter's own start is earlier);
* **stdout and stderr set aside**, ``/dev/null`` in their place: nothing
  (a library's warning, say) writes to the caller's descriptors but the
  verb's reply and the one stderr line, and neither waits (:func:`say`);
* **syslog** (authpriv) has every refusal and failure, whatever became of
  the stderr line;
* **at most** :data:`MAX_RUNS` runs of a helper at once per calling user
  (:func:`hold_slot`, a lock taken without waiting), for the helpers that
  take a slot.

A verb that ends by becoming another program (the relay helper: it drops
to the user's uid and execs kvmshell, which may then stream a console for
hours) returns an :class:`Exec`; the guard ends at that exec: the deadline
is cancelled (an alarm would outlive the exec), stdout and stderr are the
caller's again, the set-aside copies and the slot's lock close with the
exec (close-on-exec), and the job-control stops (and SIGPIPE and SIGXFSZ,
which Python ignores) are the default again (a disposition ``SIG_IGN``
would survive the exec: the program, and every process it starts, would
ignore ^Z as no direct login's does; by then the verb has dropped root,
so a stop holds only the user's own process).

Imports: the stdlib and the shared core's text escaping (every helper
uses this module; see the import contracts in setup.cfg).
"""

from __future__ import annotations

import os
import signal
import stat
import sys
import syslog

from kvmshell.common.text import printable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

DEADLINE = 10                      # seconds, whatever the helper is doing
MAX_RUNS = 4                       # concurrent runs of one helper per calling user
RUNS_DIR = "/run/kvmshell-helpers"   # root-only: PROG.UID, one lock file each


class Exec:
    """What a verb returns to become another program: execve's *path*,
    *argv* and *env* (the whole environment).  (A plain class: ``typing``'s
    NamedTuple would cost every helper run ~5 ms of imports.)"""

    def __init__(self, path: str, argv: list[str], env: dict[str, str]) -> None:
        self.path, self.argv, self.env = path, argv, env


class Refused(Exception):
    """The request is refused (exit 2)."""

    status = 2


class Failed(Exception):
    """The helper failed (exit 1)."""

    status = 1


def log(msg: str) -> None:
    syslog.syslog(syslog.LOG_NOTICE, msg)


def hold_slot(prog: str, uid: int) -> int:
    """Take one of the caller's MAX_RUNS slots for *prog* (a one-byte lock
    in RUNS_DIR/PROG.UID) without waiting; the descriptor holds it until
    exit.  Raises Refused when all are taken."""
    import fcntl

    os.makedirs(RUNS_DIR, mode=0o700, exist_ok=True)
    st = os.lstat(RUNS_DIR)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
        raise Failed(f"{RUNS_DIR} must be a directory of root's, mode 0700")
    fd = os.open(os.path.join(RUNS_DIR, f"{prog}.{uid}"),
                 os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    for slot in range(MAX_RUNS):
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, slot)
            return fd
        except OSError:
            continue
    os.close(fd)
    raise Refused(f"already {MAX_RUNS} runs of {prog} for you at once")


def say(fd: int, data: bytes) -> bool:
    """Write *data* to the caller's *fd* if that does not block (O_NONBLOCK
    on the caller's open file description: a full pipe loses the line, it
    never holds a root process).  False if it was not written whole."""
    import fcntl

    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        return os.write(fd, data) == len(data)
    except OSError:  # BlockingIOError, a closed descriptor
        return False


def _past_deadline(signum: int, frame: object) -> None:
    # Unwind (so the verb undoes what it made), with 2 more seconds to do so.
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(2)
    raise Failed(f"gave up after {DEADLINE} seconds")


def main(prog: str, verb: "Callable[[int], int | Exec]", *, log_argv: bool = True) -> int:
    """Run *verb* (given the caller's stdout, set aside) as helper *prog*;
    the exit status, or no return at all when the verb returns an
    :class:`Exec` that succeeds.  Refused and Failed become one line on
    stderr and in syslog; anything else too, never a traceback.
    *log_argv* False keeps the arguments out of syslog (a credential)."""
    for sig in (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)
    syslog.openlog(prog, syslog.LOG_PID, syslog.LOG_AUTHPRIV)
    signal.signal(signal.SIGALRM, _past_deadline)
    signal.alarm(DEADLINE)
    out_fd, err_fd = os.dup(1), os.dup(2)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 1)
    os.dup2(null, 2)
    try:
        result = verb(out_fd)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)   # past the deadline from here: die
        if isinstance(result, Exec):
            _exec(result, out_fd, err_fd)
        return result
    except (Refused, Failed) as exc:
        msg = printable(str(exc).replace("\n", " "), backslash=False)
        status = exc.status
    except OSError as exc:
        msg, status = f"system error: {exc.strerror or exc}", 1
    except BaseException as exc:  # never a traceback from a root program
        msg, status = f"internal error: {type(exc).__name__}", 1
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    args = f" argv={[a[:40] for a in sys.argv[1:4]]!r}" if log_argv else ""
    log(f"uid={os.environ.get('SUDO_UID', '?')}{args}: "
        f"{'refused' if status == 2 else 'failed'}: {msg}")
    say(err_fd, f"{prog}: {msg}\n".encode("utf-8", "replace")[:4096])
    return status


def _exec(how: Exec, out_fd: int, err_fd: int) -> "NoReturn":
    """Become *how*'s program, out of the guard: no deadline (the alarm is
    cancelled: a pending one would outlive the exec and kill the program),
    the job-control stops, SIGPIPE and SIGXFSZ the default again (an
    ignored signal stays ignored through an exec), stdout and stderr the
    caller's again (the copies are close-on-exec).
    Raises OSError when the exec fails (stdout and stderr stay the
    caller's; the error line goes to *err_fd* all the same)."""
    signal.alarm(0)
    # The stops the guard ignored, and SIGPIPE and SIGXFSZ that Python
    # ignores (as subprocess's restore_signals does for a child).
    for sig in (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    os.execve(how.path, how.argv, how.env)
