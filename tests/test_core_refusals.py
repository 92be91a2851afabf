"""Negative tests for security-cases.md sections 1-3, through the real entry point.

Each case asserts: a one-line ``kvmshell: ...`` error naming the offending
token, a non-zero exit, no QEMU started, and a tree byte-for-byte the same.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import Host, User, assert_refused

pytestmark = pytest.mark.core


@pytest.fixture(scope="module")
def neg_vm(host: Host, alice: User) -> Path:
    path = host.create_vm("neg", alice, "-m", "128")
    for leaf in ("x.iso", "disk.img"):
        (path / leaf).write_bytes(b"\0" * 4096)
        os.chown(path / leaf, alice.uid, alice.gid)
    return path


# ---- 1. command-line parsing ------------------------------------------------

PARSING = [
    # shell metacharacters are plain text
    ("start neg -cdrom x.iso; sh", "x.iso;"),
    ("start neg -cdrom x.iso && sh", "&&"),
    ("start neg -cdrom x.iso | sh", "|"),
    ("start neg -append $(id)", "needs -kernel"),
    ("start neg `id`", "`id`"),
    ("$(id)", "$(id)"),
    ("start neg -cdrom $(id)", "$(id)"),
    # control characters
    ("start neg\n-snapshot", "control character"),
    ("start neg\r", "control character"),
    ("start neg \x1b[2J", "control character"),
    ("start neg \u0441drom", "non-ASCII"),
    # admin-only options
    ("start neg -m 64000", "-m"),
    ("start neg -net user", "-net"),
    ("start neg -monitor stdio", "-monitor"),
    ("start neg -serial stdio", "-serial"),
    ("start neg -pidfile /tmp/x", "-pidfile"),
    ("start neg -nographic", "-nographic"),
    ("start neg -usbdevice host:1", "-usbdevice"),
    ("start neg -smp 64", "-smp"),
    ("start neg -M q35", "-M:"),
    ("start neg -cpu host", "-cpu:"),
    ("start neg -firmware efi", "-firmware:"),
    # unused options
    ("start neg -s", "-s:"),
    ("start neg -S", "-S:"),
    ("start neg -d int", "-d:"),
    ("start neg -L /tmp", "-L:"),
    ("start neg -daemonize", "-daemonize"),
    ("start neg -hdc x.iso", "-hdc"),
    # QEMU options in no table
    *[(f"start neg {o} x", o) for o in (
        "-readconfig", "-incoming", "-qmp", "-chardev", "-device", "-object", "-set",
        "-global", "-add-fd", "-sandbox", "-runas", "-chroot", "-bios", "-drive", "-netdev",
        "-machine", "-accel", "-plugin", "-fsdev", "-virtfs")],
    # spelling tricks QEMU accepts
    ("start neg --m 64", "--m"),
    ("start neg --readconfig x", "--readconfig"),
    ("start neg ---cdrom x.iso", "---cdrom"),
    ("start neg -cdrom=x.iso", "-cdrom=x.iso"),
    ("start neg -CDROM x.iso", "-CDROM"),
    # arity
    ("start neg -cdrom", "-cdrom: missing value"),
    ("start neg -cdrom -snapshot", "-snapshot"),
    ("start neg -kernel --", "-kernel"),
    ("start neg -boot", "-boot"),
    ("start neg -snapshot -snapshot", "given twice"),
    # values starting with -
    ("start neg -append -x", "-x"),
    ("start neg -boot -d", "-d"),
    # bad values
    ("start neg -boot z", "'z'"),
    ("start neg -vnc :0,password=on", "sub-options"),
    ("start neg -vnc 0.0.0.0:0", "0.0.0.0:0"),
    ("start neg -hdachs 1,2 -hda disk.img", "1,2"),
    # oversized input
    ("start neg " + "-snapshot " * 80, "too many words"),
    ("start neg -append " + "a" * 3000, "too long"),
    ("start " + "x" * 5000, "too long"),
    # verbs
    ("sh", "sh: unknown verb"),
    ("internal-sftp", "internal-sftp"),
    ("scp -t /tmp", "scp"),
    ("status neg --jsonx", "--jsonx"),
    ("stop neg now", "now"),
    ("", "no command"),
]


@pytest.mark.parametrize("command,token", PARSING, ids=[repr(c[0][:40]) for c in PARSING])
def test_parsing_refused(host: Host, alice: User, neg_vm: Path, command: str, token: str) -> None:
    assert_refused(host, alice, command, token)


# ---- 2. files the user names --------------------------------------------------

@pytest.fixture(scope="module")
def trap_files(host: Host, alice: User, neg_vm: Path) -> Path:
    p = neg_vm
    secret = host.root / "secret.img"
    secret.write_bytes(b"SECRET" * 100)
    os.chmod(secret, 0o644)
    (p / "link.iso").symlink_to("/etc/shadow")
    os.lchown(p / "link.iso", alice.uid, alice.gid)
    (p / "sub").mkdir()
    os.chown(p / "sub", alice.uid, alice.gid)
    (p / "subl").symlink_to(host.root)
    os.lchown(p / "subl", alice.uid, alice.gid)
    os.link(secret, p / "hard.img")
    os.mknod(p / "dev.img", 0o600 | 0o020000, os.makedev(1, 3))
    os.chown(p / "dev.img", alice.uid, alice.gid)
    os.mkfifo(p / "fifo.img")
    os.chown(p / "fifo.img", alice.uid, alice.gid)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw",
                    str(p / "backing.qcow2")], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"data_file={p / 'data.raw'}", str(p / "ext.qcow2"), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(p / "fake.img"), "1M"],
                   check=True)
    for leaf in ("backing.qcow2", "ext.qcow2", "fake.img", "data.raw"):
        os.chown(p / leaf, alice.uid, alice.gid)
    (host.images / "shared.iso").write_bytes(b"\0" * 4096)
    return p


FILES = [
    ("-cdrom /etc/passwd", "outside your VM directory"),
    ("-cdrom ../x.iso", "'../x.iso'"),
    ("-cdrom sub/../x.iso", "sub/../x.iso"),
    ("-cdrom ./x.iso", "./x.iso"),
    ("-cdrom link.iso", "link.iso"),
    ("-cdrom subl/secret.img", "subl"),
    ("-hda hard.img", "hard.img"),
    ("-cdrom dev.img", "dev.img"),
    ("-cdrom fifo.img", "fifo.img"),
    ("-kernel /proc/self/environ", "/proc/self/environ"),
    ("-cdrom a,b.iso", "a,b.iso"),
    ("-cdrom file:x.iso", "file:x.iso"),
    ("-cdrom json:{}", "json:{}"),
    ("-cdrom nbd:127.0.0.1:10809", "nbd:"),
    ("-hda backing.qcow2", "backing file"),
    ("-hda ext.qcow2", "external data file"),
    ("-hda fake.img", "qcow2 header"),
    ("-cdrom missing.iso", "missing.iso"),
    ("-hda IMAGES/shared.iso", "read-only image directory"),
    ("-cdrom IMAGES/../secret.img", "secret.img"),
    ("-cdrom IMAGESx/shared.iso", "outside"),
]


@pytest.mark.parametrize("args,token", FILES, ids=[c[0] for c in FILES])
def test_file_confinement(host: Host, alice: User, trap_files: Path, args: str, token: str) -> None:
    args = args.replace("IMAGES", str(host.images))
    assert_refused(host, alice, f"start neg {args}", token)


def test_shared_image_is_readonly_only(host: Host, alice: User, trap_files: Path) -> None:
    """Sanity for the table above: the same image directory is usable read-only."""
    r = alice.ssh_command(f"start neg -cdrom {host.images}/shared.iso -kernel missing")
    assert r.returncode == 2 and "missing" in r.stderr      # got past -cdrom


# ---- 3. VM names and the tree -------------------------------------------------

NAMES = [
    ("start ../neg", "'../neg'"),
    ("start .neg", "'.neg'"),
    ("start /neg", "'/neg'"),
    ("start a/b", "'a/b'"),
    ("status " + "n" * 40, "too long"),
    ("status nosuchvm", "nosuchvm"),
    ("start n\u0435g", "non-ASCII"),
]


@pytest.mark.parametrize("command,token", NAMES, ids=[c[0][:30] for c in NAMES])
def test_vm_names(host: Host, alice: User, neg_vm: Path, command: str, token: str) -> None:
    assert_refused(host, alice, command, token)


@pytest.mark.parametrize("verb", ["start", "stop", "kill", "status", "save", "upload", "rm"])
def test_another_users_vm(host: Host, alice: User, bob: User, verb: str) -> None:
    if not os.path.lexists(host.vmdir / "bobs"):
        host.create_vm("bobs", bob)
    rest = " x.img" if verb in ("save", "upload", "rm") else ""
    assert_refused(host, alice, f"{verb} bobs{rest}", "'bobs' is not yours")


def _bad_tree(host: Host, alice: User, name: str) -> tuple[Host, Path]:
    root = host.root / f"tree-{name}"
    root.mkdir(mode=0o755)
    bad = Host.__new__(Host)
    bad.root, bad.vmdir, bad.images, bad.conf = root, root / "vms", root / "img", root / "k.conf"
    bad.images.mkdir()
    bad.write_conf()
    bad.create_vm("t", alice)
    return bad, bad.vm_path("t")


def _rename_to(bad: Host, path: Path, name: str, words: list[str], raw: str | None = None) -> None:
    import base64
    payload = "\0".join([name, *words]).encode()
    dirname = raw or f"{name}." + base64.urlsafe_b64encode(payload).decode().rstrip("=")
    os.rename(path, bad.vmdir / dirname)
    os.unlink(bad.vmdir / name)
    os.symlink(dirname, bad.vmdir / name)


TREES = {
    "top-writable": (lambda b, p, u: os.chmod(b.vmdir, 0o777), "not group/world-writable"),
    "top-not-root": (lambda b, p, u: os.chown(b.vmdir, u.uid, -1), "owned by root"),
    "link-not-root": (lambda b, p, u: os.lchown(b.vmdir / "t", u.uid, -1), "not owned by root"),
    "dir-0755": (lambda b, p, u: os.chmod(p, 0o755), "mode 0700"),
    "dir-root": (lambda b, p, u: os.chown(p, 0, 0), "owned by the VM user"),
    "link-escapes": (lambda b, p, u: (os.unlink(b.vmdir / "t"), os.symlink(str(p), b.vmdir / "t")),
                     "sibling"),
    "padded-b64": (lambda b, p, u: _rename_to(b, p, "t", [], raw=p.name + "=="), "not <name>.<base64>"),
    "extra-b64": (lambda b, p, u: _rename_to(b, p, "t", [], raw=p.name + "AA"), "invalid option word"),
    "other-name": (lambda b, p, u: _rename_to(b, p, "t", [], raw="u." + p.name.split(".")[1]),
                   "not canonical"),
    "unwritten-options": (lambda b, p, u: _rename_to(b, p, "t", ["-smp", "999"]), "-smp"),
    "admin-gone": (lambda b, p, u: _rename_to(b, p, "t", ["-monitor", "stdio"]), "-monitor"),
}


@pytest.mark.parametrize("case", list(TREES))
def test_malformed_tree(host: Host, alice: User, case: str) -> None:
    bad, path = _bad_tree(host, alice, case)
    breaker, token = TREES[case]
    breaker(bad, path, alice)
    msg = assert_refused(bad, alice.__class__(alice.name, bad), "start t -snapshot", token, status=1)
    assert "admin" in msg
