"""Host readiness: KVM for VM users, the accelerator in status, kvmadm check.

No test here boots a guest under KVM (KVM guests hang on this machine):
the two that configure ``accel = kvm tcg`` first make sure the test user
cannot open /dev/kvm (the rig runs users with their groups cleared, so a
device of mode 0666 is the only way in) and skip otherwise.  /dev/kvm is
never changed: where a test needs a /dev/kvm of another group it binds a
stand-in over it in a private mount namespace.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import secrets
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import (KVMADM, KVMSHELL, REPO, Host, User, _drop_user, _make_user, config_place,
                      install_nethelper, kill_all)
from sshrig import CARELESS_MAIN, dropin_text, free_port
from kvmshell.admin import check
from kvmshell.common import config
from kvmshell.common.errors import ConfigError

pytestmark = pytest.mark.core

START = "start acc -kernel vmlinuz -initrd initrd.img -append console=ttyS0"


# ---- the accelerator: start, status, list ------------------------------------------

def kvm_reason(user: User) -> str:
    """Why *user*, run as the rig runs it, cannot open /dev/kvm; skips the
    test if it can (the VM would then boot under KVM)."""
    probe = ("import errno, os\n"
             "try:\n    os.close(os.open('/dev/kvm', os.O_RDWR))\n"
             "except OSError as e:\n    print(errno.errorcode[e.errno])\n"
             "else:\n    print('OPEN')\n")
    r = subprocess.run(user.argv("/usr/bin/python3", "-I", "-c", probe), env=user.env(),
                       capture_output=True, text=True, check=True)
    code = r.stdout.strip()
    if code == "OPEN":
        pytest.skip("the test user can open /dev/kvm: the guest would boot under KVM")
    return {"ENOENT": "no /dev/kvm", "EACCES": "/dev/kvm: permission denied",
            "EPERM": "/dev/kvm: operation not permitted"}[code]


@pytest.fixture(scope="module")
def carol(host: Host) -> Iterator[User]:
    """A user of this module's own (other modules count alice's VMs)."""
    name = _make_user("c")
    try:
        yield User(name, host)
    finally:
        _drop_user(name)


@pytest.fixture(scope="module")
def acc_vm(host: Host, carol: User, guest: Path) -> Path:
    return host.create_vm("acc", carol, "-m", "128", guest=guest)


def _accels(pid: int) -> list[bytes]:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return [argv[i + 1] for i, a in enumerate(argv) if a == b"-accel"]


def test_start_says_it_fell_back_and_status_reports_tcg(host: Host, carol: User,
                                                         acc_vm: Path) -> None:
    reason = kvm_reason(carol)
    host.write_conf(accel="kvm tcg")
    try:
        r = carol.ssh_command(START)
        assert r.returncode == 0, r.stderr
        assert r.stderr == (f"kvmshell: acc: accel kvm unavailable ({reason}): running under "
                            "tcg, which is much slower (admin: kvmadm check)\n")
        doc = carol.status("acc")
        assert doc["state"] == "running" and doc["accel"] == "tcg"
        pid = doc["pid"]
        assert isinstance(pid, int)
        # kvmshell decided before QEMU ran: QEMU was not even asked for kvm.
        assert [a.split(b",")[0] for a in _accels(pid)] == [b"tcg"]
        r = carol.ssh_command("status acc")
        assert r.stdout == f"acc: running (pid {pid}, tcg)\n"
        r = carol.ssh_command("list")
        assert f"(pid {pid}, tcg)" in r.stdout
        assert carol.ssh_command("kill acc").returncode == 0
        assert carol.status("acc") == {"name": "acc", "state": "stopped", "pid": None,
                                       "accel": None, "started": None, "autostart": False}
    finally:
        kill_all(carol)
        host.write_conf()
    # TCG first: nothing to say.
    r = carol.ssh_command(START)
    try:
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert carol.status("acc")["accel"] == "tcg"
    finally:
        carol.ssh_command("kill acc")
        kill_all(carol)


def test_accel_fallback_no_refuses_and_leaves_nothing(host: Host, carol: User,
                                                      acc_vm: Path) -> None:
    reason = kvm_reason(carol)
    host.write_conf(accel="kvm tcg", accel_fallback="no")
    try:
        before = host.snapshot()
        r = carol.ssh_command(START)
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr == (f"kvmshell: VM acc: accel kvm unavailable ({reason}) and "
                            "accel_fallback = no: not started (admin: kvmadm check)\n")
        assert carol.qemu_pids() == []
        assert host.snapshot() == before
        # accel = kvm alone, fallback allowed: nothing else to fall back to.
        host.write_conf(accel="kvm")
        r = carol.ssh_command(START)
        assert r.returncode == 1 and "accel names nothing else" in r.stderr
        assert carol.qemu_pids() == [] and host.snapshot() == before
    finally:
        kill_all(carol)
        host.write_conf()


def test_status_does_not_wait_for_a_busy_monitor(host: Host, carol: User,
                                                 acc_vm: Path) -> None:
    """QMP serves one client at a time: while another holds it (a long
    'save', say), status still answers within its 2 s, without the accel."""
    import socket
    import time
    r = carol.ssh_command(START)
    try:
        assert r.returncode == 0, r.stderr
        holder = socket.socket(socket.AF_UNIX)
        holder.connect(str(acc_vm / "qmp.sock"))
        try:
            assert b"QMP" in holder.recv(4096)      # QEMU is serving this client
            t = time.monotonic()
            doc = carol.status("acc")
            assert time.monotonic() - t < 10
            assert doc["state"] == "running" and doc["accel"] is None
        finally:
            holder.close()
        assert carol.status("acc")["accel"] == "tcg"
    finally:
        carol.ssh_command("kill acc")
        kill_all(carol)


def test_switches_are_yes_or_no(tmp_path: Path) -> None:
    conf = tmp_path / "k.conf"
    for key in ("accel_fallback", "adduser_kvm"):
        conf.write_text(f"{key} = maybe\n")
        with pytest.raises(ConfigError, match=key):
            config.load(str(conf), require_root=False)
    conf.write_text("accel_fallback = no\nadduser_kvm = no\n")
    cfg = config.load(str(conf), require_root=False)
    assert cfg.accel_fallback is False and cfg.adduser_kvm is False
    shipped = config.load(str(REPO / "kvmshell.conf"), require_root=False)
    assert shipped.accel_fallback is True and shipped.adduser_kvm is True


# ---- a staged host: its own tree, group, and sshd/sudo/PAM files -----------------------

class Stage:
    """A host of the test's own: a config, a VM tree, a VM users' group,
    and a sysconfdir holding the shipped sshd, sudoers and PAM files
    (paths and group rewritten), as `make install` would lay them out."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="kvmshell-check-", dir=config_place()))
        os.chmod(self.root, 0o755)
        self.group = f"kvt{secrets.token_hex(3)}g"
        subprocess.run(["groupadd", self.group], check=True)
        self.users: list[str] = []
        self.host = Host(self.root)
        self.keys = self.root / "keys"
        self.keys.mkdir(mode=0o755)
        self.etc = self.root / "etc"
        self.helper = install_nethelper(self.root, self.host.conf)
        self.write_conf()
        self._stage_etc()

    def write_conf(self, **extra: str) -> None:
        settings = {"group": self.group, "shell": KVMSHELL, "authorized_keys": str(self.keys),
                    "accel": "kvm tcg", "helper": self.helper}
        settings.update(extra)
        self.host.write_conf(**settings)

    def _stage_etc(self) -> None:
        ssh = self.etc / "ssh"
        (ssh / "sshd_config.d").mkdir(parents=True)
        self.dropin = ssh / "sshd_config.d" / "kvmshell.conf"
        self.dropin.write_text(dropin_text(f"{KVMSHELL} --config {self.host.conf}",
                                           str(self.keys), self.group))
        (ssh / "sshd_config").write_text(
            f"Include {ssh}/sshd_config.d/*.conf\n"
            + CARELESS_MAIN.format(port=free_port(), rig=ssh, loglevel="INFO"))
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(ssh / "host_ed25519_key")], check=True)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        (self.etc / "sudoers.d").mkdir()
        self.sudoers = self.etc / "sudoers.d" / "kvmshell"
        text = (REPO / "sudoers.d" / "kvmshell").read_text()
        text = text.replace("/usr/local/libexec/kvmshell/kvmshell-nethelper", self.helper)
        self.sudoers.write_text(text.replace("%kvmusers", f"%{self.group}"))
        os.chmod(self.sudoers, 0o440)
        (self.etc / "pam.d").mkdir()
        pam = (REPO / "pam" / "kvmshell").read_text().replace("kvmusers", self.group)
        (self.etc / "pam.d" / "kvmshell").write_text(pam)
        for leaf in os.listdir("/etc/pam.d"):
            if leaf.startswith("common-"):
                shutil.copy(f"/etc/pam.d/{leaf}", self.etc / "pam.d" / leaf)
        (self.etc / "shells").write_text(f"/bin/sh\n{KVMSHELL}\n")
        for dirpath, _, _ in os.walk(self.root):
            os.chmod(dirpath, 0o755)

    def adduser(self, *args: str, ns: "KvmNamespace | None" = None
                ) -> subprocess.CompletedProcess[str]:
        name = f"kvt{secrets.token_hex(3)}r"
        self.users.append(name)
        argv = [KVMADM, "--config", str(self.host.conf), "adduser", name, *args]
        r = (ns.run(argv) if ns else
             subprocess.run(argv, capture_output=True, text=True, timeout=60))
        assert r.returncode == 0, r.stderr
        return r

    def check(self, *args: str, ns: "KvmNamespace | None" = None
              ) -> tuple[int, dict[str, dict[str, object]]]:
        argv = [KVMADM, "--config", str(self.host.conf), "check", "--json",
                "--sysconfdir", str(self.etc), *args]
        r = ns.run(argv) if ns else subprocess.run(argv, capture_output=True, text=True,
                                                   timeout=120)
        assert r.stderr == "", r.stderr
        doc = json.loads(r.stdout)
        assert [c["id"] for c in doc["checks"]] == [ident for ident, _, _ in check.CHECKS]
        assert doc["summary"]["FAIL"] == sum(c["status"] == "FAIL" for c in doc["checks"])
        return r.returncode, {c["id"]: c for c in doc["checks"]}

    def close(self) -> None:
        for name in self.users:
            _drop_user(name)
        subprocess.run(["groupdel", self.group], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


class KvmNamespace:
    """Runs commands in a private mount namespace whose /dev/kvm is a
    stand-in: a node of group *group*, mode 0660, with the null device's
    numbers (only its owner, group and mode matter; opening it is harmless).
    The host's /dev/kvm is untouched."""

    def __init__(self, root: Path, group: str) -> None:
        self.dir = root / "ns-dev"
        self.dir.mkdir(mode=0o755)
        self.group = group

    def run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        d = shlex.quote(str(self.dir))
        # A tmpfs of the namespace's own: device nodes work there whatever
        # the options of the file system under the test's directory.
        script = (f"set -e; mount -t tmpfs -o mode=755 kvt {d}; "
                  f"mknod -m 660 {d}/kvm c 1 3; chgrp {shlex.quote(self.group)} {d}/kvm; "
                  f"mount --bind {d}/kvm /dev/kvm; exec {shlex.join(argv)}")
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               script], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def stage() -> Iterator[Stage]:
    s = Stage()
    try:
        yield s
    finally:
        s.close()


