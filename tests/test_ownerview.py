"""The per-owner view of the VM tree, TOP/.owners (issue 17: list flat in
the number of other users' VMs).  Through the real entry points: kvmadm
as root, kvmshell as the VM user, on a tree of each test's own.

The view is derived: kvmadm rebuilds it after each change it makes, a
reader uses it only while its stamp equals the top directory's mtime, and
every name it gives is checked against the real entry.  So a stale or
forged view can leave a VM out (until 'kvmadm refresh'), never show
another user's; and a tree without it works as before.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import KVMSHELL, Host, User
from test_security import own_host

pytestmark = pytest.mark.core


def run(user: User, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(user.argv(KVMSHELL, "--config", str(user.host.conf), *args),
                          env=user.env(), capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def listed(user: User) -> list[str]:
    r = run(user, "list")
    assert r.returncode == 0, r.stderr
    return [line.split()[0] for line in r.stdout.splitlines()]


def view(h: Host) -> dict[int, set[str]]:
    top = h.vmdir / ".owners"
    return {int(d.name): {p.name for p in d.iterdir()} for d in top.iterdir()}


def stale(h: Host) -> str | None:
    from kvmshell.admin import ownerview
    from kvmshell.common.config import load
    return ownerview.stale(load(str(h.conf)))


def stamp(h: Host) -> None:
    """Stamp the view as fresh, as kvmadm does after a rebuild (the test
    plays an admin who edited the view by hand)."""
    top = h.vmdir / ".owners"
    os.utime(top, ns=(0, os.stat(h.vmdir).st_mtime_ns))


def check_line(h: Host) -> str:
    r = h.kvmadm("check", check=False)
    return next(line for line in r.stdout.splitlines() if "per-owner view" in line)


def test_kvmadm_keeps_the_view_in_step(host: Host, alice: User, bob: User) -> None:
    """create, set and remove leave a view that holds exactly the tree's
    entries by owner, stamped; each user lists their own VMs."""
    h = own_host(host, "ov-step")
    a, b = User(alice.name, h), User(bob.name, h)
    pa = h.create_vm("ova", a, "-m", "32")
    pb = h.create_vm("ovb", b, "-m", "32")
    assert stale(h) is None
    assert view(h) == {alice.uid: {pa.name}, bob.uid: {pb.name}}
    for p in (h.vmdir / ".owners", h.vmdir / ".owners" / str(alice.uid)):
        st = os.lstat(p)
        assert st.st_uid == 0 and oct(st.st_mode & 0o777) == oct(0o755)
    assert os.readlink(h.vmdir / ".owners" / str(alice.uid) / pa.name) == f"../../{pa.name}"
    h.kvmadm("set", "ova", "--", "-m", "64")
    assert stale(h) is None and view(h)[alice.uid] == {h.vm_path("ova").name}
    assert listed(a) == ["ova"] and listed(b) == ["ovb"]
    h.kvmadm("remove", "ovb")
    assert stale(h) is None and view(h) == {alice.uid: {h.vm_path("ova").name}}
    assert listed(b) == [] and run(b, "status").returncode == 2
    assert check_line(h).startswith("PASS")
    # A refused change changes nothing, the view included.
    before = h.snapshot()
    r = h.kvmadm("create", "ova", "--owner", alice.name, check=False)
    assert r.returncode != 0 and h.snapshot() == before


def test_a_tree_changed_by_hand_is_read_whole(host: Host, alice: User) -> None:
    """A VM made by hand (no kvmadm) unstamps the view: the user's list
    reads the whole tree and finds it; check says so; refresh rebuilds."""
    h = own_host(host, "ov-hand")
    a = User(alice.name, h)
    h.create_vm("first", a, "-m", "32")
    # What kvmadm create does, by hand: the name's identifier from vmid.
    from kvmshell.common import vmid
    dirname = vmid.encode("byhand", ["-m", "32"])
    os.mkdir(h.vmdir / dirname, 0o700)
    os.chown(h.vmdir / dirname, alice.uid, alice.gid)
    os.symlink(dirname, h.vmdir / "byhand")
    assert stale(h) == "the tree changed since it was built"
    assert listed(a) == ["byhand", "first"]
    line = check_line(h)
    assert line.startswith("WARN") and "fix: kvmadm refresh" in line
    r = h.kvmadm("refresh")
    assert r.stdout.strip().endswith(": 2 entries"), r.stdout
    assert stale(h) is None and listed(a) == ["byhand", "first"]


def test_a_tree_from_before_the_view_works(host: Host, alice: User) -> None:
    """No .owners at all (a tree made by an older kvmadm): everything works
    by the whole tree; check warns; refresh makes the view."""
    h = own_host(host, "ov-old")
    a = User(alice.name, h)
    h.create_vm("old", a, "-m", "32")
    for p in (h.vmdir / ".owners").iterdir():
        for q in p.iterdir():
            q.unlink()
        p.rmdir()
    (h.vmdir / ".owners").rmdir()
    assert listed(a) == ["old"]
    assert run(a, "status").stdout.startswith("old: stopped")
    assert stale(h) == "there is none yet (a tree from before it)"
    assert check_line(h).startswith("WARN")
    h.kvmadm("refresh")
    assert stale(h) is None and listed(a) == ["old"]


def test_a_stale_or_forged_view_shows_no_one_elses_vm(host: Host, alice: User,
                                                       bob: User) -> None:
    """Every name the view gives is checked against the real entry: a link
    to Bob's directory in Alice's part of the view, stamped fresh, shows
    her nothing of Bob's.  A directory given to Bob by hand (chown, which
    the stamp cannot see) leaves Alice's list at once; Bob sees it once
    the view is rebuilt, and check names the mismatch meanwhile."""
    h = own_host(host, "ov-forged")
    a, b = User(alice.name, h), User(bob.name, h)
    h.create_vm("mine", a, "-m", "32")
    pb = h.create_vm("theirs", b, "-m", "32", "-usb")
    secret = pb.name.split(".")[1]
    os.symlink(f"../../{pb.name}", h.vmdir / ".owners" / str(alice.uid) / pb.name)
    stamp(h)
    for args in (["list"], ["status"]):
        r = run(a, *args)
        assert r.returncode == 0, r.stderr
        assert "theirs" not in r.stdout + r.stderr and secret not in r.stdout + r.stderr
        assert "mine" in r.stdout
    h.kvmadm("refresh")
    pa = h.vm_path("mine")
    os.chown(pa, bob.uid, bob.gid)                  # by hand: the top directory's mtime stays
    assert listed(a) == []                          # the real owner decides, at once
    assert listed(b) == ["theirs"]                  # the view does not know yet
    assert stale(h) == "an entry's owner is not the one it lists"
    assert check_line(h).startswith("WARN")
    h.kvmadm("refresh")
    assert listed(b) == ["mine", "theirs"] and listed(a) == []


def test_a_view_others_could_change_is_not_used(host: Host, alice: User) -> None:
    """A view not root's alone (here: made over to Alice) is ignored: a
    user who could edit it could hide VMs from themself, so the reader
    falls back to the whole tree."""
    h = own_host(host, "ov-owner")
    a = User(alice.name, h)
    pa = h.create_vm("seen", a, "-m", "32")
    (h.vmdir / ".owners" / str(alice.uid) / pa.name).unlink()
    stamp(h)
    assert listed(a) == []                          # the fresh view is what list reads
    os.chown(h.vmdir / ".owners", alice.uid, alice.gid)
    assert listed(a) == ["seen"]                    # not root's: the whole tree
    os.chown(h.vmdir / ".owners", 0, 0)
    os.chmod(h.vmdir / ".owners" / str(alice.uid), 0o775)
    assert listed(a) == ["seen"]                    # group-writable: the whole tree
    line = check_line(h)
    assert line.startswith("WARN")
    h.kvmadm("refresh")
    assert stale(h) is None and listed(a) == ["seen"]
