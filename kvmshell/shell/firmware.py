"""UEFI firmware for a VM: OVMF's code image and the VM's own variable store.

Runs as the VM user, inside ``start``, under the VM lock.  OVMF comes in
two images (Debian's ``ovmf`` package, named by ``uefi_code`` and
``uefi_vars`` in kvmshell.conf):

  code   ``OVMF_CODE_4M.fd``: the firmware, shared by every VM, read-only;
  vars   ``OVMF_VARS_4M.fd``: an empty variable store (boot entries,
         settings), the template each VM copies once.

Each UEFI VM keeps its copy as :data:`NVRAM` in its directory, made on the
first start (libvirt calls it the VM's nvram).  Both images reach QEMU as
descriptors (pflash drives on ``/dev/fdset/N``), like every other file:
QEMU opens no path.  The copy is the user's own file, so it is opened as
``files.py`` opens images: through the directory descriptor, never
following a symlink, a regular file of the user's with one link, locked
for the VM's life (``rm`` refuses it while the VM runs; removing it while
stopped resets the UEFI variables to the template on the next start).
"""

from __future__ import annotations

import os
import stat

from kvmshell.common.errors import RuntimeFailure

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kvmshell.common.config import Config
    from kvmshell.common.vmtree import VM

NVRAM = "nvram.fd"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def _open_shared(path: str) -> tuple[int, int]:
    """Open one of the admin's OVMF images read-only; (fd, size)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise RuntimeFailure(f"-firmware efi: cannot open {path}: {exc.strerror}"
                             " (admin: apt install ovmf)") from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise RuntimeFailure(f"-firmware efi: {path} is not a regular file")
    return fd, st.st_size


def _copy_template(dfd: int, template: int) -> None:
    """Create NVRAM from the template: whole or not at all (a hidden name,
    renamed once written and synced)."""
    tmp = f".{NVRAM}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=dfd)
    try:
        offset = 0
        while True:
            chunk = os.pread(template, 1 << 20, offset)
            if not chunk:
                break
            os.write(fd, chunk)
            offset += len(chunk)
        os.fsync(fd)
        os.rename(tmp, NVRAM, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
        raise
    finally:
        os.close(fd)


def _open_nvram(vm: "VM", dfd: int, size: int) -> list[int]:
    try:
        fd = os.open(NVRAM, os.O_RDWR | _FILE_FLAGS, dir_fd=dfd)
    except OSError as exc:
        raise RuntimeFailure(f"VM {vm.name}: cannot open {NVRAM}: {exc.strerror}"
                             f" (remove it with 'rm {NVRAM}' to reset the UEFI variables)") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != vm.uid or st.st_nlink != 1:
            raise RuntimeFailure(f"VM {vm.name}: {NVRAM} must be a regular file of yours with one"
                                 f" link (remove it with 'rm {NVRAM}' to reset the UEFI variables)")
        if st.st_size != size:
            raise RuntimeFailure(
                f"VM {vm.name}: {NVRAM} has {st.st_size} bytes where the firmware's variable store"
                f" has {size} (remove it with 'rm {NVRAM}' to reset the UEFI variables)")
        os.set_blocking(fd, True)
        import fcntl
        try:
            # Held for the VM's life (QEMU inherits it): 'rm' refuses meanwhile.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise RuntimeFailure(f"VM {vm.name}: {NVRAM} is in use") from exc
        # QEMU opens the store read-only under -snapshot: both modes, one inode.
        ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        os.close(fd)
        raise
    return [fd, ro]


def open_firmware(cfg: "Config", vm: "VM") -> tuple[int, list[int]]:
    """Descriptors for a UEFI VM: (code read-only, [vars read-write, vars
    read-only]).  Makes the VM's NVRAM from ``uefi_vars`` on first start.

    Raises:
        RuntimeFailure: the OVMF images are missing, or NVRAM is not a plain
            file of the user's of the template's size (the message says how to
            reset it).
    """
    code, _ = _open_shared(cfg.uefi_code)
    out: list[int] = [code]
    try:
        template, size = _open_shared(cfg.uefi_vars)
        out.append(template)
        dfd = os.open(vm.path, _DIR_FLAGS)
        try:
            try:
                os.stat(NVRAM, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                _copy_template(dfd, template)
            vars_fds = _open_nvram(vm, dfd, size)
        finally:
            os.close(dfd)
        os.close(template)
        out.remove(template)
    except BaseException:
        for fd in out:
            os.close(fd)
        raise
    return code, vars_fds
