"""Run ``qemu-img`` for kvmshell, on descriptors it opened itself.

Why this shape: image work (create, snapshot, resize, info) is qemu-img's
job, not ours.  It runs as the VM user (kvmshell already is), with a clean
environment, resource limits, a timeout and an explicit format, and it is
given ``/dev/fd/N`` for a file kvmshell opened confined -- never a path a
user or an image header chose.  Images that have a backing file are given
as a ``json:`` pseudo-filename with ``"backing": null``, so qemu-img never
follows a header's backing name either.

Source for the JSON form: QEMU's qapi/block-core.json (BlockdevOptions) and
qemu-img(1) ("json:" filenames).
"""

from __future__ import annotations

import os

from kvmshell.common.errors import RuntimeFailure

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kvmshell.common.config import Config

TIMEOUT = 120.0                     # seconds, per qemu-img run
ADDRESS_SPACE = 4 << 30            # bytes of address space qemu-img may map
CPU_SECONDS = 120


def image_spec(fd: int, fmt: str) -> str:
    """The filename argument for the image on *fd*: ``/dev/fd/N`` for raw,
    a ``json:`` spec with ``"backing": null`` for qcow2."""
    import json

    if fmt == "raw":
        return f"/dev/fd/{fd}"
    return "json:" + json.dumps({"driver": fmt, "backing": None,
                                 "file": {"driver": "file", "filename": f"/dev/fd/{fd}"}},
                                separators=(",", ":"))


def _limits() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run(cfg: "Config", args: list[str], fds: list[int], what: str) -> str:
    """Run ``qemu-img ARGS`` passing *fds*; return its stdout (text).

    Raises:
        RuntimeFailure: qemu-img could not run, timed out, or failed (its
            last line of stderr is the reason, prefixed with *what*).
    """
    import subprocess

    try:
        r = subprocess.run([cfg.qemu_img, *args], pass_fds=fds, capture_output=True,
                           stdin=subprocess.DEVNULL, timeout=TIMEOUT, preexec_fn=_limits,
                           env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeFailure(f"{what}: qemu-img failed: {exc}") from exc
    if r.returncode != 0:
        lines = [l.strip() for l in r.stderr.decode("utf-8", "replace").splitlines() if l.strip()]
        reason = lines[-1] if lines else f"exit status {r.returncode}"
        # qemu-img names the image by the spec we gave it: say it plainly.
        reason = reason.split(": ", 1)[-1] if reason.startswith("qemu-img:") else reason
        raise RuntimeFailure(f"{what}: {reason}")
    return r.stdout.decode("utf-8", "replace")


def temp_overlay(cfg: "Config", vmdir: str, size: int) -> tuple[int, int]:
    """A new, unnamed qcow2 overlay of virtual *size* bytes in *vmdir*
    (O_TMPFILE: gone when the last descriptor closes), for ``-snapshot``;
    returns its (read-write, read-only) descriptors.  It has no backing
    name: the ``-blockdev`` graph gives it its backing node.

    Raises:
        RuntimeFailure: the file or the image could not be made.
    """
    try:
        fd = os.open(vmdir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise RuntimeFailure(f"-snapshot: cannot create a temporary overlay: {exc.strerror}") from exc
    try:
        run(cfg, ["create", "-q", "-f", "qcow2", f"/dev/fd/{fd}", str(size)], [fd], "-snapshot")
        ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        os.close(fd)
        raise
    return fd, ro
