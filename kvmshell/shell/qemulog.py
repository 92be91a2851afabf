"""Which lines of QEMU's log (``qemu.log``, its stderr and stdout) say what.

QEMU prints notices before anything fatal: the accelerator it could not
use and the one it falls back to (``Could not access KVM kernel module:
...``, ``-accel kvm: failed to initialize kvm: ...``, ``falling back to
tcg``) and warnings (``qemu-system-x86_64: warning: ...``).  None of them is
why QEMU exited.  The reason is what follows: error lines, which QEMU 7.2
prints through ``error_report`` (``PROG: [LOCATION: ]MESSAGE``, e.g.
``qemu-system-x86_64: -drive ...: Unsupported cluster size: 2^0``) or, in
older loaders, with ``fprintf`` (``qemu: invalid kernel header``,
``qemu: initrd is too large, cannot support.``).

Shared by the launcher (why a start failed) and anything that reports the
accelerator actually used (the fallback notice).
"""

from __future__ import annotations

# How many of QEMU's last error lines make up the reason (e.g. "Not a
# migration stream" and then "load of migration failed: Invalid argument").
REASON_LINES = 3
REASON_CHARS = 400


def read_lines(path: str, limit: int = 65536) -> list[str]:
    """The non-empty lines of the first *limit* bytes of *path*, stripped
    (undecodable bytes kept as surrogates); [] if it cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit)
    except OSError:
        return []
    return [line.strip() for line in data.decode("utf-8", "surrogateescape").splitlines()
            if line.strip()]


def _message(line: str) -> str:
    """The line without QEMU's program prefix (``qemu-system-x86_64: ``, ``qemu: ``)."""
    head, sep, rest = line.partition(": ")
    if sep and head.startswith("qemu") and " " not in head and "/" not in head:
        return rest
    return line


def is_notice(line: str) -> bool:
    """A warning or information line: never the reason QEMU exited."""
    msg = _message(line)
    return msg.startswith(("warning: ", "info: ")) or msg.startswith("falling back to ")


def fallback_index(lines: list[str]) -> int:
    """Index of QEMU's last accelerator fallback line (``falling back to
    ACCEL``), or -1.  The lines before it that report the accelerator that
    failed are notices too: QEMU carried on."""
    for i in range(len(lines) - 1, -1, -1):
        if _message(lines[i]).startswith("falling back to "):
            return i
    return -1


def reason(lines: list[str], default: str = "QEMU exited") -> str:
    """Why QEMU exited, from its log: its last error lines after any
    accelerator fallback, warnings left out, joined with '; ' (the program
    prefix only once), bounded.  Not escaped: print it with text.printable."""
    errors = [line for line in lines[fallback_index(lines) + 1:] if not is_notice(line)]
    if not errors:
        return default
    last = errors[-REASON_LINES:]
    text = "; ".join([last[0]] + [_message(line) for line in last[1:]])
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS - 3] + "..."
