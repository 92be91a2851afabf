"""Split a command string into words, the way a user expects and no more.

Why: SSH_ORIGINAL_COMMAND and ``-c CMD`` are hostile text.  No shell is
ever involved: quotes group words, and every other character (``;``, ``$``,
backticks, ``|``) is plain text that the grammar will later refuse or
accept as part of a value.  Control characters and non-ASCII are refused
outright, so look-alikes and terminal escapes never reach a message.
"""

from __future__ import annotations

from kvmshell.common.errors import UsageError
from kvmshell.common.text import printable

MAX_COMMAND_BYTES = 4096
MAX_WORDS = 64
MAX_WORD_BYTES = 2048


def _check_chars(command: str) -> None:
    for ch in command:
        code = ord(ch)
        if code == 9:
            continue
        if code < 32 or code == 127:
            raise UsageError(f"control character {printable(ch)} in command")
        if code > 126:
            # A byte that is not UTF-8 arrives as a surrogate: shown as \xNN.
            raise UsageError(f"non-ASCII character {printable(ch)} in command")


def split(command: str) -> list[str]:
    """Return the words of *command*; raise UsageError if it is malformed."""
    if len(command) > MAX_COMMAND_BYTES:
        raise UsageError(
            f"command too long ({len(command)} bytes, at most {MAX_COMMAND_BYTES})")
    _check_chars(command)
    words: list[str] = []
    cur: list[str] = []
    in_word = False
    quote = ""
    i = 0
    n = len(command)
    while i < n:
        ch = command[i]
        if quote == "'":
            if ch == "'":
                quote = ""
            else:
                cur.append(ch)
        elif quote == '"':
            if ch == '"':
                quote = ""
            elif ch == "\\" and i + 1 < n and command[i + 1] in '"\\':
                i += 1
                cur.append(command[i])
            else:
                cur.append(ch)
        elif ch in " \t":
            if in_word:
                words.append("".join(cur))
                cur = []
                in_word = False
        elif ch in "'\"":
            quote = ch
            in_word = True
        elif ch == "\\":
            if i + 1 >= n:
                raise UsageError("trailing backslash in command")
            i += 1
            cur.append(command[i])
            in_word = True
        else:
            cur.append(ch)
            in_word = True
        i += 1
    if quote:
        raise UsageError(f"unterminated quote {quote} in command")
    if in_word:
        words.append("".join(cur))
    check_words(words)
    return words


def check_words(words: list[str]) -> None:
    """Bound an already split argv the same way (for argv input)."""
    if len(words) > MAX_WORDS:
        raise UsageError(f"too many words ({len(words)}, at most {MAX_WORDS})")
    for word in words:
        _check_chars(word)       # first: the message below quotes the word
        if len(word) > MAX_WORD_BYTES:
            raise UsageError(
                f"word too long: {word[:20]}... ({len(word)} bytes, at most {MAX_WORD_BYTES})")
