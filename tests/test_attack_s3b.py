"""Attacks on today's walks (session 3's second review): the shared count
of a VM directory (budgets.files_below: kvmadm usage and kvmshell's
start-time count), as the VM user's own code would make them.  Real
kvmadm, real kvmshell, real ext4; nothing mocked."""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

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


def test_every_purge_run_deletes_part_of_a_deep_chain(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A chain of directories deeper than one purge run can walk down in
    MAX_SECONDS (a few hundred thousand levels, which the user's code
    makes in seconds): the walk deletes nothing before it reaches the
    bottom, so every run stopped at its deadline with nothing done and
    'remove --purge' never finished.  Each run must delete part of it.
    In this process, with a clock that ticks once per look (MAX_SECONDS
    of them per run) and a chain scaled down with MAX_HELD_DEPTH, so
    that nothing depends on this machine's speed."""
    import time
    from kvmshell.admin import purge
    top = tmp_path / "vm"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    at = os.dup(fd)
    for _ in range(800):     # under Python's recursion limit: pytest's rmtree
        os.mkdir("d", dir_fd=at)
        sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=at)
        os.close(at)
        at = sub
    os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=at))
    os.close(at)

    def dirs() -> int:      # find, not os.walk: Python 3.11's recurses
        out = subprocess.run(["find", str(top), "-type", "d"], capture_output=True, check=True)
        return out.stdout.count(b"\n")
    ticks = iter(range(10 ** 9))
    monkeypatch.setattr(purge, "MAX_HELD_DEPTH", 30, raising=False)
    monkeypatch.setattr(purge, "MAX_SECONDS", 300.0)    # looks per run, on this clock
    try:
        left = dirs()
        for run in range(40):
            monkeypatch.setattr(time, "monotonic", lambda: float(next(ticks)))
            try:
                purge.empty(fd)
                break
            except purge._Changed as exc:
                assert "still not empty after 300 seconds" in str(exc), exc
            finally:
                monkeypatch.setattr(time, "monotonic", _MONOTONIC)
            now = dirs()
            assert now < left, f"run {run} deleted nothing ({now} directories left)"
            left = now
        assert os.listdir(top) == []
    finally:
        os.close(fd)
        subprocess.run(["rm", "-rf", str(top)], check=True)


_MONOTONIC = __import__("time").monotonic
