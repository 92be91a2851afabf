"""Core: the option table, the VM tree, and a validated start/stop of a real guest."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import KVMSHELL, MARKER, Host, User, console_log, kill_all, lock_holders, wait_for
from kvmshell.shell import lexer
from kvmshell.common import adminopts
from kvmshell.common import optable
from kvmshell.shell import useropts
from kvmshell.common import vmid
from kvmshell.common.errors import RefusedOption, TreeError, UsageError

pytestmark = pytest.mark.core


# ---- the table, read by the tests ------------------------------------------

def _sample(opt: optable.Option) -> list[str]:
    return [opt.name] + ([opt.example or "x"] if opt.arity else [])


def test_table_holds_every_seed_option_once() -> None:
    names = [o.name for o in optable.TABLE]
    assert len(names) == len(set(names))
    seed_user = {"-fda", "-fdb", "-hda", "-hdb", "-cdrom", "-boot", "-snapshot", "-localtime",
                 "-kernel", "-append", "-initrd", "-hdachs", "-no-acpi", "-no-reboot",
                 "-loadvm", "-vnc", "-option-rom"}
    assert {o.name for o in optable.TABLE
            if o.cls == optable.USER and o.origin == optable.SEED} == seed_user
    # kvmshell's own user options beyond the seed are marked as such.
    assert {o.name for o in optable.TABLE if o.cls == optable.USER
            and o.origin == optable.EXTENSION} == {"-cloud-init", "-user-data"}
    assert {o.cls for o in optable.TABLE} == {optable.USER, optable.ADMIN, optable.UNUSED}


@pytest.mark.parametrize("opt", [o for o in optable.TABLE if o.cls == optable.USER],
                         ids=lambda o: o.name)
def test_user_option_accepted(opt: optable.Option) -> None:
    words = _sample(opt)
    if opt.name == "-hdachs":
        words += ["-hda", "disk.img"]
    if opt.name in ("-append", "-initrd"):
        words += ["-kernel", "vmlinuz"]
    if opt.name == "-user-data":
        words += ["-cloud-init"]
    req = useropts.parse_user(words)
    assert req.has(opt.name)


@pytest.mark.parametrize("opt", [o for o in optable.TABLE if o.cls != optable.USER],
                         ids=lambda o: o.name)
def test_non_user_option_refused_naming_it(opt: optable.Option) -> None:
    with pytest.raises(RefusedOption) as exc:
        useropts.parse_user(_sample(opt))
    assert exc.value.message.startswith(opt.name + ":")
    assert ("administrator" if opt.cls == optable.ADMIN else "not used") in exc.value.message


@pytest.mark.parametrize("opt", [o for o in optable.TABLE if o.cls == optable.ADMIN],
                         ids=lambda o: o.name)
def test_admin_option(opt: optable.Option) -> None:
    words = _sample(opt)
    if opt.kind in (optable.DIR, optable.REDIR):
        words = ["-net", "nic", "-net", "user"] + words
    if opt.kind == optable.NET:
        words += ["-net", "user"]   # a nic pairs with a backend
    if opt.gone:
        with pytest.raises(RefusedOption, match=opt.name):
            adminopts.parse_admin(words)
    else:
        plan = adminopts.parse_admin(words)
        argv = adminopts.admin_argv(plan, "vm", [])
        assert argv[:2] == ["-m", str(plan.megs)]


@pytest.mark.parametrize("opt", [o for o in optable.TABLE if o.cls == optable.UNUSED],
                         ids=lambda o: o.name)
def test_unused_option_refused_by_admin_too(opt: optable.Option) -> None:
    with pytest.raises(RefusedOption, match="not used"):
        adminopts.parse_admin(_sample(opt))


def test_mappings_to_qemu_7_2() -> None:
    req = useropts.parse_user(["-localtime", "-no-acpi", "-boot", "dc", "-hda", "d.qcow2",
                              "-hdachs", "100,16,63,lba", "-cdrom", "x.iso"])
    opened = {"-hda": useropts.Opened(10, "qcow2", False, 11),
              "-cdrom": useropts.Opened(12, "raw", True)}
    argv = useropts.user_argv(req, opened, "vnc.sock")
    assert argv[argv.index("-rtc") + 1] == "base=localtime"
    assert argv[-2:] == ["-machine", "acpi=off"]
    assert "order=dc" in argv
    nodes = [json.loads(argv[i + 1]) for i, w in enumerate(argv) if w == "-blockdev"]
    assert {"driver": "file", "node-name": "hda-file", "filename": "/dev/fdset/1",
            "read-only": False} in nodes
    # QEMU never follows a header's backing name: the bottom says null.
    assert {"driver": "qcow2", "node-name": "hda", "file": "hda-file", "read-only": False,
            "backing": None} in nodes
    assert {"driver": "raw", "node-name": "cdrom", "file": "cdrom-file", "read-only": True} in nodes
    assert "ide-hd,id=hda,bus=ide.0,unit=0,drive=hda,cyls=100,heads=16,secs=63,bios-chs-trans=lba" in argv
    assert "ide-cd,id=cdrom,bus=ide.1,unit=0,drive=cdrom" in argv
    assert argv.count("-add-fd") == 3
    plan = adminopts.parse_admin(["-m", "512", "-net", "nic,model=virtio", "-net", "user",
                                "-redir", "tcp:2222::22", "-usbdevice", "tablet"])
    a = adminopts.admin_argv(plan, "web", [])
    assert "user,id=net0,restrict=off,hostfwd=tcp:127.0.0.1:2222-:22" in a
    nic = a[a.index("-device", a.index("-netdev")) + 1]
    assert nic.startswith("virtio-net-pci,netdev=net0,mac=52:54:")
    assert nic == adminopts.admin_argv(plan, "web", [])[a.index("-device", a.index("-netdev")) + 1]
    mac = int(nic.rsplit("=", 1)[1].split(":")[0], 16)
    assert mac & 2 and not mac & 1          # locally administered, unicast
    assert ["-usb", "-device", "usb-tablet"] == a[2:5]


@pytest.mark.parametrize("words,token", [
    (["-net", "nic,vlan=1"], "vlan= no longer exists"),
    (["-net", "tap,br=br0,script=/etc/qemu-ifup"], "script="),
    (["-net", "tap,br=br0,ifname=x"], "ifname="),
    (["-no-rtc"], "no longer exists"),
    (["-vmchannel", "di:1,pty"], "no longer exists"),
    (["-usbdevice", "host:1234:5678"], "no longer exists"),
    (["-balloon", "none"], "no longer exists"),
    (["-net", "nic"], "backend"),
    (["-net", "nic,macaddr=01:00:00:00:00:01", "-net", "user"], "multicast"),
    (["-net", "tap,br=thisnameistoolong0"], "bridge name"),
    (["-net", "tap,br=br0,ip=10.0.0.300/24"], "address"),
    (["-m", "10"], "-m"),
])
def test_admin_refusals(words: list[str], token: str) -> None:
    with pytest.raises(RefusedOption, match=token):
        adminopts.parse_admin(words)


def test_vmid_round_trip_and_canonical() -> None:
    d = vmid.encode("web", ["-m", "512"])
    assert vmid.decode(d) == ("web", ["-m", "512"])
    for bad in (d + "=", d + "A", d[:-1] + "+", d.replace(".", "/"), "web.", "x." + d[4:]):
        with pytest.raises(TreeError):
            vmid.decode(bad)
    with pytest.raises(UsageError, match="file-name limit"):
        vmid.encode("web", ["-net", "nic," + "x" * 300])


def test_lexer() -> None:
    assert lexer.split("start -append 'console=ttyS0 quiet'") == ["start", "-append", "console=ttyS0 quiet"]
    assert lexer.split('a "b c" d\\ e') == ["a", "b c", "d e"]
    assert lexer.split("start -cdrom x.iso; sh") == ["start", "-cdrom", "x.iso;", "sh"]
    for bad in ("a\nb", "a\rb", "a\x1bb", "'open", "caf\u00e9", "x" * 5000):
        with pytest.raises(UsageError):
            lexer.split(bad)


# ---- the whole path, through the real entry point ---------------------------

@pytest.fixture(scope="module")
def core_vm(host: Host, alice: User, guest: Path) -> Path:
    return host.create_vm("core", alice, "-m", "256", guest=guest)


def test_start_status_stop_real_guest(host: Host, alice: User, core_vm: Path) -> None:
    r = alice.ssh_command("start core -kernel vmlinuz -initrd initrd.img -append 'console=ttyS0'")
    assert r.returncode == 0, r.stderr
    try:
        # The command it names works however many VMs the user has.
        assert "'console core' attaches to its serial console" in r.stdout, r.stdout
        wait_for(lambda: MARKER in console_log(core_vm), 120, "the guest's marker")
        doc = alice.status("core")
        assert doc["state"] == "running"
        pid = doc["pid"]
        assert isinstance(pid, int) and alice.qemu_pids() == [pid]
        assert os.stat(f"/proc/{pid}").st_uid == alice.uid
        # QEMU holds the VM lock (on the directory) itself; no pid file.
        assert pid in [p for p, _ in lock_holders(core_vm)]
        assert not (core_vm / "qemu.pid").exists()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"-nodefaults" in cmdline and b"-no-user-config" in cmdline
        assert any(a.startswith(b"on,") and b"spawn=deny" in a for a in cmdline)
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"LD_PRELOAD" not in b"".join(env)

        before = host.vm_path("core")
        r = host.kvmadm("set", "core", "--", "-m", "512", check=False)
        assert r.returncode == 1 and "refused while the VM runs" in r.stderr
        r = host.kvmadm("remove", "core", check=False)
        assert r.returncode == 1 and "refused while the VM runs" in r.stderr
        assert host.vm_path("core") == before

        again = alice.ssh_command("start core -kernel vmlinuz")
        assert again.returncode == 1
        assert "already running" in again.stderr
        assert alice.qemu_pids() == [pid]

        r = alice.ssh_command("stop core")
        assert r.returncode == 0, r.stderr
        assert "powered off" in r.stdout
        assert alice.status("core")["state"] == "stopped"
        assert alice.qemu_pids() == []
        assert not (core_vm / "qmp.sock").exists()
        # The next start works: nothing was left locked.
        r = alice.ssh_command("start -kernel vmlinuz -initrd initrd.img -append console=ttyS0")
        assert r.returncode == 0, r.stderr
        r = alice.ssh_command("kill")
        assert r.returncode == 0, r.stderr
        assert alice.qemu_pids() == []
    finally:
        kill_all(alice)


def test_guest_outlives_the_session(host: Host, alice: User, core_vm: Path) -> None:
    """kvmshell returns at once; QEMU is in its own session, not the caller's."""
    r = alice.ssh_command("start core -kernel vmlinuz -initrd initrd.img -append console=ttyS0")
    assert r.returncode == 0, r.stderr
    try:
        pid = alice.status("core")["pid"]
        assert isinstance(pid, int)
        assert os.getsid(pid) != os.getsid(0)
    finally:
        alice.ssh_command("kill core")
        kill_all(alice)


