"""Attacks on issue 20's fix (attack-20 review): the uid-level attacker
against the VM lock, root's purge, the root helpers and kvmadm autostart.
Each test fails on the code before its fix."""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import pytest

import test_network
from conftest import KVMADM, KVMSHELL, NETHELPER, Host, User, wait_for
from test_network import Net
from test_uid_attacker import as_user_py

# module_vms_removed: other modules expect the session's users to own a known set
pytestmark = [pytest.mark.security, pytest.mark.usefixtures("module_vms_removed")]
net = test_network.net    # the network fixture: a namespace, users in a sudoers group



# Part of the user's code below: its own kvmshell processes running VERB,
# as it finds them in /proc (a generator: each is acted on as it is found).
OWN_KVMSHELLS = """
def own_kvmshells(verb, skip):
    me = os.getuid()
    for p in os.listdir('/proc'):
        if not p.isdigit() or p in skip or int(p) == os.getpid():
            continue
        try:
            if os.stat('/proc/' + p).st_uid != me:
                continue
            cmd = open('/proc/%s/cmdline' % p, 'rb').read().split(b'\\0')
        except OSError:
            continue
        if verb in cmd and any(c.endswith(b'kvmshell') for c in cmd):
            yield p
"""

# The user's code: wait for a 'kvmshell start' of its own (the one root's
# autostart runs through runuser), take copies of its stdout and stderr
# (pidfd_getfd: the same uid may) and keep them, writing into them for as
# long as root reads (argv[1]: 'hold' or 'flood').
GRAB = "import ctypes, os, sys, time\n" + OWN_KVMSHELLS + """
libc = ctypes.CDLL(None, use_errno=True)
print('ready', flush=True)
got = []
while not got:
    for p in own_kvmshells(b'start', ()):
        try:
            pidfd = os.pidfd_open(int(p))
        except OSError:
            continue
        for fd in (1, 2):
            n = libc.syscall(438, pidfd, fd, 0)
            if n >= 0:
                got.append(n)
    time.sleep(0.001)
print('got', len(got), flush=True)
while True:
    if sys.argv[1] == 'flood':
        os.write(got[0], b'x' * 65536)
    else:
        time.sleep(1)
"""


@pytest.mark.parametrize("how", ["hold", "flood"])
def test_autostart_is_not_held_by_the_owners_copy_of_its_pipes(host: Host, alice: User,
                                                              how: str) -> None:
    """kvmadm autostart runs 'kvmshell start' as the owner with its output
    on root's pipes.  The owner's code takes copies of those pipes from
    that process and keeps them open (or writes into them without end):
    root's autostart still ends, at its per-start deadline (2 s here, in
    place of 300), with bounded memory, and goes on to the next VM."""
    from test_security import own_host, put
    from test_uid_attacker import LIB
    h = own_host(host, f"a20as-{secrets.token_hex(2)}", shell=str(Path(KVMADM).with_name("kvmshell")))
    u = User(alice.name, h)
    first = h.create_vm("as1", u, "-m", "32")
    put(first / "autostart", u, b"")
    put(first / "start-options", u, b"-hda\nnosuch.img\n")
    grab = subprocess.Popen(as_user_py(alice, GRAB, how), env=alice.env(),
                            stdout=subprocess.PIPE, text=True)
    code = (f"import sys; sys.path.insert(0, {LIB!r})\n"
            "import resource\n"
            "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
            "from kvmshell.admin import kvmadm\n"
            "kvmadm.START_TIMEOUT = 2\n"
            f"sys.exit(kvmadm.main(['kvmadm', '--config', {str(h.conf)!r}, 'autostart']))\n")
    try:
        assert grab.stdout is not None and grab.stdout.readline() == "ready\n"
        r = subprocess.run(["/usr/bin/python3", "-I", "-c", code], capture_output=True,
                           text=True, timeout=30)
        assert grab.stdout.readline() == "got 2\n"
        assert r.returncode == 1 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
        assert r.stdout.startswith("as1: failed: "), r.stdout
    finally:
        grab.kill()
        grab.wait()


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


