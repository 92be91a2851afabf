"""Install the root helpers' entry stubs, as root runs them (used by
``make install``, the tests and the benchmarks, so all run the same
layout).

    LIBEXEC/kvmshell-nethelper      a root-owned stub: what sudo runs for kvmshell
    LIBEXEC/kvmshell-cgrouphelper   the same for the cgroup helper (kvmshell's start)
    LIBEXEC/kvmshell-pamhelper      a root-owned stub: what sudo runs for kvmshell-web
    LIBEXEC/kvmshell-relay          the relay client (sudo runs it as the relay account)
    LIBEXEC/kvmshell-relayd         the relay helper (sudo runs it as root for the relay account)

The helpers' code is :mod:`kvmshell.privileged.nethelper`,
:mod:`kvmshell.privileged.cgrouphelper` and
:mod:`kvmshell.privileged.pamhelper` in the installed (root-owned) package;
a stub fixes the two things a root program must not take from its caller:
the config path, and where the package is (``python3 -I``: no PYTHON*
variables, no user site).  Tests and the benchmarks pass their own config
and their checkout's copy of the package.
"""

from __future__ import annotations

import os

_STUB = """#!/usr/bin/python3 {flags}
# kvmshell's {what} (sudo runs this; see
# kvmshell/privileged/{module}.py).  Root-owned, written at install time.
# First, before any import: the caller's terminal cannot stop this root
# process (^Z and the background-job stops; see privileged/guard.py).
import signal
for _sig in (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
    signal.signal(_sig, signal.SIG_IGN)
import sys
{path_line}from kvmshell.privileged.{module} import main
sys.exit(main({config!r}))
"""

DEFAULT_CONFIG = "/etc/kvmshell/kvmshell.conf"


def install_nethelper(libexec: str, config: str | None = None, lib: str | None = None) -> str:
    """Write the helper's stub into *libexec*; return its path.

    *config*: the config file the helper reads (default
    ``/etc/kvmshell/kvmshell.conf``).  *lib*: a root-owned directory to put
    first on the helper's ``sys.path`` (tests); default: the installed package.
    """
    stub = _install_stub(libexec, "kvmshell-nethelper", "nethelper",
                         "privileged network helper", config, lib)
    # A file from an older layout (the helper as one module beside its stub).
    for old in ("kvmshell_nethelper.py",):
        try:
            os.unlink(os.path.join(libexec, old))
        except FileNotFoundError:
            pass
    return stub


def install_pamhelper(libexec: str, config: str | None = None, lib: str | None = None) -> str:
    """Write the web front door's login helper stub into *libexec*; return
    its path.  *config*, *lib*: as for :func:`install_nethelper`."""
    return _install_stub(libexec, "kvmshell-pamhelper", "pamhelper",
                         "web login helper", config, lib)


def install_cgrouphelper(libexec: str, config: str | None = None, lib: str | None = None) -> str:
    """Write the cgroup helper's stub into *libexec*; return its path
    (*config*, *lib*: as for :func:`install_nethelper`)."""
    # -IS: no site module either.  The helper needs nothing outside the
    # stdlib and the package, so root runs no .pth file, and each start saves
    # the site import (36 ms of CPU measured here, where a .pth imports certifi).
    if lib is None:
        import kvmshell
        lib = os.path.dirname(os.path.dirname(os.path.abspath(kvmshell.__file__)))
    return _install_stub(libexec, "kvmshell-cgrouphelper", "cgrouphelper",
                         "privileged cgroup helper", config, lib, flags="-IS")


def install_relay(libexec: str, config: str | None = None, lib: str | None = None) -> list[str]:
    """Write the relay client's and the relay helper's stubs into *libexec*
    (several hosts on one tree, docs/multihost.md); return their paths
    (*config*, *lib*: as for :func:`install_nethelper`)."""
    # -IS, as for the cgroup helper: both run on every routed command.
    if lib is None:
        import kvmshell
        lib = os.path.dirname(os.path.dirname(os.path.abspath(kvmshell.__file__)))
    return [_install_stub(libexec, "kvmshell-relay", "relayclient",
                          "relay client (as the relay account)", config, lib, flags="-IS"),
            _install_stub(libexec, "kvmshell-relayd", "relayhelper",
                          "relay helper (root, for the relay account)", config, lib,
                          flags="-IS")]


def _install_stub(libexec: str, leaf: str, module: str, what: str, config: str | None,
                  lib: str | None, flags: str = "-I") -> str:
    os.makedirs(libexec, mode=0o755, exist_ok=True)
    stub = os.path.join(libexec, leaf)
    # Without site (-S) nothing else names a kvmshell package: the directory
    # goes after the stdlib, so no file there can shadow a stdlib module.
    path_line = ((f"sys.path.append({lib!r})\n" if "S" in flags else
                  f"sys.path.insert(0, {lib!r})\n") if lib else "")
    tmp = stub + ".new"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(_STUB.format(what=what, module=module, path_line=path_line,
                             config=config or DEFAULT_CONFIG, flags=flags))
    os.chmod(tmp, 0o755)
    os.replace(tmp, stub)
    return stub


if __name__ == "__main__":
    import sys
    cfg = sys.argv[2] if len(sys.argv) > 2 else None
    print(install_nethelper(sys.argv[1], cfg))
    print(install_pamhelper(sys.argv[1], cfg))
    print(install_cgrouphelper(sys.argv[1], cfg))
    print("\n".join(install_relay(sys.argv[1], cfg)))