def test_qemu_error_is_reported(host: Host, alice: User, core_vm: Path) -> None:
    bogus = core_vm / "bogus.bin"
    bogus.write_bytes(b"not a kernel")
    os.chown(bogus, alice.uid, alice.gid)
    r = alice.ssh_command("start core -kernel bogus.bin")
    assert r.returncode == 1
    assert r.stderr.startswith("kvmshell: ") and "invalid kernel header" in r.stderr
    assert r.stderr.count("\n") == 1
    assert alice.qemu_pids() == []
    bogus.unlink()


def _qemu_io(vm_path: Path, device: str, command: str) -> None:
    """Write through QEMU's block layer as a compromised QEMU could (the test
    is root and reaches QMP directly; users never do)."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    qmp = QEMUMonitorProtocol(str(vm_path / "qmp.sock"))
    qmp.connect(negotiate=True)
    try:
        qmp.cmd("human-monitor-command", **{"command-line": f"qemu-io -d {device} \"{command}\""})
    finally:
        qmp.close()


@pytest.mark.parametrize("extra,device,base_changes", [
    ("-hda d.qcow2 -hdb e.img -fda f.img -fdb g.img -cdrom x.iso", "hda", True),
    ("-hda d.qcow2 -hdb e.img -fda f.img -fdb g.img -cdrom x.iso -snapshot", "hda", False),
    ("-hda d.qcow2 -hdachs 100,16,63,lba", "hda", True),
    ("-hda d.qcow2 -hdachs 100,16,63 -snapshot", "hda", False),
    ("-fda f.img -snapshot", "fda", False),
    ("-option-rom x.iso -boot dc -localtime -no-acpi -no-reboot", "", False),
], ids=["disks", "disks-snapshot", "hdachs", "hdachs-snapshot", "floppy-snapshot", "the-rest"])
def test_disks_start_for_real(host: Host, alice: User, core_vm: Path,
                              extra: str, device: str, base_changes: bool) -> None:
    """Every disk option starts a real QEMU; with -snapshot the guest's writes
    land in a temporary overlay and the user's image is left as it was.  The
    remaining user options (those not run by other tests) start for real too."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(core_vm / "d.qcow2"), "64M"],
                   check=True)
    for leaf, size in (("e.img", 1 << 20), ("f.img", 1474560), ("g.img", 1474560),
                       ("x.iso", 1 << 20)):
        with open(core_vm / leaf, "wb") as f:
            f.truncate(size)
    for leaf in ("d.qcow2", "e.img", "f.img", "g.img", "x.iso"):
        os.chown(core_vm / leaf, alice.uid, alice.gid)
    image = "d.qcow2" if device != "fda" else "f.img"
    before = (core_vm / image).read_bytes()
    try:
        r = alice.ssh_command(f"start core {extra}")
        assert r.returncode == 0, r.stderr
        assert alice.status("core")["state"] == "running"
        if device:
            _qemu_io(core_vm, device, "write -P 0xab 0 64k")
            # qemu-io reports on QEMU's stdout, which the launcher keeps in qemu.log.
            wait_for(lambda: b"wrote 65536/65536 bytes" in (core_vm / "qemu.log").read_bytes(),
                     10, "qemu-io's write")
        if "-snapshot" in extra:
            r = alice.ssh_command("save core st")
            assert r.returncode == 2 and "runs with -snapshot" in r.stderr, r.stderr
            assert not (core_vm / "st").exists() and alice.status("core")["state"] == "running"
        r = alice.ssh_command("kill core")
        assert r.returncode == 0, r.stderr
        assert ((core_vm / image).read_bytes() != before) == base_changes
        # The overlay was QEMU's temporary file in the VM directory: gone.
        assert not [p for p in os.listdir(core_vm) if p.startswith("vl.")]
    finally:
        kill_all(alice)
        for leaf in ("d.qcow2", "e.img", "f.img", "g.img", "x.iso"):
            (core_vm / leaf).unlink(missing_ok=True)


