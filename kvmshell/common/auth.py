"""Password checks through PAM, with kvmshell's own service (/etc/pam.d/kvmshell).

Wherever kvmshell authenticates a user itself (not through sshd or login),
it asks PAM with service ``kvmshell`` (pam/kvmshell in the source tree):
only members of the VM users' group pass, with the host's usual password
stack, pam_faildelay, pam_nologin and pam_limits.  Today that is the web
front door's login helper (:mod:`kvmshell.privileged.pamhelper`, root),
the only caller of :func:`check_password` in the product.
"""

from __future__ import annotations

from kvmshell.common.errors import RuntimeFailure

SERVICE = "kvmshell"
# linux/security/pam_types.h: PAM_RHOST, the remote host item.
_PAM_RHOST = 4


def check_password(user: str, password: str, service: str = SERVICE,
                   rhost: str | None = None) -> bool:
    """True when PAM authenticates *user* and accepts the account: see
    :func:`authenticate`."""
    return authenticate(user, password, service, rhost)[0]


def authenticate(user: str, password: str, service: str = SERVICE,
                 rhost: str | None = None) -> tuple[bool, str]:
    """(ok, PAM's reason text) -- ok when PAM authenticates *user* and its account management accepts
    it (python-pam runs pam_authenticate, then pam_acct_mgmt: a correct
    password for a user outside the group, a locked or an expired account
    still fails).  *rhost*: the client's address, set as ``PAM_RHOST`` (for
    pam_access, pam_faillock's and the stack's own logs).

    Raises RuntimeFailure when python-pam is missing; ValueError for a NUL
    in *user*, *password* or *service*."""
    try:
        from pam.__internals import PamAuthenticator  # type: ignore[import-untyped]
    except ImportError as exc:
        raise RuntimeFailure("python-pam is not installed (admin: make deps)") from exc
    pam = PamAuthenticator()
    if rhost is not None:
        # python-pam has no parameter for PAM items: set PAM_RHOST right
        # after its pam_start, before it calls pam_authenticate.  A failure
        # to set it fails the whole check (PAM's status is returned).
        import ctypes

        start = pam.pam_start
        value = ctypes.c_char_p(rhost.encode("ascii"))

        def start_with_rhost(*args: object) -> int:
            status = int(start(*args))
            if status == 0:
                status = int(pam.pam_set_item(pam.handle, _PAM_RHOST, value))
            return status

        pam.pam_start = start_with_rhost
    ok = bool(pam.authenticate(user, password, service=service, resetcreds=False))
    return ok, str(pam.reason or "")
