"""``start -cloud-init`` and ``connect``: what needs no guest to boot.

The seed is read back with pycdlib (the library that wrote it, but every
field is checked against what the guest must see: the label, the Rock
Ridge names, the YAML); refusals go through the real entry point and must
leave the tree byte-for-byte unchanged.  The booted Debian guest is in
tests/test_guest_ssh.py and tests/test_guest_tap.py.
"""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from conftest import Host, User, _drop_user, _make_user, assert_refused
from kvmshell.common import adminopts, config, sshkeys
from kvmshell.common.errors import ConfigError, RefusedOption, UsageError
from kvmshell.shell import cloudinit, connect, useropts

pytestmark = pytest.mark.guest

VM = "ci"


def _keygen(path: Path, comment: str) -> str:
    # another module using these fixtures (test_attack12) made them first
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".pub").unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f",
                    str(path)], check=True)
    return path.with_name(path.name + ".pub").read_text().strip()


@pytest.fixture(scope="module")
def pair(host: Host) -> Iterator[tuple[User, User]]:
    """Two users of this module's own (the session's alice and bob are
    expected by other modules to own a known set of VMs); their VMs are
    removed again at the end."""
    names = [_make_user("c"), _make_user("d")]
    try:
        yield User(names[0], host), User(names[1], host)
    finally:
        # Every VM of theirs (a later user may get a freed uid, and with it
        # whatever the uid still owns: other modules count their VMs).
        import pwd
        uids = {pwd.getpwnam(n).pw_uid for n in names}
        for leaf in (os.listdir(host.vmdir) if host.vmdir.is_dir() else []):
            p = host.vmdir / leaf
            if not leaf.startswith(".") and p.is_symlink() and p.stat().st_uid in uids:
                host.kvmadm("remove", leaf, "--purge", check=False)
        for name in names:
            _drop_user(name)


@pytest.fixture(scope="module")
def alice(pair: tuple[User, User]) -> User:
    return pair[0]


@pytest.fixture(scope="module")
def bob(pair: tuple[User, User]) -> User:
    return pair[1]


@pytest.fixture(scope="module")
def keyed(host: Host, alice: User, bob: User) -> Iterator[tuple[Host, list[str]]]:
    """alice's keys in a root-owned authorized_keys dir, as kvmadm writes it
    (``restrict,pty`` in front), plus a hand-written line with quoted options."""
    d = host.root / "ci-keys"   # readable by the users, as /etc/kvmshell is
    d.mkdir(mode=0o755, exist_ok=True)
    one = _keygen(d / "k1", "alice@laptop")
    two = _keygen(d / "k2", "second key")
    keys = d / "authorized_keys"
    keys.mkdir(mode=0o755, exist_ok=True)
    (keys / alice.name).write_text(
        f"# kvmadm\nrestrict,pty {one}\n"
        f'command="echo ssh-ed25519 AAAA fake",no-pty {two}\n')
    os.chmod(keys / alice.name, 0o644)
    host.write_conf(authorized_keys=str(keys))
    for name, user in ((VM, alice), ("cib", bob)):
        if not (host.vmdir / name).exists():
            host.create_vm(name, user, "-m", "128", "-net", "nic,model=virtio", "-net", "user")
    yield host, [" ".join(one.split()[:2]), " ".join(two.split()[:2])]
    host.write_conf()


def _iso_files(fd: int) -> tuple[str, dict[str, bytes]]:
    import pycdlib
    data = os.pread(fd, 1 << 20, 0)
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    label = iso.pvd.volume_identifier.decode().strip()
    out = {}
    for child in iso.list_children(rr_path="/"):
        name = child.rock_ridge.name().decode() if child.rock_ridge else ""
        if name in ("", ".", "..") or child.is_dir():
            continue
        buf = io.BytesIO()
        iso.get_file_from_iso_fp(buf, rr_path="/" + name)
        out[name] = buf.getvalue()
    iso.close()
    return label, out


