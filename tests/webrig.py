"""A real kvmshell-web for the web suite and bench/bench_web.py.

Laid out as ``make install`` does, with names of the run's own so that
runs never collide: a system user standing for kvmweb, a group standing
for kvmusers, the shipped sudoers drop-in (sudoers.d/kvmshell-web, checked
with ``visudo -cf``) and PAM service (pam/kvmshell) with those names put
in, the login helper's root-owned stub, and a config of the rig's own
(the host's, plus the web_* settings).  The server runs as the web user
(setpriv), on 127.0.0.1, for the origin ``http://localhost:PORT``
(Chromium treats http://localhost as a secure context, so the
``__Host-``/``Secure`` cookie works without TLS).

One test-only device: the sudoers rule names the exact kvmshell program
and lets it take no ``--config``, so kvmshell is reached through a
two-line wrapper that adds ``--config`` for the test tree; installed,
``web_kvmshell`` is /usr/local/bin/kvmshell itself with the default config.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
from pathlib import Path

from sshrig import end_process, free_port, wait_listening

REPO = Path(__file__).resolve().parents[1]
VENDOR = Path("kvmshell") / "web" / "static" / "vendor"


def ensure_assets(lib: Path | None) -> None:
    """The npm assets (make web-assets) in the checkout, and in *lib*'s copy."""
    if not (REPO / VENDOR / "VERSIONS").exists():
        subprocess.run(["make", "-C", str(REPO), "web-assets"], check=True)
    if lib is not None and not (lib / VENDOR / "VERSIONS").exists():
        shutil.copytree(REPO / VENDOR, lib / VENDOR, dirs_exist_ok=True)
        for dirpath, dirnames, filenames in os.walk(lib / VENDOR):
            for leaf in dirnames:
                os.chmod(os.path.join(dirpath, leaf), 0o755)
            for leaf in filenames:
                os.chmod(os.path.join(dirpath, leaf), 0o644)


