"""Which accelerator a VM gets: decided before QEMU runs, read back from QMP.

``accel`` in kvmshell.conf lists accelerators by preference (``kvm tcg``).
Given several ``-accel`` options QEMU takes the first that initialises and
only writes why the others failed to qemu.log, which the VM user cannot
read without a shell.  So kvmshell asks first, as the VM user, the way
QEMU would (:func:`kvmshell.common.kvmdev.open_error`): an accelerator the
user cannot have is left out of QEMU's argv, and ``start`` prints one line
saying which one it fell back from and why.  ``accel_fallback = no`` turns
that into a refusal before anything is started.

What a running VM actually has is QEMU's word, QMP ``query-kvm`` (enabled
and present: kvm; otherwise tcg, the only other accelerator kvmshell
passes), used by ``status``, ``list`` and ``start``.
"""

from __future__ import annotations

from kvmshell.common.config import Config
from kvmshell.common.errors import MonitorError, RuntimeFailure
from kvmshell.common.vmtree import VM


def unusable(accel: str) -> str | None:
    """Why the calling user cannot have *accel* ('kvm' or 'tcg'), or None."""
    if accel == "kvm":
        from kvmshell.common import kvmdev
        return kvmdev.open_error()
    return None  # tcg needs nothing from the host


class Choice:
    """The accelerators to pass to QEMU, in order, and why the first
    configured one was left out (*reason*, None if it was not)."""

    def __init__(self, wanted: str, accels: list[str], reason: str | None) -> None:
        self.wanted = wanted
        self.accels = accels
        self.reason = reason

    def notice(self, actual: str | None) -> str | None:
        """The one line ``start`` prints when the VM did not get the first
        configured accelerator (*actual*: from :func:`running`, None if
        QMP did not say); None when there is nothing to say."""
        got = actual or (self.accels[0] if self.reason else None)
        if got is None or got == self.wanted:
            return None
        why = self.reason or "QEMU could not initialise it"
        return (f"accel {self.wanted} unavailable ({why}): running under {got}, "
                "which is much slower (admin: kvmadm check)")


def choose(cfg: Config, vm: VM) -> Choice:
    """Decide the accelerators for *vm* as the calling (VM) user.

    Raises :class:`RuntimeFailure` when the first configured accelerator is
    unusable and ``accel_fallback = no``, or when none is usable; nothing
    has been started or changed then.
    """
    wanted = cfg.accel[0]
    why = {a: unusable(a) for a in cfg.accel}
    reason = why[wanted]
    if not cfg.accel_fallback:
        if reason:
            raise RuntimeFailure(
                f"VM {vm.name}: accel {wanted} unavailable ({reason}) and accel_fallback = no: "
                "not started (admin: kvmadm check)")
        # Only the first: should QEMU still fail to set it up, it exits
        # with its own reason instead of falling back.
        return Choice(wanted, [wanted], None)
    usable = [a for a in cfg.accel if why[a] is None]
    if not usable:
        raise RuntimeFailure(f"VM {vm.name}: accel {wanted} unavailable ({reason}) and accel "
                             "names nothing else: not started (admin: kvmadm check)")
    return Choice(wanted, usable, reason)


def running(vm: VM) -> str | None:
    """The accelerator of *vm*'s running QEMU from QMP ``query-kvm``:
    'kvm' or 'tcg'; None if QMP does not answer within 2 seconds."""
    from kvmshell.shell import monitor
    try:
        doc = monitor.query(vm, "query-kvm")
    except MonitorError:
        return None
    return from_query_kvm(doc)


def from_query_kvm(doc: object) -> str:
    """'kvm' or 'tcg' from QMP ``query-kvm``'s answer *doc* (enabled and
    present: kvm; otherwise tcg, the only other accelerator kvmshell passes)."""
    if isinstance(doc, dict) and doc.get("enabled") is True and doc.get("present") is True:
        return "kvm"
    return "tcg"