def test_seed_holds_keys_hostname_and_network(keyed: tuple[Host, list[str]], alice: User) -> None:
    host, keys = keyed
    cfg = config.load(str(host.conf))
    plan = adminopts.parse_admin(["-net", "nic", "-net", "user", "-net", "nic,model=virtio",
                                  "-net", "tap,ip=10.79.0.1/24,guest=10.79.0.2"])
    pid = os.fork()
    if pid == 0:  # as alice: the keys are read as the VM user reads them
        code = 1
        try:
            os.setgid(alice.gid)
            os.setuid(alice.uid)
            vm = type("V", (), {"name": "my_vm", "file": lambda self, leaf: "/nonexistent"})()
            seed = cloudinit.seed(cfg, vm, plan, "iid-" + "a" * 32, {"runcmd": [["true"]]})
            label, files = _iso_files(seed.fd)
            assert label == "cidata"
            assert set(files) == {"meta-data", "user-data", "network-config"}
            meta = yaml.safe_load(files["meta-data"])
            assert meta == {"instance-id": "iid-" + "a" * 32, "local-hostname": "my-vm"}
            ud = files["user-data"].decode()
            assert ud.startswith("#cloud-config\n")
            doc = yaml.safe_load(ud)
            # Exactly the two keys, no options, no comments; the user's own part kept.
            assert doc == {"runcmd": [["true"]], "ssh_authorized_keys": keys,
                           "preserve_hostname": False}
            assert "restrict" not in ud and "alice@laptop" not in ud and "fake" not in ud
            net = yaml.safe_load(files["network-config"])
            assert net["version"] == 1
            eth0, eth1 = net["config"]
            assert eth0["name"] == "eth0" and eth0["subnets"] == [{"type": "dhcp"}]
            assert eth1["name"] == "eth1" and eth1["subnets"] == [
                {"type": "static", "address": "10.79.0.2/24"}]
            # The MACs QEMU gives the NICs (the same derivation as admin_argv).
            argv = adminopts.admin_argv(plan, "my_vm", [99])
            assert f"mac={eth0['mac_address']}" in " ".join(argv)
            assert f"mac={eth1['mac_address']}" in " ".join(argv)
            # Sealed and read-only: nobody writes the seed once built.
            try:
                os.pwrite(seed.fd, b"x", 0)
                raise AssertionError("the seed descriptor is writable")
            except OSError:
                pass
            code = 0
        except BaseException as exc:  # report through the exit status
            print("child:", repr(exc), flush=True)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("machine,slot", [("pc", "bus=ide.1,unit=1"), ("q35", "bus=ide.3")])
def test_seed_argv_uses_a_slot_no_user_option_uses(machine: str, slot: str) -> None:
    import json
    argv = cloudinit.seed_argv(useropts.Opened(7, "raw", True), machine)
    assert argv[:2] == ["-add-fd", "fd=7,set=64"]
    nodes = [json.loads(argv[i + 1]) for i, w in enumerate(argv) if w == "-blockdev"]
    assert nodes == [{"driver": "file", "node-name": "cidata-file",
                      "filename": "/dev/fdset/64", "read-only": True},
                     {"driver": "raw", "node-name": "cidata", "file": "cidata-file",
                      "read-only": True}]
    assert argv[-2:] == ["-device", f"ide-cd,id=cidata,{slot},drive=cidata"]
    # Every user drive option at once: none of them takes that slot or fdset.
    req = useropts.parse_user(["-hda", "a.img", "-hdb", "b.img", "-cdrom", "c.iso",
                               "-fda", "f.img", "-fdb", "g.img", "-cloud-init"])
    opened = {n: useropts.Opened(10 + i, "raw", False) for i, n in
              enumerate(("-hda", "-hdb", "-cdrom", "-fda", "-fdb"))}
    text = " ".join(useropts.user_argv(req, opened, "vnc.sock", "ide", machine))
    assert slot not in text and "set=64" not in text and "cidata" not in text


def test_authorized_keys_lines() -> None:
    import base64
    blob = base64.b64encode(b"\0\0\0\x0bssh-ed25519" + b"\0\0\0\x20" + b"k" * 32).decode()
    assert sshkeys.keys_of_line(f"restrict,pty ssh-ed25519 {blob} c") == ("ssh-ed25519", blob)
    assert sshkeys.keys_of_line(f'command="a b",from="x" ssh-ed25519 {blob}') == (
        "ssh-ed25519", blob)
    assert sshkeys.keys_of_line(f"ssh-rsa {blob}") is None          # type mismatch
    assert sshkeys.keys_of_line("# ssh-ed25519 " + blob) is None
    assert sshkeys.keys_of_line("ssh-ed25519 AAAA!!") is None


@pytest.mark.parametrize("text", ["", "all", "22", "22 80 8000-8010", "1-65535"])
def test_connect_ports_setting(text: str, tmp_path: Path) -> None:
    p = tmp_path / "c.conf"
    p.write_text(f"connect_ports = {text}\n")
    ports = config.load(str(p), require_root=False).connect_ports
    if text == "all":
        assert ports is None
    else:
        assert ports == frozenset(p for w in text.split() for p in
                                  range(int(w.split("-")[0]), int(w.split("-")[-1]) + 1))