def _groups(name: str) -> set[str]:
    """The user's supplementary groups (useradd also gives it its own)."""
    pw = pwd.getpwnam(name)
    return {grp.getgrgid(g).gr_name for g in os.getgrouplist(name, pw.pw_gid) if g != pw.pw_gid}


# ---- adduser and /dev/kvm's group --------------------------------------------------------

def test_adduser_joins_the_group_of_dev_kvm(stage: Stage) -> None:
    """On this machine's own /dev/kvm: the user joins its group, whatever it
    is called; where it is root-only (as here) adduser and check say so and
    name the fix, and the user is not put in group root."""
    r = stage.adduser()
    name = stage.users[-1]
    assert f"created VM user {name}" in r.stdout
    try:
        st = os.stat("/dev/kvm")
    except FileNotFoundError:
        assert "no /dev/kvm" in r.stderr and _groups(name) == {stage.group}
        return
    if st.st_gid != 0:
        kvm_group = grp.getgrgid(st.st_gid).gr_name
        assert name in grp.getgrnam(kvm_group).gr_mem
        assert _groups(name) == {stage.group, kvm_group}
        assert f"member of {kvm_group}" in r.stdout
        return
    assert r.stderr.startswith("kvmadm: warning: /dev/kvm is root-only (root:root ")
    assert r.stderr.count("\n") == 1 and "chgrp kvm /dev/kvm; chmod 0660 /dev/kvm" in r.stderr
    assert _groups(name) == {stage.group}          # never group root
    _, checks = stage.check()
    if st.st_mode & 0o006 != 0o006:
        kvm_group_check = checks["kvm-group"]
        assert kvm_group_check["status"] == "WARN"
        assert str(kvm_group_check["detail"]).startswith("root-only (root:root ")
        assert "chgrp kvm /dev/kvm; chmod 0660 /dev/kvm" in str(kvm_group_check["fix"])
        users = checks["kvm-users"]
        assert users["status"] == "WARN" and name in users["items"]  # type: ignore[operator]
        assert f"{name} (/dev/kvm: permission denied)" in str(users["detail"])
    # accel_fallback = no makes the same findings FAILs: starts would be refused.
    stage.write_conf(accel_fallback="no")
    try:
        code, checks = stage.check()
        assert code == 1 and checks["kvm-group"]["status"] == "FAIL"
    finally:
        stage.write_conf()


