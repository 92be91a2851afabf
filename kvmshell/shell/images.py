"""Images in the VM directory, without a general shell: upload, images, rm.

    upload [VM] NAME [--size BYTES]
                         read the image from stdin (``ssh host upload x.iso < x.iso``);
                         with --size, anything but exactly BYTES is refused (a
                         dropped connection also ends stdin)
    images [VM]          list the files in the VM directory: bytes on disk,
                         virtual size (what the guest sees), name
    rm [VM] NAME         remove one of them

VM may be left out when the user owns exactly one VM.

Names.  ``upload`` and ``save`` create names of letters, digits and
``._+-`` (not first ``.`` or ``-``), at most :data:`NAME_MAX` characters:
the 255-byte file-name limit less kvmshell's hidden temporary name
(``.upload.NAME.PID``).  ``images`` lists every file of the directory,
whoever made it (the admin, or the user's own QEMU), so a name may hold any
byte: it is shown with bytes outside printable ASCII as ``\\xNN`` and a
backslash as ``\\\\`` (:mod:`kvmshell.common.text`), and ``rm`` takes
that form back (quote it: ``rm 'bad\\xff.img'``).  Hidden files are listed
too (a killed upload's leftover counts against ``max_image_bytes``, so the
user must be able to see and remove it); kvmshell's own files
(:data:`RESERVED`, ``*.sock``) are neither listed nor removable.

Why this shape: stdin is untrusted bytes of untrusted length.  The data go to
a hidden temporary file created with O_EXCL in the VM directory (opened
through a directory descriptor, never following a symlink), counted against
``upload_max_bytes`` and against ``max_image_bytes`` (all the user's VM
directories together), fsync'd, and only then linked to NAME -- which must
not exist.  A refused or broken upload leaves nothing behind.
"""

from __future__ import annotations

import os
import stat

from kvmshell.common.autostart import FILES as AUTOSTART_FILES
from kvmshell.common.errors import RefusedFile, RuntimeFailure, UsageError
from kvmshell.shell.launcher import CONSOLE_LOG, QEMU_LOG, RUNTIME_FILES

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kvmshell.common.config import Config
    from kvmshell.common.vmtree import VM

CHUNK = 1 << 20
RECHECK = 16 << 20
# Files kvmshell and the supervisor make in the VM directory: never upload
# targets, never removable by 'rm', not listed as images.  'lock' and
# 'qemu.pid' are what older kvmshell kept there (the lock and the pid now
# live in the kernel: common/runstate.py).
# "cloud-init.instance-id" is cloudinit.INSTANCE_ID, spelled here: images
# has no other business with that module.
RESERVED = frozenset({CONSOLE_LOG, CONSOLE_LOG + ".1", QEMU_LOG, *RUNTIME_FILES,
                      *AUTOSTART_FILES, "lock", "qemu.pid", "cloud-init.instance-id"})
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


# The longest hidden temporary name kvmshell gives a new file is
# ".upload.NAME.PID" (PIDs have at most 7 digits: pid_max <= 2^22), and a
# file name has at most 255 bytes (NAME_MAX of Linux filesystems).
FS_NAME_MAX = 255
NAME_MAX = FS_NAME_MAX - len(".upload..") - 7


def check_name(verb: str, name: str) -> str:
    """A name 'upload' and 'save' may create (see the module's "Names")."""
    from kvmshell.common import optable
    from kvmshell.common.text import printable
    if len(name) > NAME_MAX:
        raise UsageError(f"{verb}: name too long: {printable(name[:24])}... ({len(name)} "
                         f"characters, at most {NAME_MAX})")
    if "/" in name:
        raise RefusedFile(f"{verb}: {name!r}: a plain file name, without '/'")
    optable.check_file_name(verb, name)
    if name in RESERVED or name.endswith(".sock"):
        raise RefusedFile(f"{verb}: {name!r} is a name kvmshell uses itself")
    return name


