"""``kvmadm check``: is this host ready for kvmshell?  Modelled on libvirt's
``virt-host-validate``.

    kvmadm [--config PATH] check [--json] [--sysconfdir DIR]

Run by root (``make install`` and ``make demo`` end with it).  One line per
check, ``PASS``, ``WARN`` or ``FAIL``, with the fix after every WARN and
FAIL; a last line counts them.  Exit status 1 if any check FAILs, else 0.

What the words mean:

  FAIL  kvmshell cannot work as configured on this host, or a piece root
        owns or runs is not safe (users could change what root runs, or
        the VM tree).
  WARN  it works, but worse than it should: VMs under TCG instead of KVM,
        no syslog for the helper's audit trail, taps impossible.
  PASS  nothing to fix, including "not used here".

A KVM finding is a WARN while ``accel_fallback = yes`` lets VMs fall back
to TCG, and a FAIL when kvm is the first accelerator and
``accel_fallback = no`` (every start would be refused).

The checks are the table :data:`CHECKS` (id, title, function), run in its
order; each function looks at one thing and returns one :class:`Result`.
Nothing here changes the host: files are only stat'ed (never opened inside
a VM directory, which its user controls), ``/dev/kvm`` is opened by a child
that has become each VM user, and ``sshd -t``/``-T``, ``visudo -c``,
``sudo -l`` and ``qemu -version`` (only once the binary is known to be
root's) are run to read their verdicts.

``--sysconfdir DIR`` (default ``/etc``) takes sshd's, sudo's and PAM's
files from DIR instead: ``DIR/ssh/sshd_config`` (and the drop-in
``DIR/ssh/sshd_config.d/kvmshell.conf``), ``DIR/sudoers.d/kvmshell`` (and
the web front door's ``DIR/sudoers.d/kvmshell-web``),
``DIR/pam.d/kvmshell`` and ``DIR/shells``, to check a staged copy.

``--json`` prints one object::

    {"checks": [{"id": "kvm-device", "title": "/dev/kvm",
                 "status": "PASS" | "WARN" | "FAIL",
                 "detail": "...", "fix": "..." | null,
                 "items": ["what exactly is broken", ...]}, ...],
     "summary": {"PASS": 15, "WARN": 3, "FAIL": 0}}
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import subprocess
from collections.abc import Callable

from kvmshell.common.config import Config
from kvmshell.common.errors import KvmshellError, UsageError
from kvmshell.common.kvmdev import KVM_DEVICE

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
TUN_DEVICE = "/dev/net/tun"
SYSLOG_SOCKET = "/dev/log"
KVM_GET_API_VERSION = 0xAE00   # _IO(KVMIO, 0x00), linux/kvm.h
KVM_API_VERSION = 12
QEMU_TESTED = (7, 2)
# Debian's ovmf package: the 4 MiB code image and its variables template.
PAM_MODULE_DIRS = ("/lib/x86_64-linux-gnu/security", "/usr/lib/x86_64-linux-gnu/security",
                   "/lib/aarch64-linux-gnu/security", "/usr/lib/aarch64-linux-gnu/security",
                   "/lib/security", "/usr/lib/security")
TOOL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


class Result:
    """One check's verdict: *status* (PASS/WARN/FAIL), *detail* (one line),
    *fix* (one line, for WARN and FAIL), *items* (each broken thing)."""

    def __init__(self, status: str, detail: str, fix: str | None = None,
                 items: list[str] | None = None) -> None:
        self.status = status
        self.detail = detail
        self.fix = fix if status != PASS else None
        self.items = items or []


class Host:
    """What the checks look at: the config, where sshd/sudo/PAM keep their
    files, and the VM users and VMs (computed once)."""

    def __init__(self, cfg: Config, sysconfdir: str = "/etc") -> None:
        self.cfg = cfg
        self.etc = sysconfdir.rstrip("/") or "/"
        self.sshd_config = os.path.join(self.etc, "ssh", "sshd_config")
        self.sshd_dropin = os.path.join(self.etc, "ssh", "sshd_config.d", "kvmshell.conf")
        self.sudoers = os.path.join(self.etc, "sudoers.d", "kvmshell")
        self.sudoers_web = os.path.join(self.etc, "sudoers.d", "kvmshell-web")
        self.pam = os.path.join(self.etc, "pam.d", "kvmshell")
        self.shells = os.path.join(self.etc, "shells")
        self._vms: list[tuple[str, str, int, list[str] | None]] | None = None

    @property
    def kvm_used(self) -> bool:
        return "kvm" in self.cfg.accel

    @property
    def kvm_bad(self) -> str:
        """The status of a KVM finding (see the module docstring)."""
        return FAIL if self.cfg.accel[0] == "kvm" and not self.cfg.accel_fallback else WARN

    def members(self) -> list[pwd.struct_passwd]:
        """The members of the VM users' group (supplementary or primary)."""
        try:
            g = grp.getgrnam(self.cfg.group)
        except KeyError:
            return []
        out = {}
        for name in g.gr_mem:
            try:
                out[name] = pwd.getpwnam(name)
            except KeyError:
                continue
        for pw in pwd.getpwall():
            if pw.pw_gid == g.gr_gid:
                out[pw.pw_name] = pw
        return [pw for _, pw in sorted(out.items()) if pw.pw_uid != 0]

    def vm_users(self) -> list[pwd.struct_passwd]:
        """The VM users: the group's members and every VM's owner."""
        out = {pw.pw_uid: pw for pw in self.members()}
        for _, _, uid, _ in self.vms():
            if uid not in out and uid != 0:
                try:
                    out[uid] = pwd.getpwuid(uid)
                except KeyError:
                    continue
        return sorted(out.values(), key=lambda pw: pw.pw_name)

    def vms(self) -> list[tuple[str, str, int, list[str] | None]]:
        """(name, directory, owner uid, admin words or None if they do not
        decode) of every VM the top directory links; lstat only."""
        if self._vms is None:
            from kvmshell.common import vmid
            self._vms = []
            try:
                entries = sorted(os.scandir(self.cfg.vmdir), key=lambda e: e.name)
            except OSError:
                entries = []
            for e in entries:
                if not e.is_symlink() or e.name.startswith("."):
                    continue
                target = os.readlink(e.path)
                try:
                    st = os.lstat(os.path.join(self.cfg.vmdir, target))
                except OSError:
                    continue
                try:
                    _, words = vmid.decode(target)
                    got: list[str] | None = words
                except Exception:  # any malformed name: the tree check names it
                    got = None
                self._vms.append((e.name, target, st.st_uid, got))
        return self._vms