def _guest(user: User, vm: str, command: str) -> str:
    """Run *command* in the guest's shell through the console verb (byte-stream mode)."""
    r = subprocess.run(user.argv(KVMSHELL, "--config", str(user.host.conf)),
                       env=user.env(SSH_ORIGINAL_COMMAND=f"console {vm} --no-replay --linger 2"),
                       input=f"\n{command}; echo DONE-$((40+2))\n", capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "DONE-42" in r.stdout, (r.stdout[-1000:], r.stderr)
    return r.stdout


def test_save_loadvm_reset(host: Host, alice: User, core_vm: Path) -> None:
    """'save' writes the running guest's state into a file kvmshell made (QEMU
    gets a descriptor) and stops the VM; 'start -loadvm' resumes that guest,
    RAM included, instead of booting a new one."""
    boot = "-kernel vmlinuz -initrd initrd.img -append console=ttyS0"
    r = alice.ssh_command(f"start core {boot}")
    assert r.returncode == 0, r.stderr
    try:
        wait_for(lambda: MARKER in console_log(core_vm), 120, "the guest's marker")
        _guest(alice, "core", "echo kept-$((6*7)) > /saved")
        for bad, token in (("save core qemu.log", "a name kvmshell uses itself"),
                           ("save core ../x", "'../x'"), ("save", "missing file name"),
                           ("save core vmlinuz", "vmlinuz exists")):
            r = alice.ssh_command(bad)
            assert r.returncode == 2 and token in r.stderr and r.stderr.count("\n") == 1, (bad, r.stderr)
        assert alice.status("core")["state"] == "running"

        r = alice.ssh_command("save core state1")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("core: saved to state1 (") and "-loadvm state1" in r.stdout
        assert alice.qemu_pids() == [] and alice.status("core")["state"] == "stopped"
        st = (core_vm / "state1").stat()
        assert st.st_uid == alice.uid and st.st_size > 0
        assert not [p for p in os.listdir(core_vm) if p.startswith(".save.")]
        for verb in ("save core state2", "reset core"):
            r = alice.ssh_command(verb)
            assert r.returncode == 1 and "not running" in r.stderr, r.stderr
        assert not (core_vm / "state2").exists()

        r = alice.ssh_command(f"start core -loadvm state1 {boot}")
        assert r.returncode == 0, r.stderr
        assert "kept-42" in _guest(alice, "core", "cat /saved")
        # Resumed, not booted: this start's console output has no kernel banner.
        assert b"Linux version" not in (core_vm / "console.log").read_bytes()
        # 'reset' is the reset button: the same QEMU, a new boot.
        pid = alice.qemu_pids()
        r = alice.ssh_command("reset core")
        assert r.returncode == 0 and r.stdout == "core: reset\n", r.stderr
        wait_for(lambda: b"Linux version" in (core_vm / "console.log").read_bytes(), 60,
                 "the guest to boot again")
        assert alice.qemu_pids() == pid
        r = alice.ssh_command("kill core")
        assert r.returncode == 0, r.stderr

        # A state QEMU cannot load fails the start with QEMU's reason.
        (core_vm / "junk.state").write_bytes(b"not a migration stream" * 100)
        os.chown(core_vm / "junk.state", alice.uid, alice.gid)
        r = alice.ssh_command(f"start core -loadvm junk.state {boot}")
        assert r.returncode == 1 and r.stderr.startswith("kvmshell: ") and r.stderr.count("\n") == 1
        assert alice.qemu_pids() == []
    finally:
        kill_all(alice)
        for leaf in ("state1", "junk.state"):
            (core_vm / leaf).unlink(missing_ok=True)


# Every user option with a value a user would give; files are made below.
_REAL = {"-fda": "f.img", "-fdb": "g.img", "-hda": "d.qcow2", "-hdb": "e.img", "-cdrom": "x.iso",
         "-boot": "dcn", "-snapshot": None, "-localtime": None, "-kernel": "vmlinuz",
         "-append": "console=ttyS0", "-initrd": "initrd.img", "-hdachs": "100,16,63",
         "-no-acpi": None, "-no-reboot": None, "-vnc": ":0", "-option-rom": "rom.bin"}


@pytest.fixture(scope="module")
def combo_vm(host: Host, alice: User, guest: Path) -> Path:
    path = host.create_vm("combo", alice, "-m", "128", guest=guest)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path / "d.qcow2"), "64M"],
                   check=True)
    for leaf, size in (("e.img", 1 << 20), ("x.iso", 1 << 20), ("rom.bin", 4096),
                       ("f.img", 1474560), ("g.img", 1474560)):
        with open(path / leaf, "wb") as f:
            f.truncate(size)
    for leaf in ("d.qcow2", "e.img", "x.iso", "rom.bin", "f.img", "g.img"):
        os.chown(path / leaf, alice.uid, alice.gid)
    return path


