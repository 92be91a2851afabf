"""/dev/kvm: can this process open it, and why not.

Shared by kvmshell (``start``, as the VM user: decide the accelerator
before QEMU runs, :mod:`kvmshell.shell.accel`) and kvmadm (``check``, as
root in a child that has become each VM user).  The question is exactly
QEMU's first step under KVM: ``open("/dev/kvm", O_RDWR)`` (QEMU's
``kvm_init``, accel/kvm/kvm-all.c).
"""

from __future__ import annotations

import os

KVM_DEVICE = "/dev/kvm"


def open_error(path: str = KVM_DEVICE) -> str | None:
    """Try to open *path* read-write as the calling process; close it again.

    Returns None when it opens, else the reason as a short phrase for a
    message: ``"no /dev/kvm"``, ``"/dev/kvm: permission denied"``, or
    ``"/dev/kvm: <strerror, lower case>"``.  Raises nothing.  Opening
    /dev/kvm creates no VM; it only proves access.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        return f"no {path}"
    except OSError as exc:
        return f"{path}: {(exc.strerror or type(exc).__name__).lower()}"
    os.close(fd)
    return None