@pytest.mark.parametrize("text,want", [("yes", True), ("no", False)])
def test_connect_user_mode_setting(text: str, want: bool, tmp_path: Path) -> None:
    p = tmp_path / "k.conf"
    p.write_text(f"connect_user_mode = {text}\n")
    assert config.load(str(p), require_root=False).connect_user_mode is want
    p.write_text("connect_user_mode = off\n")
    with pytest.raises(ConfigError, match="connect_user_mode"):
        config.load(str(p), require_root=False)


@pytest.mark.parametrize("text", ["0", "65536", "ssh", "22,80", "80-22", "-5", "all 22"])
def test_connect_ports_setting_refused(text: str, tmp_path: Path) -> None:
    p = tmp_path / "c.conf"
    p.write_text(f"connect_ports = {text}\n")
    with pytest.raises(ConfigError):
        config.load(str(p), require_root=False)


@pytest.mark.parametrize("bad", ["guest=10.79.0.1", "guest=10.80.0.2", "guest=10.79.0.255",
                                 "guest=10.79.0.0", "guest=x", "guest=224.0.0.1",
                                 "guest=10.79.0.2/24"])
def test_guest_address_checked(bad: str) -> None:
    with pytest.raises(RefusedOption):
        adminopts.parse_admin(["-net", "nic", "-net", f"tap,ip=10.79.0.1/24,{bad}"])


def test_connect_port_words() -> None:
    assert connect.parse_args(["22"]) == (None, 22)
    assert connect.parse_args(["vm", "65535"]) == ("vm", 65535)
    for bad in ("0", "65536", "022", "+22", "-1", "1e3", "２２", "ssh", "22 ", "99999999"):
        with pytest.raises(UsageError) as exc:
            connect.parse_args(["vm", bad])
        assert bad in exc.value.message


# ---- refusals, through the real entry point: nothing changes ----------------------

@pytest.mark.security
@pytest.mark.parametrize("content,token", [
    (b"#cloud-config\n" + b"a: b\n" * 20000, "larger than 65536 bytes"),
    (b"#cloud-config\nkey: [unclosed\n", "not YAML"),
    (b"#cloud-config\n- a\n- b\n", "not a YAML mapping"),
    (b"#cloud-config\na: 1\n---\nb: 2\n", "not YAML"),
    (b"#!/bin/sh\nrm -rf /\n", "first line must be '#cloud-config'"),
    (b"#cloud-config\n\xff\xfe\n", "not UTF-8"),
    (b"#cloud-config\nssh_authorized_keys: not-a-list\n", "ssh_authorized_keys"),
])
def test_user_data_refused(keyed: tuple[Host, list[str]], alice: User, content: bytes,
                           token: str) -> None:
    host, _ = keyed
    path = host.vm_path(VM) / "ud.yaml"
    path.write_bytes(content)
    os.chown(path, alice.uid, alice.gid)
    try:
        msg = assert_refused(host, alice, f"start {VM} -cloud-init -user-data ud.yaml", token)
        assert "ud.yaml" in msg or "ssh_authorized_keys" in msg
        assert not (host.vm_path(VM) / cloudinit.INSTANCE_ID).exists()
    finally:
        path.unlink()


@pytest.mark.security
@pytest.mark.parametrize("command,token", [
    (f"start {VM} -cloud-init old", "'old'"),
    (f"start {VM} -user-data ud.yaml", "-user-data: needs -cloud-init"),
    (f"start {VM} -cloud-init -user-data ../x.yaml", "../x.yaml"),
    (f"start {VM} -cloud-init -user-data /etc/shadow", "/etc/shadow"),
    (f"start {VM} -cloud-init -cloud-init", "given twice"),
])
def test_cloud_init_options_refused(keyed: tuple[Host, list[str]], alice: User, command: str,
                                    token: str) -> None:
    assert_refused(keyed[0], alice, command, token)


@pytest.mark.security
@pytest.mark.parametrize("args,token,status", [
    ("ci 0", "0: not a port", 2), ("ci 65536", "65536: not a port", 2),
    ("ci ssh", "ssh: not a port", 2), ("ci 022", "022: not a port", 2),
    ("ci 22 23", "23: unexpected argument", 2), ("", "missing PORT", 2),
    ("cib 22", "not yours", 2),            # bob's VM
    ("ci 22", "is not running", 1),
])
def test_connect_refused(keyed: tuple[Host, list[str]], alice: User, args: str, token: str,
                         status: int) -> None:
    assert_refused(keyed[0], alice, f"connect {args}".strip(), token, status=status)