def _real_words(names: "tuple[str, ...]") -> str:
    words: list[str] = []
    for n in names:
        words += [n] + ([_REAL[n]] if _REAL[n] is not None else [])
    if "-hdachs" in names and "-hda" not in names:
        words += ["-hda", "d.qcow2"]
    if ("-append" in names or "-initrd" in names) and "-kernel" not in names:
        words += ["-kernel", "vmlinuz"]
    return " ".join(words)


def test_user_options_start_qemu_in_pairs_and_all_together(alice: User, combo_vm: Path) -> None:
    """The argv of every pair of user options (and of all of them at once) is
    accepted by the real QEMU 7.2, not only by the table: 'start' succeeds.
    (-loadvm needs a saved state: test_save_loadvm_reset; -cloud-init and
    -user-data need the user's SSH keys: tests/test_cloudinit.py starts them
    with every drive option at once.)"""
    import itertools

    assert set(_REAL) == {o.name for o in optable.TABLE if o.cls == optable.USER} - {
        "-loadvm", "-cloud-init", "-user-data"}
    combos = list(itertools.combinations(_REAL, 2)) + [tuple(_REAL)]
    failed = []
    try:
        for names in combos:
            r = alice.ssh_command(f"start combo {_real_words(names)}")
            if r.returncode != 0:
                failed.append((names, r.stderr.strip()))
                continue
            assert alice.ssh_command("kill combo").returncode == 0
    finally:
        kill_all(alice)
    assert not failed, failed


