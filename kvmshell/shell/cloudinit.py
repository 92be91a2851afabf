"""``start -cloud-init``: a NoCloud seed that kvmshell builds and attaches.

Runs as the VM user, inside kvmshell.  The seed is what cloud-init's NoCloud
datasource reads (cloud-init docs, reference/datasources/nocloud): an
ISO 9660 file system labelled ``cidata`` (Rock Ridge and Joliet names, as
``cloud-localds``/genisoimage make it) holding

``meta-data``
    ``instance-id`` (kept in the VM directory as :data:`INSTANCE_ID`, so a
    restart is not a first boot; ``-cloud-init new`` makes a new one) and
    ``local-hostname``, the VM's name (``_`` spelled ``-``: hostnames have
    no underscore).
``user-data``
    ``#cloud-config`` with ``ssh_authorized_keys``, the user's own keys
    taken from the root-owned file sshd reads for them
    (``<authorized_keys>/USER``), key options and comments dropped, and
    ``preserve_hostname: false`` so that the hostname is the VM's name.
    With ``-user-data FILE`` the user's ``#cloud-config`` mapping is parsed
    (PyYAML ``safe_load``, at most :data:`USER_DATA_MAX` bytes), kvmshell's
    keys are added to its ``ssh_authorized_keys``, and the result is
    written out again by kvmshell (``safe_dump``): parsed, never passed
    through.  cloud-init runs it inside the guest only; nothing of it runs
    on the host.
``network-config``
    (version 1, as Proxmox writes it) only where kvmshell knows the
    guest's network: ``ethN`` with DHCP for a user-mode NIC, and the static
    ``guest=`` address for a routed tap; without either there is no
    network-config and cloud-init's fallback (DHCP on the first NIC) applies.

The image is built with pycdlib in a sealed memfd (never on disk, so
nothing is left behind and nothing can be swapped) and handed to QEMU as a
read-only descriptor: a wrapper-owned CD-ROM in a slot no user option
(``-hda`` ``-hdb`` ``-cdrom`` ``-fda`` ``-fdb``) uses.  See :func:`seed_argv`.
"""

from __future__ import annotations

import os
import stat

from kvmshell.common.errors import RefusedFile, RuntimeFailure
from kvmshell.shell.useropts import Opened

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kvmshell.common.adminopts import AdminPlan
    from kvmshell.common.config import Config
    from kvmshell.common.vmtree import VM

INSTANCE_ID = "cloud-init.instance-id"
USER_DATA_MAX = 64 * 1024
# user-data as kvmshell writes it out, keys aside (parse_user_data's mapping
# re-spelled: block style, quoting).
WRITTEN_MAX = 4 * USER_DATA_MAX
MAX_DEPTH = 64
# The descriptor set of the seed: above any set useropts numbers (one per
# user drive, at most five).
SEED_FDSET = 64
HEADER = "#cloud-config"
LABEL = "cidata"


# ---- the pieces ---------------------------------------------------------------

def user_keys(cfg: "Config", uid: int) -> list[str]:
    """The user's public keys, ``TYPE BASE64`` each, from the root-owned file
    sshd reads for them (``<authorized_keys>/USER``, sshd's format).

    Raises:
        RuntimeFailure: no such file, not root's, writable by others, or no
        key in it.
    """
    import pwd

    from kvmshell.common.sshkeys import MAX_KEYS, MAX_LINE, keys_of_line

    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError as exc:
        raise RuntimeFailure(f"-cloud-init: uid {uid} has no user name") from exc
    path = os.path.join(cfg.authorized_keys, user)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise RuntimeFailure(f"-cloud-init: no SSH keys for {user} ({path}: {exc.strerror};"
                             " admin: kvmadm setkey)") from exc
    try:
        st = os.fstat(fd)
        # Why: only the admin's file is the user's key list (as sshd's StrictModes).
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            raise RuntimeFailure(f"-cloud-init: {path} must be a root-owned file not writable"
                                 " by others (admin: kvmadm setkey)")
        data = os.read(fd, MAX_KEYS * MAX_LINE)
    finally:
        os.close(fd)
    keys: list[str] = []
    for line in data.decode("ascii", "replace").splitlines():
        found = keys_of_line(line[:MAX_LINE])
        if found is not None and " ".join(found) not in keys:
            keys.append(" ".join(found))
    if not keys:
        raise RuntimeFailure(f"-cloud-init: no SSH key for {user} in {path} (admin: kvmadm setkey)")
    return keys[:MAX_KEYS]


