"""Text from outside, made safe to print: one escaping rule for all output.

File names (from the filesystem), QEMU's and the guest's words, and
anything a user typed may hold terminal escapes (``ESC [ 31 m``), other
control characters, or bytes that are not UTF-8 (which Python carries as
surrogates, U+DC80-U+DCFF, after ``surrogateescape`` decoding).  Printed
raw, they would drive the reader's terminal.

:func:`printable` spells every such character as ``\\xNN``, one escape per
byte of its UTF-8 encoding (an undecodable byte as itself: ``\\xff``), and
a backslash as ``\\\\``; printable ASCII stays as it is.  The result is
printable ASCII and :func:`unescape` turns it back into the same string, so
a name shown escaped can be typed back (``rm 'bad\\xff.img'``).

Every human-readable line kvmshell and kvmadm print passes through
:func:`printable` (names, as they are formatted) or through
``printable(line, backslash=False)`` (the last safety net at the output,
which leaves already escaped text as it is).  JSON output escapes by
construction (``json.dumps``, ``ensure_ascii``).
"""

from __future__ import annotations

_HEX = "0123456789abcdef"


def _bytes_of(ch: str) -> bytes:
    try:
        return ch.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:   # a lone surrogate that is not an escaped byte
        return ch.encode("utf-8", "surrogatepass")


def printable(text: str, backslash: bool = True) -> str:
    """*text* as printable ASCII: other characters become ``\\xNN`` per
    UTF-8 byte (an undecodable byte, carried as a surrogate, as itself);
    with *backslash*, ``\\`` becomes ``\\\\`` so that :func:`unescape`
    gives *text* back.  Pure: never raises."""
    if text.isascii() and text.isprintable() and (not backslash or "\\" not in text):
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if 32 <= code < 127:
            out.append("\\\\" if backslash and ch == "\\" else ch)
        else:
            out.extend(f"\\x{_HEX[b >> 4]}{_HEX[b & 15]}" for b in _bytes_of(ch))
    return "".join(out)


def unescape(text: str) -> str:
    """The string :func:`printable` shows as *text*: ``\\xNN`` is byte NN,
    ``\\\\`` a backslash, anything else itself; the bytes are decoded as
    the filesystem does (UTF-8, undecodable bytes as surrogates).  Raises
    ValueError for a backslash followed by anything else."""
    if "\\" not in text:
        return text
    out = bytearray()
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch != "\\":
            out += _bytes_of(ch)
            i += 1
            continue
        nxt = text[i + 1:i + 2]
        if nxt == "\\":
            out += b"\\"
            i += 2
            continue
        digits = text[i + 2:i + 4]
        if nxt != "x" or len(digits) != 2 or any(c not in _HEX for c in digits.lower()):
            raise ValueError(f"at '{printable(text[i:i + 4])}': expected \\xNN or \\\\")
        out.append(int(digits, 16))
        i += 4
    return out.decode("utf-8", "surrogateescape")
