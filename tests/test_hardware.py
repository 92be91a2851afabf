"""Today's VM hardware (-smp, -M q35, -cpu, UEFI, the default NIC) and the
per-user budgets of RAM, vCPUs and running VMs: kvmshell's early check,
``quota`` and ``kvmadm usage``, and the kernel's enforcement through the
cgroup helper, for real (cgroup v1 here; systemd's slice drop-ins are
checked with ``systemd-analyze verify``, as systemd is not PID 1 here).

The kernel tests run the helper through a real sudo and a real sudoers
drop-in (the shipped one, renamed for this session), as kvmshell runs it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import (CGROUPHELPER, KVMSHELL, MARKER, Host, User, console_log, kill_all,
                      install_cgrouphelper, sudoers_text, wait_for)
from kvmshell.common import adminopts, budgets, optable
from kvmshell.common.errors import RefusedOption

pytestmark = pytest.mark.hardware

BOOT = "-kernel vmlinuz -initrd initrd.img -append console=ttyS0"
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


# ---- the table and the parser -----------------------------------------------------

def test_table_marks_extensions_and_reclassified_seed_rows() -> None:
    rows = optable.BY_NAME
    assert {o.origin for o in optable.TABLE} == {optable.SEED, optable.EXTENSION}
    # The seed's rows stay, with the seed's class and a one-line reason where it changed.
    for name in ("-smp", "-M"):
        assert rows[name].origin == optable.SEED
        assert rows[name].seed_cls == optable.UNUSED and rows[name].cls == optable.ADMIN
    changed = [o for o in optable.TABLE if o.seed_cls != o.cls]
    assert {o.name for o in changed} == {"-smp", "-M"}
    for o in changed:
        assert o.reason and "\n" not in o.reason
    assert [o.name for o in optable.TABLE if o.origin == optable.EXTENSION] == [
        "-cloud-init", "-user-data", "-cpu", "-firmware", "-host"]   # -host: issue 16
    for o in optable.TABLE:
        if o.origin == optable.EXTENSION:
            # The user class's two are issue 12's (the cloud-init seed).
            assert o.cls == (optable.USER if o.name in ("-cloud-init", "-user-data")
                             else optable.ADMIN) and o.help and o.example


@pytest.mark.parametrize("words,token", [
    (["-smp", "0"], "-smp: invalid number"), (["-smp", "two"], "-smp: invalid number"),
    (["-smp", "256"], "-smp: invalid number"), (["-smp", "02"], "-smp: invalid number"),
    (["-M", "isapc"], "-M: unknown machine type"), (["-M", "q35,smm=on"], "-M: unknown machine"),
    (["-cpu", "Skylake-Client,+vmx"], "-cpu: unknown CPU model"), (["-cpu", "HOST"], "-cpu"),
    (["-firmware", "uefi"], "-firmware: unknown firmware"), (["-smp", "2", "-smp", "2"], "twice"),
])
def test_hardware_refusals(words: list[str], token: str) -> None:
    with pytest.raises(RefusedOption, match=re.escape(token)):
        adminopts.parse_admin(words)


def test_hardware_argv_and_default_nic() -> None:
    plan = adminopts.parse_admin(["-m", "2048", "-smp", "2", "-M", "q35", "-cpu", "max",
                                  "-firmware", "efi", "-net", "nic", "-net", "user"])
    assert (plan.smp, plan.machine, plan.cpu, plan.firmware) == (2, "q35", "max", "efi")
    argv = adminopts.admin_argv(plan, "web", [], (10, [11, 12]))
    assert argv[:6] == ["-m", "2048", "-smp", "2", "-cpu", "max"]
    assert ["-add-fd", "fd=10,set=64", "-add-fd", "fd=11,set=65", "-add-fd", "fd=12,set=65"] \
        == argv[6:12]
    assert "if=pflash,unit=0,format=raw,readonly=on,file=/dev/fdset/64" in argv
    assert "if=pflash,unit=1,format=raw,file=/dev/fdset/65" in argv
    # No model given: virtio (decided in adminopts.DEFAULT_NIC_MODEL).
    assert any(a.startswith("virtio-net-pci,netdev=net0,") for a in argv)
    e1000 = adminopts.admin_argv(adminopts.parse_admin(["-net", "nic,model=e1000", "-net", "user"]),
                                 "web", [])
    assert any(a.startswith("e1000,netdev=net0,") for a in e1000)


# ---- a tree of this module's own -------------------------------------------------

class Rig:
    """A VM tree whose config and budget files the tests rewrite; its own
    cgroup helper stub (reading this tree's config), a sudoers drop-in for a
    group of this session, and a cgroup parent of this session's own."""

    def __init__(self, root: Path, group: str, cgname: str) -> None:
        self.root = root
        self.group = group
        self.cgname = cgname
        self.host = Host.__new__(Host)
        h = self.host
        h.root, h.vmdir, h.images, h.conf = root, root / "vms", root / "img", root / "k.conf"
        self.budgets = root / "budgets"
        self.helper = install_cgrouphelper(root, h.conf)
        self.conf()

    def conf(self, **extra: str) -> None:
        settings = {"vmdir": str(self.host.vmdir), "accel": "tcg", "stop_timeout": "5",
                    "budgets": str(self.budgets), "cgroup": "off", "cgroup_name": self.cgname,
                    "cgroup_helper": self.helper}
        settings.update(extra)
        self.host.conf.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        os.chmod(self.host.conf, 0o644)

    def budget(self, kind: str, name: str, **values: int) -> Path:
        d = self.budgets / kind
        d.mkdir(parents=True, exist_ok=True, mode=0o755)
        path = d / f"{name}.conf"
        path.write_text("".join(f"{k} = {v}\n" for k, v in values.items()))
        os.chmod(path, 0o644)
        return path

    def clear_budgets(self) -> None:
        shutil.rmtree(self.budgets, ignore_errors=True)

    def as_user(self, user: User, *argv: str) -> list[str]:
        # --init-groups: as sshd does (initgroups), so sudo sees the group.
        return ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups", "--",
                *argv]

    def run(self, user: User, command: str, timeout: float = 120,
            stdin: int | None = subprocess.DEVNULL, input: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.as_user(user, KVMSHELL, "--config", str(self.host.conf)),
                              env=user.env(SSH_ORIGINAL_COMMAND=command), capture_output=True,
                              text=True, timeout=timeout,
                              stdin=None if input is not None else stdin, input=input)

    def create(self, name: str, user: User, *admin: str, guest: Path | None = None) -> Path:
        return self.host.create_vm(name, user, *admin, guest=guest)

    def cgroup(self, ctl: str, uid: int, leaf: str = "") -> Path:
        from kvmshell.common import cgroups
        p = Path(cgroups.v1_mounts()[ctl]) / self.cgname / f"user-{uid}"
        return p / leaf if leaf else p


