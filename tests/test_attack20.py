"""Attacks on issue 20's fix (attack-20 review): the uid-level attacker
against the VM lock, root's purge, the root helpers and kvmadm autostart.
Each test fails on the code before its fix."""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import pytest

from conftest import KVMADM, Host, User
from test_uid_attacker import as_user_py

pytestmark = pytest.mark.security


# The user's code: wait for a 'kvmshell start' of its own (the one root's
# autostart runs through runuser), take copies of its stdout and stderr
# (pidfd_getfd: the same uid may) and keep them, writing into them for as
# long as root reads (argv[1]: 'hold' or 'flood').
GRAB = """import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
me = os.getuid()
print('ready', flush=True)
got = []
while not got:
    for p in os.listdir('/proc'):
        if not p.isdigit() or int(p) == os.getpid():
            continue
        try:
            if os.stat('/proc/' + p).st_uid != me:
                continue
            cmd = open('/proc/%s/cmdline' % p, 'rb').read().split(b'\\0')
        except OSError:
            continue
        if b'start' not in cmd or not any(c.endswith(b'kvmshell') for c in cmd):
            continue
        try:
            pidfd = os.pidfd_open(int(p))
        except OSError:
            continue
        for fd in (1, 2):
            n = libc.syscall(438, pidfd, fd, 0)
            if n >= 0:
                got.append(n)
    time.sleep(0.001)
print('got', len(got), flush=True)
while True:
    if sys.argv[1] == 'flood':
        os.write(got[0], b'x' * 65536)
    else:
        time.sleep(1)
"""


@pytest.mark.parametrize("how", ["hold", "flood"])
def test_autostart_is_not_held_by_the_owners_copy_of_its_pipes(host: Host, alice: User,
                                                              how: str) -> None:
    """kvmadm autostart runs 'kvmshell start' as the owner with its output
    on root's pipes.  The owner's code takes copies of those pipes from
    that process and keeps them open (or writes into them without end):
    root's autostart still ends, at its per-start deadline (2 s here, in
    place of 300), with bounded memory, and goes on to the next VM."""
    from test_security import own_host, put
    from test_uid_attacker import LIB
    h = own_host(host, f"a20as-{secrets.token_hex(2)}", shell=str(Path(KVMADM).with_name("kvmshell")))
    u = User(alice.name, h)
    first = h.create_vm("as1", u, "-m", "32")
    put(first / "autostart", u, b"")
    put(first / "start-options", u, b"-hda\nnosuch.img\n")
    grab = subprocess.Popen(as_user_py(alice, GRAB, how), env=alice.env(),
                            stdout=subprocess.PIPE, text=True)
    code = (f"import sys; sys.path.insert(0, {LIB!r})\n"
            "import resource\n"
            "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
            "from kvmshell.admin import kvmadm\n"
            "kvmadm.START_TIMEOUT = 2\n"
            f"sys.exit(kvmadm.main(['kvmadm', '--config', {str(h.conf)!r}, 'autostart']))\n")
    try:
        assert grab.stdout is not None and grab.stdout.readline() == "ready\n"
        r = subprocess.run(["/usr/bin/python3", "-I", "-c", code], capture_output=True,
                           text=True, timeout=30)
        assert grab.stdout.readline() == "got 2\n"
        assert r.returncode == 1 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
        assert r.stdout.startswith("as1: failed: "), r.stdout
    finally:
        grab.kill()
        grab.wait()
