"""``--json``: every verb that prints gives one JSON document (docs/json.md).

Shared by kvmshell's verbs and kvmadm.  A verb builds a dict (the keys
docs/json.md lists for it) and calls :func:`emit`; file names that came
from the filesystem go through :func:`file_name`.

How the output stays valid and harmless whatever the names hold: it is
ASCII only (``ensure_ascii``: every non-ASCII character and control
character is a ``\\uXXXX`` escape, so no terminal escape reaches a screen),
and no string holds a lone surrogate.  A file name that is not valid UTF-8
(Python carries its bad bytes as surrogates, ``surrogateescape``) is given
as ``name`` with each bad byte spelled ``\\xNN`` -- for display only -- plus
``name_bytes``, the name's exact bytes in lowercase hex.  ``name_bytes``
appears exactly when ``name`` is not the file's name.
"""

from __future__ import annotations

import sys


def file_name(name: str, key: str = "name") -> dict[str, str]:
    """``{key: name}``, or for a name that is not valid UTF-8, ``{key:
    display form, key + "_bytes": hex of the raw bytes}``."""
    raw = name.encode("utf-8", "surrogateescape")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return {key: raw.decode("utf-8", "backslashreplace"), key + "_bytes": raw.hex()}
    return {key: name}


def dumps(doc: object) -> str:
    """One JSON document on one line (ASCII, no NaN)."""
    import json
    return json.dumps(doc, ensure_ascii=True, allow_nan=False)


def emit(doc: object) -> None:
    """Print *doc* as one JSON document and a newline on stdout."""
    sys.stdout.write(dumps(doc) + "\n")
