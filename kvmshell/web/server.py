"""``kvmshell-web [--config PATH]``: serve the web front door (uvicorn).

Runs as ``web_user`` (kvmweb; the systemd unit sets it) and refuses root.
Listens where ``web_listen`` says: ``unix:/run/kvmshell-web/web.sock`` (the
default: a TLS reverse proxy on this host connects there, README: the
nginx example), any ``HOST:PORT``, or serving TLS itself with
``web_tls_cert`` and ``web_tls_key``.  ``web_origins`` must name the
origin(s) users type in the address bar: it has no default.

Whose ``X-Forwarded-For`` is believed (the client address the rate limits,
PAM's ``PAM_RHOST`` and the fail2ban log line use):

* on a unix socket, whoever can connect to it: so the socket's directory
  must keep everyone else out (no access for others, not the VM users'
  group; :func:`check_listen` refuses to start otherwise);
* on TCP, the addresses in ``web_proxies``, which must not be addresses of
  this host: every local user, a VM user's compromised QEMU, and every
  guest with user networking (QEMU's slirp connects from the host) can
  connect from those, so they could forge the client's address, e.g. to
  have fail2ban ban someone else, or to dodge the per-address limit.

Config errors: one line, exit 2.
"""

from __future__ import annotations

import os
import sys

from kvmshell.common.config import DEFAULT_PATH
from kvmshell.common.errors import ConfigError, KvmshellError, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio

    from kvmshell.common.config import WebConfig

# Seconds a connection may take to send a whole request head (from its
# start, or from the end of the previous answer on a kept-alive one).
HEAD_SECONDS = 10.0


def options(args: list[str]) -> str:
    """The config path from ``[--config PATH]``; raises UsageError."""
    path = DEFAULT_PATH
    while args:
        if args[0] == "--config" and len(args) >= 2:
            path, args = args[1], args[2:]
        else:
            raise UsageError(f"{args[0][:40]}: unexpected argument (usage: kvmshell-web "
                             "[--config PATH])")
    return path


def _local_address(addr: str) -> bool:
    """Is *addr* (an IP address) one of this host's own?  (Binding to it
    succeeds; EADDRNOTAVAIL says it is not; anything else: assume it is.)"""
    import errno
    import socket
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((addr, 0))
        except OSError as exc:
            return exc.errno != errno.EADDRNOTAVAIL
    return True


def check_listen(w: "WebConfig", vm_group: str) -> None:
    """Refuse (ConfigError) a listening setup in which someone other than
    the proxy could forge ``X-Forwarded-For``: on TCP, a ``web_proxies``
    address of this host; on a unix socket, a directory owned by someone
    but root and web_user, that others may enter, or that a member of the VM users' group (*vm_group*) may enter
    through the directory's group."""
    import grp
    import stat
    kind, where, _port = w.listen
    if kind == "tcp":
        for addr in w.proxies:
            if _local_address(addr):
                raise ConfigError(
                    f"web_proxies: {addr} is an address of this host: every local user (and "
                    "every guest with user networking) can connect from it and forge "
                    "X-Forwarded-For; put a proxy on this host on web_listen = unix:PATH "
                    "(README)")
        return
    directory = os.path.dirname(where) or "/"
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise ConfigError(f"web_listen: {directory}: {exc.strerror} (make install creates "
                          "/run/kvmshell-web through /etc/tmpfiles.d/kvmshell-web.conf)") from exc
    who = ""
    if st.st_uid not in (0, os.geteuid()):
        who = f"its owner (uid {st.st_uid}, neither root nor web_user)"
    elif st.st_mode & 0o007:
        who = "every user"
    elif st.st_mode & 0o070:
        try:
            vm_users = _members(grp.getgrnam(vm_group).gr_gid)
        except KeyError:
            vm_users = set()
        shared = sorted(_members(st.st_gid) & vm_users)
        if shared:
            who = f"VM user {shared[0]} (through the directory's group)"
    if who:
        raise ConfigError(
            f"web_listen: {directory} (mode {stat.S_IMODE(st.st_mode):04o}) lets {who} "
            "reach the socket, whose X-Forwarded-For is believed: keep it to web_user and "
            "the proxy's group (chmod 0750, chgrp www-data)")


def _members(gid: int) -> set[str]:
    """The users whose primary or supplementary group is *gid*."""
    import grp
    import pwd
    try:
        names = set(grp.getgrgid(gid).gr_mem)
    except KeyError:
        names = set()
    return names | {pw.pw_name for pw in pwd.getpwall() if pw.pw_gid == gid}


def http_protocol() -> type["asyncio.Protocol"]:
    """uvicorn's HTTP/1.1 protocol (h11) with a deadline for each request
    head: a connection that has not sent a whole head :data:`HEAD_SECONDS`
    after it opened, or after the previous answer, is closed.  Why: uvicorn
    has no such timeout (its keep-alive timer ends with the first byte), so
    connections that send nothing, or a byte now and then, would each hold
    a descriptor until the server has none left -- for anyone, before any
    login.  (A request's body has its own deadline in the app:
    ``app.BODY_SECONDS``.)  Once a connection becomes a WebSocket the
    deadline no longer applies."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _head_timer: "asyncio.TimerHandle | None" = None

        def connection_made(self, transport: "asyncio.Transport") -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(HEAD_SECONDS, self._too_slow)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _too_slow(self) -> None:
            self._head_timer = None
            if self.transport.get_protocol() is self and not self.transport.is_closing():
                self.transport.close()

        def handle_events(self) -> None:
            before = self.scope
            super().handle_events()
            if self.scope is not before:        # a whole head arrived
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return Protocol


def main(argv: list[str] | None = None) -> int:
    from kvmshell.common import config
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if os.getuid() == 0 or os.geteuid() == 0:
            raise UsageError("refusing to run as root (run it as web_user, e.g. kvmweb)")
        cfg = config.load(options(args))
        w = cfg.web
        if not w.origins:
            raise ConfigError(f"{cfg.path}: web_origins is empty: name the address users "
                              "open, e.g. web_origins = https://vm.example.org")
        check_listen(w, cfg.group)
        for key, path in (("web_tls_cert", w.tls_cert), ("web_tls_key", w.tls_key)):
            if path:
                try:
                    with open(path, "rb"):
                        pass
                except OSError as exc:
                    raise ConfigError(f"{key}: cannot read {path}: {exc.strerror} (it must be "
                                      f"readable by {w.user})") from exc
    except KvmshellError as exc:
        sys.stderr.write(f"kvmshell-web: {exc.message}\n")
        return 2
    import uvicorn

    from kvmshell.web.app import create_app
    kind, where, port = w.listen
    uconfig = uvicorn.Config(
        create_app(cfg), host=where if kind == "tcp" else "127.0.0.1", port=port or 8480,
        uds=where if kind == "unix" else None,
        proxy_headers=bool(w.proxies) or kind == "unix",
        forwarded_allow_ips="*" if kind == "unix" else ",".join(w.proxies) or "",
        ssl_certfile=w.tls_cert or None, ssl_keyfile=w.tls_key or None,
        ws_max_size=1 << 20, lifespan="off", log_level="warning", access_log=False,
        server_header=False, http=http_protocol())
    from kvmshell.web import events
    events.log(f"listening on {'unix:' + where if kind == 'unix' else f'{where}:{port}'} "
               f"for {' '.join(w.origins)}")
    uvicorn.Server(uconfig).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