class WebRig:
    """Users, sudoers, PAM service, helper, config; ``start()`` runs the
    server, ``stop()`` ends it, ``close()`` removes everything."""

    def __init__(self, root: Path, kvmshell: str, host_conf: Path, lib: Path | None,
                 **settings: str) -> None:
        self.tag = secrets.token_hex(3)
        self.root = root / f"web-{self.tag}"
        self.root.mkdir(mode=0o755)
        self.lib = lib
        self.group = f"kvtg{self.tag}"
        self.web_user = f"kvtw{self.tag}"
        self.service = f"kvmshell-test-{self.tag}"
        self.port = free_port()
        self.origin = f"http://localhost:{self.port}"
        self.base = f"http://127.0.0.1:{self.port}"
        self.sudoers = Path(f"/etc/sudoers.d/kvmshell-web-test-{self.tag}")
        self.pam = Path("/etc/pam.d") / self.service
        self.proc: subprocess.Popen[bytes] | None = None
        self.users: list[str] = []
        ensure_assets(lib)
        subprocess.run(["groupadd", self.group], check=True)
        subprocess.run(["useradd", "--system", "-M", "-N", "-d", "/nonexistent",
                        "-s", "/usr/sbin/nologin", self.web_user], check=True)
        pw = pwd.getpwnam(self.web_user)
        self.web_uid, self.web_gid = pw.pw_uid, pw.pw_gid
        # kvmshell for the test tree (see the module docstring).
        self.kvmshell = self.root / "kvmshell"
        self.kvmshell.write_text(f"#!/bin/sh\nexec {kvmshell} --config {host_conf} \"$@\"\n")
        os.chmod(self.kvmshell, 0o755)
        from kvmshell.admin.install import install_pamhelper
        self.conf = self.root / "kvmshell.conf"
        self.pamhelper = install_pamhelper(str(self.root / "libexec"), str(self.conf),
                                           str(lib) if lib else None)
        self.server = self.root / "kvmshell-web"
        text = (REPO / "bin" / "kvmshell-web").read_text().splitlines(True)
        if lib:
            text.insert(1, f"import sys; sys.path.insert(0, {str(lib)!r})\n")
        self.server.write_text("".join(text))
        os.chmod(self.server, 0o755)
        base = {k.strip(): v.strip() for k, _, v in
                (ln.partition("=") for ln in host_conf.read_text().splitlines() if "=" in ln)}
        base.update({"group": self.group, "web_user": self.web_user,
                     "web_pam_service": self.service, "web_pamhelper": self.pamhelper,
                     "web_kvmshell": str(self.kvmshell), "web_origins": self.origin,
                     "web_listen": f"127.0.0.1:{self.port}"})
        base.update(settings)
        self.settings = base
        self.write_conf()
        self._install_pam()
        self._install_sudoers()

    def write_conf(self, **extra: str) -> None:
        self.settings.update(extra)
        self.conf.write_text("".join(f"{k} = {v}\n" for k, v in self.settings.items()))
        os.chmod(self.conf, 0o644)

    def _install_pam(self) -> None:
        text = (REPO / "pam" / "kvmshell").read_text()
        assert text.count("ingroup kvmusers") == 2
        self.pam.write_text(text.replace("ingroup kvmusers", f"ingroup {self.group}"))

    def sudoers_text(self) -> str:
        """The shipped drop-in with this rig's names (aliases made unique:
        they are global across sudoers files)."""
        text = (REPO / "sudoers.d" / "kvmshell-web").read_text()
        for old, new in (("/usr/local/libexec/kvmshell/kvmshell-pamhelper", self.pamhelper),
                         ("/usr/local/bin/kvmshell", str(self.kvmshell)),
                         ("%kvmusers", f"%{self.group}"),
                         ("kvmweb ALL", f"{self.web_user} ALL"),
                         ("KVMSHELL_PAMHELPER", f"KVMSHELL_PAMHELPER_{self.tag.upper()}"),
                         ("KVMSHELL_WEB_VERBS", f"KVMSHELL_WEB_VERBS_{self.tag.upper()}")):
            assert old in text, old
            text = text.replace(old, new)
        return text

    def _install_sudoers(self) -> None:
        tmp = self.sudoers.with_name(f".{self.sudoers.name}.tmp")  # sudo skips names with '.'
        tmp.write_text(self.sudoers_text())
        os.chmod(tmp, 0o440)
        subprocess.run(["visudo", "-cf", str(tmp)], check=True, capture_output=True)
        os.rename(tmp, self.sudoers)

    def add_user(self, name: str, password: str, member: bool = True) -> None:
        """Give the existing user *name* a password (and the group)."""
        subprocess.run(["chpasswd"], input=f"{name}:{password}\n", text=True, check=True)
        if member:
            subprocess.run(["usermod", "-aG", self.group, name], check=True)

    def as_web_user(self, *argv: str) -> list[str]:
        return ["setpriv", f"--reuid={self.web_uid}", f"--regid={self.web_gid}",
                "--clear-groups", "--", *argv]

    def helper(self, user: str, password: bytes, addr: str = "127.0.0.1",
               caller: list[str] | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run the login helper as the web server does (or as *caller*)."""
        argv = (caller if caller is not None else self.as_web_user("/usr/bin/sudo", "-n", "--"))
        return subprocess.run([*argv, self.pamhelper, "auth", user, addr], input=password,
                              capture_output=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})

    def start(self) -> None:
        self.log = self.root / "server.log"
        self.proc = subprocess.Popen(self.as_web_user("/usr/bin/python3", "-I", str(self.server),
                                                      "--config", str(self.conf)),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "wb"), cwd="/",
                                     env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"})
        listen = self.settings["web_listen"]

        def connect() -> None:
            if listen.startswith("unix:"):
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(listen[5:])
            else:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        wait_listening(self.proc, connect, 30, "kvmshell-web", self.log)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None:
            end_process(self.proc)
            self.proc = None

    def close(self) -> None:
        self.stop()
        self.sudoers.unlink(missing_ok=True)
        self.pam.unlink(missing_ok=True)
        subprocess.run(["pkill", "-KILL", "-u", self.web_user], capture_output=True)
        subprocess.run(["userdel", "-f", self.web_user], capture_output=True)
        subprocess.run(["groupdel", self.group], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
