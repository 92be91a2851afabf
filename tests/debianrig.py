"""A real Debian 12 guest for the tests that need one.

tests/guest/build-debian.sh makes it, and keeps it until the script changes
(a stamp holds the script's sha256): 70-90 s on an idle 2-core host, up to
about 7.5 min on a busy one.  OUTDIR/debian.qcow2 is an ext4 root (label
"root", no partition table, 3 GiB virtual); OUTDIR/vmlinuz and
OUTDIR/initrd.img are the bookworm cloud kernel and its initramfs.  Always
attach the disk with snapshot=on (or an overlay): the golden image must stay
pristine.

On the serial console (ttyS0) the guest logs root in by itself, and once
boot has finished -- cloud-init included, so nothing else is printed
afterwards -- it prints the line READY.  Wait for READY, send a newline,
then wait for PROMPT before typing commands.  Under TCG on a 2-core host
with 1 vCPU and 1 GiB, READY comes about 60-65 s after QEMU starts on an
idle host, and 2-3 times that when the host is busy.

The guest has systemd, dbus/logind (the ACPI power button, i.e. QMP
system_powerdown, powers it off in a few seconds), openssh-server (host keys
made at build time) and cloud-init (datasources NoCloud and None only).
It configures no network by itself (no DHCP wait at boot): give it one with
network_config_arg() on the kernel command line, or with ip(8) on the console.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO / "tests" / "guest" / "build-debian.sh"
DEFAULT_DIR = REPO / "build" / "debian"

IMAGE = "debian.qcow2"
KERNEL = "vmlinuz"
INITRD = "initrd.img"

# Kernel command lines: the disk as the first IDE disk, or as virtio-blk.
CMDLINE_IDE = "root=/dev/sda rw console=ttyS0"
CMDLINE_VIRTIO = "root=/dev/vda rw console=ttyS0"

# Serial-console markers, in the order they appear.
AUTOLOGIN = "debian-guest login: root (automatic login)"
# The first prompt follows AUTOLOGIN, but cloud-init may still print after it.
PROMPT = "root@debian-guest:~# "
# Printed on a line of its own (after a blank line) once boot has finished.
READY = "KVMSHELL-DEBIAN-READY"
# systemd's own status line, colour codes and all.  It is NOT reliable: when
# the serial getty holds the console before multi-user.target is reached,
# systemd prints no status line for it.  Prefer READY.
MULTI_USER_RE = re.compile(r"Reached target \S*multi-user\.target\S* - Multi-User System")

# Generous bounds for TCG on a shared 2-core machine.
BOOT_TIMEOUT = 900.0
POWERDOWN_TIMEOUT = 60.0

_built: set[Path] = set()


def debian_dir() -> Path:
    """Where the guest lives: $KVMSHELL_DEBIAN, else REPO/build/debian."""
    return Path(os.environ.get("KVMSHELL_DEBIAN") or DEFAULT_DIR).resolve()


def debian_guest() -> Path:
    """Build the guest if needed (the script returns at once when its stamp
    matches) and return its directory, holding IMAGE, KERNEL and INITRD."""
    outdir = debian_dir()
    if outdir in _built:
        return outdir
    proc = subprocess.run([str(BUILD_SCRIPT), str(outdir)], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-30:])
        raise RuntimeError(f"{BUILD_SCRIPT.name} {outdir} failed ({proc.returncode}):\n{tail}")
    for name in (IMAGE, KERNEL, INITRD):
        if not (outdir / name).is_file():
            raise RuntimeError(f"{BUILD_SCRIPT.name} left no {outdir / name}")
    _built.add(outdir)
    return outdir


def qemu_args(outdir: Path, bus: str = "ide") -> list[str]:
    """The disk, kernel, initrd and command line for QEMU (bus "ide" or
    "virtio"); the disk is attached with snapshot=on."""
    cmdline = {"ide": CMDLINE_IDE, "virtio": CMDLINE_VIRTIO}[bus]
    return ["-drive", f"file={outdir / IMAGE},if={bus},format=qcow2,snapshot=on",
            "-kernel", str(outdir / KERNEL), "-initrd", str(outdir / INITRD),
            "-append", cmdline]


def network_config_arg(yaml_text: str) -> str:
    """A kernel command-line word that hands cloud-init a network config
    (version 1 or 2 YAML), e.g. for a static address on a kvmshell tap:

        network:
          version: 2
          ethernets:
            ens3: {addresses: [10.0.0.2/24]}
    """
    return "network-config=" + base64.b64encode(yaml_text.encode()).decode()