# ---- helpers ------------------------------------------------------------------

def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _mode_text(st: os.stat_result) -> str:
    from kvmshell.admin.users import mode_text
    return mode_text(st)


def _writable_by_others(st: os.stat_result) -> bool:
    """Could someone but root change this entry (or, for a directory, its
    names)?  Sticky directories (/tmp) only let users touch their own."""
    if st.st_uid != 0:
        return True
    if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX:
        return False
    return bool(st.st_mode & 0o002 or (st.st_mode & 0o020 and st.st_gid != 0))


def _root_path_problems(path: str) -> list[str]:
    """What lets a user change *path* or a directory above it ([] if nothing)."""
    out = []
    p = os.path.abspath(path)
    while True:
        try:
            st = os.lstat(p)
        except OSError as exc:
            out.append(f"{p}: {exc.strerror}")
            break
        if _writable_by_others(st):
            out.append(f"{p} is {_mode_text(st)}")
        if p == "/":
            break
        p = os.path.dirname(p)
    return out


def _run(argv: list[str], timeout: float = 30) -> tuple[int, str]:
    """Run a tool (as root, clean environment); (exit status, its output)."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL, env={"PATH": TOOL_PATH, "LC_ALL": "C"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, str(exc)
    return r.returncode, (r.stderr.strip() + "\n" + r.stdout.strip()).strip()


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "no output")


def _which(tool: str) -> str | None:
    import shutil
    return shutil.which(tool, path=TOOL_PATH)


OPEN_AS_SECONDS = 5     # how long a child dropped to a VM user may take to open /dev/kvm


def _open_as(pw: pwd.struct_passwd) -> str | None:
    """Try /dev/kvm as *pw* would after logging in (its groups from the
    group database): None if it opens, else the reason."""
    from kvmshell.common import kvmdev
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child becomes the user; it runs nothing but open()
        code = 1
        try:
            os.close(rfd)
            os.initgroups(pw.pw_name, pw.pw_gid)
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            os.write(wfd, (kvmdev.open_error() or "").encode())
            code = 0
        finally:
            os._exit(code)
    os.close(wfd)
    # Why a deadline: once the child runs as the user, the user's code may
    # signal it (SIGSTOP) and would hold root's check for ever.
    import select
    import signal
    import time
    chunks = []
    deadline = time.monotonic() + OPEN_AS_SECONDS
    answered = False
    try:
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([rfd], [], [], left)[0]:
                break
            chunk = os.read(rfd, 4096)
            if not chunk:
                answered = True
                break
            chunks.append(chunk)
    finally:
        os.close(rfd)
        if not answered:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    if not answered:
        return f"could not be tried (no answer in {OPEN_AS_SECONDS} s as the user)"
    if status != 0:
        return "could not be tried (dropping to the user failed)"
    return b"".join(chunks).decode("utf-8", "replace") or None


# ---- the checks: one function each ----------------------------------------------------

def _no_kvm_fix() -> str:
    return ("enable VT-x/AMD-V in the firmware and load the module (modprobe kvm_intel, or "
            "kvm_amd); if this host is itself a VM, enable nested virtualization on its host; "
            "or accept TCG (accel = tcg)")


def check_kvm_device(h: Host) -> Result:
    """/dev/kvm is there and answers as KVM (KVM_GET_API_VERSION)."""
    if not h.kvm_used:
        return Result(PASS, f"not used (accel = {' '.join(h.cfg.accel)})")
    import fcntl
    try:
        st = os.stat(KVM_DEVICE)
    except FileNotFoundError:
        return Result(h.kvm_bad, f"no {KVM_DEVICE}: every VM runs under TCG", _no_kvm_fix())
    if not stat.S_ISCHR(st.st_mode):
        return Result(h.kvm_bad, f"{KVM_DEVICE} is not a character device", _no_kvm_fix())
    try:
        fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
        try:
            version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
        finally:
            os.close(fd)
    except OSError as exc:
        return Result(h.kvm_bad, f"{KVM_DEVICE} does not answer as KVM: {exc.strerror}",
                      _no_kvm_fix())
    if version != KVM_API_VERSION:
        return Result(h.kvm_bad, f"{KVM_DEVICE}: KVM API version {version}, QEMU needs "
                      f"{KVM_API_VERSION}", "use the distribution's kernel")
    return Result(PASS, f"character device {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}, "
                  f"KVM API version {version}")


def check_kvm_group(h: Host) -> Result:
    """/dev/kvm belongs to a group that may read and write it."""
    from kvmshell.admin import users
    if not h.kvm_used:
        return Result(PASS, "not used")
    try:
        st = os.stat(KVM_DEVICE)
    except OSError:
        return Result(PASS, f"not applicable: no {KVM_DEVICE} (see above)")
    mode = stat.S_IMODE(st.st_mode)
    name, why = users.kvm_group()
    if st.st_gid == 0:
        if mode & 0o006 == 0o006:
            return Result(PASS, f"{_mode_text(st)}: every local user may open it")
        return Result(h.kvm_bad, f"root-only ({_mode_text(st)}): no VM user "
                      "can be given KVM, so every VM runs under TCG", users.kvm_group_fix())
    if mode & 0o060 != 0o060:
        return Result(h.kvm_bad, f"group {name} may not read and write it ({_mode_text(st)})",
                      f"chmod 0660 {KVM_DEVICE} (at boot: udev's rule, "
                      "/lib/udev/rules.d/50-udev-default.rules)")
    return Result(PASS, f"{_mode_text(st)}: VM users get KVM as members of {name}")


def check_kvm_users(h: Host) -> Result:
    """Each VM user (member of the group or owner of a VM) can open /dev/kvm."""
    from kvmshell.admin import users
    if not h.kvm_used:
        return Result(PASS, "not used")
    if not os.path.exists(KVM_DEVICE):
        return Result(PASS, f"not applicable: no {KVM_DEVICE} (see above)")
    everyone = h.vm_users()
    if not everyone:
        return Result(PASS, "no VM users yet")
    denied = [(pw.pw_name, why) for pw in everyone if (why := _open_as(pw))]
    if not denied:
        return Result(PASS, f"all {len(everyone)} VM users can open {KVM_DEVICE}")
    name, _ = users.kvm_group()
    if name:
        fix = (f"usermod -aG {name} USER for each (kvmadm adduser does it for new users; "
               "it takes effect at their next login)")
    else:
        fix = "give /dev/kvm a group first: " + users.kvm_group_fix()
    listed = ", ".join(f"{user} ({why})" for user, why in denied)
    return Result(h.kvm_bad, f"{len(denied)} of {len(everyone)} VM users cannot open "
                  f"{KVM_DEVICE}, their VMs run under TCG: {listed}", fix,
                  [user for user, _ in denied])


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def check_cpu_flags(h: Host) -> Result:
    """The CPU offers hardware virtualization (vmx or svm in /proc/cpuinfo)."""
    flags = _cpu_flags()
    if "vmx" in flags:
        return Result(PASS, "vmx (Intel VT-x)")
    if "svm" in flags:
        return Result(PASS, "svm (AMD-V)")
    if not h.kvm_used:
        return Result(PASS, "none, and not needed (accel = tcg)")
    if check_kvm_device(h).status == PASS:
        return Result(PASS, "no vmx/svm flag shown, but /dev/kvm answers (the hypervisor "
                      "under this host provides KVM)")
    if "hypervisor" in flags:
        return Result(h.kvm_bad, "no vmx/svm flag: this host is a VM whose host does not pass "
                      "virtualization on", "enable nested virtualization on the host that runs "
                      "this machine (e.g. kvm_intel nested=1, and CPU model host-passthrough)")
    return Result(h.kvm_bad, "no vmx/svm flag: hardware virtualization is off or absent",
                  "enable VT-x/AMD-V (SVM) in the firmware settings")


def check_nested(h: Host) -> Result:
    """Whether guests may run KVM themselves (kvm_intel/kvm_amd 'nested')."""
    for mod in ("kvm_intel", "kvm_amd"):
        try:
            with open(f"/sys/module/{mod}/parameters/nested", encoding="ascii") as f:
                value = f.read().strip()
        except OSError:
            continue
        if value in ("Y", "1"):
            return Result(PASS, f"on ({mod} nested={value}): guests may run KVM themselves")
        return Result(PASS, f"off ({mod} nested={value}): guests cannot run KVM themselves "
                      f"(to allow it: options {mod} nested=1 in /etc/modprobe.d/, then "
                      f"reload {mod})")
    return Result(PASS, "not applicable: neither kvm_intel nor kvm_amd is loaded")


def check_qemu(h: Host) -> Result:
    """The configured QEMU is root's, runs, and is 7.2 or later."""
    import re
    path = h.cfg.qemu
    if not os.path.exists(path):
        return Result(FAIL, f"{path} is missing: no VM can start",
                      f"apt-get install qemu-system-x86 (or set qemu in {h.cfg.path})")
    if not os.access(path, os.X_OK) or not stat.S_ISREG(os.stat(path).st_mode):
        return Result(FAIL, f"{path} is not an executable file", f"set qemu in {h.cfg.path}")
    unsafe = _root_path_problems(path)
    if unsafe:
        # Why before running it: this check runs it as root.
        return Result(FAIL, f"{path} could be replaced by a user: {'; '.join(unsafe)} "
                      "(not run)", "chown root:root and chmod go-w each of them", unsafe)
    code, out = _run([path, "-version"], timeout=20)
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", out)
    if code != 0 or not m:
        return Result(FAIL, f"{path} -version failed: {_first_line(out)}",
                      "apt-get install --reinstall qemu-system-x86")
    version = ".".join(g for g in m.groups() if g is not None)
    if (int(m.group(1)), int(m.group(2))) < QEMU_TESTED:
        return Result(WARN, f"QEMU {version} ({path}): kvmshell maps its options to QEMU "
                      f"{QEMU_TESTED[0]}.{QEMU_TESTED[1]} and is tested with it",
                      f"install QEMU {QEMU_TESTED[0]}.{QEMU_TESTED[1]} or later")
    return Result(PASS, f"QEMU {version} ({path})")