def _cleanup_cgroups(cgname: str) -> None:
    from kvmshell.common import cgroups
    for mount in set(cgroups.v1_mounts().values()):
        top = Path(mount) / cgname
        if not top.is_dir():
            continue
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            try:
                d.rmdir()
            except OSError:
                pass
        try:
            top.rmdir()
        except OSError:
            pass


def _v1() -> bool:
    from kvmshell.common import cgroups
    return all(c in cgroups.v1_mounts() for c in cgroups.CONTROLLERS)


# The kernel tests need cgroup v1's memory, cpu and pids hierarchies (this
# kind of host); on a host without them they cannot run at all.
needs_v1 = pytest.mark.skipif(not _v1(), reason="no cgroup v1 memory/cpu/pids hierarchies here")


@pytest.fixture(scope="module")
def rig(host: Host, alice: User, bob: User) -> Iterator[Rig]:
    tag = secrets.token_hex(3)
    group, cgname = f"kvtg{tag}", f"kvt{tag}"
    root = host.root / f"hw-{tag}"
    root.mkdir(mode=0o755)
    (root / "img").mkdir(mode=0o755)
    drop_in = Path(f"/etc/sudoers.d/kvmshell-hw-{tag}")
    subprocess.run(["groupadd", group], check=True)
    try:
        for u in (alice, bob):
            subprocess.run(["usermod", "-aG", group, u.name], check=True)
        r = Rig(root, group, cgname)
        # The shipped drop-in, naming this module's helper stub (which reads this tree's config).
        text = sudoers_text(tag, group).replace(CGROUPHELPER, r.helper)
        tmp = drop_in.with_name(f".{drop_in.name}.tmp")  # sudo skips names with '.'
        tmp.write_text(text)
        os.chmod(tmp, 0o440)
        subprocess.run(["visudo", "-cf", str(tmp)], check=True, capture_output=True)
        os.rename(tmp, drop_in)
        yield r
    finally:
        for u in (alice, bob):
            kill_all(u)
        time.sleep(0.5)
        drop_in.unlink(missing_ok=True)
        subprocess.run(["groupdel", group], capture_output=True)
        _cleanup_cgroups(cgname)


def _pid(r: subprocess.CompletedProcess[str]) -> int:
    assert r.returncode == 0, r.stderr
    m = re.search(r"\(pid (\d+)\)", r.stdout)
    assert m, r.stdout
    return int(m.group(1))


def _stop_all(*users: User) -> None:
    for u in users:
        kill_all(u)
    wait_for(lambda: all(u.qemu_pids() == [] for u in users), 30, "QEMU to exit")
    time.sleep(0.3)  # the supervisors' teardown


def _guest(rig: Rig, user: User, vm: str, command: str) -> str:
    """Run *command* in the guest's shell through the console verb (byte-stream mode)."""
    r = rig.run(user, f"console {vm} --no-replay --linger 2", timeout=90,
                input=f"\n{command}; echo DONE-$((40+2))\n")
    assert r.returncode == 0 and "DONE-42" in r.stdout, (r.stdout[-1000:], r.stderr)
    return r.stdout


# ---- hardware, on a real QEMU -------------------------------------------------------

def test_smp2_q35_guest_sees_two_cpus(rig: Rig, alice: User, guest: Path) -> None:
    path = rig.create("hwsmp", alice, "-m", "256", "-smp", "2", "-M", "q35", "-cpu", "max",
                      guest=guest)
    pid = _pid(rig.run(alice, f"start hwsmp {BOOT}"))
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert argv[argv.index(b"-machine") + 1] == b"q35"
        assert argv[argv.index(b"-smp") + 1] == b"2" and argv[argv.index(b"-cpu") + 1] == b"max"
        wait_for(lambda: MARKER in console_log(path), 180, "the guest's marker")
        out = _guest(rig, alice, "hwsmp", "echo CPUS=$(grep -c ^processor /proc/cpuinfo)")
        assert "CPUS=2" in out, out[-500:]
        # q35: the guest sits on a PCIe host bridge (ICH9), not the i440FX.
        out = _guest(rig, alice, "hwsmp", "cat /sys/bus/pci/devices/0000:00:00.0/device")
        assert "0x29c0" in out, out[-500:]
    finally:
        _stop_all(alice)