@pytest.mark.parametrize("admin", [
    "-nographic", "-win2k-hack", "-usb", "-usbdevice tablet", "-usbdevice mouse",
    "-usbdevice keyboard", "-balloon virtio", "-net none",
    "-net nic,model=virtio -net user", "-net nic,model=e1000,macaddr=52:54:00:12:34:56 -net user,hostname=g",
    "-net nic,model=rtl8139 -net user -tftp TMP", "-net nic,model=pcnet -net user -redir tcp:2222::22",
    "-net nic,model=i82559er -net user -redir udp:5353::53", "-net nic,model=ne2k_pci -net user",
    "-net nic -net user -net nic -net user",
    "-usb -usbdevice tablet -balloon virtio -win2k-hack -net nic -net user -redir tcp:2223::22",
])
def test_admin_options_start_qemu(host: Host, alice: User, combo_vm: Path, tmp_path: Path,
                                  admin: str) -> None:
    """Each admin option's mapping is accepted by the real QEMU 7.2."""
    os.chmod(tmp_path, 0o755)
    host.kvmadm("set", "combo", "--", "-m", "128", *admin.replace("TMP", str(tmp_path)).split())
    try:
        r = alice.ssh_command("start combo -kernel vmlinuz -initrd initrd.img -append console=ttyS0")
        assert r.returncode == 0, r.stderr
        assert alice.ssh_command("kill combo").returncode == 0
    finally:
        kill_all(alice)
        host.kvmadm("set", "combo", "--", "-m", "128")