def _taps(h: Host) -> list[str]:
    from kvmshell.common import adminopts
    out = []
    for name, _, _, words in h.vms():
        try:
            if words is not None and adminopts.parse_admin(words).taps:
                out.append(name)
        except UsageError:
            continue
    return out


def check_tun(h: Host) -> Result:
    """/dev/net/tun exists (the root helper makes taps with it)."""
    try:
        st = os.stat(TUN_DEVICE)
    except OSError:
        users_of = _taps(h)
        status = FAIL if users_of else WARN
        detail = f"no {TUN_DEVICE}: VMs with -net tap cannot start"
        if users_of:
            detail += f" ({', '.join(users_of)} have one)"
        return Result(status, detail, "modprobe tun (in a container: its host must pass "
                      f"{TUN_DEVICE} in)", users_of)
    if not stat.S_ISCHR(st.st_mode):
        return Result(FAIL, f"{TUN_DEVICE} is not a character device", "modprobe tun")
    return Result(PASS, f"character device ({_mode_text(st)}; only the root helper opens it)")


def check_group(h: Host) -> Result:
    """The VM users' group exists."""
    try:
        g = grp.getgrnam(h.cfg.group)
    except KeyError:
        return Result(FAIL, f"group {h.cfg.group} does not exist: the sshd and sudoers "
                      "drop-ins match no one", f"groupadd --system {h.cfg.group} "
                      "(make install does)")
    return Result(PASS, f"{h.cfg.group} (gid {g.gr_gid}), {len(h.members())} members")


