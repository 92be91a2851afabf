"""Install the network helper as root runs it (used by ``make install``,
the tests and the benchmark, so all three run the same layout).

    LIBEXEC/kvmshell_nethelper.py            kvmshell/helper.py, verbatim
    LIBEXEC/__pycache__/...pyc               compiled here, once
    LIBEXEC/kvmshell-nethelper               a four-line stub (what sudo runs)

Why a stub: Python compiles a script on every run (~2 ms for the helper,
twice per VM start); a module is compiled once, at install time, into a
root-owned cache beside it.  Tests and the benchmark also rewrite the
helper's fixed config path, since it takes no config option.
"""

from __future__ import annotations

import importlib.util
import os
import py_compile

HELPER_CONFIG_LINE = '\nCONFIG = "/etc/kvmshell/kvmshell.conf"\n'

_STUB = """#!/usr/bin/python3 -IS
# kvmshell's privileged network helper: the code is kvmshell_nethelper.py
# beside this file (root-owned, compiled at install time).
import sys
sys.path.insert(0, {libexec!r})
from kvmshell_nethelper import main
sys.exit(main())
"""


def install_nethelper(source: str, libexec: str, config: str | None = None) -> str:
    """Install *source* (kvmshell/helper.py) into *libexec*; return the stub's path."""
    with open(source, encoding="utf-8") as f:
        text = f.read()
    if config is not None:
        if text.count(HELPER_CONFIG_LINE) != 1:
            raise ValueError(f"{source}: no single CONFIG line to rewrite")
        text = text.replace(HELPER_CONFIG_LINE, f"\nCONFIG = {config!r}\n")
    os.makedirs(libexec, mode=0o755, exist_ok=True)
    module = os.path.join(libexec, "kvmshell_nethelper.py")
    stub = os.path.join(libexec, "kvmshell-nethelper")
    for path, body, mode in ((module, text, 0o644), (stub, _STUB.format(libexec=libexec), 0o755)):
        tmp = path + ".new"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(body)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    cached = importlib.util.cache_from_source(module)
    py_compile.compile(module, cfile=cached, doraise=True)
    os.chmod(os.path.dirname(cached), 0o755)
    os.chmod(cached, 0o644)
    return stub


if __name__ == "__main__":
    import sys
    print(install_nethelper(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None))
