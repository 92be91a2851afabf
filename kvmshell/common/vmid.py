"""The VM identifier: ``<name>.<url-safe base64 of the admin options>``.

The seed's design: the directory name is the VM's whole admin
configuration.  The encoded payload is the name followed by the admin
option words, separated by NUL, so two VMs with the same options still get
different identifiers.  Decoding is strict: the text must be canonical
(re-encoding gives the same string), so there is exactly one directory
name per configuration.
"""

from __future__ import annotations

import binascii  # not base64: that module imports re, ~6 ms on every command

from kvmshell.common.errors import TreeError, UsageError
from kvmshell.common.text import printable

_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")

NAME_MAX = 32
FILENAME_MAX = 255
_NAME_FIRST = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_NAME_REST = _NAME_FIRST + "_-"
_B64 = _NAME_FIRST + "-_"
# Sets, for subset tests: the tree is scanned name by name (vmtree.scan_all).
_NAME_REST_SET = frozenset(_NAME_REST)
_B64_SET = frozenset(_B64)


def check_name(name: str) -> str:
    """Validate a human-readable VM name (what users type)."""
    if not name:
        raise UsageError("empty VM name")
    if len(name) > NAME_MAX:
        raise UsageError(f"VM name too long: {printable(name[:NAME_MAX])}... "
                         f"(at most {NAME_MAX} characters)")
    if name[0] not in _NAME_FIRST or not _NAME_REST_SET.issuperset(name):
        raise UsageError(
            f"invalid VM name '{printable(name)}': use letters, digits, '_' and '-' "
            "(not '_' or '-' first)")
    return name


def encode(name: str, words: list[str]) -> str:
    """Return the directory name for VM *name* with admin option *words*."""
    check_name(name)
    for w in words:
        if not w or "\0" in w or not w.isprintable() or not w.isascii():
            raise UsageError(f"invalid option word '{printable(w)}'")
    payload = "\0".join([name, *words]).encode("ascii")
    b64 = binascii.b2a_base64(payload, newline=False).translate(_TO_URLSAFE).decode("ascii").rstrip("=")
    dirname = f"{name}.{b64}"
    if len(dirname.encode()) > FILENAME_MAX:
        raise UsageError(
            f"VM identifier for {name!r} would be {len(dirname)} bytes, "
            f"over the {FILENAME_MAX}-byte file-name limit: use fewer admin options")
    return dirname


def decode(dirname: str) -> tuple[str, list[str]]:
    """Return (name, admin words) of a VM directory name, or raise TreeError."""
    name, dot, b64 = dirname.partition(".")
    if not dot or not b64 or not _B64_SET.issuperset(b64):
        raise TreeError(f"VM directory '{printable(dirname)}': not <name>.<base64>")
    try:
        check_name(name)
        padded = (b64 + "=" * (-len(b64) % 4)).encode("ascii").translate(_FROM_URLSAFE)
        payload = binascii.a2b_base64(padded, strict_mode=True)
        text = payload.decode("ascii")
    except (UsageError, binascii.Error, ValueError) as exc:
        raise TreeError(f"VM directory '{printable(dirname)}': undecodable identifier") from exc
    parts = text.split("\0")
    try:
        canonical = encode(parts[0], parts[1:])
    except UsageError as exc:
        raise TreeError(f"VM directory '{printable(dirname)}': {exc.message}") from exc
    if canonical != dirname or parts[0] != name:
        raise TreeError(f"VM directory '{printable(dirname)}': identifier is not canonical")
    return name, parts[1:]
