"""Host settings: one root-owned file, ``/etc/kvmshell/kvmshell.conf``.

Format: ``key = value`` lines, ``#`` comments.  Unknown keys are errors, so
a typo never silently weakens a limit.  Why root-owned: kvmshell runs as
the (hostile) VM user, and the file decides which directories that user may
read images from, so only a file the user cannot write is honoured.
"""

from __future__ import annotations

import os
import stat

from kvmshell.common.errors import ConfigError, RefusedFile
from kvmshell.common.rootfile import read_root_file

DEFAULT_DIR = "/etc/kvmshell"
DEFAULT_PATH = DEFAULT_DIR + "/kvmshell.conf"
MAX_BYTES = 65536                  # the config's size cap (a larger file is refused)
# Where kvmshell (run by the VM user, whose code may pick its argv) takes a
# config from: the admin's directory, and the place of the test suite's and
# the benchmarks' own trees.  Only root can create either (/etc and /run are
# root's), and every component of the path is checked to be root's too, so
# a config there is the admin's word.  kvmadm, run by root, takes any path.
USER_CONFIG_DIRS = ("/etc/kvmshell", "/run/kvmshell-test")

_DEFAULTS: dict[str, str] = {
    "vmdir": "/var/lib/kvmshell/vms",
    "qemu": "/usr/bin/qemu-system-x86_64",
    "qemu_img": "/usr/bin/qemu-img",
    "accel": "kvm tcg",
    "accel_fallback": "yes",
    "image_dirs": "",
    "helper": "/usr/local/libexec/kvmshell/kvmshell-nethelper",
    "stop_timeout": "30",
    "console_log_bytes": "1048576",
    "max_running": "0",
    "max_image_bytes": "0",
    "upload_max_bytes": "4294967296",
    "group": "kvmusers",
    "authorized_keys": "/etc/kvmshell/authorized_keys",
    "shell": "/usr/local/bin/kvmshell",
    "adduser_kvm": "yes",
    "log_socket": "/dev/log",
    "autostart": "yes",
    # The web front door (kvmshell-web; off until the admin enables it).
    "web_listen": "unix:/run/kvmshell-web/web.sock",
    "web_origins": "",
    "web_proxies": "",
    "web_user": "kvmweb",
    "web_pam_service": "kvmshell",
    "web_pamhelper": "/usr/local/libexec/kvmshell/kvmshell-pamhelper",
    "web_kvmshell": "/usr/local/bin/kvmshell",
    "web_idle_timeout": "900",
    "web_session_lifetime": "28800",
    "web_login_window": "600",
    "web_login_failures_per_address": "20",
    "web_login_failures_per_user": "5",
    "web_tls_cert": "",
    "web_tls_key": "",
    "max_smp": "0",
    "max_ram_mib": "0",
    "max_vcpus": "0",
    "budgets": "/etc/kvmshell/budgets",
    "uefi_code": "/usr/share/OVMF/OVMF_CODE_4M.fd",
    "uefi_vars": "/usr/share/OVMF/OVMF_VARS_4M.fd",
    "cgroup": "auto",
    "cgroup_name": "kvmshell",
    "cgroup_helper": "/usr/local/libexec/kvmshell/kvmshell-cgrouphelper",
    "connect_ports": "all",
    "connect_user_mode": "yes",
    # Several hosts on one shared tree (docs/multihost.md).
    "host_name": "",
    "hosts_file": "/etc/kvmshell/hosts",
    "relay_user": "kvmrelay",
    "relay_client": "/usr/local/libexec/kvmshell/kvmshell-relay",
    "relay_key": "/etc/kvmshell/relay/id_ed25519",
    "relay_known_hosts": "/etc/kvmshell/relay/known_hosts",
    "munge": "/usr/bin/munge",
}

_ACCELS = ("kvm", "tcg")
CGROUP_MODES = ("auto", "cgroupfs", "systemd", "off")


