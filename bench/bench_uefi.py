#!/usr/bin/python3
"""Benchmark: the start of a q35 UEFI VM (2 vCPUs, 512 MiB, OVMF, virtio
NIC) through kvmshell, as a VM user over the ForceCommand path with the
kernel's budget on (cgroup helper through sudo, cgroup v1 here), against
the same QEMU started by hand as the same user, in the same run.

Measured, median of BENCH_RUNS (default 5) interleaved runs:
  * to the firmware's first serial output (OVMF's ``BdsDxe`` line): the
    VM is running code.  Target: kvmshell <= 1.2x by hand;
  * to QEMU's monitor answering (``start`` returns; by hand, the first
    ``query-status`` answer on the QMP socket), for context.

"By hand" is what a user with a shell would type: the same QEMU binary,
machine, accelerator, CPU, memory and firmware images (the code image by
path, the user's own copy of the variable store), serial on stdout, QMP on
a socket, started from a process of the user's that sits in the user's
cgroup (as every process of the user does under a systemd slice), so both
sides run under the same kernel limits and CPU share.
Everything runs from this checkout's code, installed into a temporary
root as the tests do; the cgroup helper runs from a stub under a
temporary sudoers drop-in.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import statistics
import subprocess
import sys
import time

RUNS = int(os.environ.get("BENCH_RUNS", "5"))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER = f"kvb{secrets.token_hex(3)}"   # this run's own user: nothing else runs as it
ADMIN = ["-m", "512", "-smp", "2", "-M", "q35", "-cpu", "max", "-firmware", "efi",
         "-net", "nic", "-net", "user"]
CODE, VARS = "/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"
FIRMWARE_LINE = b"BdsDxe"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import tree_root, write_sudoers  # noqa: E402


def install(root: str) -> tuple[str, str, str]:
    """This checkout's package and entry points under *root* (readable by the user)."""
    lib = os.path.join(root, "lib")
    shutil.copytree(os.path.join(REPO, "kvmshell"), os.path.join(lib, "kvmshell"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["/usr/bin/python3", "-m", "compileall", "-q", lib], check=True)
    scripts = []
    for name in ("kvmshell", "kvmadm"):
        with open(os.path.join(REPO, "bin", name)) as f:
            lines = f.read().splitlines(True)
        lines.insert(1, f"import sys; sys.path.insert(0, {lib!r})\n")
        path = os.path.join(root, name)
        with open(path, "w") as f:
            f.write("".join(lines))
        scripts.append(path)
    sys.path.insert(0, lib)
    from kvmshell.admin.install import install_cgrouphelper
    helper = install_cgrouphelper(os.path.join(root, "libexec"), os.path.join(root, "k.conf"), lib)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o755 if f in ("kvmshell", "kvmadm")
                     or f.startswith("kvmshell-") else 0o644)
    return scripts[0], scripts[1], helper


def wait_file(path: str, needle: bytes, deadline: float) -> float:
    while time.monotonic() < deadline:
        for leaf in (path + ".1", path):
            try:
                with open(leaf, "rb") as f:
                    if needle in f.read():
                        return time.monotonic()
            except FileNotFoundError:
                pass
        time.sleep(0.01)
    raise RuntimeError(f"no {needle!r} in {path}")