def test_adduser_with_a_kvm_group_and_the_switches(stage: Stage) -> None:
    """With /dev/kvm owned by a group (a stand-in in a private namespace):
    adduser puts the user in it; --no-kvm and adduser_kvm = no leave it
    out; check names exactly the VM users who cannot open it."""
    kvm_group = f"kvt{secrets.token_hex(3)}k"
    subprocess.run(["groupadd", kvm_group], check=True)
    try:
        ns = KvmNamespace(stage.root, kvm_group)
        r = stage.adduser(ns=ns)
        joined = stage.users[-1]
        assert f"{joined} may open /dev/kvm: member of {kvm_group}" in r.stdout
        assert r.stderr == ""
        r = stage.adduser("--no-kvm", ns=ns)
        flag = stage.users[-1]
        assert "(--no-kvm)" in r.stdout
        stage.write_conf(adduser_kvm="no")
        try:
            r = stage.adduser(ns=ns)
            setting = stage.users[-1]
            assert "adduser_kvm = no" in r.stdout
        finally:
            stage.write_conf()
        assert grp.getgrnam(kvm_group).gr_mem == [joined]
        assert _groups(joined) == {stage.group, kvm_group}
        assert _groups(flag) == _groups(setting) == {stage.group}
        # check covers existing users: each is tried as it would log in.
        _, checks = stage.check(ns=ns)
        assert checks["kvm-group"]["status"] == "PASS"
        assert f"members of {kvm_group}" in str(checks["kvm-group"]["detail"])
        users = checks["kvm-users"]
        members = {n for n in stage.users if stage.group in _groups(n)}
        assert users["status"] == "WARN"
        assert set(users["items"]) == members - {joined}  # type: ignore[arg-type]
        assert f"usermod -aG {kvm_group} USER" in str(users["fix"])
    finally:
        subprocess.run(["groupdel", kvm_group], capture_output=True)