def test_admin_smb_without_samba_is_a_clear_failure(host: Host, alice: User, combo_vm: Path,
                                                   tmp_path: Path) -> None:
    """-smb needs the host's smbd (not installed here): QEMU's reason, on one line."""
    if os.path.exists("/usr/sbin/smbd"):
        pytest.skip("smbd is installed here")
    host.kvmadm("set", "combo", "--", "-m", "128", "-net", "nic", "-net", "user",
                "-smb", str(tmp_path))
    try:
        r = alice.ssh_command("start combo -kernel vmlinuz")
        assert r.returncode == 1 and "smbd" in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert alice.qemu_pids() == []
    finally:
        host.kvmadm("set", "combo", "--", "-m", "128")


def test_help_and_list(alice: User, core_vm: Path) -> None:
    r = alice.ssh_command("help")
    assert r.returncode == 0 and "start" in r.stdout
    r = alice.ssh_command("help start")
    assert "-cdrom" in r.stdout and "-m " not in r.stdout
    r = alice.ssh_command("list")
    assert r.returncode == 0 and "core" in r.stdout


def test_kvmadm_set_show_remove(host: Host, alice: User) -> None:
    host.create_vm("adm", alice, "-m", "128")
    old = host.vm_path("adm")
    (old / "keep.img").write_bytes(b"data")
    host.kvmadm("set", "adm", "--", "-m", "256", "-usb")
    new = host.vm_path("adm")
    assert new != old and not old.exists() and (new / "keep.img").read_bytes() == b"data"
    show = host.kvmadm("show", "adm").stdout
    assert "-m 256 -usb" in show and alice.name in show
    r = host.kvmadm("set", "adm", "--", "-smp", "0", check=False)
    assert r.returncode == 2 and "-smp" in r.stderr
    assert host.vm_path("adm") == new
    r = host.kvmadm("create", "bad", "--owner", alice.name, "--", "-net", "nic," + "m" * 300, check=False)
    assert r.returncode == 2
    host.kvmadm("remove", "adm")
    assert not os.path.lexists(host.vmdir / "adm")
    kept = list((host.vmdir / ".removed").iterdir())
    assert any((k / "keep.img").exists() for k in kept)