class Config:
    """Parsed host settings (all values validated)."""

    def __init__(self, path: str, values: dict[str, str]) -> None:
        self.path = path
        self.vmdir = _abs(values, "vmdir")
        self.qemu = _abs(values, "qemu")
        self.qemu_img = _abs(values, "qemu_img")
        self.helper = _abs(values, "helper")
        self.group = values["group"]
        self.authorized_keys = _abs(values, "authorized_keys")
        self.shell = _abs(values, "shell")
        self.accel = values["accel"].split()
        if not self.accel or any(a not in _ACCELS for a in self.accel):
            raise ConfigError(f"{path}: accel must be a list of {'/'.join(_ACCELS)}")
        # May start fall back from the first accelerator to a later one
        # (and say so), or must it refuse?  See kvmshell.shell.accel.
        self.accel_fallback = _bool(values, "accel_fallback", path)
        # Does kvmadm adduser add the user to /dev/kvm's group?
        self.adduser_kvm = _bool(values, "adduser_kvm", path)
        self.image_dirs = [_checkdir(path, d) for d in values["image_dirs"].split()]
        self.stop_timeout = _int(values, "stop_timeout", path)
        self.console_log_bytes = _int(values, "console_log_bytes", path)
        self.max_running = _int(values, "max_running", path)
        self.max_image_bytes = _int(values, "max_image_bytes", path)
        self.upload_max_bytes = _int(values, "upload_max_bytes", path)
        # Guest TCP ports 'connect' may reach: None is all of them.
        self.connect_ports = _ports(values["connect_ports"], path)
        # May 'connect' reach user-mode VMs, through a short-lived loopback
        # forward (connect.py; SECURITY.md states the race)?
        self.connect_user_mode = _bool(values, "connect_user_mode", path)
        self._hardware(values, path)
        self.log_socket = _abs(values, "log_socket")
        self.autostart = _bool(values, "autostart", path)
        self._multihost(values, path)
        self._values = values
        self._web: WebConfig | None = None

    def _multihost(self, values: dict[str, str], path: str) -> None:
        """Several hosts on one tree (common/hosts.py, docs/multihost.md):
        this host's name (default: the kernel's node name), the host list,
        the relay account, its client, key and known hosts, MUNGE's client."""
        self.host_name = values["host_name"] or os.uname().nodename.partition(".")[0]
        if not is_host_name(self.host_name):
            raise ConfigError(f"{path}: host_name: {self.host_name!r} is not a plain host name")
        self.hosts_file = _abs(values, "hosts_file")
        self.relay_user = _word(path, values, "relay_user")
        self.relay_client = _abs(values, "relay_client")
        self.relay_key = _abs(values, "relay_key")
        self.relay_known_hosts = _abs(values, "relay_known_hosts")
        self.munge = _abs(values, "munge")

    def _hardware(self, values: dict[str, str], path: str) -> None:
        """Hardware and budget settings: vCPUs per VM, per-user budgets, UEFI, cgroups."""
        # max_smp 0: as many vCPUs per VM as the host has CPUs.
        self.max_smp = _int(values, "max_smp", path) or (os.cpu_count() or 1)
        self.max_ram_mib = _int(values, "max_ram_mib", path)
        self.max_vcpus = _int(values, "max_vcpus", path)
        self.budgets = _abs(values, "budgets")
        self.uefi_code = _abs(values, "uefi_code")
        self.uefi_vars = _abs(values, "uefi_vars")
        self.cgroup_helper = _abs(values, "cgroup_helper")
        self.cgroup = values["cgroup"]
        if self.cgroup not in CGROUP_MODES:
            raise ConfigError(f"{path}: cgroup must be one of {', '.join(CGROUP_MODES)}")
        self.cgroup_name = values["cgroup_name"]
        ok = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"
        if not 1 <= len(self.cgroup_name) <= 64 or any(c not in ok for c in self.cgroup_name):
            raise ConfigError(f"{path}: cgroup_name must be 1-64 of [A-Za-z0-9_-]")

    @property
    def web(self) -> "WebConfig":
        """The web front door's settings, parsed on first use (kvmshell's
        start path never pays for them).  Raises ConfigError."""
        if self._web is None:
            self._web = WebConfig(self.path, self._values)
        return self._web