# ---- kvmadm check: healthy, then each breakage in turn --------------------------------------

@pytest.fixture(scope="module")
def staged_vm(stage: Stage) -> Path:
    if not stage.users:
        stage.adduser()
    owner = User(stage.users[0], stage.host)
    return stage.host.create_vm("chk", owner, "-m", "128")


def test_check_on_a_healthy_install(stage: Stage, staged_vm: Path) -> None:
    code, checks = stage.check()
    failed = {k: v for k, v in checks.items() if v["status"] == "FAIL"}
    assert code == 0 and not failed, failed
    for c in checks.values():
        assert c["status"] in ("PASS", "WARN")
        assert (c["fix"] is None) == (c["status"] == "PASS"), c
    assert checks["sshd"]["status"] == "PASS" and checks["sudoers"]["status"] == "PASS"
    assert "members of" in str(checks["sshd-match"]["detail"])
    assert "1 VMs" in str(checks["tree"]["detail"])
    # The text form: one line per check, then the count.
    r = subprocess.run([KVMADM, "--config", str(stage.host.conf), "check", "--sysconfdir",
                        str(stage.etc)], capture_output=True, text=True, timeout=120)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == len(check.CHECKS) + 1
    for line, (_, title, _) in zip(lines, check.CHECKS):
        assert line.split("  ", 1)[0] in ("PASS", "WARN") and f"  {title}: " in line
        assert ("; fix: " in line) == line.startswith("WARN")
    assert lines[-1].startswith("kvmadm check: ") and lines[-1].endswith(" 0 FAIL")