# The user's code: a terminal of its own (a pty it opened), the network
# helper's 'up' run through sudo as the terminal's foreground job (its
# stdout a socket, as kvmshell gives it), and the terminal's stop key typed
# when told (a line on stdin): the kernel, not the user, then stops the root
# process.  argv: helper, VM, the key.
PTY_JOB = """import fcntl, os, resource, signal, socket, sys, termios, time
resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
master, slave = os.openpty()
mine, theirs = socket.socketpair()
r, w = os.pipe()
if os.fork() == 0:                       # the session leader, a shell's part
    os.setsid()
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    job = os.fork()
    if job == 0:
        os.setpgid(0, 0)
        for fd in (0, 2):
            os.dup2(slave, fd)
        os.dup2(theirs.fileno(), 1)
        while os.tcgetpgrp(0) != os.getpid():
            time.sleep(0.001)
        os.execv('/usr/bin/sudo', ['sudo', '-n', '--', sys.argv[1], 'up', sys.argv[2]])
    os.setpgid(job, job)
    os.tcsetpgrp(slave, job)             # the job in the foreground: ^Z reaches it
    os.write(w, b'%d\\n' % job)
    time.sleep(3600)
os.close(slave)
print(int(os.read(r, 32)), flush=True)
sys.stdin.readline()
os.write(master, sys.argv[3].encode('latin-1'))
time.sleep(3600)
"""


def posix_locked_by(pid: int) -> bool:
    return any(l.split()[1:2] == ["POSIX"] and l.split()[4:5] == [str(pid)]
               for l in Path("/proc/locks").read_text().splitlines())


