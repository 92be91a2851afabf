"""The real Debian guest on a routed tap: ``-cloud-init`` gives it the
admin's ``guest=`` address (network-config) and the user's key, and
``connect`` reaches its sshd on that address through the VM's own tap,
as the OpenSSH client's ProxyCommand.  kvmshell, the network helper
(through a real sudo) and QEMU run inside a network namespace of the
test's own (tests/test_network.py's rig).  One boot."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from conftest import KVMSHELL, Host, User, kill_all
import debianrig
import guestrig
from test_network import Net, net_rig

pytestmark = pytest.mark.guest

VM = "tv"
HOST_CIDR, GUEST_IP = "10.79.0.1/24", "10.79.0.2"
ADMIN = ["-m", "1024", "-net", "nic,model=virtio", "-net", f"tap,ip={HOST_CIDR},guest={GUEST_IP}"]


@pytest.fixture(scope="module")
def rig(host: Host, alice: User, bob: User) -> Iterator[tuple[Net, Path, Path]]:
    debian = debianrig.debian_guest()
    d = host.root / "tap-keys"
    keys = d / "authorized_keys"
    keys.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(d, 0o755)
    key = d / "alice"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (keys / alice.name).write_text("restrict,pty " + Path(f"{key}.pub").read_text())
    os.chmod(keys / alice.name, 0o644)
    # connect_user_mode = no closes only user-mode VMs: a tap is still reached.
    host.write_conf(authorized_keys=str(keys), image_dirs=str(debian), stop_timeout="150",
                    connect_user_mode="no")
    try:
        with net_rig(alice, bob) as net:
            host.create_vm(VM, alice, *ADMIN)
            r = net.kvmshell(alice, guestrig.clone_words(VM, debian))
            assert r.returncode == 0, r.stderr
            # The ProxyCommand: kvmshell as alice, in the namespace, as sshd would run it.
            proxy = d / "proxy"
            args = net.as_user(alice, "env", "-i", "PATH=/usr/bin:/bin")
            proxy.write_text("#!/bin/sh\nexec " + " ".join(shlex.quote(a) for a in args)
                             + f' "SSH_ORIGINAL_COMMAND=connect {VM} $1"'
                             + f" {KVMSHELL} --config {host.conf}\n")
            os.chmod(proxy, 0o755)
            try:
                yield net, key, proxy
            finally:
                kill_all(alice)
                # Other modules count alice's VMs: leave none of ours behind.
                host.kvmadm("remove", VM, "--purge", check=False)
    finally:
        host.write_conf()
        shutil.rmtree(d, ignore_errors=True)


def test_routed_tap_key_reaches_guest(rig: tuple[Net, Path, Path], host: Host, alice: User) -> None:
    net, key, proxy = rig
    path = host.vm_path(VM)
    guestrig.forget_console(path)
    r = net.kvmshell(alice, guestrig.start_words(VM, debianrig.debian_dir(), ADMIN, "-cloud-init"))
    assert r.returncode == 0, r.stderr
    took = guestrig.wait_ready(path, lambda: bool(alice.qemu_pids()))
    print(f"routed tap: READY after {took:.0f} s")
    known = key.with_name("known_hosts")
    ssh = guestrig.guest_ssh_argv([str(proxy), "%p"], key, known, VM, "accept-new",
                                  "hostname;", "ip", "-4", "-o", "addr")
    r = subprocess.run(ssh, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == VM
    assert any(f"inet {GUEST_IP}/24" in l and "eth0" in l for l in lines), r.stdout
    # While a session is open, QEMU listens on nothing (the tap route adds
    # no socket on the host); the connection is alice's, bound to the tap.
    session = subprocess.Popen(guestrig.guest_ssh_argv([str(proxy), "%p"], key, known, VM,
                                                       "yes", "echo up; sleep 15"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               stdin=subprocess.DEVNULL)
    try:
        assert session.stdout is not None
        assert session.stdout.readline().strip() == "up"
        pid = alice.qemu_pids()[0]
        assert guestrig.qemu_listeners(pid) == []
        ss = subprocess.run(["ip", "netns", "exec", net.ns, "ss", "-tnpe", "dst", GUEST_IP],
                            capture_output=True, text=True).stdout
        estab = [l for l in ss.splitlines() if "ESTAB" in l]
        assert len(estab) == 1 and f"uid:{alice.uid}" in estab[0], ss
        assert "%kvs" in estab[0], ss   # bound to the VM's tap (SO_BINDTODEVICE)
    finally:
        session.kill()
        session.wait()
    r = net.kvmshell(alice, f"stop {VM}", timeout=200)
    assert r.returncode == 0, r.stderr
