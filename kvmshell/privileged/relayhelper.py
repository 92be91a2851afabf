"""kvmshell-relayd: the far host's half of routing (root, via sudo from the relay account).

Whole input: a MUNGE credential, in the environment variable
``KVMSHELL_CREDENTIAL`` (the relay client's ``SendEnv``, accepted by sshd
for the relay account alone and kept by sudo: never in an argv, which
every user can read) with an empty word; or, with no such variable, as the
one word (the relay key's forced command passes ``$SSH_ORIGINAL_COMMAND``
as that word; docs/multihost.md).  The
helper believes nothing the front door says but what MUNGE vouches for:

1. **who**: the uid and gid in the credential, as this host's munged
   decodes it (libmunge's ``munge_decode``): MUNGE's key is shared by the
   hosts only, and the uid is the one that asked the front door's munged,
   so no front door can speak for another user.  munged refuses a
   credential it has decoded before (a replay), an expired one (kvmshell
   asks for 60 seconds) and one made for another decoder (kvmshell makes
   them for root only).  The user must be a VM user (in ``group``);
   never root.
2. **what**: the credential's payload, ``{"v": 1, "host": H, "from": F,
   "words": [...], "nonce": N}``: H must be this host (``host_name``), so a
   credential for another host is refused here even before that host's
   munged saw it; the words are the command (a verb first, never one of
   kvmshell's own options such as ``--config``), run as they are.
3. then it **becomes the user**: the user's PAM session (service
   ``kvmshell``: pam_limits gives it the limits a direct login gets from
   sshd's), initgroups, setgid, setuid (it checks it cannot get root
   back), and execs kvmshell (its entry point, from the package this
   helper runs from: :func:`entry_code`) with the words and
   the config at the fixed path :data:`CONFIG`, in a clean environment
   with ``KVMSHELL_RELAYED`` set to F (so kvmshell runs it here).  kvmshell
   then checks everything from the tree, as for a direct login; stdin,
   stdout and stderr are the ssh session's, unchanged.

Who may run it: the relay account (``relay_user``), through sudo; any
other caller is refused.  Deny by default; every run goes to syslog
(authpriv).  Everything before the exec runs inside
:mod:`kvmshell.privileged.guard`, as the other root helpers do (its
deadline, stdout and stderr set aside, the one stderr line written only if
it does not block, the job-control stops ignored); the guard ends at the
exec: the deadline is cancelled and kvmshell gets stdout and stderr back
(the exec'd kvmshell, the user's own process, may stream a console for
hours).  It takes no per-user run slot: nothing of the caller's can hold
its root part (it never reads stdin, writes only the non-blocking stderr
line, waits only on this host's munged and the user and group
databases), and the one user it could count, the credential's, is known
only once munged has vouched for it, by when the root part is all but
done; a bound per relay account would let one user's parallel commands
refuse everyone's.
"""

from __future__ import annotations

import os
import sys

from kvmshell.privileged import caller, guard
from kvmshell.privileged.guard import Failed, Refused, log
from kvmshell.privileged.relayclient import CRED_ENV, check_credential

CONFIG = "/etc/kvmshell/kvmshell.conf"
PROG = "kvmshell-relayd"
LIBMUNGE = "libmunge.so.2"
LIBPAM = "libpam.so.0"
PAM_SERVICE = "kvmshell"        # pam/kvmshell (its session stack: pam_limits)
PAM_FILE = "/etc/pam.d/" + PAM_SERVICE
WORDS_MAX = 256
WORD_MAX = 4096
RELAYED_ENV = "KVMSHELL_RELAYED"
PYTHON = "/usr/bin/python3"