def test_kvmadm_refuses_smp_over_the_host_cap(rig: Rig, alice: User) -> None:
    rig.conf(max_smp="2")
    try:
        r = rig.host.kvmadm("create", "hwcap", "--owner", alice.name, "--", "-smp", "3",
                            check=False)
        assert r.returncode == 2 and "-smp: 3 CPUs is over this host's limit of 2 (max_smp)" \
            in r.stderr, r.stderr
        assert not os.path.lexists(rig.host.vmdir / "hwcap")
        rig.create("hwcap", alice, "-smp", "2")
        r = rig.host.kvmadm("set", "hwcap", "--", "-smp", "4", check=False)
        assert r.returncode == 2 and "max_smp" in r.stderr
        # A host whose cap went down refuses the start, naming the admin's fix.
        rig.conf(max_smp="1")
        r = rig.run(alice, "start hwcap")
        assert r.returncode == 1 and "-smp: 2 CPUs is over this host's limit of 1" in r.stderr
        assert "admin" in r.stderr and r.stderr.count("\n") == 1 and alice.qemu_pids() == []
    finally:
        rig.conf()


def test_cpu_host_refused_under_tcg(rig: Rig, alice: User) -> None:
    """-cpu host needs KVM: kvmadm refuses it on a TCG-only host, and a start
    where this user cannot use KVM is refused by kvmshell before QEMU runs."""
    r = rig.host.kvmadm("create", "hwhost", "--owner", alice.name, "--", "-cpu", "host",
                        check=False)
    assert r.returncode == 1 and "-cpu host" in r.stderr and "TCG only" in r.stderr, r.stderr
    rig.conf(accel="kvm tcg")
    try:
        rig.create("hwhost", alice, "-cpu", "host")
        # /dev/kvm is root's 0600 here: the user cannot use KVM.
        r = rig.run(alice, "start hwhost")
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert "-cpu host: the host CPU model needs KVM" in r.stderr and "/dev/kvm" in r.stderr
        rig.conf(accel="tcg")
        r = rig.run(alice, "start hwhost")
        assert r.returncode == 1 and "TCG only (accel = tcg)" in r.stderr, r.stderr
        assert alice.qemu_pids() == []
    finally:
        rig.conf()


def test_uefi_reaches_ovmf_and_boots_linux(rig: Rig, alice: User, guest: Path) -> None:
    path = rig.create("hwefi", alice, "-m", "256", "-M", "q35", "-firmware", "efi", guest=guest)
    nvram = path / "nvram.fd"
    assert not nvram.exists()
    pid = _pid(rig.run(alice, "start hwefi"))
    try:
        # No kernel, no disk: OVMF's boot manager on the serial console.
        wait_for(lambda: b"BdsDxe" in console_log(path), 120, "OVMF's serial output")
        st = nvram.stat()
        assert st.st_uid == alice.uid and st.st_mode & 0o777 == 0o600
        assert st.st_size == OVMF_VARS.stat().st_size
        fds = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert "/usr/share/OVMF/OVMF_CODE_4M.fd" in fds and str(nvram) in fds
        argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert b"OVMF" not in argv and b"nvram" not in argv   # descriptors, never paths
        r = rig.run(alice, "rm hwefi nvram.fd")
        assert r.returncode == 2 and "in use by a running VM" in r.stderr
        assert rig.run(alice, "kill hwefi").returncode == 0
        wait_for(lambda: alice.qemu_pids() == [], 30, "QEMU to exit")
        # The store is kept (OVMF wrote its boot entries), and a Linux kernel
        # boots through the firmware's EFI stub.
        written = nvram.read_bytes()
        assert written != OVMF_VARS.read_bytes()
        _pid(rig.run(alice, f"start hwefi {BOOT}"))
        wait_for(lambda: MARKER in console_log(path), 180, "the guest's marker")
        assert b"EFI stub" in console_log(path)
        assert rig.run(alice, "kill hwefi").returncode == 0
        wait_for(lambda: alice.qemu_pids() == [], 30, "QEMU to exit")
        # A store that is not the firmware's size: kvmshell's own message, naming the fix.
        with open(nvram, "r+b") as f:
            f.truncate(4096)
        r = rig.run(alice, "start hwefi")
        assert r.returncode == 1 and "nvram.fd has 4096 bytes" in r.stderr \
            and "rm nvram.fd" in r.stderr and r.stderr.count("\n") == 1, r.stderr
        # 'rm' while stopped resets the variables: the next start copies the template.
        assert rig.run(alice, "rm hwefi nvram.fd").returncode == 0
        _pid(rig.run(alice, "start hwefi -snapshot"))
        assert nvram.read_bytes() == OVMF_VARS.read_bytes()
        assert rig.run(alice, "kill hwefi").returncode == 0
        wait_for(lambda: alice.qemu_pids() == [], 30, "QEMU to exit")
        # A symlink in its place is never followed.
        nvram.unlink()
        os.symlink("/etc/shadow", nvram)
        os.lchown(nvram, alice.uid, alice.gid)
        r = rig.run(alice, "start hwefi")
        assert r.returncode == 1 and "cannot open nvram.fd" in r.stderr, r.stderr
        assert alice.qemu_pids() == [] and nvram.is_symlink()
    finally:
        _stop_all(alice)


