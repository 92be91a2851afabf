"""Attacks on the shared caller checks, the one reader of the admin's files
and the relay helper inside the guard (session 3's review): a VM user's
code and a holder of the relay key, on the real rig (tests/multihostrig.py).
Nothing mocked."""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Iterator

import pytest

from conftest import kill_all, wait_for
from multihostrig import Cluster
from multihostrig import cluster as make_cluster

pytestmark = [pytest.mark.multihost, pytest.mark.security]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with make_cluster() as c:
        yield c


def _limit(pid: int, name: str) -> str:
    """The soft limit *name* ('Max open files') of process *pid*."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith(name):
            return line[len(name):].split()[0]
    raise AssertionError(f"{name} not in /proc/{pid}/limits")


def _status(pid: int) -> dict[str, str]:
    """The credentials and umask of process *pid* (/proc/PID/status)."""
    keep = ("Uid", "Gid", "Groups", "Umask", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
            "NoNewPrivs", "SigBlk", "SigIgn")
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in keep:
            out[key] = value.strip()
    return out


def test_relayed_kvmshell_gets_the_users_limits(cluster: Cluster) -> None:
    """The admin bounds the VM users' group with pam_limits (the shipped
    pam/limits-kvmshell.conf.example).  X's QEMU started through another
    host runs under the far kvmshell the relay helper execs: it must get
    X's limits, as on a direct login, not those of the relay account's
    ssh session (the relay sudo rule has !pam_session): else X's code
    there escapes nproc, nofile, core and fsize.  Its uid, groups,
    capabilities, umask and signal dispositions are a direct login's too."""
    group = re.search(r"^group\s*=\s*(\S+)", cluster.tree.conf.read_text(), re.M)
    assert group
    limits = Path(f"/etc/security/limits.d/kvmshell-s3-{secrets.token_hex(3)}.conf")
    limits.write_text(f"@{group[1]} - nofile 777\n")
    name = f"p{secrets.token_hex(3)}"
    cluster.tree.create_vm(name, cluster.x, "-m", "64", "-host", "hostb")
    seen = {}
    try:
        for via in ("hostb", "hosta"):       # a direct login, then relayed
            r = cluster.ssh(via, cluster.x, "start", name)
            assert r.returncode == 0, r.stderr
            assert cluster.qemu_host(cluster.x) == ["hostb"]
            (pid,) = cluster.x.qemu_pids()
            assert _limit(pid, "Max open files") == "777", via
            seen[via] = _status(pid)
            assert cluster.ssh("hostb", cluster.x, "stop", name).returncode == 0
            wait_for(lambda: not cluster.x.qemu_pids(), 30, "QEMU gone")
        assert seen["hosta"] == seen["hostb"]
    finally:
        limits.unlink()
        kill_all(cluster.x)
        cluster.tree.kvmadm("remove", name, "--purge")