def unmunge(cred: str) -> tuple[bytes, int, int]:
    """(payload, uid, gid) of *cred*, from this host's munged (libmunge's
    munge_decode, munge.h).  Raises Refused with MUNGE's reason."""
    import ctypes
    try:
        lib = ctypes.CDLL(LIBMUNGE, use_errno=True)
        libc = ctypes.CDLL(None)
    except OSError as exc:
        raise Failed(f"cannot load {LIBMUNGE} (apt install libmunge2)") from exc
    buf, length = ctypes.c_void_p(), ctypes.c_int()
    uid, gid = ctypes.c_uint(), ctypes.c_uint()
    lib.munge_decode.restype = ctypes.c_int
    lib.munge_decode.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                 ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_uint),
                                 ctypes.POINTER(ctypes.c_uint)]
    lib.munge_strerror.restype = ctypes.c_char_p
    lib.munge_strerror.argtypes = [ctypes.c_int]
    err = lib.munge_decode(cred.encode("ascii"), None, ctypes.byref(buf), ctypes.byref(length),
                           ctypes.byref(uid), ctypes.byref(gid))
    try:
        if err != 0:
            why = (lib.munge_strerror(err) or b"?").decode("ascii", "replace")
            raise Refused(f"credential refused by MUNGE: {why}")
        payload = ctypes.string_at(buf.value, length.value) if buf.value else b""
    finally:
        if buf.value:
            libc.free(buf)
    return payload, uid.value, gid.value


def check_payload(payload: bytes, host: str) -> tuple[list[str], str]:
    """(words, front door's host name) of a payload for *host*; else Refused."""
    import json
    try:
        doc = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise Refused("the credential's payload is not kvmshell's") from exc
    if not isinstance(doc, dict) or doc.get("v") != 1:
        raise Refused("the credential's payload is not kvmshell's")
    if doc.get("host") != host:
        raise Refused("the credential is for another host")
    words, origin = doc.get("words"), doc.get("from")
    if (not isinstance(words, list) or not 1 <= len(words) <= WORDS_MAX
            or not all(isinstance(w, str) and len(w) <= WORD_MAX and "\0" not in w
                       for w in words)):
        raise Refused("the credential's command is not a list of words")
    if words[0].startswith("-"):
        # A verb first, as on a direct login: kvmshell's own options
        # (--config, -c) are the helper's to give, never the credential's.
        raise Refused(f"the credential's words are not a command: {words[0][:20]!r}")
    from kvmshell.common.hosts import is_name
    if not isinstance(origin, str) or not is_name(origin):
        raise Refused("the credential names no front door")
    return words, origin


def pam_session(user: str) -> None:
    """Open *user*'s PAM session of :data:`PAM_SERVICE` in this process,
    still root (libpam's ``pam_start`` and ``pam_open_session``;
    pam_start(3), pam_open_session(3)): pam_limits sets the user's limits
    on it, which the exec'd kvmshell and its QEMU inherit, as a direct
    login's get them from sshd's PAM session (no ``PAM_RHOST``: the front
    door's name is only the credential's claim).  Only the session stack
    runs: the helper checks the group itself (the config's ``group``), and
    the account stack is the front door's sshd's.  (Why libpam through
    ctypes, as libmunge: python-pam opens a handle only inside
    ``authenticate``, which needs a password.)
    The session is never closed (the process that would close it is the
    user's own kvmshell, as with sudo's ``pam_session``).  Failed when
    :data:`PAM_FILE` or libpam is missing or the session cannot be opened."""
    import ctypes
    if not os.path.isfile(PAM_FILE):
        # Why: libpam would fall back to the "other" service, without pam_limits.
        raise Failed(f"{PAM_FILE} is missing (make install)")
    try:
        lib = ctypes.CDLL(LIBPAM, use_errno=True)
    except OSError as exc:
        raise Failed(f"cannot load {LIBPAM} (apt install libpam0g)") from exc
    conv_fn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_void_p)

    class PamConv(ctypes.Structure):
        _fields_ = [("conv", conv_fn), ("appdata_ptr", ctypes.c_void_p)]

    # No conversation: nothing is asked of anyone (PAM_CONV_ERR, 19).
    conv = PamConv(conv_fn(lambda n, msg, resp, data: 19), None)
    handle = ctypes.c_void_p()
    lib.pam_start.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(PamConv),
                              ctypes.POINTER(ctypes.c_void_p)]
    lib.pam_strerror.restype = ctypes.c_char_p
    lib.pam_strerror.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.pam_open_session.argtypes = lib.pam_end.argtypes = [ctypes.c_void_p, ctypes.c_int]
    err = lib.pam_start(PAM_SERVICE.encode(), user.encode(), ctypes.byref(conv),
                        ctypes.byref(handle))
    if err != 0:
        raise Failed(f"PAM service {PAM_SERVICE} cannot start (error {err})")
    try:
        err = lib.pam_open_session(handle, 0x8000)                  # PAM_SILENT
        if err != 0:
            why = (lib.pam_strerror(handle, err) or b"?").decode("ascii", "replace")
            raise Failed(f"user {user}: PAM session {PAM_SERVICE}: {why}")
    finally:
        lib.pam_end(handle, err)


