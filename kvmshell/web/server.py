"""``kvmshell-web [--config PATH]``: serve the web front door (uvicorn).

Runs as ``web_user`` (kvmweb; the systemd unit sets it) and refuses root.
Listens where ``web_listen`` says: ``127.0.0.1:8480`` (the default), any
``HOST:PORT``, or ``unix:PATH``; behind a TLS reverse proxy (README: the
nginx example), or serving TLS itself with ``web_tls_cert`` and
``web_tls_key``.  ``X-Forwarded-For`` is believed only from the addresses
in ``web_proxies`` (on a unix socket: from whoever may connect to it, so
keep its directory to the proxy's group).  ``web_origins`` must name the
origin(s) users type in the address bar: it has no default.

Config errors: one line, exit 2.
"""

from __future__ import annotations

import os
import sys

from kvmshell.common.config import DEFAULT_PATH
from kvmshell.common.errors import ConfigError, KvmshellError, UsageError


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
        server_header=False)
    from kvmshell.web import events
    events.log(f"listening on {'unix:' + where if kind == 'unix' else f'{where}:{port}'} "
               f"for {' '.join(w.origins)}")
    uvicorn.Server(uconfig).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