@pytest.mark.network
def test_a_helper_stopped_from_the_users_terminal_still_ends(net: Net, host: Host,
                                                             alice: User) -> None:
    """The user's code runs the network helper as the foreground job of a
    pty of its own and types the stop key (^Z) once the helper runs its
    verb (it holds its per-user slot): the kernel would stop the root
    process, whose deadline (a Python handler) then never runs, and the
    taps it made would stay with it.  The helper does not stop: it is gone
    by its deadline (10 s, plus 2 of grace)."""
    import signal
    import time

    name = f"a20s{secrets.token_hex(2)}"
    host.create_vm(name, alice, "-net", "nic", "-net", "tap,ip=10.80.0.1/24")
    user = subprocess.Popen(net.as_user(alice, "/usr/bin/python3", "-I", "-c", PTY_JOB, NETHELPER,
                                        name, "\x1a"),
                            env=alice.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    helper = 0
    try:
        assert user.stdout is not None and user.stdin is not None
        helper = int(user.stdout.readline())
        wait_for(lambda: posix_locked_by(helper) or proc_state(helper) in ("gone", "Z"), 10,
                 "the helper to take its slot")
        user.stdin.write("go\n")
        user.stdin.flush()
        time.sleep(13)            # the deadline (10 s) and its 2 s of grace
        assert proc_state(helper) in ("gone", "Z"), proc_state(helper)
    finally:
        if helper and proc_state(helper) not in ("gone", "Z"):
            os.kill(helper, signal.SIGKILL)
        user.kill()
        user.wait()
        # the job's session leader (a session of its own) keeps the taps it got
        subprocess.run(["pkill", "-KILL", "-u", str(alice.uid), "-f", "TIOCSCTTY"])



# The user's code: the network helper's 'up' for its VM, run by itself
# (not by kvmshell, so no supervisor cleans up after it), the taps kept in
# the reply's socket for as long as it likes.  argv: helper, VM.
HOLD_TAPS = """import socket, subprocess, sys, time
mine, theirs = socket.socketpair()
r = subprocess.run(['/usr/bin/sudo', '-n', '--', sys.argv[1], 'up', sys.argv[2]],
                   stdout=theirs.fileno(), stdin=subprocess.DEVNULL)
theirs.close()
print(r.returncode, flush=True)
time.sleep(3600)
"""


@pytest.mark.network
@pytest.mark.parametrize("change", ["remove", "remove --purge", "set"])
def test_kvmadm_remove_and_set_delete_the_taps_the_user_holds(net: Net, host: Host,
                                                              alice: User, change: str) -> None:
    """The user's code asks the network helper for its VM's tap and keeps
    it (no QEMU, so the VM is stopped and its lock free).  When the admin
    removes the VM, or sets options giving it another network, the tap
    (on its bridge, or with its host-side address) must not stay with the
    user: kvmadm deletes the VM's taps."""
    import time

    name = f"a20t{secrets.token_hex(2)}"
    host.create_vm(name, alice, "-net", "nic", "-net", "tap,ip=10.82.0.1/24")
    user = subprocess.Popen(net.as_user(alice, "/usr/bin/python3", "-I", "-c", HOLD_TAPS,
                                        NETHELPER, name),
                            env=alice.env(), stdout=subprocess.PIPE, text=True)
    try:
        assert user.stdout is not None and user.stdout.readline() == "0\n"
        (tap,) = net.taps()
        args = change.split() if change != "set" else ["set", "--", "-net", "nic", "-net",
                                                          "tap,ip=10.83.0.1/24"]
        args = args[:1] + [name] + args[1:]
        r = subprocess.run(["ip", "netns", "exec", net.ns, KVMADM, "--config", str(host.conf),
                            *args], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        time.sleep(0.2)
        assert tap not in net.taps()
        assert "10.82.0.1/24" not in " ".join(net.addrs())
    finally:
        user.kill()
        user.wait()
    for leaf in os.listdir(host.vmdir / ".removed"):
        if leaf.startswith(name + "."):
            subprocess.run(["rm", "-rf", str(host.vmdir / ".removed" / leaf)])


def test_kvmadm_names_what_holds_a_vm_busy(host: Host, alice: User) -> None:
    """The owner's code holds its VM's lock with a process that is no QEMU
    (status 'busy'), for as long as it likes: kvmadm set and remove refuse,
    naming the holding process, so the admin knows what to end; once it is
    ended, remove works."""
    name = f"a20b{secrets.token_hex(2)}"
    path = host.create_vm(name, alice, "-m", "32")
    # The lock's taker passes it on to a child and exits: the pid the
    # kernel's lock table names is gone.
    holder = subprocess.Popen(as_user_py(alice, "import fcntl, os, sys, time\n"
                                         "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)\n"
                                         "fcntl.flock(fd, fcntl.LOCK_SH)\n"
                                         "if os.fork():\n"
                                         "    os._exit(0)\n"
                                         "os.setsid()\n"
                                         "print(os.getpid(), flush=True)\n"
                                         "time.sleep(120)\n", str(path)),
                              env=alice.env(), stdout=subprocess.PIPE, text=True)
    pid = []
    try:
        assert holder.stdout is not None
        pid = [int(holder.stdout.readline())]
        holder.wait()
        for args in (("set", name, "--", "-m", "48"), ("remove", name, "--purge")):
            r = host.kvmadm(*args, check=False)
            assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
            assert any(f"pid {p} (/usr/bin/python3" in r.stderr for p in pid), (pid, r.stderr)
    finally:
        for p in pid:
            os.kill(p, 9)
        holder.kill()
        holder.wait()
    wait_for(lambda: host.kvmadm("remove", name, "--purge", check=False).returncode == 0, 10,
             "the VM to be removed")


# The user's code: stop every 'kvmshell start' of its own the moment it
# appears (SIGSTOP: the same uid may), as a QEMU of its first autostarted
# VM could do to the starts of its others.
STOP_STARTS = "import os, signal, time\n" + OWN_KVMSHELLS + """
print('ready', flush=True)
done = set()
while True:
    for p in own_kvmshells(b'start', done):
        os.kill(int(p), signal.SIGSTOP)
        done.add(p)
    time.sleep(0.001)
"""


def test_an_owner_whose_starts_hang_holds_back_only_itself(host: Host, alice: User,
                                                           bob: User) -> None:
    """The owner's code stops each of its autostarted VMs' starts: the first
    runs out of time (2 s here, in place of 300), and the owner's other
    marked VMs are not tried (an owner's starts share one deadline: each
    would cost the same), so the VMs of other owners after them start at
    once."""
    from test_security import own_host, put
    from test_uid_attacker import LIB
    h = own_host(host, f"a20hang-{secrets.token_hex(2)}",
                 shell=str(Path(KVMADM).with_name("kvmshell")))
    a, b = User(alice.name, h), User(bob.name, h)
    for vm, u in (("h1", a), ("h2", a), ("h3", b)):
        path = h.create_vm(vm, u, "-m", "32")
        put(path / "autostart", u, b"")
        put(path / "start-options", u, b"-hda\nnosuch.img\n")
    stopper = subprocess.Popen(as_user_py(alice, STOP_STARTS), env=alice.env(),
                               stdout=subprocess.PIPE, text=True)
    code = (f"import sys; sys.path.insert(0, {LIB!r})\n"
            "from kvmshell.admin import kvmadm\n"
            "kvmadm.START_TIMEOUT = 2\n"
            f"sys.exit(kvmadm.main(['kvmadm', '--config', {str(h.conf)!r}, 'autostart']))\n")
    try:
        assert stopper.stdout is not None and stopper.stdout.readline() == "ready\n"
        r = subprocess.run(["/usr/bin/python3", "-I", "-c", code], capture_output=True,
                           text=True, timeout=60)
    finally:
        stopper.kill()
        stopper.wait()
        subprocess.run(["pkill", "-KILL", "-u", str(alice.uid), "-f", "kvmshell"])
    lines = r.stdout.splitlines()
    assert lines[0] == "h1: failed: no answer from kvmshell start in 2 s", r.stdout
    assert lines[1] == f"h2: failed: not tried: the starts of {alice.name}'s VMs took their 2 s", \
        r.stdout
    assert lines[2].startswith("h3: failed: ") and "nosuch.img" in lines[2], r.stdout


# The user's code: SIGSTOP every process that becomes its own among the
# next pids the kernel hands out (kill() succeeds once a process runs as
# the user, e.g. root's child the moment it has dropped to the user).
STOP_NEW = """import os, signal
first = os.getpid()
second = os.fork() or first         # two of them: one may be off the CPU
me = (first, second if second != first else os.getpid())
if second == first:
    print('ready', flush=True)
while True:
    last = int(open('/proc/sys/kernel/ns_last_pid').read())
    for p in range(last - 2, last + 40):
        if p not in me:
            try:
                os.kill(p, signal.SIGSTOP)
            except OSError:
                pass
"""


def test_kvmadm_check_is_not_held_by_its_child_dropped_to_the_user(alice: User) -> None:
    """kvmadm check tries /dev/kvm as each VM user in a child that drops to
    the user: from then on the user may signal it, and its code stops it
    (SIGSTOP) the moment it can.  Root's check must still answer (the
    child is given a few seconds, then killed), naming the user."""
    from test_uid_attacker import LIB
    code = (f"import pwd, sys; sys.path.insert(0, {LIB!r})\n"
            "from kvmshell.admin import check\n"
            f"print(check._open_as(pwd.getpwnam({alice.name!r})))\n")
    stopper = subprocess.Popen(as_user_py(alice, STOP_NEW), env=alice.env(),
                               stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert stopper.stdout is not None and stopper.stdout.readline() == "ready\n"
        for _ in range(20):      # the stoppers may miss a child: it lives for a moment
            r = subprocess.run(["/usr/bin/python3", "-I", "-c", code], capture_output=True,
                               text=True, timeout=30)
            assert r.returncode == 0, r.stderr
            if "could not be tried" in r.stdout:
                break
        assert "could not be tried" in r.stdout, r.stdout
    finally:
        os.killpg(stopper.pid, 9)
        stopper.wait()
        subprocess.run(["pkill", "-KILL", "-u", str(alice.uid), "-f", "kvmshell.admin"])


@pytest.mark.web
def test_the_web_servers_run_is_not_flooded_by_the_users_copy_of_its_pipe(host: Host,
                                                                          alice: User) -> None:
    """The web server runs 'kvmshell list --json' as the user (sudo) and
    reads its output.  The user's code copies that process's stdout
    (pidfd_getfd) and pours into it without end: the web server (here its
    runner, as the web user, with 1 GiB of address space) keeps a bounded
    part and answers within its timeout, instead of reading everything."""
    from test_uid_attacker import LIB
    from webrig import WebRig
    rig = WebRig(host.root, KVMSHELL, host.conf, host.root / "lib")
    grab = None
    try:
        rig.add_user(alice.name, "Pw-" + secrets.token_hex(8))
        grab = subprocess.Popen(as_user_py(alice, GRAB.replace("b'start'", "b'list'"), "flood"),
                                env=alice.env(), stdout=subprocess.PIPE, text=True)
        assert grab.stdout is not None and grab.stdout.readline() == "ready\n"
        code = (f"import asyncio, resource, sys; sys.path.insert(0, {LIB!r})\n"
                "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
                "from kvmshell.common.config import load\n"
                "from kvmshell.web import runner\n"
                f"cfg = load({str(rig.conf)!r})\n"
                f"r = asyncio.run(runner.run(cfg, {alice.name!r}, ['list', '--json'], 5.0))\n"
                "print(r.status, len(r.stdout), r.message[:80])\n")
        r = subprocess.run(rig.as_web_user("/usr/bin/python3", "-I", "-c", code),
                           capture_output=True, text=True, timeout=60, cwd="/")
        assert grab.stdout.readline() == "got 2\n"
        assert r.returncode == 0 and "MemoryError" not in r.stderr, (r.stdout, r.stderr[-500:])
    finally:
        if grab is not None:
            grab.kill()
            grab.wait()
        rig.close()
