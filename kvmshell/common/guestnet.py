"""A VM's network names and addresses, derived the same way on both sides.

kvmshell (the user) puts the guest MAC into QEMU's ``-device`` argv and
looks for leftover taps by name; the network helper (root) creates the taps
under those names and locks each bridge port to that MAC.  Both call this
module, so the two derivations cannot drift apart.  Inputs are the VM's
name, the root-owned tree path and the admin's parsed words (see
:func:`kvmshell.common.adminopts.taps_of`): nothing here reads user text.
"""

from __future__ import annotations

MAX_TAPS = 16


def _sha256(data: bytes) -> bytes:
    try:
        from _sha256 import sha256  # type: ignore[import-not-found]  # builtin; hashlib loads OpenSSL
    except ImportError:
        from hashlib import sha256
    return bytes(sha256(data).digest())


def guest_mac(name: str, index: int) -> bytes:
    """The 6-byte MAC of NIC *index* of VM *name* when the admin named none:
    locally administered (52:54:...), unicast, stable per name and index."""
    return b"\x52\x54" + _sha256(f"kvmshell:{name}:{index}".encode())[:4]


def mac_text(mac: bytes) -> str:
    """``aa:bb:cc:dd:ee:ff`` for 6 bytes."""
    return ":".join(f"{b:02x}" for b in mac)


def stable_mac(name: str, index: int) -> str:
    """:func:`guest_mac` as QEMU's ``mac=`` text."""
    return mac_text(guest_mac(name, index))


def tap_name(vmdir: str, name: str, index: int) -> str:
    """The tap of the *index*-th ``-net tap`` of VM *name* in tree *vmdir*:
    deterministic per tree, VM and tap; 14 bytes (IFNAMSIZ - 1 is 15)."""
    h = _sha256(f"{vmdir}\0{name}".encode()).hex()[:10]
    return f"kvs{h}{index:x}"


class Tap:
    """One tap of a VM: its interface name, and either the bridge it joins
    (with the guest MAC its port is locked to) or the host-side address."""

    def __init__(self, ifname: str, bridge: str | None, addr: str | None, mac: bytes) -> None:
        self.ifname, self.bridge, self.addr, self.mac = ifname, bridge, addr, mac