def check_shell(h: Host) -> Result:
    """kvmshell, the VM users' login shell, is installed, root's, and in /etc/shells."""
    path = h.cfg.shell
    if not os.path.exists(path) or not os.access(path, os.X_OK):
        return Result(FAIL, f"{path} is missing or not executable: VM users cannot log in",
                      "make install (or set shell in the config)")
    unsafe = _root_path_problems(path)
    if unsafe:
        return Result(FAIL, f"{path} could be replaced by a user: {'; '.join(unsafe)}",
                      "chown root:root and chmod go-w each of them", unsafe)
    try:
        with open(h.shells, encoding="utf-8", errors="replace") as f:
            listed = path in (line.strip() for line in f)
    except OSError:
        listed = False
    if not listed:
        return Result(WARN, f"{path} is not in {h.shells}: chsh, and services that check "
                      "it, refuse the VM users' shell", f"echo {path} >> {h.shells} "
                      "(make install does)")
    return Result(PASS, f"{path}, listed in {h.shells}")


def check_config(h: Host) -> Result:
    """kvmshell would take this config (only from /etc/kvmshell/, below root's
    directories: the VM user's own code may pick kvmshell's argv)."""
    from kvmshell.common import config
    from kvmshell.common.errors import RefusedFile
    try:
        config.check_place(h.cfg.path)
    except RefusedFile as exc:
        return Result(FAIL, f"kvmshell refuses it: {exc.message}",
                      f"move it to {config.DEFAULT_PATH} (and the ForceCommand line's --config)")
    return Result(PASS, f"{h.cfg.path}, in a place kvmshell takes a config from")


def check_helper(h: Host) -> Result:
    """The network helper sudo runs as root is installed and only root's."""
    path = h.cfg.helper
    if not os.path.lexists(path):
        return Result(FAIL, f"{path} is missing: VMs with -net tap cannot start",
                      "make install (installs it)")
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o100:
        return Result(FAIL, f"{path} is not an executable file ({_mode_text(st)})",
                      "make install (installs it)")
    unsafe = _root_path_problems(path)
    if unsafe:
        return Result(FAIL, f"root runs {path} for users, and a user could change it: "
                      f"{'; '.join(unsafe)}", "chown root:root and chmod go-w each of them",
                      unsafe)
    return Result(PASS, f"{path} ({_mode_text(st)})")


def check_sudoers(h: Host) -> Result:
    """The sudoers drop-in parses (visudo -c) and lets the group run the helper."""
    path = h.sudoers
    visudo = _which("visudo")
    if visudo is None:
        return Result(FAIL, "sudo is not installed: kvmshell cannot run the network helper",
                      "apt-get install sudo")
    try:
        st = os.lstat(path)
    except OSError:
        return Result(FAIL, f"{path} is missing: VMs with -net tap cannot start",
                      "make install (installs it)")
    if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        return Result(FAIL, f"{path} is {_mode_text(st)}: sudo ignores it, and users must not "
                      "write it", f"chown root:root {path}; chmod 0440 {path}")
    code, out = _run([visudo, "-c", "-f", path])
    if code != 0:
        return Result(FAIL, f"visudo -c -f {path}: {_first_line(out)}",
                      "fix the line it names, or reinstall it (make install); a broken "
                      "drop-in may stop all of sudo")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read(1 << 20)
    words = text.split()
    if h.cfg.helper not in words and f"{h.cfg.helper}," not in words:
        return Result(FAIL, f"{path} does not name the helper {h.cfg.helper}",
                      "make install (writes the path it installs to)")
    if f"%{h.cfg.group}" not in words:
        return Result(FAIL, f"{path} grants nothing to group {h.cfg.group}",
                      f"name %{h.cfg.group} in it, as the shipped sudoers.d/kvmshell does")
    if h.etc == "/etc":
        code, out = _run([visudo, "-c"])
        if code != 0:
            return Result(FAIL, f"visudo -c (all of sudo's files): {_first_line(out)}",
                          "fix the file it names")
        sudo = _which("sudo")
        member = next(iter(h.members()), None)
        if sudo and member is not None:
            code, out = _run([sudo, "-n", "-l", "-U", member.pw_name, h.cfg.helper])
            if code != 0:
                return Result(FAIL, f"sudo does not let {member.pw_name} run {h.cfg.helper}",
                              "check that /etc/sudoers reads /etc/sudoers.d (@includedir)")
    return Result(PASS, f"visudo -c passes; %{h.cfg.group} may run {h.cfg.helper}")