_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class WebConfig:
    """The ``web_*`` settings: read by kvmshell-web (as ``web_user``) and by
    the login helper (as root).  See kvmshell.conf for what each one means.

    ``listen``: ``("tcp", host, port)`` or ``("unix", path, 0)``;
    ``origins``: the allowed ``scheme://host[:port]`` values (lower case);
    ``proxies``: addresses whose ``X-Forwarded-For`` is believed;
    the timeouts and the login window in seconds."""

    def __init__(self, path: str, values: dict[str, str]) -> None:
        self.listen = _listen(path, values["web_listen"])
        self.origins = [_origin(path, o) for o in values["web_origins"].split()]
        self.proxies = values["web_proxies"].split()
        for p in self.proxies:
            _ip(path, "web_proxies", p)
        self.user = _word(path, values, "web_user")
        self.pam_service = _word(path, values, "web_pam_service")
        self.pamhelper = _abs(values, "web_pamhelper")
        self.kvmshell = _abs(values, "web_kvmshell")
        self.idle_timeout = _int(values, "web_idle_timeout", path)
        self.session_lifetime = _int(values, "web_session_lifetime", path)
        self.login_window = _int(values, "web_login_window", path)
        self.login_failures_per_address = _int(values, "web_login_failures_per_address", path)
        self.login_failures_per_user = _int(values, "web_login_failures_per_user", path)
        self.tls_cert = _abs(values, "web_tls_cert") if values["web_tls_cert"] else ""
        self.tls_key = _abs(values, "web_tls_key") if values["web_tls_key"] else ""
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError(f"{path}: web_tls_cert and web_tls_key go together")
        for key in ("idle_timeout", "session_lifetime", "login_window"):
            if getattr(self, key) == 0:
                raise ConfigError(f"{path}: web_{key}: must be at least 1 second")


def is_host_name(name: str) -> bool:
    """A host name as the host list spells it (common/hosts.py): 1-63 of
    [a-z0-9-], not first '-'."""
    return (1 <= len(name) <= 63 and name[0] != "-"
            and all(c in "abcdefghijklmnopqrstuvwxyz0123456789-" for c in name))


def _word(path: str, values: dict[str, str], key: str) -> str:
    v = values[key]
    if not 1 <= len(v) <= 32 or v[0] in ".-" or any(c not in _NAME_CHARS for c in v):
        raise ConfigError(f"{path}: {key}: {v!r} is not a plain name")
    return v


def _ip(path: str, key: str, value: str) -> str:
    import ipaddress
    try:
        return str(ipaddress.ip_address(value))
    except ValueError as exc:
        raise ConfigError(f"{path}: {key}: {value!r} is not an IP address") from exc


def _listen(path: str, value: str) -> tuple[str, str, int]:
    if value.startswith("unix:"):
        sock = value[5:]
        if not sock.startswith("/") or "/../" in sock + "/" or len(sock) > 100:
            raise ConfigError(f"{path}: web_listen: {value!r}: unix:ABSOLUTE-PATH expected")
        return "unix", sock, 0
    host, colon, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{path}: web_listen: {value!r}: HOST:PORT or unix:PATH expected")
    return "tcp", _ip(path, "web_listen", host), int(port)


def _origin(path: str, value: str) -> str:
    """``scheme://host[:port]`` exactly, as a browser sends it in ``Origin``."""
    scheme, sep, rest = value.lower().partition("://")
    host = rest.rsplit(":", 1)[0] if not rest.endswith("]") else rest
    ok = bool(sep and scheme in ("http", "https") and rest and "/" not in rest
              and "@" not in rest and all(c in _NAME_CHARS or c in ":[]" for c in rest) and host)
    if ":" in rest and not rest.endswith("]"):
        ok = ok and rest.rsplit(":", 1)[1].isdigit()
    if not ok:
        raise ConfigError(f"{path}: web_origins: {value!r} is not scheme://host[:port]")
    return value.lower()


def _abs(values: dict[str, str], key: str) -> str:
    v = values[key]
    if not v.startswith("/") or "//" in v or "/../" in v + "/" or "," in v:
        raise ConfigError(f"{key}: must be a plain absolute path, got {v!r}")
    return v.rstrip("/") or "/"


def _checkdir(path: str, d: str) -> str:
    if not d.startswith("/") or "," in d or ":" in d or "/." in d:
        raise ConfigError(f"{path}: image_dirs: {d!r} is not a plain absolute path")
    return d.rstrip("/")


