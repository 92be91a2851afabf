"""Attacks on today's walks (session 3's second review): the shared count
of a VM directory (budgets.files_below: kvmadm usage and kvmshell's
start-time count), as the VM user's own code would make them.  Real
kvmadm, real kvmshell, real ext4; nothing mocked."""

from __future__ import annotations

import os
import secrets
import subprocess

import pytest

from conftest import KVMADM, Host, User, kill_all, wait_for
from test_security import own_host

pytestmark = pytest.mark.security

# The user's code: one empty file and LINKS hard links to it under long
# names in one directory.  No file bytes and no new inode, but the
# directory's own blocks grow (ext4: about 260 bytes per 240-character name).
LINKS = 16000
_MAKE = ("import os; os.mkdir('d'); open('f', 'w').close()\n"
         f"for i in range({LINKS}): os.link('f', 'd/%05d' % i + 'x' * 240)\n")


def test_directory_blocks_count_against_the_disk_budget(host: Host, alice: User) -> None:
    """A directory takes disk too: one of the user's holding 16000 long
    names (hard links of one empty file) takes about 4 MiB, which a count of
    regular files only left out: 'kvmadm usage' showed less than du, and a
    start under a 1 MiB max_image_bytes was admitted."""
    import json
    h = own_host(host, f"s3b-{secrets.token_hex(2)}", max_image_bytes=str(1 << 20))
    u = User(alice.name, h)
    path = h.create_vm("s3b", u, "-m", "32")
    subprocess.run(u.argv("/usr/bin/python3", "-c", _MAKE), cwd=path, check=True, timeout=120)
    held = os.lstat(path / "d").st_blocks * 512
    assert held > 2 << 20, held
    try:
        r = subprocess.run([KVMADM, "--config", str(h.conf), "usage", "--json"],
                           capture_output=True, text=True, timeout=120)
        (doc,) = [d for d in json.loads(r.stdout) if d["user"] == u.name]
        assert doc["budgets"]["image_bytes"]["used"] >= held, (doc, held)
        r2 = u.ssh_command("start s3b")
        assert r2.returncode == 1 and "over the limit of 1048576 bytes" in r2.stderr, r2.stderr
        assert u.qemu_pids() == []
    finally:
        if u.qemu_pids():
            kill_all(u)
            wait_for(lambda: u.qemu_pids() == [], 30, "QEMU to exit")
        h.kvmadm("remove", "s3b", "--purge", check=False)