def check_web(h: Host) -> Result:
    """The web front door, if installed (it is optional): its sudoers
    drop-in parses and names the config's login helper, kvmshell and web
    user; the web user exists and is no VM user; the helper is root's."""
    from kvmshell.common.errors import ConfigError
    path = h.sudoers_web
    if not os.path.lexists(path):
        return Result(PASS, f"not installed ({path} is absent)")
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        return Result(FAIL, f"{path} is {_mode_text(st)}: sudo ignores it, and users must not "
                      "write it", f"chown root:root {path}; chmod 0440 {path}")
    try:
        w = h.cfg.web
    except ConfigError as exc:
        return Result(FAIL, exc.message, "fix the web_* setting it names in the config")
    visudo = _which("visudo")
    if visudo is not None:
        code, out = _run([visudo, "-c", "-f", path])
        if code != 0:
            return Result(FAIL, f"visudo -c -f {path}: {_first_line(out)}",
                          "fix the line it names, or reinstall it (make install)")
    with open(path, encoding="utf-8", errors="replace") as f:
        words = f.read(1 << 20).split()
    missing = [p for p in (w.pamhelper, w.kvmshell, w.user) if p not in words]
    if missing or f"ALL=(%{h.cfg.group})" not in words:
        return Result(FAIL, f"{path} does not name {', '.join(missing) or '%' + h.cfg.group} "
                      "as the config does (web_pamhelper, web_kvmshell, web_user, group)",
                      "make install (writes the paths it installs to), or fix the config")
    try:
        pw = pwd.getpwnam(w.user)
    except KeyError:
        return Result(FAIL, f"web_user {w.user} does not exist", "make install (creates it)")
    if pw.pw_uid == 0 or any(m.pw_uid == pw.pw_uid for m in h.members()):
        return Result(FAIL, f"web_user {w.user} is root or a VM user: the web server must be "
                      "a user of its own", f"web_user = kvmweb, or remove {w.user} from "
                      f"{h.cfg.group}")
    if not os.path.lexists(w.pamhelper):
        return Result(FAIL, f"{w.pamhelper} is missing: nobody can log in on the web",
                      "make install (installs it)")
    unsafe = _root_path_problems(w.pamhelper)
    if unsafe:
        return Result(FAIL, f"root runs {w.pamhelper} for the web server, and a user could "
                      f"change it: {'; '.join(unsafe)}",
                      "chown root:root and chmod go-w each of them", unsafe)
    state = ("on for " + " ".join(w.origins)) if w.origins else \
        "off until web_origins is set (README: the web front door)"
    return Result(PASS, f"installed, {state}; {w.user} may run {w.pamhelper} as root and "
                  f"{w.kvmshell} as %{h.cfg.group}")


def _sshd_includes(h: Host) -> bool:
    """Does the main sshd_config's Include reach the drop-in?  Relative
    patterns are relative to /etc/ssh (sshd_config(5))."""
    import fnmatch
    try:
        with open(h.sshd_config, encoding="utf-8", errors="replace") as f:
            lines = f.read(1 << 20).splitlines()
    except OSError:
        return False
    for line in lines:
        words = line.split()
        if len(words) >= 2 and words[0].lower() == "include":
            for pattern in words[1:]:
                if not pattern.startswith("/"):
                    pattern = os.path.join(h.etc, "ssh", pattern)
                if fnmatch.fnmatch(h.sshd_dropin, pattern):
                    return True
    return False


def check_sshd(h: Host) -> Result:
    """The sshd drop-in is there, included, root's, and sshd -t passes."""
    sshd = _which("sshd")
    if sshd is None:
        return Result(WARN, "openssh-server is not installed: no SSH front door (local "
                      "logins and su still work)", "apt-get install openssh-server")
    path = h.sshd_dropin
    try:
        st = os.lstat(path)
    except OSError:
        return Result(FAIL, f"{path} is missing: VM users' SSH sessions are not confined to "
                      "kvmshell", "make install (installs it), then systemctl reload ssh")
    if not stat.S_ISREG(st.st_mode) or _writable_by_others(st):
        return Result(FAIL, f"{path} is {_mode_text(st)}", f"chown root:root {path}; "
                      f"chmod 0644 {path}")
    if not _sshd_includes(h):
        return Result(FAIL, f"{h.sshd_config} does not include {path}",
                      f"add 'Include {os.path.dirname(path)}/*.conf' as its first line "
                      "(Debian's default)")
    code, out = _run([sshd, "-t", "-f", h.sshd_config])
    if code != 0:
        return Result(FAIL, f"sshd -t: {_first_line(out)}", "fix what sshd names (no host keys: "
                      "ssh-keygen -A; no /run/sshd: mkdir -p /run/sshd)")
    return Result(PASS, f"{path}; sshd -t passes")


def check_sshd_match(h: Host) -> Result:
    """sshd applies the drop-in's Match block to every member of the group
    (sshd -T -C user=...): ForceCommand kvmshell, root's key files, no forwarding."""
    sshd = _which("sshd")
    if sshd is None:
        return Result(PASS, "not applicable: no sshd")
    members = h.members()
    if not members:
        return Result(PASS, f"no member of {h.cfg.group} to try it with yet")
    want_keys = f"{h.cfg.authorized_keys}/%u"
    bad = []
    force = ""
    for pw in members:
        code, out = _run([sshd, "-T", "-f", h.sshd_config, "-C",
                          f"user={pw.pw_name},host=localhost,addr=127.0.0.1"])
        if code != 0:
            bad.append(f"{pw.pw_name} (sshd -T: {_first_line(out)})")
            continue
        eff: dict[str, str] = {}
        for line in out.splitlines():
            key, _, value = line.partition(" ")
            eff.setdefault(key, value.strip())
        force = eff.get("forcecommand", "none")
        prog = force.split()[0] if force.split() else ""
        if prog != h.cfg.shell and os.path.basename(prog) != "kvmshell":
            bad.append(f"{pw.pw_name} (forcecommand {force})")
        elif eff.get("authorizedkeysfile") != want_keys:
            bad.append(f"{pw.pw_name} (authorizedkeysfile {eff.get('authorizedkeysfile')})")
        elif eff.get("disableforwarding") != "yes":
            bad.append(f"{pw.pw_name} (disableforwarding {eff.get('disableforwarding')})")
    if bad:
        return Result(FAIL, f"the drop-in does not apply to: {', '.join(bad)}",
                      f"the drop-in's Match must be 'Match Group {h.cfg.group}', and nothing "
                      "read before it may set these keywords (sshd keeps the first value); "
                      "see docs/ssh.md", [b.split()[0] for b in bad])
    return Result(PASS, f"all {len(members)} members of {h.cfg.group} get ForceCommand "
                  f"{force} and the drop-in's settings")