def through_kvmshell(as_user: list[str], kvmshell: str, conf: str, vmdir: str) -> tuple[float, float]:
    log = os.path.join(vmdir, "console.log")
    for leaf in ("console.log", "console.log.1"):
        try:
            os.unlink(os.path.join(vmdir, leaf))
        except FileNotFoundError:
            pass
    env = {"PATH": "/usr/bin:/bin", "SSH_ORIGINAL_COMMAND": "start uefi"}
    t0 = time.monotonic()
    subprocess.run(as_user + [kvmshell, "--config", conf], env=env, check=True,
                   stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    returned = time.monotonic()
    fw = wait_file(log, FIRMWARE_LINE, t0 + 120)
    env["SSH_ORIGINAL_COMMAND"] = "kill uefi"
    subprocess.run(as_user + [kvmshell, "--config", conf], env=env, check=True,
                   stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    return fw - t0, returned - t0


# The user's shell for the hand starts: a process of the user's that the
# cgroup helper put in the user's group once (as a systemd host's slice holds
# every process of the user), so hand-started QEMUs run under the same kernel
# limits and CPU share as kvmshell's.  One line on stdin per run; it answers
# with the two times, measured from just before it spawns QEMU.
HAND = r"""
import json, os, shutil, socket, subprocess, sys, time
helper, work, code, vars_tmpl, mode = sys.argv[1:6]
if mode != "off":
    a, b = socket.socketpair()
    r = subprocess.run(["/usr/bin/sudo", "-n", "--", helper, "attach", "uefi"], stdin=b.fileno(),
                       env={"PATH": "/usr/bin:/bin"})
    b.close()
    if r.returncode:
        sys.exit(r.returncode)
print("ready", flush=True)
vars_copy, sock = os.path.join(work, "vars.fd"), os.path.join(work, "qmp.sock")
argv = ["/usr/bin/qemu-system-x86_64", "-name", "guest=uefi", "-nodefaults",
        "-no-user-config", "-machine", "q35", "-accel", "tcg,tb-size=128",
        "-m", "512", "-smp", "2", "-cpu", "max",
        "-drive", f"if=pflash,unit=0,format=raw,readonly=on,file={code}",
        "-drive", f"if=pflash,unit=1,format=raw,file={vars_copy}",
        "-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0",
        "-chardev", f"socket,id=qmp,path={sock},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control", "-serial", "stdio", "-display", "none"]
for _ in sys.stdin:
    if os.path.exists(sock):
        os.unlink(sock)
    t0 = time.monotonic()
    if not os.path.exists(vars_copy):
        shutil.copyfile(vars_tmpl, vars_copy)    # the user's own copy, made once
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         stdin=subprocess.DEVNULL, cwd=work)
    os.set_blocking(p.stdout.fileno(), False)
    qmp_at, buf = None, b""
    while time.monotonic() < t0 + 180:
        if qmp_at is None and os.path.exists(sock):
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(sock)
                f = s.makefile("rwb")
                f.readline()
                f.write(b'{"execute":"qmp_capabilities"}\n{"execute":"query-status"}\n')
                f.flush()
                f.readline()
                if b"return" in f.readline():
                    qmp_at = time.monotonic()
                s.close()
            except OSError:
                pass
        try:
            buf += os.read(p.stdout.fileno(), 65536)
        except BlockingIOError:
            pass
        if b"BdsDxe" in buf and qmp_at is not None:
            break
        time.sleep(0.01)
    fw = time.monotonic()
    p.kill()
    p.wait()
    ok = b"BdsDxe" in buf and qmp_at is not None
    print(json.dumps([fw - t0, (qmp_at or fw) - t0, ok]), flush=True)
"""


def by_hand(shell: "subprocess.Popen[str]") -> tuple[float, float]:
    assert shell.stdin is not None and shell.stdout is not None
    shell.stdin.write("go\n")
    shell.stdin.flush()
    fw, qmp, ok = json.loads(shell.stdout.readline())
    if not ok:
        raise RuntimeError("QEMU by hand did not reach the firmware")
    return fw, qmp


def main() -> int:
    tag = secrets.token_hex(3)
    group, cgname = f"kvbg{tag}", f"kvb{tag}"
    subprocess.run(["useradd", "-M", "-N", "-s", "/bin/false", USER], check=True)
    pw = pwd.getpwnam(USER)
    sys.path.insert(0, REPO)
    from kvmshell.common import cgroups
    root = tree_root()
    drop_in = f"/etc/sudoers.d/kvmshell-bench-{tag}"
    subprocess.run(["groupadd", group], check=True)
    try:
        subprocess.run(["usermod", "-aG", group, USER], check=True)
        kvmshell, kvmadm, helper = install(root)
        conf = os.path.join(root, "k.conf")
        with open(conf, "w") as f:
            # cgroup = auto, as shipped (cgroupfs here; off where the host has
            # neither systemd nor cgroup v1, and then neither side is placed).
            f.write(f"vmdir = {root}/vms\naccel = tcg\ncgroup = auto\n"
                    f"cgroup_name = {cgname}\ncgroup_helper = {helper}\n"
                    f"budgets = {root}/budgets\nmax_ram_mib = 4096\nmax_vcpus = 4\n")
        os.chmod(conf, 0o644)
        write_sudoers(drop_in, tag, group,
                      {"/usr/local/libexec/kvmshell/kvmshell-cgrouphelper": helper})
        subprocess.run([kvmadm, "--config", conf, "create", "uefi", "--owner", USER, "--",
                        *ADMIN], check=True, stdout=subprocess.DEVNULL)
        vmdir = os.path.join(root, "vms", os.readlink(os.path.join(root, "vms", "uefi")))
        work = os.path.join(root, "hand")
        os.mkdir(work, 0o700)
        os.chown(work, pw.pw_uid, pw.pw_gid)
        as_user = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--"]
        from kvmshell.common import config
        mode = cgroups.mode(config.load(conf))
        shell = subprocess.Popen(as_user + ["/usr/bin/python3", "-I", "-c", HAND, helper, work,
                                            CODE, VARS, mode],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env={"PATH": "/usr/bin:/bin"}, cwd=work)
        assert shell.stdout is not None and shell.stdout.readline().strip() == "ready"
        through_kvmshell(as_user, kvmshell, conf, vmdir)         # warm-up (and nvram.fd made)
        by_hand(shell)
        ours_fw, ours_ret, hand_fw, hand_qmp = [], [], [], []
        for _ in range(RUNS):
            fw, ret = through_kvmshell(as_user, kvmshell, conf, vmdir)
            ours_fw.append(fw)
            ours_ret.append(ret)
            fw, qmp = by_hand(shell)
            hand_fw.append(fw)
            hand_qmp.append(qmp)
        assert shell.stdin is not None
        shell.stdin.close()
        shell.wait(30)
        m = {k: statistics.median(v) for k, v in
             (("ours_fw", ours_fw), ("ours_ret", ours_ret), ("hand_fw", hand_fw),
              ("hand_qmp", hand_qmp))}
        print(f"q35 UEFI VM start (2 vCPUs, 512 MiB, OVMF, TCG; kernel budget: {mode}), "
              f"median of {RUNS}: to the firmware's "
              f"first serial line: kvmshell {m['ours_fw']:.2f} s, by hand {m['hand_fw']:.2f} s "
              f"-> {m['ours_fw'] / m['hand_fw']:.2f}x (target <= 1.2x); to QEMU's monitor "
              f"answering: kvmshell start returns after {m['ours_ret'] * 1000:.0f} ms, by hand QMP "
              f"answers after {m['hand_qmp'] * 1000:.0f} ms -> {m['ours_ret'] / m['hand_qmp']:.2f}x")
        print(json.dumps({"runs": RUNS, **{k: [round(x, 3) for x in v] for k, v in
                          (("kvmshell_firmware_s", ours_fw), ("kvmshell_returned_s", ours_ret),
                           ("hand_firmware_s", hand_fw), ("hand_qmp_s", hand_qmp))}}))
        return 0
    finally:
        for pid in [int(d) for d in os.listdir("/proc") if d.isdigit()]:
            try:
                if os.stat(f"/proc/{pid}").st_uid == pw.pw_uid:   # this run's user only
                    os.kill(pid, 9)
            except OSError:
                pass
        time.sleep(0.3)
        if os.path.exists(drop_in):
            os.unlink(drop_in)
        subprocess.run(["userdel", "-f", USER], capture_output=True)
        subprocess.run(["groupdel", group], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
        for mount in set(cgroups.v1_mounts().values()):
            base = os.path.join(mount, cgname)
            for dirpath, _dirs, _files in sorted(os.walk(base), key=lambda w: -len(w[0])):
                try:
                    os.rmdir(dirpath)
                except OSError:
                    pass


if __name__ == "__main__":
    sys.exit(main())