def become(uid: int, group: str) -> str:
    """Drop to *uid* (a VM user: in *group*, not root) for good, with its
    own groups (the credential's gid is not needed) and the limits of its
    PAM session (:func:`pam_session`); the user's name."""
    import grp
    import pwd
    try:
        pw = pwd.getpwuid(uid)
        members = grp.getgrnam(group)
    except KeyError as exc:
        raise Refused(f"uid {uid} is not a VM user here") from exc
    if uid == 0:
        raise Refused("uid 0: root is never relayed")
    if not caller.in_group(pw, members):
        raise Refused(f"user {pw.pw_name} is not in {group}")
    # Why: a relayed kvmshell (and its QEMU) must be bound as a direct
    # login is (pam_limits: nproc, nofile, core, fsize), not run with the
    # limits of the relay account's ssh session.
    pam_session(pw.pw_name)
    os.initgroups(pw.pw_name, pw.pw_gid)
    os.setgid(pw.pw_gid)
    os.setuid(uid)
    try:
        os.setuid(0)
    except PermissionError:
        return pw.pw_name
    raise Failed("could not drop root")


def run(argv: list[str], env: dict[str, str], config: str = CONFIG) -> guard.Exec:
    """Check the request, become the user; kvmshell's exec (path, argv, env)."""
    import pwd
    caller.require_root()
    cfg = caller.host_config(config)
    try:
        relay_uid = pwd.getpwnam(cfg.relay_user).pw_uid
    except KeyError as exc:
        raise Refused(f"there is no relay account {cfg.relay_user}") from exc
    if env.get("SUDO_UID") != str(relay_uid):
        raise Refused(f"only {cfg.relay_user} may run this (through sudo)")
    if len(argv) != 2 or (CRED_ENV in env and argv[1]):
        raise Refused("expected one word: a MUNGE credential")
    payload, uid, _gid = unmunge(check_credential(env.get(CRED_ENV) or argv[1]))
    words, origin = check_payload(payload, cfg.host_name)
    name = become(uid, cfg.group)
    log(f"relay from {origin}: user={name} uid={uid} verb={words[0][:20]!r}")
    envp = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "HOME": "/", "USER": name,
            "LOGNAME": name, RELAYED_ENV: origin}
    term = env.get("TERM", "")
    if 0 < len(term) <= 40 and term.replace("-", "").isalnum() and term.isascii():
        envp["TERM"] = term     # the console's terminal type, nothing else
    return guard.Exec(PYTHON, [PYTHON, "-IS", "-c", entry_code(), "--config", config, *words],
                      envp)


def entry_code() -> str:
    """kvmshell's entry (bin/kvmshell's two lines), for ``python3 -IS -c``:
    the package this helper was loaded from, and the system's package
    directories (kvmshell's own dependencies, qemu.qmp), after the stdlib.
    Why not bin/kvmshell itself: its ``-I`` runs site, whose .pth files
    (certifi's, here) cost 50 ms on every routed command, twice the rest of
    the far side's work."""
    import site                 # the module only: under -S nothing has run it
    import kvmshell
    lib = os.path.dirname(os.path.dirname(os.path.abspath(kvmshell.__file__)))
    paths = [p for p in (lib, *site.getsitepackages()) if os.path.isdir(p)]
    return (f"import sys; sys.path += {paths!r}; "
            "from kvmshell.shell.cli import main; sys.exit(main())")


def main(config: str = CONFIG) -> int:
    """The helper's entry point (the installed stub calls it): on success it
    becomes kvmshell and never returns; else the exit status.  The
    arguments stay out of syslog (the one word may be a credential)."""
    return guard.main(PROG, lambda _out: run(list(sys.argv), dict(os.environ), config),
                      log_argv=False)