def test_kvmadm_check_knows_uefi_and_cgroups(rig: Rig, alice: User) -> None:
    """kvmadm check (issue 19's readiness report) reads -firmware efi and the
    configured OVMF images, and says whether the kernel holds the budgets."""
    def checks() -> dict[str, dict[str, object]]:
        r = rig.host.kvmadm("check", "--json", check=False)
        return {c["id"]: c for c in json.loads(r.stdout)["checks"]}
    rig.create("hwchk", alice, "-M", "q35", "-firmware", "efi")
    try:
        c = checks()
        assert c["ovmf"]["status"] == "PASS" and "use UEFI" in str(c["ovmf"]["detail"]), c["ovmf"]
        rig.conf(uefi_code="/nonexistent/OVMF_CODE.fd")
        c = checks()
        assert c["ovmf"]["status"] == "FAIL" and "hwchk" in c["ovmf"]["items"], c["ovmf"]
        assert "none needed: cgroup = off" in str(c["cgroups"]["detail"])
        if _v1():
            rig.conf(cgroup="cgroupfs")
            c = checks()
            assert c["cgroups"]["status"] == "PASS"
            assert "held by the kernel (cgroupfs" in str(c["cgroups"]["detail"])
    finally:
        rig.conf()


# ---- budgets: kvmshell's early check, quota, kvmadm usage ---------------------------

def test_ram_budget_refuses_the_second_start(rig: Rig, alice: User) -> None:
    rig.conf(max_ram_mib="200")
    rig.create("ra", alice, "-m", "128")
    rig.create("rb", alice, "-m", "128")
    try:
        pid = _pid(rig.run(alice, "start ra"))
        before = rig.host.snapshot()
        r = rig.run(alice, "start rb")
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert ("kvmshell: VM rb: needs 128 MiB of RAM, your RAM budget (max_ram_mib = 200 MiB,"
                " default) has 72 MiB left (ra running)") in r.stderr, r.stderr
        assert alice.qemu_pids() == [pid]
        assert rig.host.snapshot() == before
        assert rig.run(alice, "status ra").stdout.startswith("ra: running")
    finally:
        _stop_all(alice)
        rig.conf()