def parse_user_data(fd: int, name: str) -> dict[str, object]:
    """Read a ``#cloud-config`` file from *fd* (opened by files.open_file) and
    return its top-level mapping.  Refused (RefusedFile, naming *name*):
    more than :data:`USER_DATA_MAX` bytes, not UTF-8, another cloud-init
    part type (scripts, includes, MIME, gzip: the first line must be
    ``#cloud-config``), not YAML, several documents, or not a mapping."""
    import yaml

    data = b""
    while len(data) <= USER_DATA_MAX:
        chunk = os.read(fd, USER_DATA_MAX + 1 - len(data))
        if not chunk:
            break
        data += chunk
    token = f"-user-data: {name}"
    if len(data) > USER_DATA_MAX:
        raise RefusedFile(f"{token}: larger than {USER_DATA_MAX} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RefusedFile(f"{token}: not UTF-8 text") from exc
    if text.split("\n", 1)[0].rstrip() != HEADER:
        raise RefusedFile(f"{token}: the first line must be {HEADER!r} (only cloud-config is taken)")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        # Why: an alias is written out again in full (scalars) and merge
        # keys copy pairs (<<: [*a, *a] doubles per line): kilobytes that
        # cost gigabytes and hours.  cloud-config needs neither.
        # Depth: libyaml's time grows with its square (30000: 8 s).
        depth = 0
        for event in yaml.parse(text, Loader=loader):
            mark = event.start_mark
            line = mark.line + 1 if mark else "?"
            if isinstance(event, yaml.AliasEvent):
                raise RefusedFile(f"{token}: YAML aliases (*{event.anchor}, line {line})"
                                  " are not taken")
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise RefusedFile(f"{token}: nested more than {MAX_DEPTH} deep (line {line})")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        doc = yaml.load(text, Loader=loader)  # noqa: S506 -- a safe loader
    except (ValueError, OverflowError) as exc:
        # A scalar Python cannot hold: a date with month 13, an int of more
        # than 4300 digits (sys.get_int_max_str_digits).
        raise RefusedFile(f"{token}: a value cannot be read: {exc}") from exc
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise RefusedFile(f"{token}: not YAML{line}: {getattr(exc, 'problem', None) or exc}") from exc
    except RecursionError as exc:
        raise RefusedFile(f"{token}: nested too deeply") from exc
    if not isinstance(doc, dict) or not all(isinstance(k, str) for k in doc):
        raise RefusedFile(f"{token}: not a YAML mapping of names to values")
    try:
        user_data([], doc)   # written out once now: refused by name, before anything
    except RefusedFile as exc:
        raise RefusedFile(f"{token}: {exc.message.removeprefix('-user-data: ')}") from exc
    return doc


def user_data(keys: list[str], extra: dict[str, object] | None) -> bytes:
    """The ``user-data`` text: the user's mapping (if any) with *keys* added."""
    import yaml

    doc: dict[str, object] = dict(extra or {})
    theirs = doc.get("ssh_authorized_keys", [])
    if not isinstance(theirs, list) or not all(isinstance(k, str) for k in theirs):
        raise RefusedFile("-user-data: ssh_authorized_keys must be a list of strings")
    doc["ssh_authorized_keys"] = keys + [k for k in theirs if k not in keys]
    doc.setdefault("preserve_hostname", False)
    # Why: block style indents by depth, so nested flow mappings grow when
    # written out (64 KB made 3.9 MB); the seed stays within this.
    limit = WRITTEN_MAX + sum(len(k) + 8 for k in keys)
    out = _Capped(limit)
    try:
        yaml.safe_dump(doc, out, default_flow_style=False, sort_keys=False, allow_unicode=True)
    except _TooLarge as exc:
        raise RefusedFile(f"-user-data: larger than {limit} bytes when written out "
                          "(nested too deeply?)") from exc
    except (yaml.YAMLError, RecursionError, ValueError, OverflowError) as exc:
        raise RefusedFile(f"-user-data: cannot be written out again: {exc}") from exc
    return (HEADER + "\n" + out.getvalue()).encode()


class _TooLarge(Exception):
    pass


class _Capped:
    """A text stream for yaml.safe_dump that stops it past *limit* characters."""

    def __init__(self, limit: int) -> None:
        self.parts: list[str] = []
        self.left = limit

    def write(self, text: str) -> None:
        self.left -= len(text)
        if self.left < 0:
            raise _TooLarge
        self.parts.append(text)

    def getvalue(self) -> str:
        return "".join(self.parts)


def meta_data(vm_name: str, iid: str) -> bytes:
    import yaml
    return yaml.safe_dump({"instance-id": iid, "local-hostname": vm_name.replace("_", "-")},
                          default_flow_style=False, sort_keys=False).encode()


def network_config(plan: "AdminPlan", vm_name: str) -> bytes | None:
    """Network config version 1 for the NICs kvmshell knows, or None."""
    import ipaddress

    import yaml

    from kvmshell.common.guestnet import stable_mac

    config: list[dict[str, object]] = []
    for index, (nic, backend) in enumerate(zip(plan.nics, plan.backends)):
        if backend.kind == "user":
            subnets: list[dict[str, object]] = [{"type": "dhcp"}]
        elif backend.kind == "tap" and "ip" in backend.params and "guest" in backend.params:
            prefix = ipaddress.ip_interface(backend.params["ip"]).network.prefixlen
            subnets = [{"type": "static", "address": f"{backend.params['guest']}/{prefix}"}]
        else:
            continue
        mac = nic.params.get("macaddr") or stable_mac(vm_name, index)
        config.append({"type": "physical", "name": f"eth{index}", "mac_address": mac,
                       "subnets": subnets})
    if not config:
        return None
    return yaml.safe_dump({"version": 1, "config": config}, default_flow_style=False,
                          sort_keys=False).encode()


# ---- the instance-id ------------------------------------------------------------

def _valid_iid(text: str) -> bool:
    return (len(text) == 36 and text.startswith("iid-")
            and all(c in "0123456789abcdef" for c in text[4:]))


def instance_id(vm: "VM", new: bool) -> tuple[str, bool]:
    """The VM's instance-id and whether it must be stored (:func:`store_iid`):
    the stored one unless *new* or there is none (or it is not one of
    kvmshell's, e.g. edited by hand)."""
    if not new:
        try:
            fd = os.open(vm.file(INSTANCE_ID), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                         | os.O_NONBLOCK)
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    text = os.read(fd, 64).decode("ascii", "replace").strip()
                    if _valid_iid(text):
                        return text, False
            finally:
                os.close(fd)
    import secrets
    return "iid-" + secrets.token_hex(16), True


def store_iid(vm: "VM", iid: str) -> None:
    """Write *iid* to :data:`INSTANCE_ID` in the VM directory (a hidden
    O_EXCL temporary, renamed over it: never through a symlink)."""
    tmp = vm.file("." + INSTANCE_ID + ".tmp")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (iid + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, vm.file(INSTANCE_ID))


# ---- the image and its drive ----------------------------------------------------

def build_iso(files: list[tuple[str, str, bytes]]) -> Opened:
    """An ISO 9660 image labelled ``cidata`` holding *files* (ISO 9660 name,
    Rock Ridge/Joliet name, bytes), in a sealed memfd; returns a read-only
    descriptor of it (format raw)."""
    import fcntl
    import io

    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=1, vol_ident=LABEL, joliet=3, rock_ridge="1.09")
    for iso_name, name, data in files:
        iso.add_fp(io.BytesIO(data), len(data), f"/{iso_name};1", rr_name=name,
                   joliet_path=f"/{name}")
    mfd = os.memfd_create("cidata", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        with os.fdopen(os.dup(mfd), "wb") as out:
            iso.write_fp(out)
        iso.close()
        # Why: sealed, the seed cannot change under the guest, whoever holds it.
        fcntl.fcntl(mfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                    | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
        # QEMU picks the descriptor of a set by its access mode: read-only.
        ro = os.open(f"/proc/self/fd/{mfd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(mfd)
    return Opened(ro, "raw", True)


def seed(cfg: "Config", vm: "VM", plan: "AdminPlan", iid: str,
         extra: dict[str, object] | None) -> Opened:
    """Build the seed for *vm*: meta-data, user-data (with the user's
    parsed ``-user-data`` mapping *extra*), network-config."""
    files = [("METADATA.", "meta-data", meta_data(vm.name, iid)),
             ("USERDATA.", "user-data", user_data(user_keys(cfg, os.getuid()), extra))]
    net = network_config(plan, vm.name)
    if net is not None:
        files.append(("NETWORKC.", "network-config", net))
    return build_iso(files)


# Where the seed's CD-ROM goes: a slot no user option uses.  On pc (i440FX)
# the second IDE bus's slave (ide.1 unit 1, -hdd's old place); on q35 the
# AHCI port after -hda, -hdb and -cdrom (ide.0-2).
SEED_DEVICE = {"pc": "ide-cd,id=cidata,bus=ide.1,unit=1,drive=cidata",
               "q35": "ide-cd,id=cidata,bus=ide.3,drive=cidata"}


def seed_argv(seed: Opened, machine: str = "pc", fdset: int = SEED_FDSET) -> list[str]:
    """QEMU 7.2 argv attaching *seed* read-only as a CD-ROM of kvmshell's
    own (:data:`SEED_DEVICE` for *machine*): its descriptor in fdset
    *fdset*, a ``file`` and a ``raw`` -blockdev node (useropts.blockdev_argv,
    as for the user's drives).  Everything in it is kvmshell's own text and
    numbers."""
    from kvmshell.shell.useropts import blockdev_argv
    return blockdev_argv("cidata", seed, [fdset - 1]) + ["-device", SEED_DEVICE[machine]]