# A breakage: (the check that must FAIL, text its fix must hold, how to undo it).
Undo = tuple[str, str, Callable[[], None]]
Breakage = Callable[["Stage", Path], Undo]


def _top_writable(stage: Stage, vm: Path) -> Undo:
    top = stage.host.vmdir
    os.chmod(top, 0o777)
    return "tree", f"chmod 755 {top}", lambda: os.chmod(top, 0o755)


def _dropin_removed(stage: Stage, vm: Path) -> Undo:
    aside = stage.root / "dropin.aside"
    stage.dropin.rename(aside)
    return "sshd", "make install", lambda: aside.rename(stage.dropin)


def _sudoers_broken(stage: Stage, vm: Path) -> Undo:
    good = stage.sudoers.read_text()
    os.chmod(stage.sudoers, 0o640)
    stage.sudoers.write_text(good + "%kvmusers ALL=(root NOPASSWD: this is not sudoers\n")
    os.chmod(stage.sudoers, 0o440)

    def restore() -> None:
        os.chmod(stage.sudoers, 0o640)
        stage.sudoers.write_text(good)
        os.chmod(stage.sudoers, 0o440)
    return "sudoers", "fix the line it names", restore


def _helper_missing(stage: Stage, vm: Path) -> Undo:
    os.unlink(stage.helper)
    return "helper", "make install", lambda: install_nethelper(stage.root, stage.host.conf)


def _vm_dir_mode(stage: Stage, vm: Path) -> Undo:
    os.chmod(vm, 0o755)
    return "tree", f"chmod 700 {vm}", lambda: os.chmod(vm, 0o700)


@pytest.mark.parametrize("breakage", [_top_writable, _dropin_removed, _sudoers_broken,
                                      _helper_missing, _vm_dir_mode],
                         ids=["top-dir-writable", "sshd-dropin-removed", "sudoers-broken",
                              "helper-missing", "vm-dir-mode"])
def test_check_fails_each_breakage_with_its_fix(stage: Stage, staged_vm: Path,
                                                breakage: Breakage) -> None:
    ident, fix, restore = breakage(stage, staged_vm)
    try:
        code, checks = stage.check()
        got = checks[ident]
        assert code == 1 and got["status"] == "FAIL", got
        assert fix in str(got["fix"]), got
        if ident == "tree":   # the broken entry is named
            path = fix.split()[-1]
            assert any(str(i).startswith(path + " is ") for i in got["items"]), got  # type: ignore[attr-defined]
        if ident == "sudoers":
            assert "visudo -c" in str(got["detail"]) and "syntax error" in str(got["detail"])
        others = [k for k, v in checks.items() if v["status"] == "FAIL" and k != ident]
        assert set(others) <= {"sshd-match"}, others   # the match fails with its drop-in
    finally:
        restore()
    code, checks = stage.check()
    assert code == 0 and checks[ident]["status"] != "FAIL"


def test_check_refuses_unknown_arguments(stage: Stage) -> None:
    for bad in (["--yaml"], ["--sysconfdir"], ["--sysconfdir", "etc"]):
        r = subprocess.run([KVMADM, "--config", str(stage.host.conf), "check", *bad],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith(f"kvmadm: {bad[0]}: unexpected argument")


# ---- the install runs it; the README's commands need no sudo ---------------------------------

def test_install_and_demo_end_with_check() -> None:
    for target in ("install", "demo"):
        r = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(REPO), target,
                            "PREFIX=/nonexistent"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        cmds = [line for line in r.stdout.splitlines() if line.strip()]
        assert cmds[-1].split()[:2] == ["/nonexistent/sbin/kvmadm", "check"], cmds[-3:]
    readme = (REPO / "README.md").read_text()
    two = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    commands = [line.strip() for line in two.splitlines() if line.startswith("    ")]
    assert [c.split("#")[0].strip() for c in commands] == ["make demo", "make test"]