def _pam_module(name: str) -> bool:
    if name.startswith("/"):
        return os.path.exists(name)
    return any(os.path.exists(os.path.join(d, name)) for d in PAM_MODULE_DIRS)


def check_pam(h: Host) -> Result:
    """The PAM service is root's, its modules and includes exist, and it
    admits the VM users' group."""
    import re
    path = h.pam
    try:
        st = os.lstat(path)
    except OSError:
        return Result(FAIL, f"{path} is missing: kvmshell cannot check passwords",
                      "make install (installs it)")
    if not stat.S_ISREG(st.st_mode) or _writable_by_others(st):
        return Result(FAIL, f"{path} is {_mode_text(st)}",
                      f"chown root:root {path}; chmod 0644 {path}")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read(1 << 20)
    missing = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if words[0] == "@include":
            if len(words) < 2 or not os.path.exists(os.path.join(h.etc, "pam.d", words[1])):
                missing.append(" ".join(words))
            continue
        rest = " ".join(words[1:])
        if rest.startswith("["):       # [value=action ...] control
            rest = rest.partition("]")[2]
        else:
            rest = rest.partition(" ")[2]
        module = rest.split()[0] if rest.split() else ""
        if not module or not _pam_module(module):
            missing.append(module or line.strip())
    if missing:
        return Result(FAIL, f"{path} names what is not installed: {', '.join(missing)}",
                      "apt-get install libpam-modules libpam-runtime", missing)
    groups = re.findall(r"\bingroup\s+(\S+)", text)
    if groups and any(g != h.cfg.group for g in groups):
        return Result(FAIL, f"{path} admits group {', '.join(sorted(set(groups)))}, but the VM "
                      f"users' group is {h.cfg.group}", f"name {h.cfg.group} in its "
                      "'ingroup' lines")
    return Result(PASS, f"{path}: its modules are installed")


def check_tree(h: Host) -> Result:
    """The VM tree: a root-owned top directory users cannot change; each
    VM a root-owned link to a 0700 directory of its user; every broken
    entry named."""
    from kvmshell.common import adminopts
    from kvmshell.common import vmid
    top = h.cfg.vmdir
    if not os.path.lexists(top):
        return Result(PASS, f"{top} does not exist yet (kvmadm create makes it)")
    broken: list[tuple[str, str]] = []   # (what, the fix)
    st = os.lstat(top)
    if not stat.S_ISDIR(st.st_mode):
        return Result(FAIL, f"{top} is not a directory", f"rm {top}; kvmadm create makes it")
    if st.st_uid != 0 or st.st_mode & 0o022:
        broken.append((f"{top} is {_mode_text(st)}: users could rename VMs",
                       f"chown root:root {top}; chmod 755 {top}"))
    for p in _root_path_problems(os.path.dirname(top)):
        broken.append((f"{p}: above the VM tree", "chown root:root and chmod go-w it"))
    count = 0
    for e in sorted(os.scandir(top), key=lambda e: e.name):
        path, est = e.path, os.lstat(e.path)
        if e.name.startswith("."):
            if e.name == ".removed" and (est.st_uid != 0 or est.st_mode & 0o077):
                broken.append((f"{path} is {_mode_text(est)}", f"chown root:root {path}; "
                               f"chmod 700 {path}"))
            continue
        if stat.S_ISLNK(est.st_mode):
            count += 1
            target = os.readlink(path)
            if est.st_uid != 0:
                broken.append((f"{path} is owned by {_user(est.st_uid)}",
                               f"chown -h root:root {path}"))
            if "/" in target:
                broken.append((f"{path} -> {target} is not a sibling", f"kvmadm remove {e.name}"))
            elif not os.path.lexists(os.path.join(top, target)):
                broken.append((f"{path} -> {target} is missing", f"kvmadm remove {e.name}"))
            continue
        if not stat.S_ISDIR(est.st_mode):
            continue                     # a stray file is harmless: nothing reads it
        try:
            name, words = vmid.decode(e.name)
        except Exception:  # any malformed name
            broken.append((f"{path} is not a VM directory name", f"move {path} out of {top}"))
            continue
        user = _user(est.st_uid)
        if est.st_uid == 0:
            broken.append((f"{path} is owned by root", f"chown OWNER {path}"))
        elif user == str(est.st_uid):
            broken.append((f"{path} is owned by uid {user}, no such user",
                           f"chown OWNER {path} (or kvmadm remove {name})"))
        if stat.S_IMODE(est.st_mode) != 0o700:
            broken.append((f"{path} is {_mode_text(est)}, not 0700", f"chmod 700 {path}"))
        # Nothing inside the directory is looked at: what the user keeps
        # there is the user's (the VM lock is on the directory itself).
        try:
            adminopts.parse_admin(words)
        except UsageError as exc:
            broken.append((f"{path}: its options are refused: {exc.message}",
                           f"kvmadm set {name} -- OPTIONS"))
    if broken:
        fixes = list(dict.fromkeys(fix for _, fix in broken))
        return Result(FAIL, f"{len(broken)} broken: " + "; ".join(w for w, _ in broken),
                      "; ".join(fixes), [w for w, _ in broken])
    return Result(PASS, f"{top} ({_mode_text(st)}), {count} VMs, each a 0700 directory "
                  "of its user")


def check_owner_view(h: Host) -> Result:
    """TOP/.owners, the per-owner view users' commands find their VMs by
    (admin/ownerview.py): fresh, or each user's list reads the whole tree
    (correct, but its cost grows with the host)."""
    from kvmshell.admin import ownerview
    from kvmshell.common import vmtree
    from kvmshell.common.errors import TreeError
    top = h.cfg.vmdir
    if not os.path.lexists(top):
        return Result(PASS, f"{top} does not exist yet")
    try:
        why = ownerview.stale(h.cfg)
    except TreeError:
        return Result(PASS, "not used while the tree is broken (see the VM tree check)")
    view = os.path.join(top, vmtree.OWNERS)
    if why:
        return Result(WARN, f"{view}: {why}: users' commands read the whole tree meanwhile",
                      "kvmadm refresh")
    return Result(PASS, f"{view} holds what the tree holds")