@pytest.mark.security
def test_connect_port_outside_admin_list(keyed: tuple[Host, list[str]], alice: User) -> None:
    host, _ = keyed
    host.write_conf(authorized_keys=str(config.load(str(host.conf)).authorized_keys),
                    connect_ports="22 8000-8010")
    try:
        assert_refused(host, alice, f"connect {VM} 23", "23: guest port not allowed")
        assert_refused(host, alice, f"connect {VM} 8011", "8011: guest port not allowed")
        # An allowed port gets as far as the VM's state.
        assert_refused(host, alice, f"connect {VM} 8010", "is not running", status=1)
    finally:
        host.write_conf(authorized_keys=str(config.load(str(host.conf)).authorized_keys))


def test_ssh_config_stanza(tmp_path: Path) -> None:
    """bin/kvmshell-ssh-config's stanza, as the OpenSSH client reads it (ssh -G)."""
    from conftest import REPO
    tool = str(REPO / "bin" / "kvmshell-ssh-config")
    r = subprocess.run([tool, "alice@lab.example", "myvm"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    conf = tmp_path / "config"
    conf.write_text(r.stdout)
    eff = subprocess.run(["ssh", "-G", "-F", str(conf), "myvm"], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert "user debian" in eff and "hostname myvm" in eff and "port 22" in eff
    assert "proxycommand ssh -T alice@lab.example connect myvm %p" in eff
    assert "hostkeyalias kvmshell-lab.example-myvm" in eff
    for bad in (["alice@lab", "my vm"], ["alice@lab", "-oProxyCommand=x"], ["a;b", "vm"],
                ["alice@lab", "vm", "root@x"], ["alice@lab"]):
        r = subprocess.run([tool, *bad], capture_output=True, text=True)
        assert r.returncode == 2 and r.stdout == "", (bad, r)


def _qmp(sock_dir: Path, command: str) -> object:
    """One QMP command as root (the test's own look at QEMU)."""
    import json
    import socket
    s = socket.socket(socket.AF_UNIX)
    # The path may be longer than sun_path: connect through the directory's descriptor.
    dfd = os.open(sock_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        s.connect(f"/proc/self/fd/{dfd}/qmp.sock")
    finally:
        os.close(dfd)
    f = s.makefile("rwb")
    f.readline()
    for cmd in ("qmp_capabilities", command):
        f.write(json.dumps({"execute": cmd}).encode() + b"\n")
        f.flush()
        while True:
            msg = json.loads(f.readline())
            if "event" not in msg:
                break
    s.close()
    return msg["return"]


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_seed_with_every_drive_option_on_real_qemu(keyed: tuple[Host, list[str]], alice: User,
                                                   guest: Path, machine: str) -> None:
    """QEMU 7.2 takes the seed next to all five user drives (no slot clash),
    read-only, as a CD-ROM with its medium in, on either machine; the
    instance-id is stored, alice's, mode 0600; -user-data's descriptor never
    reaches QEMU."""
    host, _ = keyed
    admin = ["-m", "128", "-net", "nic,model=virtio", "-net", "user"]
    if machine == "q35":
        host.kvmadm("set", VM, "--", *admin, "-M", "q35")
    path = host.vm_path(VM)   # set renames the directory: the identifier changed
    made = []
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path / "d.qcow2"), "64M"],
                   check=True)
    made.append(path / "d.qcow2")
    for leaf, size in (("e.img", 1 << 20), ("x.iso", 1 << 20), ("f.img", 1474560),
                       ("g.img", 1474560)):
        with open(path / leaf, "wb") as f:
            f.truncate(size)
        made.append(path / leaf)
    (path / "ud.yaml").write_text("#cloud-config\npackages: [htop]\n")
    made.append(path / "ud.yaml")
    (path / "vmlinuz").write_bytes((guest / "vmlinuz").read_bytes())
    made.append(path / "vmlinuz")
    for p in made:
        os.chown(p, alice.uid, alice.gid)
    try:
        r = alice.ssh_command(f"start {VM} -hda d.qcow2 -hdb e.img -cdrom x.iso -fda f.img "
                              "-fdb g.img -kernel vmlinuz -cloud-init new "
                              "-user-data ud.yaml")
        assert r.returncode == 0, r.stderr
        blocks = _qmp(path, "query-block")
        assert isinstance(blocks, list)
        seed = [b for b in blocks if b.get("qdev", "").endswith("cidata") or
                b.get("device") == "cidata"]
        assert len(seed) == 1, blocks
        assert seed[0]["removable"] and seed[0]["inserted"]["ro"], seed
        assert len(blocks) == 6, [b.get("device") for b in blocks]
        iid = path / cloudinit.INSTANCE_ID
        st = iid.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (alice.uid, 0o600)
        assert iid.read_text().startswith("iid-")
        pid = alice.qemu_pids()[0]
        fds = [os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")]
        assert not any(t.endswith("/ud.yaml") for t in fds), fds
        assert any(t.startswith("/memfd:cidata") for t in fds), fds
    finally:
        alice.ssh_command(f"kill {VM}")
        for p in made + [path / cloudinit.INSTANCE_ID]:
            p.unlink(missing_ok=True)
        if machine == "q35":
            host.kvmadm("set", VM, "--", *admin)


def _usernet(path: Path) -> str:
    """HMP 'info usernet' of the VM in *path*: slirp's sockets, one line
    each (a host forward shows as TCP[HOST_FORWARD])."""
    import json
    import socket
    s = socket.socket(socket.AF_UNIX)
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        s.connect(f"/proc/self/fd/{dfd}/qmp.sock")   # path may exceed sun_path
    finally:
        os.close(dfd)
    f = s.makefile("rwb")
    f.readline()
    for cmd in ({"execute": "qmp_capabilities"},
                {"execute": "human-monitor-command",
                 "arguments": {"command-line": "info usernet"}}):
        f.write(json.dumps(cmd).encode() + b"\n")
        f.flush()
        while "event" in (msg := json.loads(f.readline())):
            pass
    s.close()
    out = msg["return"]
    assert isinstance(out, str), msg
    return out


def test_connect_user_mode_leaves_no_forward(host: Host, alice: User, guest: Path) -> None:
    """connect on user-mode networking, against the tiny guest (its port 22
    is closed, so each connection is refused by the guest and ends): every
    run exits 0, and afterwards QEMU listens on no TCP port and slirp holds
    no host forward (HMP 'info usernet' has no HOST_FORWARD line)."""
    from guestrig import qemu_listeners
    host.create_vm("cu", alice, "-m", "128", "-net", "nic,model=virtio", "-net", "user",
                   guest=guest)
    r = alice.ssh_command("start cu -kernel vmlinuz -initrd initrd.img "
                          "-append 'console=ttyS0 kvmshell.ip=10.0.2.15/24'")
    assert r.returncode == 0, r.stderr
    try:
        pid = alice.qemu_pids()[0]
        for _ in range(20):   # QEMU's answer comes before or after the connection: both ways
            r = alice.ssh_command("connect cu 22", timeout=60)
            assert r.returncode == 0 and r.stdout == "", r.stderr
            assert qemu_listeners(pid) == []
        assert "HOST_FORWARD" not in _usernet(host.vm_path("cu"))
    finally:
        alice.ssh_command("kill cu")


@pytest.mark.security
def test_connect_user_mode_off(host: Host, alice: User, guest: Path) -> None:
    """connect_user_mode = no: connect to a user-mode VM is refused (exit 2,
    one kvmshell: line naming the VM and the setting), stopped or running,
    before QEMU is asked anything: QEMU listens on no TCP port and slirp
    holds no forward.  With the setting back at yes the same connect runs
    (the tiny guest's port 22 is closed: exit 0, nothing carried)."""
    from guestrig import qemu_listeners
    keys = str(config.load(str(host.conf)).authorized_keys)
    host.create_vm("cn", alice, "-m", "128", "-net", "nic,model=virtio", "-net", "user",
                   guest=guest)
    host.write_conf(authorized_keys=keys, connect_user_mode="no")
    try:
        err = assert_refused(host, alice, "connect cn 22", "VM cn has user-mode networking")
        assert "connect_user_mode = no" in err, err
        r = alice.ssh_command("start cn -kernel vmlinuz -initrd initrd.img "
                              "-append 'console=ttyS0 kvmshell.ip=10.0.2.15/24'")
        assert r.returncode == 0, r.stderr
        pid = alice.qemu_pids()[0]
        r = alice.ssh_command("connect cn 22", timeout=60)
        assert (r.returncode, r.stdout) == (2, ""), r
        assert r.stderr.startswith("kvmshell: ") and r.stderr.count("\n") == 1, r.stderr
        assert "VM cn has user-mode networking" in r.stderr and "Traceback" not in r.stderr
        assert qemu_listeners(pid) == []
        assert "HOST_FORWARD" not in _usernet(host.vm_path("cn"))
        host.write_conf(authorized_keys=keys)
        r = alice.ssh_command("connect cn 22", timeout=60)
        assert (r.returncode, r.stdout) == (0, ""), r.stderr
    finally:
        host.write_conf(authorized_keys=keys)
        alice.ssh_command("kill cn")
