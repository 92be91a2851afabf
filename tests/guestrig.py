"""Helpers for the tests that boot the real Debian guest with ``-cloud-init``
and reach it with ``connect`` (tests/test_guest_ssh.py, tests/test_guest_tap.py).

The golden image is debianrig's, in an image directory; each test VM
boots a ``disk clone`` of it, so restarts keep what the first boot wrote.
"""

from __future__ import annotations

import os
import shlex
import shutil
import time
from pathlib import Path

from conftest import User, console_log
import debianrig

# What the tests hand the guest as -user-data: cloud-init makes new ssh host
# keys on an instance's first boot (as real cloud images do; the test image
# keeps its build-time keys otherwise), so "first boot ran again" shows as a
# changed host key.
USER_DATA = "#cloud-config\nssh_deletekeys: true\nssh_genkeytypes: [ed25519]\n"
GUEST_USER = "debian"   # Debian's cloud-init default user


def clone_words(vm: str, debian: Path, leaf: str = "debian.qcow2") -> str:
    """``disk clone``: the user's copy-on-write clone of the golden image
    (debianrig's image, in an image directory), so that restarts keep what
    the first boot wrote."""
    return f"disk clone {vm} {leaf} {debian / debianrig.IMAGE}"


def put_user_data(vm_path: Path, user: User, leaf: str = "ud.yaml") -> None:
    p = vm_path / leaf
    p.write_text(USER_DATA)
    os.chown(p, user.uid, user.gid)


def network_cmdline(vm: str, admin: list[str]) -> str:
    """``network-config=BASE64`` of the network-config kvmshell's seed holds
    for this VM (kvmshell.shell.cloudinit.network_config).

    Why on the kernel command line: the test image disables cloud-init's
    network configuration (``network: {config: disabled}``, so that a guest
    without DHCP does not wait for it at every boot), which a seed's
    network-config cannot override but the command line can.  The text is
    kvmshell's own rendering, so the guest still proves it right (names by
    MAC, DHCP, the routed tap's guest= address); tests/test_cloudinit.py
    checks the seed carries the same."""
    import base64
    from kvmshell.common import adminopts
    from kvmshell.shell import cloudinit
    net = cloudinit.network_config(adminopts.parse_admin(admin), vm)
    assert net is not None
    return "network-config=" + base64.b64encode(net).decode()


def start_words(vm: str, debian: Path, admin: list[str], *extra: str) -> str:
    """The ``start`` command line (for SSH_ORIGINAL_COMMAND or the ssh client)."""
    return (f"start {vm} -hda debian.qcow2 -kernel {debian / debianrig.KERNEL} "
            f"-initrd {debian / debianrig.INITRD} "
            f"-append '{debianrig.CMDLINE_IDE} {network_cmdline(vm, admin)}' " + " ".join(extra))


def ready_count(vm_path: Path) -> int:
    return console_log(vm_path).count(debianrig.READY.encode())


def forget_console(vm_path: Path) -> None:
    """Remove the console log of the last run (before a start): the
    supervisor opens a new one only once QEMU answers, so an old READY
    could otherwise be read as this boot's."""
    for leaf in ("console.log", "console.log.1"):
        (vm_path / leaf).unlink(missing_ok=True)


def wait_ready(vm_path: Path, qemu_alive: "callable[[], bool]",  # type: ignore[valid-type]
               timeout: float = debianrig.BOOT_TIMEOUT) -> float:
    """Wait for READY in this run's console log (see :func:`forget_console`);
    return the seconds taken."""
    t0 = time.monotonic()
    while ready_count(vm_path) < 1:
        if not qemu_alive():
            raise AssertionError("QEMU exited during boot:\n"
                                 + console_log(vm_path)[-3000:].decode("utf-8", "replace"))
        if time.monotonic() - t0 > timeout:
            raise AssertionError("no READY after %.0f s:\n%s" % (
                timeout, console_log(vm_path)[-3000:].decode("utf-8", "replace")))
        time.sleep(1)
    return time.monotonic() - t0


def guest_ssh_argv(proxy: list[str], key: Path, known_hosts: Path, alias: str,
                   strict: str = "accept-new", *command: str) -> list[str]:
    """OpenSSH client argv to the guest's sshd, *proxy* (argv) as its
    ProxyCommand (``%p`` is appended by the caller's proxy list)."""
    return ["ssh", "-F", "/dev/null", "-i", str(key), "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", f"StrictHostKeyChecking={strict}", "-o", f"HostKeyAlias={alias}",
            "-o", "ConnectTimeout=60", "-o", "LogLevel=ERROR",
            "-o", "ProxyCommand=" + " ".join(shlex.quote(a) for a in proxy),
            f"{GUEST_USER}@{alias}", *command]


def qemu_listeners(pid: int) -> list[str]:
    """Listening TCP sockets (``ADDR:PORT`` as /proc spells them) that QEMU *pid* holds."""
    inodes = set()
    for leaf in os.listdir(f"/proc/{pid}/fd"):
        try:
            t = os.readlink(f"/proc/{pid}/fd/{leaf}")
        except OSError:
            continue
        if t.startswith("socket:["):
            inodes.add(int(t[8:-1]))
    out = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            w = line.split()
            if w[3] == "0A" and int(w[9]) in inodes:
                out.append(w[1])
    return out


def copy_key_for(path: Path, dst_dir: Path) -> Path:
    dst = dst_dir / path.name
    shutil.copy(path, dst)
    os.chmod(dst, 0o600)
    return dst