def check_image_dirs(h: Host) -> Result:
    """The image_dirs exist and no user can write them (users read images there)."""
    if not h.cfg.image_dirs:
        return Result(PASS, "none configured (image_dirs)")
    broken = []
    for d in h.cfg.image_dirs:
        try:
            st = os.lstat(d)
        except OSError as exc:
            broken.append(f"{d}: {exc.strerror}")
            continue
        if not stat.S_ISDIR(st.st_mode):
            broken.append(f"{d} is not a directory")
            continue
        if st.st_uid != 0 or st.st_mode & 0o002 or (st.st_mode & 0o020 and st.st_gid != 0):
            broken.append(f"{d} is {_mode_text(st)}: users could write it")
        broken += _root_path_problems(os.path.dirname(d))
    if broken:
        return Result(FAIL, "; ".join(broken), "mkdir -p DIR; chown root:root DIR; chmod 755 "
                      "DIR (or drop it from image_dirs)", broken)
    return Result(PASS, f"{len(h.cfg.image_dirs)} directories, root's, read-only to users")


def _uses_uefi(words: list[str]) -> bool:
    """The admin's words say ``-firmware efi`` (as kvmshell parses them)."""
    from kvmshell.common import adminopts
    from kvmshell.common.errors import KvmshellError
    try:
        return adminopts.parse_admin(words).firmware == "efi"
    except KvmshellError:
        return False


def check_ovmf(h: Host) -> Result:
    """OVMF (Debian's ovmf package) is installed where a VM uses UEFI: the
    images kvmshell.conf names (uefi_code, uefi_vars)."""
    uefi = [name for name, _, _, words in h.vms() if words and _uses_uefi(words)]
    code = h.cfg.uefi_code if os.path.isfile(h.cfg.uefi_code) else None
    varsfile = h.cfg.uefi_vars if os.path.isfile(h.cfg.uefi_vars) else None
    if not uefi:
        return Result(PASS, "no VM uses UEFI" + (f" (OVMF is installed: {code})" if code
                                                  else ""))
    if code is None or varsfile is None:
        return Result(FAIL, f"{', '.join(uefi)} use UEFI, but OVMF is not installed",
                      "apt-get install ovmf", uefi)
    return Result(PASS, f"{len(uefi)} VMs use UEFI: {code}, {varsfile}")


def _cgroup_needs(cfg: Config) -> set[str]:
    # The kernel holds the budgets through memory, cpu and pids groups
    # (common/cgroups.py) unless the admin turned that off.
    return set() if cfg.cgroup == "off" else {"memory", "cpu", "pids"}


def _cgroup_controllers() -> tuple[str, set[str]]:
    try:
        with open("/sys/fs/cgroup/cgroup.controllers", encoding="ascii") as f:
            return "v2", set(f.read().split())
    except OSError:
        pass
    out = set()
    try:
        with open("/proc/cgroups", encoding="ascii") as f:
            for line in f:
                words = line.split()
                if len(words) == 4 and not line.startswith("#") and words[3] == "1":
                    out.add(words[0])
    except OSError:
        return "none", set()
    return ("v1 + v2" if os.path.isdir("/sys/fs/cgroup/unified") else "v1"), out


def check_cgroups(h: Host) -> Result:
    """The cgroup controllers the configured budgets need are available."""
    version, have = _cgroup_controllers()
    need = _cgroup_needs(h.cfg)
    shown = ", ".join(sorted(have & {"cpu", "memory", "pids", "io", "blkio", "cpuset"}))
    if need - have:
        missing = ", ".join(sorted(need - have))
        return Result(FAIL, f"the budgets need the {missing} controllers; cgroup {version} "
                      f"offers {shown or 'none'}", "enable them (kernel command line, e.g. "
                      "cgroup_enable=memory; or systemd's unified hierarchy)")
    if not need:
        return Result(PASS, f"none needed: cgroup = off (cgroup {version}: {shown or 'none'})")
    from kvmshell.common import cgroups
    how = cgroups.mode(h.cfg)
    if how == "off":
        return Result(WARN, "cgroup = auto found neither systemd nor the cgroup v1 memory, cpu "
                      "and pids hierarchies: budgets are kvmshell's checks only",
                      "mount the v1 hierarchies, run systemd, or set cgroup = off to say so")
    return Result(PASS, f"budgets held by the kernel ({how}; cgroup {version}: {shown})")