def existing_name(verb: str, word: str) -> str:
    """The file a user names to 'rm': any name 'images' lists, in the form
    it lists it (``\\xNN`` escapes, see :mod:`kvmshell.common.text`)."""
    from kvmshell.common.text import printable, unescape
    if len(word) > 4 * FS_NAME_MAX:
        raise UsageError(f"{verb}: name too long: {printable(word[:24])}... "
                         f"(at most {FS_NAME_MAX} bytes)")
    try:
        name = unescape(word)
    except ValueError as exc:
        raise UsageError(f"{verb}: {printable(word)}: {exc} (names are written as "
                         "'images' lists them)") from exc
    shown = printable(name)
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > FS_NAME_MAX:
        raise UsageError(f"{verb}: name too long: {shown[:24]}... ({size} bytes, "
                         f"at most {FS_NAME_MAX})")
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise RefusedFile(f"{verb}: '{shown}': a plain file name, without '/'")
    if name in RESERVED or name.endswith(".sock"):
        raise RefusedFile(f"{verb}: '{shown}' is a name kvmshell uses itself")
    return name


def _split(verb: str, args: list[str]) -> tuple[str | None, str]:
    if len(args) == 1:
        return None, args[0]
    if len(args) == 2:
        return args[0], args[1]
    if not args:
        raise UsageError(f"{verb}: missing file name (usage: {verb} [VM] NAME)")
    raise UsageError(f"{args[2]}: unexpected argument to '{verb}'")


def open_dir(vm: "VM") -> int:
    try:
        return os.open(vm.path, _DIR_FLAGS)
    except OSError as exc:
        raise RuntimeFailure(f"cannot open the directory of VM {vm.name!r}: {exc.strerror}") from exc


def refuse_existing(verb: str, name: str, dfd: int) -> None:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    raise RefusedFile(f"{verb}: {name} exists (remove it first with 'rm {name}')")


def create_tmp(verb: str, name: str, dfd: int) -> tuple[str, int]:
    """A new hidden file beside NAME, for data that becomes NAME only when whole."""
    tmp = f".{verb}.{name}.{os.getpid()}"
    # Why O_EXCL|O_NOFOLLOW through dfd: nothing the user placed in the
    # directory (a symlink, a FIFO) is ever written through.
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dfd)
    except OSError as exc:
        raise RuntimeFailure(f"{verb}: {name}: {exc.strerror}") from exc
    return tmp, fd


