"""Disks: the disk and snapshot verbs, backing chains given to QEMU as a
-blockdev graph of descriptors, golden images in an image directory, and
the quota counted by virtual size.  The scenario test boots the real
Debian 12 guest (tests/debianrig.py) from copy-on-write clones of one
golden image; the verb tests need no guest.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pexpect
import pytest

import debianrig
from conftest import KVMSHELL, Host, User, _drop_user, _make_user, kill_all, wait_for

pytestmark = pytest.mark.disks


def _sha(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _as_user(user: User, path: Path) -> None:
    os.chown(path, user.uid, user.gid)


@pytest.fixture(scope="module")
def dora(host: Host) -> Iterator[User]:
    name = _make_user("d")
    try:
        yield User(name, host)
    finally:
        _drop_user(name)


@pytest.fixture(scope="module")
def eve(host: Host) -> Iterator[User]:
    name = _make_user("e")
    try:
        yield User(name, host)
    finally:
        _drop_user(name)


@pytest.fixture(scope="module")
def dvm(host: Host, dora: User) -> Iterator[Path]:
    path = host.create_vm("dk", dora, "-m", "256")
    try:
        yield path
    finally:
        kill_all(dora)
        host.kvmadm("remove", "dk", "--purge")


def _listing(path: Path) -> list[str]:
    return sorted(os.listdir(path))


# ---- the verbs, no guest -------------------------------------------------------

def test_create_raw_is_sparse_and_qcow2_has_the_size(dora: User, dvm: Path) -> None:
    r = dora.ssh_command("disk create a.img 64M")
    assert r.returncode == 0, r.stderr
    st = os.stat(dvm / "a.img")
    assert st.st_size == 64 << 20 and st.st_blocks * 512 < 1 << 20 and st.st_uid == dora.uid
    r = dora.ssh_command("disk create b.qcow2 1G")
    assert r.returncode == 0, r.stderr
    info = json.loads(dora.ssh_command("disk info b.qcow2 --json").stdout)
    assert info["format"] == "qcow2" and info["virtual_size"] == 1 << 30
    assert info["backing_chain"] == [] and info["snapshots"] == []
    assert "virtual size:   1073741824 bytes" in dora.ssh_command("disk info b.qcow2").stdout
    for leaf in ("a.img", "b.qcow2"):
        assert dora.ssh_command(f"rm {leaf}").returncode == 0


@pytest.mark.parametrize("command,token", [
    ("disk create x.img 12Q", "'12Q'"),
    ("disk create x.img -5M", "'-5M'"),
    ("disk create x.img 100T", "'100T'"),
    ("disk create ../x.img 1M", "../x.img"),
    ("disk create lock 1M", "'lock'"),
    ("disk clone c.img base.qcow2", "'c.img'"),
    ("disk clone c.qcow2 /etc/hostname", "/etc/hostname"),
    ("disk clone c.qcow2 nothere.qcow2", "nothere.qcow2"),
    ("disk resize nothere.img 1M", "nothere.img"),
    ("disk frobnicate x", "frobnicate"),
    ("snapshot create nothere.qcow2 'bad tag'", "'bad tag'"),
    ("snapshot create nothere.img t1", "nothere.img"),
    ("snapshot fly d.qcow2", "fly"),
])
def test_refusals_leave_nothing(host: Host, dora: User, dvm: Path, command: str,
                                token: str) -> None:
    before = host.snapshot()
    r = dora.ssh_command(command)
    assert r.returncode != 0 and r.stderr.startswith("kvmshell: ") and token in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert host.snapshot() == before


def test_clone_reset_resize_snapshot_without_guest(host: Host, dora: User, dvm: Path) -> None:
    assert dora.ssh_command("disk create base.qcow2 8M").returncode == 0
    r = dora.ssh_command("disk clone c.qcow2 base.qcow2")
    assert r.returncode == 0, r.stderr
    info = json.loads(dora.ssh_command("disk info c.qcow2 --json").stdout)
    assert info["backing_chain"] == ["base.qcow2"] and info["virtual_size"] == 8 << 20
    # rm of a base in use by a clone: refused, and nothing changes.
    before = host.snapshot()
    r = dora.ssh_command("rm base.qcow2")
    assert r.returncode == 2 and "base of c.qcow2" in r.stderr, r.stderr
    assert host.snapshot() == before
    # Write into the clone (as a guest would, through qemu-io as root), then reset.
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 64k", str(dvm / "c.qcow2")],
                   check=True, capture_output=True)
    base_sum = _sha(dvm / "base.qcow2")
    assert dora.ssh_command("disk reset c.qcow2").returncode == 0
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0 0 64k",
                        str(dvm / "c.qcow2")], capture_output=True, text=True, cwd=dvm)
    assert "Pattern verification failed" not in r.stdout + r.stderr, r.stdout
    assert _sha(dvm / "base.qcow2") == base_sum and os.stat(dvm / "c.qcow2").st_uid == dora.uid
    # Snapshots of a stopped disk: create, write, revert: the write is gone.
    assert dora.ssh_command("snapshot create c.qcow2 clean").returncode == 0
    assert dora.ssh_command("snapshot list c.qcow2").stdout.split() == ["clean"]
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xcd 0 64k", str(dvm / "c.qcow2")],
                   check=True, capture_output=True, cwd=dvm)
    assert dora.ssh_command("snapshot revert c.qcow2 clean").returncode == 0
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0 0 64k",
                        str(dvm / "c.qcow2")], capture_output=True, text=True, cwd=dvm)
    assert "Pattern verification failed" not in r.stdout + r.stderr, r.stdout
    assert dora.ssh_command("snapshot delete c.qcow2 clean").returncode == 0
    # Grow only.
    r = dora.ssh_command("disk resize c.qcow2 4M")
    assert r.returncode == 2 and "shrinking is refused" in r.stderr, r.stderr
    assert dora.ssh_command("disk resize c.qcow2 16M").returncode == 0
    assert json.loads(dora.ssh_command("disk info c.qcow2 --json").stdout)["virtual_size"] == 16 << 20
    for leaf in ("c.qcow2", "base.qcow2"):
        assert dora.ssh_command(f"rm {leaf}").returncode == 0, leaf


def test_quota_counts_virtual_size(host: Host, dora: User, dvm: Path) -> None:
    host.write_conf(max_image_bytes=str(100 << 20))
    try:
        before = host.snapshot()
        r = dora.ssh_command("disk create big.qcow2 64T")
        assert r.returncode == 2 and "max_image_bytes" in r.stderr, r.stderr
        assert dora.ssh_command("disk create ok.qcow2 60M").returncode == 0
        r = dora.ssh_command("disk clone c.qcow2 ok.qcow2")
        assert r.returncode == 2 and "max_image_bytes" in r.stderr, r.stderr
        r = dora.ssh_command("disk resize ok.qcow2 200M")
        assert r.returncode == 2 and "max_image_bytes" in r.stderr, r.stderr
        # A 200 KiB qcow2 that claims 64 TiB: refused at upload, whole.
        tiny = dvm.parent / "tiny.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tiny), "64T"], check=True)
        with open(tiny, "rb") as f:
            r = subprocess.run(dora.argv(KVMSHELL, "--config", str(host.conf), "upload", "t.qcow2"),
                               stdin=f, capture_output=True, text=True, env=dora.env())
        tiny.unlink()
        assert r.returncode == 2 and "virtual size" in r.stderr, r.stderr
        assert not (dvm / "t.qcow2").exists()
        assert dora.ssh_command("rm ok.qcow2").returncode == 0
        assert set(host.snapshot()) == set(before)
    finally:
        host.write_conf()


def _hand_made(dvm: Path, user: User, name: str, *args: str) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *args, str(dvm / name), "1M"],
                   check=True, cwd=dvm, capture_output=True)
    _as_user(user, dvm / name)


def test_chains_qemu_must_not_follow(host: Host, dora: User, eve: User, dvm: Path) -> None:
    """Hand-made overlays whose headers point elsewhere: refused at start,
    nothing started, nothing changed."""
    evm = host.create_vm("ek", eve)
    try:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(evm / "x.qcow2"), "1M"],
                       check=True)
        _as_user(eve, evm / "x.qcow2")
        _hand_made(dvm, dora, "etc.qcow2", "-u", "-b", "/etc/hostname", "-F", "raw")
        _hand_made(dvm, dora, "other.qcow2", "-u", "-b", "../" + evm.name + "/x.qcow2", "-F", "qcow2")
        _hand_made(dvm, dora, "abs.qcow2", "-u", "-b", str(evm / "x.qcow2"), "-F", "qcow2")
        _hand_made(dvm, dora, "data.qcow2", "-o", f"data_file={dvm}/data.raw")
        _as_user(dora, dvm / "data.raw")
        # A chain one deeper than the limit: l0 <- l1 <- ... <- l9.
        _hand_made(dvm, dora, "l0.qcow2")
        for i in range(1, 10):
            _hand_made(dvm, dora, f"l{i}.qcow2", "-u", "-b", f"l{i - 1}.qcow2", "-F", "qcow2")
        _hand_made(dvm, dora, "loop.qcow2", "-u", "-b", "loop.qcow2", "-F", "qcow2")
        _hand_made(dvm, dora, "fmt.qcow2", "-u", "-b", "l0.qcow2", "-F", "raw")
        for disk, token in (("etc.qcow2", "'/etc/hostname' is outside"),
                            ("other.qcow2", "is not a plain name"),
                            ("abs.qcow2", "is outside"),
                            ("data.qcow2", "external data file"),
                            ("l9.qcow2", "deeper than 8"),
                            ("loop.qcow2", "loops"),
                            ("fmt.qcow2", "says the backing file is raw")):
            before = host.snapshot()
            r = dora.ssh_command(f"start dk -hda {disk}")
            assert r.returncode == 2 and token in r.stderr, (disk, r.stderr)
            assert dora.qemu_pids() == [] and host.snapshot() == before
        # eight layers below the top is the limit: l8 starts.
        r = dora.ssh_command("start dk -hda l8.qcow2 -snapshot")
        assert r.returncode == 0, r.stderr
        assert dora.ssh_command("kill dk").returncode == 0
        # A clone of another user's image: not in the VM directory, not an image dir.
        r = dora.ssh_command(f"disk clone c.qcow2 {evm}/x.qcow2")
        assert r.returncode == 2 and "outside" in r.stderr, r.stderr
    finally:
        kill_all(dora)
        host.kvmadm("remove", "ek", "--purge")
        for leaf in os.listdir(dvm):
            if leaf.endswith((".qcow2", ".raw")):
                os.unlink(dvm / leaf)


# ---- the real guest: a golden image, two users' clones ---------------------------

def _console(user: User, vm: str) -> pexpect.spawn:
    argv = user.argv(KVMSHELL, "--config", str(user.host.conf), "console", vm)
    c = pexpect.spawn(argv[0], argv[1:], env=user.env(TERM="dumb"), timeout=60,
                      encoding="utf-8", codec_errors="replace")
    c.expect_exact("Escape character is ^]")
    return c


def _boot(user: User, vm: str, words: str) -> None:
    r = user.ssh_command(f"start {vm} {words}")
    assert r.returncode == 0, r.stderr


def _wait_ready(host: Host, vm: str) -> None:
    from conftest import console_log
    path = host.vm_path(vm)
    wait_for(lambda: debianrig.READY.encode() in console_log(path), max(debianrig.BOOT_TIMEOUT, 900),
             f"{vm}'s Debian guest to finish booting")


def _run(c: pexpect.spawn, command: str, answer: str) -> None:
    c.send("\r")
    c.expect_exact(debianrig.PROMPT)
    c.send(command + "\r")
    c.expect_exact(answer)


def _stop(user: User, vm: str) -> None:
    r = user.ssh_command(f"stop {vm}", timeout=180)
    assert r.returncode == 0, r.stderr


def _qemu_files(user: User) -> set[str]:
    (pid,) = user.qemu_pids()
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/") and not target.startswith(("/dev/", "/proc/")):
            out.add(target)
    return out


def test_golden_image_clones_on_the_real_guest(host: Host, dora: User, eve: User) -> None:
    gold = debianrig.debian_guest()
    images = host.images
    for leaf in (debianrig.IMAGE, debianrig.KERNEL, debianrig.INITRD):
        if not (images / leaf).exists():
            os.link(gold / leaf, images / leaf) if os.stat(gold).st_dev == os.stat(images).st_dev \
                else subprocess.run(["cp", "--reflink=auto", str(gold / leaf), str(images / leaf)],
                                    check=True)
    base_sum = _sha(images / debianrig.IMAGE)
    kernel = (f"-kernel {images}/{debianrig.KERNEL} -initrd {images}/{debianrig.INITRD} "
              "-append 'root=LABEL=root rw console=ttyS0'")
    # By label: with two disks the kernel's asynchronous probe may name the
    # data disk sda (seen here), so /dev/sda is not always the root disk.
    users = {"dg": dora, "eg": eve}
    paths = {vm: host.create_vm(vm, u, "-m", "1024") for vm, u in users.items()}
    try:
        for vm, u in users.items():
            r = u.ssh_command(f"disk clone {vm} d.qcow2 {images}/{debianrig.IMAGE}")
            assert r.returncode == 0, r.stderr
        assert dora.ssh_command("disk create dg data.img 64M").returncode == 0
        # Round 1: both boot their clone and mark it.
        _boot(dora, "dg", f"-hda d.qcow2 -hdb data.img {kernel}")
        _boot(eve, "eg", f"-hda d.qcow2 {kernel}")
        # QEMU got descriptors only: every block node is on /dev/fdset, and the
        # files it holds are exactly those kvmshell opened for it.
        files = _qemu_files(dora)
        assert str(paths["dg"] / "d.qcow2") in files and str(images / debianrig.IMAGE) in files
        # (Beside the images: the wrapper's own runtime files, by its names,
        # and the VM directory itself: QEMU's share of the VM lock.)
        own = ("d.qcow2", "data.img", "qemu.log", "console.log", "serial.in", "serial.out")
        assert files <= {str(paths["dg"])} | {str(paths["dg"] / leaf) for leaf in own} | {
            str(images / leaf) for leaf in (debianrig.IMAGE, debianrig.KERNEL, debianrig.INITRD)}, files
        argv = open(f"/proc/{dora.qemu_pids()[0]}/cmdline", "rb").read().split(b"\0")
        nodes = [json.loads(argv[i + 1]) for i, w in enumerate(argv) if w == b"-blockdev"]
        assert all(n["filename"].startswith("/dev/fdset/") for n in nodes if n["driver"] == "file")
        assert [n["backing"] for n in nodes if n["driver"] == "qcow2"] == [None, "hda-1"]
        for vm, u in users.items():
            _wait_ready(host, vm)
            c = _console(u, vm)
            _run(c, f"echo {vm}-was-here > /root/mark; sync; echo mark-$((6*7))", "mark-42")
            if vm == "dg":
                _run(c, f"echo size=$(cat /sys/block/sd?/size | grep -x {(64 << 20) // 512})",
                     f"size={(64 << 20) // 512}")
            c.close()
        for vm, u in users.items():
            _stop(u, vm)
        assert dora.ssh_command("snapshot create dg d.qcow2 marked").returncode == 0
        assert dora.ssh_command("disk resize dg data.img 128M").returncode == 0
        # Round 2: each sees its own file after a restart; dora sees the new size.
        _boot(dora, "dg", f"-hda d.qcow2 -hdb data.img {kernel}")
        _boot(eve, "eg", f"-hda d.qcow2 {kernel}")
        for vm, u in users.items():
            _wait_ready(host, vm)
            c = _console(u, vm)
            other = "eg" if vm == "dg" else "dg"
            _run(c, "cat /root/mark", f"{vm}-was-here")
            _run(c, f"grep -c {other} /root/mark || echo none-of-$((1+1))", "none-of-2")
            if vm == "dg":
                _run(c, f"echo size=$(cat /sys/block/sd?/size | grep -x {(128 << 20) // 512})",
                     f"size={(128 << 20) // 512}")
                _run(c, "touch /root/after; sync; echo after-$((2*3))", "after-6")
            c.close()
        for vm, u in users.items():
            _stop(u, vm)
        # Revert to the snapshot: /root/after is gone, the mark stays.  Then reset.
        assert dora.ssh_command("snapshot revert dg d.qcow2 marked").returncode == 0
        _boot(dora, "dg", f"-hda d.qcow2 {kernel}")
        _wait_ready(host, "dg")
        c = _console(dora, "dg")
        _run(c, "ls /root/after 2>/dev/null || echo gone-$((3*3))", "gone-9")
        _run(c, "cat /root/mark", "dg-was-here")
        c.close()
        _stop(dora, "dg")
        assert dora.ssh_command("disk reset dg d.qcow2").returncode == 0
        _boot(dora, "dg", f"-hda d.qcow2 {kernel}")
        _wait_ready(host, "dg")
        c = _console(dora, "dg")
        _run(c, "cat /root/mark 2>/dev/null || echo clean-$((4*4))", "clean-16")
        c.close()
        _stop(dora, "dg")
        # The golden image never changed.
        assert _sha(images / debianrig.IMAGE) == base_sum
    finally:
        kill_all(dora)
        kill_all(eve)
        for vm in users:
            host.kvmadm("remove", vm, "--purge", check=False)


@pytest.mark.parametrize("admin", [["-M", "q35"], ["-disk-interface", "virtio"],
                                   ["-M", "q35", "-disk-interface", "virtio"]],
                         ids=["q35", "virtio", "q35-virtio"])
def test_every_disk_option_on_each_machine_and_bus(host: Host, dora: User, admin: list[str]) -> None:
    """A real QEMU takes every disk option in the -blockdev graph on q35
    (AHCI ports, an added floppy controller) and with virtio disks."""
    path = host.create_vm("dm", dora, "-m", "128", *admin)
    try:
        for leaf, size in (("a.img", 1 << 20), ("b.img", 1 << 20), ("f.img", 1474560),
                           ("g.img", 1474560), ("x.iso", 1 << 20)):
            with open(path / leaf, "wb") as f:
                f.truncate(size)
            _as_user(dora, path / leaf)
        for extra in ("", " -snapshot"):
            r = dora.ssh_command("start dm -hda a.img -hdb b.img -fda f.img -fdb g.img "
                                 "-cdrom x.iso" + extra)
            assert r.returncode == 0, r.stderr
            assert dora.ssh_command("kill dm").returncode == 0
        if "virtio" not in admin:
            r = dora.ssh_command("start dm -hda a.img -hdachs 2,16,63")
            assert r.returncode == 0, r.stderr
            assert dora.ssh_command("kill dm").returncode == 0
        else:
            r = dora.ssh_command("start dm -hda a.img -hdachs 2,16,63")
            assert r.returncode == 2 and "geometry is for IDE disks" in r.stderr, r.stderr
    finally:
        kill_all(dora)
        host.kvmadm("remove", "dm", "--purge")


def test_plain_backing_name_resolves_beside_the_image(host: Host, dora: User, dvm: Path) -> None:
    """A golden image in a subdirectory of an image dir whose header names a
    plain base: the base beside it, not a same-named file at the top."""
    sub = host.images / "sub"
    sub.mkdir(mode=0o755, exist_ok=True)
    try:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(sub / "base.qcow2"), "4M"],
                       check=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(host.images / "base.qcow2"),
                        "2M"], check=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "base.qcow2", "-F",
                        "qcow2", str(sub / "top.qcow2"), "4M"], check=True)
        r = dora.ssh_command(f"disk clone c.qcow2 {sub}/top.qcow2")
        assert r.returncode == 0, r.stderr
        info = json.loads(dora.ssh_command("disk info c.qcow2 --json").stdout)
        assert info["backing_chain"] == [f"{sub}/top.qcow2", f"{sub}/base.qcow2"], info
        assert dora.ssh_command("rm c.qcow2").returncode == 0
    finally:
        for p in (sub / "top.qcow2", sub / "base.qcow2", host.images / "base.qcow2"):
            p.unlink(missing_ok=True)
        sub.rmdir()
