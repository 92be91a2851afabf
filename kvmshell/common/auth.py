"""Password checks through PAM, with kvmshell's own service (/etc/pam.d/kvmshell).

Wherever kvmshell authenticates a user itself (not through sshd or login),
it asks PAM with service ``kvmshell`` (pam/kvmshell in the source tree):
only members of the VM users' group pass, with the host's usual password
stack, pam_faildelay, pam_nologin and pam_limits.
"""

from __future__ import annotations

from kvmshell.common.errors import RuntimeFailure

SERVICE = "kvmshell"


def check_password(user: str, password: str, service: str = SERVICE) -> bool:
    """True when PAM authenticates *user* and its account management accepts
    it (python-pam runs pam_authenticate, then pam_acct_mgmt: a correct
    password for a user outside the group or a locked account still fails)."""
    try:
        from pam.__internals import PamAuthenticator  # type: ignore[import-untyped]
    except ImportError as exc:
        raise RuntimeFailure("python-pam is not installed (admin: make deps)") from exc
    return bool(PamAuthenticator().authenticate(user, password, service=service,
                                                resetcreds=False))