def check_multihost(h: Host) -> Result:
    """Several hosts on one tree (docs/multihost.md): the host list names
    this host, munged answers here, the relay account, its key (its alone),
    the hosts' keys and both relay programs are in place, every VM has a
    lease of its owner's, 0600 (others could hold a lease they can open),
    and its owner record file.  PASS when there is no host list."""
    from kvmshell.common import hosts, lease
    from kvmshell.common.errors import ConfigError
    cfg = h.cfg
    try:
        known = hosts.load(cfg)
    except ConfigError as exc:
        return Result(FAIL, exc.message, f"fix {cfg.hosts_file}")
    if known is None:
        return Result(PASS, f"not used (no host list {cfg.hosts_file})")
    items: list[str] = []
    sock = "/run/munge/munge.socket.2"
    if not os.path.exists(sock) or not stat.S_ISSOCK(os.stat(sock).st_mode):
        items.append(f"{sock} is missing: munged does not run here (apt install munge; "
                     "the cluster's key in /etc/munge/munge.key)")
    try:
        relay = pwd.getpwnam(cfg.relay_user)
    except KeyError:
        items.append(f"no relay account {cfg.relay_user} (make install makes it)")
        relay = None
    try:
        st = os.lstat(cfg.relay_key)
        if relay is not None and (not stat.S_ISREG(st.st_mode) or st.st_uid != relay.pw_uid
                                  or st.st_mode & 0o077):
            items.append(f"{cfg.relay_key} must be a file of {cfg.relay_user}'s, mode 0600 "
                         "(VM users must not read it)")
    except OSError:
        items.append(f"{cfg.relay_key} (the relay key) is missing")
    for path, what in ((cfg.relay_known_hosts, "the hosts' SSH keys"),
                       (cfg.relay_client, "the relay client"),
                       (os.path.join(os.path.dirname(cfg.relay_client), "kvmshell-relayd"),
                        "the relay helper")):
        try:
            st = os.lstat(path)
        except OSError:
            items.append(f"{path} ({what}) is missing")
            continue
        if st.st_uid != 0 or st.st_mode & 0o022:
            items.append(f"{path} ({what}) must be root's and not group/world-writable")
    for name, _dirname, uid, _words in h.vms():
        fd = None
        try:
            fd = lease.open_lease(cfg, name, write=False, uid=uid)
        except KvmshellError as exc:
            items.append(exc.message)
            continue
        if fd is None:
            items.append(f"VM {name} has no lease (kvmadm set {name} -- its options)")
            continue
        os.close(fd)
        if not lease.sound(cfg, name, uid):
            items.append(f"VM {name} has no owner record file {lease.LEASES}/{name}"
                         f"{lease.RECORD} of its owner's (kvmadm set {name} -- its options)")
    if items:
        return Result(FAIL, f"{len(items)} problem(s) for hosts sharing the tree",
                      "see each item; docs/multihost.md", items)
    return Result(PASS, f"{len(known)} hosts; this is {cfg.host_name}")


def check_syslog(h: Host) -> Result:
    """Syslog takes messages on /dev/log (the helper records every action
    there) and on log_socket (kvmshell's and kvmadm's audit records)."""
    import socket
    sockets = {SYSLOG_SOCKET: ["the helper's record of what it does for users"]}
    sockets.setdefault(h.cfg.log_socket, []).append("kvmshell's and kvmadm's audit records")
    for path, lost in sockets.items():
        why: str | None = None
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            s = socket.socket(socket.AF_UNIX, kind)
            try:
                s.connect(path)
                why = None
                break
            except OSError as exc:
                why = "does not exist" if isinstance(exc, FileNotFoundError) else (
                    exc.strerror or "refused")
            finally:
                s.close()
        if why:
            return Result(WARN, f"{path} {why}: {' and '.join(lost)} (authpriv) are lost",
                          "apt-get install rsyslog (or run systemd-journald)")
    return Result(PASS, f"{' and '.join(sockets)} accept messages")


# id, title, function: the order of the report.
CHECKS: list[tuple[str, str, Callable[[Host], Result]]] = [
    ("kvm-device", "/dev/kvm", check_kvm_device),
    ("kvm-group", "/dev/kvm's group", check_kvm_group),
    ("kvm-users", "VM users can open /dev/kvm", check_kvm_users),
    ("cpu-flags", "CPU virtualization", check_cpu_flags),
    ("nested", "nested virtualization", check_nested),
    ("qemu", "QEMU", check_qemu),
    ("tun", "/dev/net/tun", check_tun),
    ("group", "VM users' group", check_group),
    ("shell", "login shell", check_shell),
    ("config", "config's place", check_config),
    ("helper", "network helper", check_helper),
    ("sudoers", "sudoers drop-in", check_sudoers),
    ("web", "web front door", check_web),
    ("sshd", "sshd drop-in", check_sshd),
    ("sshd-match", "sshd Match for the group", check_sshd_match),
    ("pam", "PAM service", check_pam),
    ("tree", "VM tree", check_tree),
    ("tree-owners", "VM tree's per-owner view", check_owner_view),
    ("image-dirs", "image directories", check_image_dirs),
    ("ovmf", "UEFI firmware (OVMF)", check_ovmf),
    ("cgroups", "cgroup controllers", check_cgroups),
    ("syslog", "syslog", check_syslog),
    ("multihost", "several hosts", check_multihost),
]


def run(h: Host) -> list[tuple[str, str, Result]]:
    """Every check in order; one that raises is reported as a FAIL naming the error."""
    out = []
    for ident, title, fn in CHECKS:
        try:
            res = fn(h)
        except OSError as exc:
            res = Result(FAIL, f"{exc.filename or ''}: {exc.strerror}".lstrip(": "),
                         "see the path named")
        out.append((ident, title, res))
    return out


def main(cfg: Config, args: list[str]) -> int:
    """``kvmadm check [--json] [--sysconfdir DIR]``: print the report; 1 if any FAIL."""
    import json
    import sys
    from kvmshell.common.text import printable
    as_json, etc = False, "/etc"
    rest = list(args)
    while rest:
        if rest[0] == "--json":
            as_json, rest = True, rest[1:]
        elif rest[0] == "--sysconfdir" and len(rest) >= 2 and rest[1].startswith("/"):
            etc, rest = rest[1], rest[2:]
        else:
            raise UsageError(f"{rest[0]}: unexpected argument (check [--json] [--sysconfdir DIR])")
    results = run(Host(cfg, etc))
    counts = {s: sum(1 for _, _, r in results if r.status == s) for s in (PASS, WARN, FAIL)}
    if as_json:
        doc = {"checks": [{"id": i, "title": t, "status": r.status, "detail": r.detail,
                           "fix": r.fix, "items": r.items} for i, t, r in results],
               "summary": counts}
        sys.stdout.write(json.dumps(doc) + "\n")
    else:
        for _, title, r in results:
            line = f"{r.status}  {title}: {r.detail}"
            if r.fix:
                line += f"; fix: {r.fix}"
            # Names from the tree and the tools' output: escaped (text.printable).
            sys.stdout.write(printable(line, backslash=False) + "\n")
        sys.stdout.write(f"kvmadm check: {counts[PASS]} PASS, {counts[WARN]} WARN, "
                         f"{counts[FAIL]} FAIL\n")
    return 1 if counts[FAIL] else 0