def test_concurrent_starts_never_exceed_any_budget(rig: Rig, alice: User) -> None:
    """Ten starts at once; the budgets allow 128 MiB (four of these VMs) and
    6 vCPUs (three): exactly three run, each other start names a budget."""
    rig.conf(max_ram_mib="128", max_vcpus="6", max_smp="2")
    names = [f"c{i}" for i in range(10)]
    for n in names:
        rig.create(n, alice, "-m", "32", "-smp", "2")
    try:
        procs = [subprocess.Popen(rig.as_user(alice, KVMSHELL, "--config", str(rig.host.conf)),
                                  env=alice.env(SSH_ORIGINAL_COMMAND=f"start {n}"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  stdin=subprocess.DEVNULL) for n in names]
        results = [(p.wait(180), *p.communicate()) for p in procs]
        ok = [r for r in results if r[0] == 0]
        refused = [r for r in results if r[0] != 0]
        assert len(ok) == 3, results
        for code, _out, err in refused:
            assert code == 1 and ("max_vcpus = 6" in err or "max_ram_mib = 128" in err), err
        assert len(alice.qemu_pids()) == 3
        doc = json.loads(rig.run(alice, "quota --json").stdout)
        assert doc["budgets"]["vcpus"]["used"] == 6 and doc["budgets"]["ram_mib"]["used"] == 96
    finally:
        _stop_all(alice)
        rig.conf()


def test_user_file_beats_group_beats_default(rig: Rig, alice: User, bob: User) -> None:
    """Default 64 MiB; the session group grants 256; bob's own file says 128;
    a second group of alice's grants unlimited vCPUs over the group's 1."""
    extra = f"kvtx{secrets.token_hex(2)}"
    subprocess.run(["groupadd", extra], check=True)
    subprocess.run(["usermod", "-aG", extra, alice.name], check=True)
    rig.conf(max_ram_mib="64", max_vcpus="1", max_smp="2")
    rig.budget("groups", rig.group, max_ram_mib=256, max_vcpus=1)
    rig.budget("groups", extra, max_vcpus=0)
    rig.budget("users", bob.name, max_ram_mib=128)
    rig.create("oa", alice, "-m", "200", "-smp", "2")
    rig.create("ob", bob, "-m", "200")
    try:
        qa = json.loads(rig.run(alice, "quota --json").stdout)["budgets"]
        qb = json.loads(rig.run(bob, "quota --json").stdout)["budgets"]
        assert qa["ram_mib"]["limit"] == 256 and qa["ram_mib"]["source"] == f"group {rig.group}"
        assert qa["vcpus"]["limit"] is None and qa["vcpus"]["source"] == f"group {extra}"
        assert qb["ram_mib"]["limit"] == 128 and qb["ram_mib"]["source"] == f"user {bob.name}"
        assert qb["vcpus"]["limit"] == 1 and qb["vcpus"]["source"] == f"group {rig.group}"
        assert qa["running"]["source"] == "default" and qa["running"]["limit"] is None
        _pid(rig.run(alice, "start oa"))       # 200 MiB, 2 vCPUs: the groups' grant
        r = rig.run(bob, "start ob")           # 200 MiB over bob's own 128
        assert r.returncode == 1 and f"max_ram_mib = 128 MiB, user {bob.name}" in r.stderr, r.stderr
        # Without the files, the default (64 MiB) holds for both.
        _stop_all(alice)
        rig.clear_budgets()
        r = rig.run(alice, "start oa")
        assert r.returncode == 1 and "max_ram_mib = 64 MiB, default" in r.stderr, r.stderr
        # A budget file the user could have written is refused, never skipped.
        path = rig.budget("users", alice.name, max_ram_mib=4096)
        os.chown(path, alice.uid, alice.gid)
        r = rig.run(alice, "start oa")
        assert r.returncode == 1 and str(path) in r.stderr and "owned by root" in r.stderr
        assert alice.qemu_pids() == []
    finally:
        _stop_all(alice, bob)
        rig.clear_budgets()
        rig.conf()
        subprocess.run(["groupdel", extra], capture_output=True)


def test_quota_json_and_kvmadm_usage(rig: Rig, alice: User) -> None:
    rig.conf(max_running="3", max_ram_mib="1000", max_smp="2")
    path = rig.create("qa", alice, "-m", "128", "-smp", "2")
    rig.create("qb", alice, "-m", "64")
    img = path / "disk.img"
    img.write_bytes(os.urandom(300 << 10))
    os.chown(img, alice.uid, alice.gid)
    try:
        _pid(rig.run(alice, "start qa"))
        r = rig.run(alice, "quota --json")
        assert r.returncode == 0 and r.stdout.count("\n") == 1, r.stderr
        doc = json.loads(r.stdout)
        from kvmshell.shell import limits
        from kvmshell.common import config, vmtree
        cfg = config.load(str(rig.host.conf))
        disk = limits.image_bytes(vmtree.owned(cfg, alice.uid))
        assert disk >= 300 << 10
        assert doc["user"] == alice.name and doc["running"] == ["qa"]
        assert doc["budgets"] == {
            "running": {"used": 1, "limit": 3, "left": 2, "source": "default"},
            "ram_mib": {"used": 128, "limit": 1000, "left": 872, "source": "default"},
            "vcpus": {"used": 2, "limit": None, "left": None, "source": "default"},
            "image_bytes": {"used": disk, "limit": None, "left": None, "source": "default"}}
        assert doc["kernel"] == {"mode": "off", "group": None}
        text = rig.run(alice, "quota").stdout
        assert re.search(r"^ram_mib\s+128\s+1000\s+872\s+default$", text, re.M), text
        assert "running VMs: qa" in text
        r = rig.run(alice, "quota --xml")
        assert r.returncode == 2 and "--xml" in r.stderr
        r = rig.host.kvmadm("usage", "--json")
        mine = [d for d in json.loads(r.stdout) if d["user"] == alice.name]
        assert len(mine) == 1 and mine[0]["budgets"]["ram_mib"] == doc["budgets"]["ram_mib"]
        assert mine[0]["budgets"]["image_bytes"]["used"] == disk
        assert {"qa", "qb"} <= set(mine[0]["vms"])
        table = rig.host.kvmadm("usage").stdout
        assert re.search(rf"^{alice.name}\s+1/3\s+128/1000\s+2/-", table, re.M), table
    finally:
        _stop_all(alice)
        rig.conf()


# ---- the kernel's enforcement (cgroup v1 here) --------------------------------------

def _cg_of(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctls, path = line.split(":", 2)
        for c in ctls.split(","):
            out[c] = path
    return out


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@needs_v1
def test_helper_places_the_vm_with_the_budget(rig: Rig, alice: User) -> None:
    rig.conf(cgroup="cgroupfs", max_running="1", max_ram_mib="256", max_vcpus="1")
    rig.create("kp", alice, "-m", "128")
    try:
        pid = _pid(rig.run(alice, "start kp"))
        want = f"/{rig.cgname}/user-{alice.uid}/vm-kp"
        cg = _cg_of(pid)
        assert cg["memory"] == cg["cpu"] == cg["pids"] == want, cg
        sup = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert _cg_of(sup)["memory"] == want      # the supervisor is inside too
        mem = rig.cgroup("memory", alice.uid)
        assert int((mem / "memory.limit_in_bytes").read_text()) == (256 + 256) << 20
        cpu = rig.cgroup("cpu", alice.uid)
        assert int((cpu / "cpu.cfs_quota_us").read_text()) == 100_000
        assert int((rig.cgroup("pids", alice.uid) / "pids.max").read_text()) == 192
        for f in (mem / "cgroup.procs", mem / "memory.limit_in_bytes", mem.parent / "cgroup.procs"):
            st = f.stat()
            assert st.st_uid == 0 and not st.st_mode & 0o022     # root's, not the user's
        doc = json.loads(rig.run(alice, "quota --json").stdout)["kernel"]
        assert doc["mode"] == "cgroupfs" and doc["memory_limit_bytes"] == 512 << 20
        assert doc["cpu_quota_us"] == 100_000 and doc["pids_max"] == 192
        assert doc["group"] == f"{rig.cgname}/user-{alice.uid}"
        # The user cannot leave its group or lift a limit.
        for argv in (["sh", "-c", f"echo {pid} > {Path(cgroup_mount('memory')) / 'cgroup.procs'}"],
                     ["sh", "-c", f"echo -1 > {mem / 'memory.limit_in_bytes'}"]):
            r = subprocess.run(rig.as_user(alice, *argv), capture_output=True, text=True)
            assert r.returncode != 0 and "Permission denied" in r.stderr
        assert _cg_of(pid)["memory"] == want
        assert int((mem / "memory.limit_in_bytes").read_text()) == 512 << 20
    finally:
        _stop_all(alice)
        rig.conf()


def cgroup_mount(ctl: str) -> str:
    from kvmshell.common import cgroups
    return cgroups.v1_mounts()[ctl]


def _attach_script(rig: Rig, vm: str, stdin: str = "socket") -> str:
    """A small Python program of the user's: it asks the helper to attach it
    as kvmshell does (sudo, a socketpair it made on stdin), then execs its
    arguments (if any) inside the group."""
    return ("import os, socket, subprocess, sys\n"
            "a, b = socket.socketpair()\n"
            f"stdin = b.fileno() if {stdin!r} == 'socket' else subprocess.DEVNULL\n"
            f"r = subprocess.run(['/usr/bin/sudo', '-n', '--', {rig.helper!r}, 'attach', {vm!r}],"
            " stdin=stdin, env={'PATH': '/usr/bin:/bin'})\n"
            "b.close()\n"
            "if r.returncode or len(sys.argv) < 2: sys.exit(r.returncode)\n"
            "os.execvp(sys.argv[1], sys.argv[1:])\n")


def _attach(rig: Rig, user: User, vm: str, *argv: str,
            stdin: str = "socket") -> subprocess.CompletedProcess[str]:
    return subprocess.run(rig.as_user(user, "/usr/bin/python3", "-I", "-c",
                                      _attach_script(rig, vm, stdin), *argv),
                          env=user.env(), capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


@needs_v1
def test_helper_refuses(rig: Rig, alice: User, bob: User) -> None:
    rig.conf(cgroup="cgroupfs")
    rig.create("kr", bob, "-m", "64")
    rig.create("kq", alice, "-m", "64")
    try:
        r = _attach(rig, alice, "kr")
        assert r.returncode == 2 and "VM 'kr' is not yours" in r.stderr, r.stderr
        r = _attach(rig, alice, "../kq")
        assert r.returncode == 2 and "invalid VM name" in r.stderr
        r = _attach(rig, alice, "kq", stdin="devnull")
        assert r.returncode == 2 and "stdin must be a unix socket" in r.stderr
        for args in (["detach", "kq"], ["attach"], ["attach", "kq", "1"]):
            r = subprocess.run(rig.as_user(alice, "/usr/bin/sudo", "-n", "--", rig.helper, *args),
                               env=alice.env(), capture_output=True, text=True)
            assert r.returncode == 2 and r.stderr.startswith("kvmshell-cgrouphelper: "), r.stderr
        # Run directly (no sudo): not root.
        r = subprocess.run(rig.as_user(alice, rig.helper, "attach", "kq"), env=alice.env(),
                           capture_output=True, text=True)
        assert r.returncode != 0
        # A socket made by another uid (root's, here) is not the caller's.
        import socket
        a, b = socket.socketpair()
        try:
            r = subprocess.run([rig.helper, "attach", "kq"], stdin=b.fileno(), capture_output=True,
                               text=True, env={"PATH": "/usr/bin:/bin", "SUDO_UID": str(alice.uid)})
            assert r.returncode == 2 and "not made by the calling user" in r.stderr, r.stderr
        finally:
            a.close()
            b.close()
        # With cgroup = off the helper refuses rather than pretend.
        rig.conf(cgroup="off")
        r = _attach(rig, alice, "kq")
        assert r.returncode == 2 and "cgroup = off" in r.stderr
        # No process of the user's was moved by any of these.
        assert not rig.cgroup("memory", alice.uid, "vm-kq").exists() or \
            (rig.cgroup("memory", alice.uid, "vm-kq") / "cgroup.procs").read_text() == ""
    finally:
        rig.conf()


@needs_v1
def test_tampered_files_do_not_lift_kernel_limits(rig: Rig, alice: User) -> None:
    """The uid-level attacker deletes kvmshell's pid and lock files, then runs
    QEMU itself from inside its group (as a hijacked QEMU's code would be):
    the cgroup refuses the memory, and the CPU quota holds."""
    rig.conf(cgroup="cgroupfs", max_running="1", max_ram_mib="128", max_vcpus="1")
    path = rig.create("kt", alice, "-m", "128")
    try:
        pid = _pid(rig.run(alice, "start kt"))
        for leaf in ("qemu.pid", "lock"):
            subprocess.run(rig.as_user(alice, "rm", "-f", str(path / leaf)), check=True)
        # kvmshell is not fooled (its lock is on the directory: runstate.py) ...
        assert rig.run(alice, "status kt").stdout.startswith(f"kt: running (pid {pid}")
        # ... but the user's code can run QEMU itself: the kernel's limits hold.
        mem = rig.cgroup("memory", alice.uid)
        limit = int((mem / "memory.limit_in_bytes").read_text())
        assert limit == (128 + 256) << 20
        # QEMU by hand, 1 GiB preallocated: more than the group may hold.
        r = _attach(rig, alice, "kt", "/usr/bin/qemu-system-x86_64", "-nodefaults", "-display",
                    "none", "-S", "-accel", "tcg", "-m", "1024", "-mem-prealloc")
        assert r.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL, 137), (r.returncode, r.stderr)
        assert int((mem / "memory.max_usage_in_bytes").read_text()) <= limit
        assert int((mem / "memory.failcnt").read_text()) > 0
        # Two busy loops from inside the group: together at most one CPU (max_vcpus = 1).
        cpu = rig.cgroup("cpu", alice.uid)
        throttled = int(dict(l.split() for l in (cpu / "cpu.stat").read_text().splitlines())
                        ["nr_throttled"])
        spin = "import os; os.fork(); t = __import__('time').time() + 6\nwhile __import__('time').time() < t: pass"
        p = subprocess.Popen(rig.as_user(alice, "/usr/bin/python3", "-I", "-c",
                                         _attach_script(rig, "kt"), "/usr/bin/python3", "-c", spin),
                             env=alice.env(), stdin=subprocess.DEVNULL)
        time.sleep(1.5)
        spinners = _procs_in(rig.cgroup("cpu", alice.uid, "vm-kt"), exclude={pid})
        assert len(spinners) >= 2, spinners
        t0, c0 = time.monotonic(), sum(_cpu_seconds(s) for s in spinners)
        time.sleep(3)
        used = (sum(_cpu_seconds(s) for s in spinners) - c0) / (time.monotonic() - t0)
        p.wait(30)
        stat = dict(l.split() for l in (cpu / "cpu.stat").read_text().splitlines())
        assert used <= 1.15, used
        if used > 0.9:
            # They reached the quota (the machine's other load allowing): the
            # kernel throttled them there.
            assert int(stat["nr_throttled"]) > throttled, stat
        # The VM kvmshell started is untouched by either.
        assert os.path.exists(f"/proc/{pid}")
    finally:
        _stop_all(alice)
        rig.conf()


def _procs_in(group: Path, exclude: set[int]) -> list[int]:
    return [int(p) for p in (group / "cgroup.procs").read_text().split() if int(p) not in exclude]


# Windows per state: the machine's other load (CI is alone on it; a developer's
# machine may not be) moves single windows, the median of five much less.
ROUNDS = 5


@needs_v1
def test_host_stays_usable_with_two_users_busy(rig: Rig, alice: User, bob: User,
                                               guest: Path) -> None:
    """Two users, each a 2-vCPU TCG guest spinning on both of its vCPUs,
    and a busy root process: with the guests in their groups, the root
    process gets about as much CPU as all the guests together (the groups
    above them weigh as one process), where without the groups it gets about
    a quarter (four busy vCPU threads against one).  Measured as the root
    process's CPU time over the guests' in the same windows, so the machine's
    other load weighs on both alike; the windows alternate with the guests
    moved out of their groups (the control) and frozen (the root process's
    CPU alone, printed)."""
    rig.conf(cgroup="cgroupfs", max_smp="2", max_vcpus="2")
    vms = {alice.name: "busy0", bob.name: "busy1"}
    paths = {u.name: rig.create(vms[u.name], u, "-m", "128", "-smp", "2", guest=guest)
             for u in (alice, bob)}
    cpu_root = Path(cgroup_mount("cpu"))
    try:
        pids = [_pid(rig.run(u, f"start {vms[u.name]} {BOOT}")) for u in (alice, bob)]
        groups = {p: cpu_root / _cg_of(p)["cpu"].lstrip("/") for p in pids}
        for u in (alice, bob):
            wait_for(lambda: MARKER in console_log(paths[u.name]), 240, "the guest's marker")
            _guest(rig, u, vms[u.name], "(while :; do :; done &) ; (while :; do :; done &)")
        spinner = subprocess.Popen(["/usr/bin/python3", "-c", "while True: pass"])
        root: dict[str, list[float]] = {"in groups": [], "no groups": [], "frozen": []}
        share: dict[str, list[float]] = {"in groups": [], "no groups": []}
        try:
            time.sleep(1)
            for _ in range(ROUNDS):
                for state in root:
                    for p in pids:
                        os.kill(p, signal.SIGSTOP if state == "frozen" else signal.SIGCONT)
                        dest = groups[p] if state == "in groups" else cpu_root
                        (dest / "cgroup.procs").write_text(str(p))
                    time.sleep(0.5)
                    t0, c0 = time.monotonic(), _cpu_seconds(spinner.pid)
                    g0 = sum(_cpu_seconds(p) for p in pids)
                    time.sleep(2.5)
                    spun = _cpu_seconds(spinner.pid) - c0
                    root[state].append(spun / (time.monotonic() - t0))
                    if state in share:
                        share[state].append(spun / max(sum(_cpu_seconds(p) for p in pids) - g0,
                                                       0.01))
        finally:
            spinner.kill()
            spinner.wait()
            for p in pids:
                (groups[p] / "cgroup.procs").write_text(str(p))
                os.kill(p, signal.SIGCONT)
        med = {k: sorted(v)[ROUNDS // 2] for k, v in {**root, **{f"share {k}": v for k, v in
                                                        share.items()}}.items()}
        print(f"root process CPU: {med['in groups']:.2f} with both users' busy guests in their "
              f"groups ({med['share in groups']:.2f}x the guests' CPU), {med['no groups']:.2f} "
              f"with them outside any group ({med['share no groups']:.2f}x), {med['frozen']:.2f} "
              f"with them frozen (medians of {ROUNDS} windows)")
        assert med["share in groups"] >= 1.5 * med["share no groups"], (root, share)
        assert med["share in groups"] >= 0.35, (root, share)
    finally:
        _stop_all(alice, bob)
        rig.conf()


# ---- systemd hosts: the slice drop-ins ------------------------------------------------

def test_slice_dropins_verify(rig: Rig, alice: User, bob: User, tmp_path: Path) -> None:
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze is missing (Makefile APT_TEST installs systemd)")
    rig.conf(max_running="2", max_ram_mib="2048", max_vcpus="4")
    rig.budget("users", bob.name, max_ram_mib=0, max_vcpus=0)
    try:
        rig.create("sa", alice)
        rig.create("sb", bob)
        r = rig.host.kvmadm("slices", "--dir", str(tmp_path))
        owned = {u: budgets.owned_count(_cfg(rig), u) for u in (alice.uid, bob.uid)}
        a = (tmp_path / f"user-{alice.uid}.slice.d" / "50-kvmshell.conf").read_text()
        slots = min(2, owned[alice.uid])
        assert f"MemoryMax={2048 + 256 * slots}M\n" in a and "CPUQuota=400%\n" in a
        assert f"TasksMax={192 * slots}\n" in a and "CPUWeight=100\n" in a
        b = (tmp_path / f"user-{bob.uid}.slice.d" / "50-kvmshell.conf").read_text()
        assert "MemoryMax" not in b and "CPUQuota" not in b and "TasksMax=" in b
        for uid in (alice.uid, bob.uid):
            v = subprocess.run(["systemd-analyze", "verify", f"user-{uid}.slice"],
                               env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"},
                               capture_output=True, text=True, cwd=tmp_path)
            assert v.returncode == 0 and v.stdout == "" and v.stderr == "", (v.stdout, v.stderr)
        # The check is real: a broken drop-in is reported.
        bad = tmp_path / "user-4242424.slice.d"
        bad.mkdir()
        (bad / "50-kvmshell.conf").write_text("[Slice]\nMemoryMaxx=1G\nCPUQuota=lots\n")
        v = subprocess.run(["systemd-analyze", "verify", "user-4242424.slice"],
                           env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"},
                           capture_output=True, text=True, cwd=tmp_path)
        assert "MemoryMaxx" in v.stderr and "CPU quota" in v.stderr, v.stderr
        # A user who no longer owns a VM loses the drop-in kvmadm wrote (and only that).
        rig.host.kvmadm("remove", "sb", "--purge")
        if budgets.owned_count(_cfg(rig), bob.uid) == 0:
            r = rig.host.kvmadm("slices", "--dir", str(tmp_path))
            assert not (tmp_path / f"user-{bob.uid}.slice.d" / "50-kvmshell.conf").exists()
            assert (bad / "50-kvmshell.conf").exists()
            assert "removed" in r.stdout
    finally:
        rig.clear_budgets()
        rig.conf()


def _cfg(rig: Rig) -> "object":
    from kvmshell.common import config
    return config.load(str(rig.host.conf))


_FULL_STDERR = r"""
import fcntl, os, subprocess, sys
r, w = os.pipe()
os.set_blocking(w, False)
try:
    while True:
        os.write(w, b"x" * 4096)
except BlockingIOError:
    pass
os.set_blocking(w, True)
p = subprocess.Popen(["/usr/bin/sudo", "-n", "--", *sys.argv[1:]], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=w)
os.close(w)
print(p.pid, flush=True)
print(p.wait(), flush=True)
"""


@pytest.mark.security
def test_helper_does_not_hang_on_a_full_stderr(rig: Rig, alice: User) -> None:
    """The caller owns the helper's stderr: a pipe it filled and never reads
    must not park a root process for ever (each would be a root Python the
    user's process limits do not count).  The helper gives up after its
    deadline (cgrouphelper.DEADLINE seconds)."""
    from kvmshell.privileged import nethelper
    p = subprocess.Popen(rig.as_user(alice, "/usr/bin/python3", "-I", "-c", _FULL_STDERR,
                                     rig.helper, "detach", "kq"),
                         env=alice.env(), stdout=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL)
    assert p.stdout is not None
    sudo_pid = int(p.stdout.readline())
    deadline = time.monotonic() + getattr(nethelper, "DEADLINE", 45) + 30
    try:
        while os.path.exists(f"/proc/{sudo_pid}") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not os.path.exists(f"/proc/{sudo_pid}"), "the root helper still hangs"
        assert p.stdout.readline().strip() not in ("", "0")
    finally:
        if os.path.exists(f"/proc/{sudo_pid}"):
            # Before the fix: the root helper sits in write(2); end it (sudo
            # may have exec'd it in place, or waits for it as its child).
            children = Path(f"/proc/{sudo_pid}/task/{sudo_pid}/children").read_text().split()
            for pid in [int(c) for c in children] or [sudo_pid]:
                os.kill(pid, signal.SIGKILL)
        p.wait(timeout=30)