def publish(verb: str, name: str, dfd: int, tmp: str, fd: int) -> None:
    """fsync the data, then give it its name; refused if NAME appeared meanwhile."""
    os.fsync(fd)
    try:
        # link, not rename: it fails if NAME exists.
        os.link(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
    except FileExistsError as exc:
        raise RefusedFile(f"{verb}: {name} exists (remove it first with 'rm {name}')") from exc


def _unlink_tmp(tmp: str, dfd: int) -> None:
    # The user may have removed it meanwhile ('rm' takes hidden names).
    try:
        os.unlink(tmp, dir_fd=dfd)
    except FileNotFoundError:
        pass


def usage_bytes(cfg: "Config", uid: int) -> int:
    """Disk space of the user's VM directories, counted as limits.py counts it."""
    from kvmshell.shell import limits
    from kvmshell.common import vmtree
    # Broken directories of the user's own count too: their files take space.
    return limits.image_bytes(vmtree.scan(cfg, uid).dirs)


def upload(cfg: "Config", uid: int, args: list[str], src: int = 0) -> tuple["VM", str, int]:
    """Copy *src* into the VM directory as NAME; return (vm, name, bytes)."""
    from kvmshell.common import vmtree
    expect: int | None = None
    if args and args[-1] == "--size":
        raise UsageError("--size: missing value (a number of bytes)")
    if len(args) >= 2 and args[-2] == "--size":
        if not (args[-1].isascii() and args[-1].isdigit()) or len(args[-1]) > 18:
            raise UsageError(f"--size: {args[-1]!r}: expected a number of bytes")
        expect, args = int(args[-1]), args[:-2]
    vm_name, name = _split("upload", args)
    check_name("upload", name)
    vm = vmtree.pick(cfg, uid, vm_name)
    # 0 in the config means "no limit"; a quota already used up means 0 bytes.
    limit: int | None = cfg.upload_max_bytes or None
    why = "upload_max_bytes"
    if cfg.max_image_bytes:
        room = max(0, cfg.max_image_bytes - usage_bytes(cfg, uid))
        if limit is None or room < limit:
            limit, why = room, "max_image_bytes, for all your images together"
    if expect is not None and limit is not None and expect > limit:
        raise UsageError(f"upload: {name} exceeds the limit of {limit} bytes ({why})")
    dfd = open_dir(vm)
    try:
        refuse_existing("upload", name, dfd)
        tmp, fd = create_tmp("upload", name, dfd)
        done = False
        try:
            size = 0
            while True:
                chunk = os.read(src, CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if cfg.max_image_bytes and size % RECHECK < len(chunk):
                    # Concurrent uploads each saw the same room: recount
                    # (our own temp file included) every RECHECK bytes.
                    if usage_bytes(cfg, uid) + len(chunk) > cfg.max_image_bytes:
                        limit = size - len(chunk)
                if limit is not None and size > limit:
                    raise UsageError(f"upload: {name} exceeds the limit of {limit} bytes ({why})")
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            if expect is not None and size != expect:
                # Why: EOF on stdin is also what a dropped connection looks like.
                raise UsageError(f"upload: {name}: got {size} bytes, expected {expect} "
                                 "(connection lost?); nothing stored")
            if cfg.max_image_bytes and usage_bytes(cfg, uid) > cfg.max_image_bytes:
                # Counted again now that the file is whole: a small qcow2 may
                # declare a huge virtual size, which the guest could fill.
                raise UsageError(f"upload: {name} would not fit in max_image_bytes "
                                 "(a disk counts its virtual size)")
            publish("upload", name, dfd, tmp, fd)
            done = True
        except OSError as exc:
            raise RuntimeFailure(f"upload: {name}: {exc.strerror}") from exc
        finally:
            os.close(fd)
            _unlink_tmp(tmp, dfd)
            if done:
                os.fsync(dfd)
    finally:
        os.close(dfd)
    return vm, name, size


def save(cfg: "Config", uid: int, args: list[str]) -> tuple["VM", str, int]:
    """Write a running VM's state to NAME in its directory and stop it
    (``start VM -loadvm NAME`` restores it).  Nothing is lost on failure:
    the VM runs on and no NAME appears."""
    from kvmshell.shell import launcher
    from kvmshell.shell import limits
    from kvmshell.shell import monitor
    from kvmshell.common import vmtree
    vm_name, name = _split("save", args)
    check_name("save", name)
    vm = vmtree.pick(cfg, uid, vm_name)
    pid = monitor.qemu_pid(vm, cfg.qemu)
    if pid is None:
        raise RuntimeFailure(f"VM {vm.name!r} is not running")
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            qemu_argv = f.read().split(b"\0")
    except OSError as exc:
        raise RuntimeFailure(f"VM {vm.name!r} is not running") from exc
    if b"-snapshot" in qemu_argv:
        # The guest's disk writes live only in QEMU's temporary overlay: a
        # state restored over the unchanged images would corrupt them.
        raise UsageError("save: the VM runs with -snapshot; its disk changes would be lost "
                         "(stop it instead)")
    if cfg.max_image_bytes:
        # The state is about the guest's RAM at most, plus page headers and
        # device state (QEMU's file-size rlimit also stops it at max_image_bytes).
        megs = launcher.admin_plan(vm).megs
        need = (megs + megs // 64 + 16) << 20
        room = max(0, cfg.max_image_bytes - usage_bytes(cfg, uid))
        if need > room:
            raise UsageError(f"save: no room for the state of a {need >> 20} MiB guest "
                             f"({room} bytes left of max_image_bytes)")
    dfd = open_dir(vm)
    try:
        refuse_existing("save", name, dfd)
        tmp, fd = create_tmp("save", name, dfd)
        try:
            # Why a descriptor: QEMU writes the state into a file kvmshell
            # created, and never names or opens a path itself.
            # The state is a file QEMU writes: its file-size cap (limits.py)
            # is lifted to max_image_bytes while the guest is paused (the
            # room was counted above), and put back if the guest resumes.
            cap: list[int | None] = [None]
            monitor.save(vm, fd, lambda: publish("save", name, dfd, tmp, fd),
                         paused=lambda: cap.__setitem__(0, limits.lift_file_cap(pid)),
                         resuming=lambda: limits.restore_file_cap(pid, cap[0]))
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
            _unlink_tmp(tmp, dfd)
    finally:
        os.close(dfd)
    monitor.wait_gone(vm, 30)
    return vm, name, size


def _virtual_size(dfd: int, name: str, st: os.stat_result) -> int | None:
    """What the guest sees: a raw file's size, or a qcow2's size field
    (bytes 24-31 of its header, big-endian; QEMU's docs/interop/qcow2.txt).
    The format comes from the name, as for 'start'; None if a .qcow2 is not one."""
    if not name.endswith(".qcow2"):
        return st.st_size
    from kvmshell.shell.qcow2 import MAGIC as QCOW2_MAGIC
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                     | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        head = os.pread(fd, 32, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(head) < 32 or head[:4] != QCOW2_MAGIC:
        return None
    return int.from_bytes(head[24:32], "big")


def listing(cfg: "Config", uid: int, args: list[str]) -> list[tuple[str, int, int | None]]:
    """(name, bytes on disk, virtual size or None) of the files in one VM
    directory, sorted by name; names as the filesystem has them (print
    them with text.printable)."""
    from kvmshell.common import vmtree
    if len(args) > 1:
        raise UsageError(f"{args[1]}: unexpected argument to 'images'")
    vm = vmtree.pick(cfg, uid, args[0] if args else None)
    dfd = open_dir(vm)
    out = []
    try:
        for entry in os.scandir(dfd):
            if entry.name in RESERVED or entry.name.endswith(".sock"):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                out.append((entry.name, st.st_blocks * 512, _virtual_size(dfd, entry.name, st)))
    finally:
        os.close(dfd)
    return sorted(out)


def clone_of(dfd: int, name: str) -> str | None:
    """The first qcow2 image in the directory *dfd* whose header names *name*
    as its backing file (a plain name: bases in image directories are the
    admin's), or None.  Each file is opened without following symlinks or
    blocking, and only its header is read."""
    from kvmshell.shell import qcow2
    for entry in os.scandir(dfd):
        if entry.name == name or not entry.name.endswith(".qcow2"):
            continue
        try:
            fd = os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dfd)
        except OSError:
            continue
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode) and qcow2.is_qcow2(fd):
                if qcow2.read_header(fd, entry.name).backing == name:
                    return entry.name
        except (OSError, RefusedFile):
            pass
        finally:
            os.close(fd)
    return None


def remove(cfg: "Config", uid: int, args: list[str]) -> tuple["VM", str]:
    """Unlink NAME from the VM directory unless a running VM holds it."""
    import fcntl
    from kvmshell.common import vmtree
    from kvmshell.common.text import printable
    vm_name, word = _split("rm", args)
    name = existing_name("rm", word)
    shown = printable(name)
    vm = vmtree.pick(cfg, uid, vm_name)
    dfd = open_dir(vm)
    try:
        fd = _open_to_remove(dfd, name, shown)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise RefusedFile(f"rm: {shown} is not a regular file")
            try:
                # A running VM holds a lock on every image it uses (files.py).
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise RefusedFile(f"rm: {shown} is in use by a running VM") from exc
            clone = clone_of(dfd, name)
            if clone is not None:
                raise RefusedFile(f"rm: {shown} is the base of {clone} (remove or reset that "
                                  "clone first)")
            os.unlink(name, dir_fd=dfd)
        finally:
            os.close(fd)
    finally:
        os.close(dfd)
    return vm, name


def _open_to_remove(dfd: int, name: str, shown: str) -> int:
    """Open NAME to lock it; a file of the user's own that its mode makes
    unreadable (000: the user's QEMU may chmod its files) is made 0600
    first, so that every file 'images' lists can be removed."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        return os.open(name, flags, dir_fd=dfd)
    except FileNotFoundError as exc:
        raise RefusedFile(f"rm: {shown}: no such file") from exc
    except PermissionError:
        pass
    except OSError as exc:
        raise RefusedFile(f"rm: {shown}: {exc.strerror}") from exc
    try:
        pfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            st = os.fstat(pfd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                raise RefusedFile(f"rm: {shown}: permission denied")
            # Through our own descriptor: the same inode, no path looked up again.
            os.chmod(f"/proc/self/fd/{pfd}", 0o600)
        finally:
            os.close(pfd)
        return os.open(name, flags, dir_fd=dfd)
    except OSError as exc:
        raise RefusedFile(f"rm: {shown}: {exc.strerror}") from exc
