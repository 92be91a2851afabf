"""A real sshd on 127.0.0.1 for the ssh suite and bench/bench_ssh.py.

The sshd runs with its own host key and its own config file.  That config
is Debian's sshd_config layout (the drop-in directory included on the first
line) with deliberately careless global settings after it -- forwarding,
tunnels, ~/.ssh/rc and AcceptEnv of LD_* and PYTHON* all allowed -- so the
tests show that the shipped drop-in (sshd_config.d/kvmshell.conf, with only
its paths and group name replaced) is what confines the VM users.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
DROPIN = REPO / "sshd_config.d" / "kvmshell.conf"

CARELESS_MAIN = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {rig}/host_ed25519_key
PidFile {rig}/sshd.pid
AuthorizedKeysFile .ssh/authorized_keys
KbdInteractiveAuthentication no
UsePAM yes
PrintMotd no
StrictModes yes
LogLevel {loglevel}
# Careless on purpose: the drop-in must win for the VM users' group.
X11Forwarding yes
AllowTcpForwarding yes
AllowAgentForwarding yes
AllowStreamLocalForwarding yes
GatewayPorts yes
PermitTunnel yes
PermitUserRC yes
AcceptEnv LANG LC_* LD_* PYTHON*
Subsystem sftp /usr/lib/openssh/sftp-server
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(proc: "subprocess.Popen[bytes]", connect: "Callable[[], None]",
                   timeout: float, what: str, log: Path) -> None:
    """Until *connect* (which raises OSError while nothing listens) works:
    RuntimeError naming *what*, with its *log*, if *proc* exits first or
    *timeout* seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            connect()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start: " + log.read_text())
            time.sleep(0.05)


def end_process(proc: "subprocess.Popen[bytes]") -> None:
    """SIGTERM, ten seconds' grace, then SIGKILL; reaped either way."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def dropin_text(kvmshell_line: str, keys_dir: str, group: str) -> str:
    text = DROPIN.read_text()
    for old, new in (("ForceCommand /usr/local/bin/kvmshell", f"ForceCommand {kvmshell_line}"),
                     ("/etc/kvmshell/authorized_keys", keys_dir),
                     ("Match Group kvmusers", f"Match Group {group}")):
        assert old in text, old
        text = text.replace(old, new)
    return text


class Sshd:
    """One sshd; ``stop()`` ends it and removes its directory."""

    def __init__(self, kvmshell_line: str, group: str, loglevel: str = "DEBUG2") -> None:
        # Not under /tmp: StrictModes refuses a key file below a world-writable
        # directory, and /run is root-owned 0755 like /etc.
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir
        self.rig = Path(tempfile.mkdtemp(prefix="kvmshell-ssh-", dir="/run"))
        os.chmod(self.rig, 0o755)
        self.keys = self.rig / "authorized_keys"
        self.keys.mkdir(mode=0o755)
        self.port = free_port()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(self.rig / "host_ed25519_key")], check=True)
        (self.rig / "sshd_config.d").mkdir()
        (self.rig / "sshd_config.d" / "kvmshell.conf").write_text(
            dropin_text(kvmshell_line, str(self.keys), group))
        self.config = self.rig / "sshd_config"
        self.config.write_text(f"Include {self.rig}/sshd_config.d/*.conf\n"
                               + CARELESS_MAIN.format(port=self.port, rig=self.rig,
                                                      loglevel=loglevel))
        subprocess.run(["/usr/sbin/sshd", "-t", "-f", str(self.config)], check=True)
        self.log = self.rig / "sshd.log"
        self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(self.config)],
                                     stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "wb"))
        wait_listening(self.proc, lambda: socket.create_connection(("127.0.0.1", self.port),
                                                                   timeout=1).close(),
                       20, "sshd", self.log)

    def client_key(self, name: str) -> Path:
        key = self.rig / f"client-{name}"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name,
                        "-f", str(key)], check=True)
        return key

    def ssh_argv(self, user: str, key: Path, *args: str) -> list[str]:
        return ["ssh", "-p", str(self.port), "-i", str(key), "-F", "/dev/null",
                "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                "-o", "IdentitiesOnly=yes", *args, f"{user}@127.0.0.1"]

    def effective(self, user: str) -> str:
        """``sshd -T`` for a connection by *user*: the settings sshd applies."""
        r = subprocess.run(["/usr/sbin/sshd", "-T", "-f", str(self.config), "-C",
                            f"user={user},host=localhost,addr=127.0.0.1,laddr=127.0.0.1,"
                            f"lport={self.port}"], capture_output=True, text=True, check=True)
        return r.stdout

    def stop(self) -> None:
        end_process(self.proc)
        shutil.rmtree(self.rig, ignore_errors=True)