def test_three_ways_in_share_one_parser(host: Host, alice: User, core_vm: Path) -> None:
    """argv, -c CMD (login shell) and SSH_ORIGINAL_COMMAND (ForceCommand)."""
    from conftest import KVMSHELL
    conf = str(host.conf)
    run = lambda argv, **env: subprocess.run(alice.argv(*argv), env=alice.env(**env),  # noqa: E731
                                             capture_output=True, text=True, timeout=60)
    r = run([KVMSHELL, "--config", conf, "-c", "status core"])
    assert r.returncode == 0 and "core: stopped" in r.stdout
    # sshd's ForceCommand line, when kvmshell is also the login shell:
    r = run([KVMSHELL, "-c", f"{KVMSHELL} --config {conf}"], SSH_ORIGINAL_COMMAND="status core")
    assert r.returncode == 0 and "core: stopped" in r.stdout, r.stderr
    # ...but the same text sent by the user is just words, never kvmshell's options.
    r = run([KVMSHELL, "-c", f"kvmshell --config {conf} status core"])
    assert r.returncode == 2 and "kvmshell: unknown verb" in r.stderr
    r = alice.ssh_command(f"status core --config {conf}")
    assert r.returncode == 2 and "--config" in r.stderr
    r = run([KVMSHELL, "--config", conf, "-c", "start core -m 999"])
    assert r.returncode == 2 and "-m: only the administrator" in r.stderr
    # no command and no terminal: refused
    r = run([KVMSHELL, "--config", conf])
    assert r.returncode == 2 and "no command" in r.stderr


def test_refuses_root_and_user_owned_config(host: Host, alice: User, tmp_path: Path) -> None:
    from conftest import KVMSHELL
    r = subprocess.run([KVMSHELL, "--config", str(host.conf), "status"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "root" in r.stderr
    evil = host.root / f"evil-{alice.name}.conf"
    evil.write_text(f"vmdir = {host.vmdir}\nimage_dirs = /\n")
    os.chown(evil, alice.uid, alice.gid)
    r = subprocess.run(alice.argv(KVMSHELL, "--config", str(evil), "status"), env=alice.env(),
                       capture_output=True, text=True)
    assert r.returncode == 1 and "owned by root" in r.stderr
    evil.unlink()


def test_config_only_from_trusted_text(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvmshell.shell import cli
    from kvmshell.common.config import DEFAULT_PATH
    monkeypatch.delenv("SSH_ORIGINAL_COMMAND", raising=False)
    # -c text without SSH_ORIGINAL_COMMAND may be the user's: no config from it.
    assert cli.parse_invocation(["kvmshell", "-c", "kvmshell --config /evil"]) == (DEFAULT_PATH, None)
    assert cli.parse_invocation(["kvmshell", "--config", "/adm", "-c", "kvmshell --config /evil"]) \
        == ("/adm", None)
    # with SSH_ORIGINAL_COMMAND, -c text is sshd's ForceCommand line (the admin's)
    monkeypatch.setenv("SSH_ORIGINAL_COMMAND", "status --config /evil2")
    assert cli.parse_invocation(["kvmshell", "-c", "/usr/local/bin/kvmshell --config /adm"]) \
        == ("/adm", ["status", "--config", "/evil2"])


def test_shipped_config_matches_the_shipped_files() -> None:
    """kvmshell.conf loads, and names the helpers the sudoers drop-in allows
    and the login shell the sshd drop-in forces."""
    from kvmshell.common import config

    repo = Path(__file__).resolve().parents[1]
    cfg = config.load(str(repo / "kvmshell.conf"), require_root=False)
    sudoers = (repo / "sudoers.d" / "kvmshell").read_text()
    assert f"= {cfg.helper}\n" in sudoers and f"= {cfg.cgroup_helper}\n" in sudoers
    assert cfg.vmdir == "/var/lib/kvmshell/vms" and cfg.accel[0] == "kvm"
    assert cfg.shell in (repo / "sshd_config.d" / "kvmshell.conf").read_text()
