"""OpenSSH public keys: the key types kvmshell accepts, and the key file sshd reads.

Shared by kvmadm (``adduser``/``setkey`` write ``<authorized_keys>/USER``)
and kvmshell (``start -cloud-init`` hands the same keys to the guest).  The
format is sshd(8)'s AUTHORIZED_KEYS FILE FORMAT: ``[options] keytype
base64 [comment]``, one key a line, ``#`` comments.
"""

from __future__ import annotations

import binascii

KEY_TYPES = frozenset({
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com"})
MAX_KEYS = 32
# A line of the key file: an RSA-16384 key is about 2.8 KB of base64.
MAX_LINE = 8192


def check_key(kind: str, b64: str) -> bool:
    """True if *b64* is base64 of an SSH key blob whose embedded type
    (RFC 4253 section 6.6: a uint32 length and the name) is *kind*, a type
    of :data:`KEY_TYPES`."""
    if kind not in KEY_TYPES:
        return False
    try:
        blob = binascii.a2b_base64(b64.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return False
    name = kind.encode()
    return blob[:4] == len(name).to_bytes(4, "big") and blob[4:4 + len(name)] == name


def keys_of_line(line: str) -> tuple[str, str] | None:
    """The (type, base64) of one authorized_keys line, options and comment
    dropped; None for blank and comment lines and lines without a key.

    The key is the first word that is a known type followed by a word that
    is that type's key blob (:func:`check_key`): options, however quoted,
    never pass that test, so nothing of them is returned.
    """
    words = line.split()
    if not words or words[0].startswith("#"):
        return None
    for i, word in enumerate(words[:-1]):
        if check_key(word, words[i + 1]):
            return word, words[i + 1]
    return None