def _bool(values: dict[str, str], key: str, path: str) -> bool:
    v = values[key]
    if v not in ("yes", "no"):
        raise ConfigError(f"{path}: {key}: must be yes or no, got {v!r}")
    return v == "yes"


def _int(values: dict[str, str], key: str, path: str) -> int:
    try:
        n = int(values[key])
    except ValueError as exc:
        raise ConfigError(f"{path}: {key}: not a number: {values[key]!r}") from exc
    if n < 0:
        raise ConfigError(f"{path}: {key}: must not be negative")
    return n


def check_place(path: str, dirs: tuple[str, ...] = USER_CONFIG_DIRS) -> None:
    """Refuse a config path outside *dirs*, or below anything not root's.

    Why: a config names the limits (0 means none), the tree and the image
    directories, so kvmshell honours only one the admin placed, however its
    argv was chosen.  Raises RefusedFile (exit status 2, as every refused
    word of a command line): the path is the ``--config`` word's."""
    if (not path.startswith("/") or os.path.normpath(path) != path
            or not any(path.startswith(d + "/") for d in dirs)):
        raise RefusedFile(f"config {path}: kvmshell takes a config only from "
                          + " or ".join(d + "/" for d in dirs))
    # Why: /etc/kvmshell also holds other root files whose keys are config
    # keys (budgets/groups/G.conf): in the admin's place only a *.conf file
    # directly in it is a host config.
    if path.startswith(DEFAULT_DIR + "/") and (os.path.dirname(path) != DEFAULT_DIR
                                               or not path.endswith(".conf")):
        raise RefusedFile(f"config {path}: in {DEFAULT_DIR}/ kvmshell takes only a *.conf "
                          "file directly in it")
    parent = "/"
    for comp in path.split("/")[1:-1]:
        parent = os.path.join(parent, comp)
        try:
            st = os.lstat(parent)
        except FileNotFoundError:
            return          # and so is the file: load() says so
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            raise RefusedFile(f"config {path}: {parent} must be a directory owned by root "
                              "and not group/world-writable")


def _ports(text: str, path: str) -> "frozenset[int] | None":
    """``all``, or space-separated ports and ranges (``22 80 8000-8080``)."""
    words = text.split()
    if words == ["all"]:
        return None
    out: set[int] = set()
    for word in words:
        lo, dash, hi = word.partition("-")
        if not (lo.isdigit() and lo.isascii() and (not dash or (hi.isdigit() and hi.isascii()))):
            raise ConfigError(f"{path}: connect_ports: {word!r} is not a port or range")
        a, b = int(lo), int(hi) if dash else int(lo)
        if not 1 <= a <= b <= 65535:
            raise ConfigError(f"{path}: connect_ports: {word!r} is not within 1-65535")
        out.update(range(a, b + 1))
    return frozenset(out)


def load(path: str = DEFAULT_PATH, *, require_root: bool = True,
         places: tuple[str, ...] | None = None) -> Config:
    """Read and validate the host config; a missing default file means
    defaults.  *places*: the directories the path must be in (see
    :func:`check_place`); None for root's own tools.  *require_root* False:
    any owner and mode (tests reading a checkout's file).

    Raises:
        RefusedFile: the path is outside *places*.
        ConfigError: the file is missing (but the default), not a regular
            file of root's, over :data:`MAX_BYTES` bytes
            (:func:`~kvmshell.common.rootfile.read_root_file`), or a setting
            is unknown or invalid.
    """
    if places is not None:
        check_place(path, places)
    values = dict(_DEFAULTS)
    # Why root's: a config the user can write would let them widen image_dirs.
    data = read_root_file(path, MAX_BYTES, "config", require_root=require_root)
    if data is None:
        if path == DEFAULT_PATH:
            return Config(path, values)
        raise ConfigError(f"cannot read config {path}: no such file")
    for lineno, raw in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, eq, value = line.partition("=")
        key = key.strip()
        if not eq or key not in _DEFAULTS:
            raise ConfigError(f"{path}:{lineno}: unknown setting {key!r}")
        values[key] = value.strip()
    return Config(path, values)
