"""Operations: the audit log, --json, man pages, completion, autostart at boot.

The audit records are received by a datagram socket the test binds and
names in the (root-owned) config's ``log_socket``: the same code path as
``/dev/log``, which this machine may not have.  "No /dev/log" is also run
literally, in a mount namespace whose /dev has none.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import KVMADM, KVMSHELL, REPO, Host, User, kill_all, render_man, wait_for
from kvmshell.common import auditlog
from kvmshell.common import autostart as autostart_files

pytestmark = pytest.mark.operations

BOOT = "-kernel vmlinuz -initrd initrd.img -append console=ttyS0"
FRAME = re.compile(rb"<(\d+)>([A-Z][a-z]{2} [ 1-3]\d \d\d:\d\d:\d\d) ([a-z]+)\[(\d+)\]: (.*)",
                   re.S)


class Record:
    """One datagram the sink received, checked to be one line of printable ASCII."""

    def __init__(self, data: bytes) -> None:
        assert all(0x20 <= b < 0x7F for b in data), data   # no newline, ESC or non-ASCII
        m = FRAME.fullmatch(data)
        assert m, data
        self.pri = int(m.group(1))
        self.facility, self.severity = divmod(self.pri, 8)
        self.program = m.group(3).decode()
        self.pid = int(m.group(4))
        self.text = m.group(5).decode()
        self.fields = auditlog.parse(self.text)

    def __getitem__(self, key: str) -> str:
        return self.fields[key]

    def __repr__(self) -> str:
        return f"Record({self.program}: {self.text})"


class Sink:
    """A syslog socket of the test's own, named by the config's log_socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        os.chmod(path, 0o666)           # the VM users send to it, as to /dev/log
        self.seen: list[Record] = []

    def drain(self) -> list[Record]:
        self.sock.setblocking(False)
        try:
            while True:
                self.seen.append(Record(self.sock.recv(65536)))
        except BlockingIOError:
            pass
        return self.seen

    def find(self, timeout: float = 10, program: str | None = None, **want: str) -> Record:
        """The first record (since the last clear) of *program* whose fields include *want*."""
        deadline = time.monotonic() + timeout
        while True:
            for r in self.drain():
                if program not in (None, r.program):
                    continue
                if all(r.fields.get(k) == v for k, v in want.items()):
                    return r
            if time.monotonic() > deadline:
                raise AssertionError(f"no record with {want}: {self.seen}")
            time.sleep(0.05)

    def clear(self) -> None:
        self.drain()
        self.seen = []

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sink(host: Host) -> Iterator[Sink]:
    d = host.root / f"log-{secrets.token_hex(3)}"
    d.mkdir(mode=0o755)
    s = Sink(d / "dev-log")
    host.write_conf(log_socket=str(s.path), shell=KVMSHELL)
    try:
        yield s
    finally:
        s.close()
        host.write_conf()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(autouse=True)
def _leave_no_vm(host: Host) -> Iterator[None]:
    """Remove the VMs a test made: the other files' tests count the session
    users' VMs ('start' with the VM left out)."""
    def names() -> set[str]:
        return {n for n in os.listdir(host.vmdir) if "." not in n} if host.vmdir.exists() else set()
    before = names()
    yield
    for name in sorted(names() - before):
        wait_for(lambda: host.kvmadm("remove", name, "--purge", check=False).returncode == 0,
                 30, f"kvmadm remove {name}")


def _vm(host: Host, user: User, *admin: str, guest: Path | None = None) -> str:
    name = f"op{secrets.token_hex(3)}"
    host.create_vm(name, user, *admin, guest=guest)
    return name


SSH = {"SSH_CONNECTION": "192.0.2.7 51234 192.0.2.1 22"}


# ---- the record's format ---------------------------------------------------

@pytest.mark.parametrize("value", [
    "plain", "", "two words", 'quote " and \\ backslash', "new\nline", "cr\rtab\t",
    "esc \x1b[2J\x1b]0;title\x07", "nul \x00 del \x7f", "caf\u00e9 \u202e rtl", "bad \udcff byte",
    "a=b", "<13>Jan  1 00:00:00 kvmshell[1]: user=root outcome=ok",
])
def test_record_quoting_is_one_printable_line_and_round_trips(value: str) -> None:
    text = auditlog.message([("user", "alice"), ("args", value), ("outcome", "ok")])
    assert all(0x20 <= ord(c) < 0x7F for c in text), text
    assert auditlog.parse(text) == {"user": "alice", "args": value, "outcome": "ok"}
    # a forged field inside a value stays inside it
    assert list(auditlog.parse(text)) == ["user", "args", "outcome"]


def test_record_values_are_cut_and_marked() -> None:
    text = auditlog.message([("args", "x" * 5000)])
    fields = auditlog.parse(text)
    assert fields["args"] == "x" * auditlog.MAX_VALUE and fields["truncated"] == "yes"


def test_frame_is_rfc3164_authpriv() -> None:
    data = auditlog.frame("kvmshell", "user=a outcome=ok", auditlog.INFO, now=0)
    r = Record(data)
    assert (r.facility, r.severity, r.program, r.pid) == (10, 6, "kvmshell", os.getpid())
    assert r.fields == {"user": "a", "outcome": "ok"}


def test_join_words_splits_back_with_the_lexer() -> None:
    from kvmshell.shell import lexer
    words = ["-append", "console=ttyS0 quiet", "it's", "a\"b", "x\\y", "", "$(id)"]
    assert lexer.split(auditlog.join_words(words)) == words


# ---- what each command leaves ----------------------------------------------

def test_audit_accepted_start(host: Host, alice: User, guest: Path, sink: Sink) -> None:
    vm = _vm(host, alice, "-m", "128", guest=guest)
    try:
        r = alice.ssh_command(f"start {vm} {BOOT} -no-reboot", **SSH)
        assert r.returncode == 0, r.stderr
        rec = sink.find(verb="start", vm=vm)
        assert (rec.program, rec.facility, rec.severity) == ("kvmshell", 10, auditlog.INFO)
        assert rec.fields == {
            "user": alice.name, "uid": str(alice.uid), "via": "ssh", "client": "192.0.2.7",
            "client_port": "51234", "verb": "start", "vm": vm, "outcome": "ok", "status": "0",
            "options": "-kernel vmlinuz -initrd initrd.img -append console=ttyS0 -no-reboot",
            "args": f"{vm} {BOOT} -no-reboot"}
        sink.clear()
        r = alice.kvmshell("status", vm)                       # argv, no terminal
        assert r.returncode == 0
        rec = sink.find(verb="status")
        assert (rec["via"], rec["vm"], rec["outcome"]) == ("local", vm, "ok")
        assert "client" not in rec.fields and "tty" not in rec.fields
    finally:
        kill_all(alice)


def test_audit_refused_option(host: Host, alice: User, sink: Sink) -> None:
    vm = _vm(host, alice)
    r = alice.ssh_command(f"start {vm} -monitor stdio", **SSH)
    assert r.returncode == 2
    rec = sink.find(verb="start")
    assert (rec.severity, rec["outcome"], rec["status"], rec["vm"]) == (
        auditlog.NOTICE, "refused", "2", vm)
    assert rec["reason"] == r.stderr.strip().removeprefix("kvmshell: ")
    assert rec["reason"].startswith("-monitor: only the administrator")
    assert rec["args"] == f"{vm} -monitor stdio"
    assert "options" not in rec.fields                 # never parsed


FORGED = "\n<86>Jan  1 00:00:00 kvmshell[1]: user=root verb=start outcome=ok\x1b[2J\x1b]0;x\x07"


@pytest.mark.parametrize("way", ["ssh", "argv"])
def test_audit_injection_in_vm_name(host: Host, alice: User, sink: Sink, way: str) -> None:
    name = "web" + FORGED
    if way == "ssh":
        r = alice.ssh_command(f"status '{name}'", **SSH)
    else:
        r = alice.kvmshell("status", name)
    assert r.returncode == 2 and "control character" in r.stderr
    sink.drain()
    assert len(sink.seen) == 1, sink.seen                     # one record, not two
    rec = sink.seen[0]
    assert (rec["verb"], rec["vm"], rec["outcome"]) == ("status", name, "refused")
    assert "\\x0a<86>" in rec.text and "\\x1b[2J" in rec.text
    if way == "ssh":
        assert rec["command"] == f"status '{name}'"


@pytest.mark.parametrize("way", ["ssh", "argv"])
def test_audit_injection_in_option_value(host: Host, alice: User, sink: Sink, way: str) -> None:
    vm = _vm(host, alice)
    sink.clear()
    value = "console=ttyS0" + FORGED + "\u00e9"
    if way == "ssh":
        r = alice.ssh_command(f"start {vm} -append '{value}'", **SSH)
    else:
        r = alice.kvmshell("start", vm, "-append", value)
    assert r.returncode == 2
    sink.drain()
    assert len(sink.seen) == 1, sink.seen
    rec = sink.seen[0]
    assert (rec["verb"], rec["vm"], rec["outcome"]) == ("start", vm, "refused")
    assert rec["args"] == auditlog.join_words([vm, "-append", value])
    assert "\\xc3\\xa9" in rec.text                          # non-ASCII as its UTF-8 bytes


def test_audit_prompt(host: Host, alice: User, sink: Sink) -> None:
    import pexpect
    _vm(host, alice)
    c = pexpect.spawn(alice.argv(KVMSHELL, "--config", str(host.conf))[0],
                      alice.argv(KVMSHELL, "--config", str(host.conf))[1:],
                      env=alice.env(TERM="dumb"), timeout=30)
    try:
        c.expect_exact("kvmshell> ")
        c.sendline("status nosuchvm")
        c.expect_exact("kvmshell> ")
        c.sendline("help")
        c.expect_exact("kvmshell> ")
        c.sendline("exit")
        c.expect(pexpect.EOF)
    finally:
        c.close(force=True)
    refused = sink.find(verb="status")
    assert (refused["via"], refused["vm"], refused["outcome"]) == ("prompt", "nosuchvm", "refused")
    assert refused["tty"].startswith("/dev/pts/")
    assert sink.find(verb="help")["outcome"] == "ok"
    assert not [r for r in sink.seen if r.fields.get("verb") == "exit"]


def test_audit_kvmadm_changes(host: Host, alice: User, sink: Sink) -> None:
    name = f"op{secrets.token_hex(3)}"
    host.kvmadm("create", name, "--owner", alice.name, "--", "-m", "256", "-net", "none")
    rec = sink.find(verb="create")
    assert rec.program == "kvmadm" and rec.facility == 10
    assert {k: v for k, v in rec.fields.items() if k not in ("loginuid", "sudo_user")} == {
        "user": "root", "uid": "0", "verb": "create", "vm": name, "owner": alice.name,
        "options": "-m 256 -net none", "outcome": "ok", "status": "0"}
    sink.clear()
    r = host.kvmadm("set", name, "--", "-monitor", "stdio", check=False)
    assert r.returncode == 2
    rec = sink.find(verb="set")
    assert (rec["vm"], rec["outcome"], rec["owner"]) == (name, "refused", alice.name)
    assert rec["reason"].startswith("-monitor:")
    sink.clear()
    host.kvmadm("list")                                  # reading changes nothing: no record
    host.kvmadm("remove", name, "--purge")
    assert sink.find(verb="remove")["vm"] == name
    assert [r["verb"] for r in sink.seen] == ["remove"]


# ---- syslog down -----------------------------------------------------------

def test_no_syslog_socket(host: Host, alice: User) -> None:
    vm = _vm(host, alice)
    host.write_conf(log_socket=str(host.root / "no-such-socket"))
    try:
        r = alice.ssh_command(f"status {vm}", timeout=20)
        assert r.returncode == 0 and r.stdout == f"{vm}: stopped\n" and r.stderr == ""
        r = alice.ssh_command(f"start {vm} -monitor stdio", timeout=20)
        assert r.returncode == 2 and r.stderr.startswith("kvmshell: -monitor:")
    finally:
        host.write_conf()


def test_no_dev_log_at_all(host: Host, alice: User) -> None:
    """The default log_socket, in a mount namespace whose /dev has no log
    socket (whatever this host has): kvmshell and kvmadm work as usual."""
    vm = _vm(host, alice)
    host.write_conf()                                   # log_socket = /dev/log (default)
    script = (
        "set -e; old=$(mktemp -d); mount --bind /dev $old; mount -t tmpfs none /dev; "
        "for d in null zero urandom random; do touch /dev/$d; mount --bind $old/$d /dev/$d; done; "
        "test ! -e /dev/log; "
        f"{' '.join(alice.argv(KVMSHELL, '--config', str(host.conf)))} status {vm}; "
        f"{KVMADM} --config {host.conf} set {vm} -- -m 64"
    )
    r = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"{vm}: stopped", f"{vm}: options set"]


def test_stalled_syslog_does_not_hang(host: Host, alice: User) -> None:
    """A log daemon that stopped reading (its queue full): glibc's syslog(3),
    and so Python's syslog module, would block here for good."""
    vm = _vm(host, alice)
    path = host.root / f"stalled-{secrets.token_hex(3)}"
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stalled.bind(str(path))
    os.chmod(path, 0o666)
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    filler.connect(str(path))
    filler.setblocking(False)
    with pytest.raises(BlockingIOError):
        while True:
            filler.send(b"x" * 200)
    host.write_conf(log_socket=str(path))
    try:
        r = alice.ssh_command(f"status {vm}", timeout=20)
        assert r.returncode == 0 and r.stdout == f"{vm}: stopped\n"
        r = host.kvmadm("set", vm, "--", "-m", "64")
        assert r.returncode == 0
    finally:
        host.write_conf()
        stalled.close()
        filler.close()
        path.unlink()


# ---- --json ----------------------------------------------------------------

def _json(r: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1 and r.stdout.isascii(), r.stdout
    doc = json.loads(r.stdout)
    assert isinstance(doc, dict)
    return doc


def test_json_every_verb(host: Host, alice: User, sink: Sink) -> None:
    vm = _vm(host, alice, "-m", "64")
    (host.vm_path(vm) / "disk.img").write_bytes(b"\0" * 512)
    os.chown(host.vm_path(vm) / "disk.img", alice.uid, alice.gid)

    doc = _json(alice.ssh_command("help --json"))
    assert set(doc) == {"verbs", "options"}
    from kvmshell.common import optable
    from kvmshell.shell.context import JSON_VERBS, VERBS
    assert [v["verb"] for v in doc["verbs"]] == list(VERBS)             # type: ignore[index,union-attr]
    for v in doc["verbs"]:                                              # type: ignore[union-attr]
        assert set(v) == {"verb", "synopsis", "summary", "json"}
        assert v["json"] == (v["verb"] in JSON_VERBS)
    assert [o["option"] for o in doc["options"]] == [                   # type: ignore[index,union-attr]
        o.name for o in optable.TABLE if o.cls == optable.USER]
    for o in doc["options"]:                                            # type: ignore[union-attr]
        assert set(o) == {"option", "takes_value", "value_optional", "value", "help", "example"}
    doc = _json(alice.ssh_command("help stop --json"))
    assert [v["verb"] for v in doc["verbs"]] == ["stop"] and doc["options"] == []  # type: ignore[index,union-attr]

    doc = _json(alice.ssh_command("list --json"))
    assert set(doc) == {"vms"}
    mine = [v for v in doc["vms"] if v["name"] == vm]                   # type: ignore[union-attr,index]
    assert mine == [{"name": vm, "state": "stopped", "pid": None, "accel": None,
                     "started": None, "autostart": False}]

    doc = _json(alice.ssh_command(f"status --json {vm}"))
    assert doc == {"name": vm, "state": "stopped", "pid": None, "accel": None, "started": None,
                   "autostart": False}

    doc = _json(alice.ssh_command(f"images {vm} --json"))
    (img,) = doc["images"]                                               # type: ignore[index]
    assert img["name"] == "disk.img" and img["virtual_size"] == 512     # type: ignore[index]
    assert img["bytes"] == os.stat(host.vm_path(vm) / "disk.img").st_blocks * 512  # type: ignore[index]

    doc = _json(host.kvmadm("list", "--json"))
    entry = [v for v in doc["vms"] if v["name"] == vm]                  # type: ignore[union-attr,index]
    assert entry == [{"name": vm, "owner": alice.name, "uid": alice.uid, "state": "stopped",
                      "pid": None, "options": ["-m", "64"], "autostart": "off"}]
    doc = _json(host.kvmadm("show", vm, "--json"))
    assert set(doc) == {"name", "owner", "uid", "directory", "options", "qemu", "autostart",
                        "start_options"}
    assert doc["qemu"][:2] == ["-m", "64"] and doc["directory"] == str(host.vm_path(vm))  # type: ignore[index]

    # --json on a verb that does not print a document is refused by name
    r = alice.ssh_command(f"stop {vm} --json")
    assert r.returncode == 2 and "--json" in r.stderr


def test_json_file_names_that_are_not_utf8(host: Host, alice: User) -> None:
    vm = _vm(host, alice)
    d = bytes(host.vm_path(vm))
    names = {b"bad\xff.img": "bad\\xff.img", b"esc\x1b[31mred.img": "esc\x1b[31mred.img",
             "caf\u00e9.img".encode(): "caf\u00e9.img"}
    for raw in names:
        p = os.path.join(d, raw)
        with open(p, "wb") as f:
            f.write(b"x")
        os.chown(p, alice.uid, alice.gid)
    r = subprocess.run(alice.argv(KVMSHELL, "--config", str(host.conf), "images", vm, "--json"),
                       env=alice.env(), capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert all(0x20 <= b < 0x7F for b in r.stdout[:-1]) and r.stdout.endswith(b"\n")
    doc = json.loads(r.stdout)
    got = {}
    for entry in doc["images"]:
        entry["name"].encode("utf-8")           # strict: no lone surrogate anywhere
        got[entry["name"]] = entry.get("name_bytes")
    assert got == {"bad\\xff.img": b"bad\xff.img".hex(), "esc\x1b[31mred.img": None,
                   "caf\u00e9.img": None}


# ---- man pages, completion, systemd unit -----------------------------------

def test_man_pages_render_and_cover_the_tables(manpages: dict[str, Path]) -> None:
    from kvmshell.admin.kvmadm import COMMAND_HELP
    from kvmshell.common import config, optable
    from kvmshell.shell.context import VERBS
    assert set(manpages) == {"kvmshell.1", "kvmadm.8", "kvmshell.conf.5"}
    user = render_man(manpages["kvmshell.1"])
    for verb, (syn, _) in VERBS.items():
        assert re.search(rf"^ +{re.escape(verb)}\b.*$", user, re.M), verb
    for o in optable.TABLE:
        if o.cls == optable.USER:
            assert re.search(rf"^ +{re.escape(o.name)}\b", user, re.M), o.name
    admin = render_man(manpages["kvmadm.8"])
    for cmd in COMMAND_HELP:
        assert re.search(rf"^ +{cmd}\b", admin, re.M), cmd
    for o in optable.TABLE:
        if o.cls == optable.ADMIN and not o.gone:
            assert re.search(rf"^ +{re.escape(o.name)}\b", admin, re.M), o.name
    conf = render_man(manpages["kvmshell.conf.5"])
    for key, default in config._DEFAULTS.items():
        assert re.search(rf"^ +{key}\b", conf, re.M), key
        assert f"Default: {default or 'empty'}." in " ".join(conf.split()), key


def test_kvmadm_completion(host: Host, alice: User) -> None:
    vm = _vm(host, alice)

    def complete(*words: str) -> list[str]:
        line = [KVMADM, "--config", str(host.conf), *words]
        script = (f"source {REPO / 'completion' / 'kvmadm.bash'}; "
                  f"COMP_WORDS=({' '.join(repr(w) for w in line)}); "
                  f"COMP_CWORD={len(line) - 1}; _kvmadm; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
        r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout.split()

    from kvmshell.admin.kvmadm import COMMAND_HELP
    assert set(complete("")) == set(COMMAND_HELP) | {"help"}
    assert complete("cr") == ["create"]
    assert vm in complete("show", "")
    assert complete("show", vm[:5]) == [n for n in complete("show", "") if n.startswith(vm[:5])]
    assert alice.name in complete("create", "new", "--owner", "")
    admin = complete("create", "new", "--owner", alice.name, "--", "-")
    assert "-m" in admin and "-net" in admin and "-no-autostart" in admin
    assert "-monitor" not in admin and "-cdrom" not in admin
    assert complete("create", "new", "--owner", alice.name, "--", "-m", "") == []
    assert complete("remove", vm, "") == ["--purge"]
    assert alice.name in complete("setkey", "")
    files = complete("setkey", alice.name, str(REPO / "READ"))
    assert files == [str(REPO / "README.md")]


def test_systemd_unit_verifies(manpages: dict[str, Path], tmp_path: Path) -> None:
    """systemd-analyze verify, as make install lays the unit out (its
    ExecStart is kvmadm's path; its Documentation= page exists)."""
    (tmp_path / "man" / "man8").mkdir(parents=True)
    shutil.copy(manpages["kvmadm.8"], tmp_path / "man" / "man8" / "kvmadm.8")
    unit = tmp_path / "kvmshell-autostart.service"
    unit.write_text((REPO / "systemd" / "kvmshell-autostart.service").read_text()
                    .replace("/usr/local/sbin/kvmadm", KVMADM))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "MANPATH": str(tmp_path / "man")},
                       timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    text = unit.read_text()
    assert "After=network-online.target" in text and "KillMode=process" in text
    assert f"ExecStart={KVMADM} autostart" in text


# ---- autostart -------------------------------------------------------------

def _saved(host: Host, vm: str) -> list[str]:
    return (host.vm_path(vm) / autostart_files.OPTIONS).read_text().splitlines()


def test_kept_words_leave_loadvm_out() -> None:
    assert autostart_files.kept_words({"-loadvm": "s.state", "-snapshot": None, "-boot": "d"}) \
        == ["-snapshot", "-boot", "d"]
    for bad in (b"x" * (autostart_files.MAX_OPTIONS_BYTES + 1), b"-hda\n\n", b"-hda", b"\xff\n",
                b"-append\nconsole=\x1b\n"):
        with pytest.raises(ValueError):
            autostart_files.decode(bad)


def test_autostart_verb(host: Host, alice: User, guest: Path, sink: Sink) -> None:
    vm = _vm(host, alice, guest=guest)
    r = alice.ssh_command(f"autostart {vm}")
    assert r.returncode == 0 and r.stdout == f"{vm}: autostart off\n"
    r = alice.ssh_command(f"autostart {vm} on")
    assert r.returncode == 0 and "(no start kept yet)" in r.stdout
    assert sink.find(verb="autostart")["vm"] == vm
    try:
        r = alice.ssh_command(f"start {vm} {BOOT} -snapshot")
        assert r.returncode == 0, r.stderr
        assert _saved(host, vm) == ["-kernel", "vmlinuz", "-initrd", "initrd.img", "-append",
                                    "console=ttyS0", "-snapshot"]
        st = (host.vm_path(vm) / autostart_files.OPTIONS).stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (alice.uid, 0o600)
        assert alice.ssh_command(f"kill {vm}").returncode == 0
        r = alice.ssh_command(f"start {vm} -kernel vmlinuz -initrd initrd.img -append 'console=ttyS0 quiet'")
        assert r.returncode == 0, r.stderr
        assert _saved(host, vm) == ["-kernel", "vmlinuz", "-initrd", "initrd.img", "-append",
                                    "console=ttyS0 quiet"]       # replaced by the later start
        r = alice.ssh_command(f"autostart {vm}")
        assert r.stdout == (f"{vm}: autostart on; at boot it starts with: start {vm} "
                            "-kernel vmlinuz -initrd initrd.img -append 'console=ttyS0 quiet'\n")
        assert alice.status(vm)["autostart"] is True
        assert json.loads(host.kvmadm("show", vm, "--json").stdout)["autostart"] == "on"
    finally:
        kill_all(alice)
    # a refused start keeps the last good options
    r = alice.ssh_command(f"start {vm} -hda nosuch.img")
    assert r.returncode != 0 and _saved(host, vm)[-1] == "console=ttyS0 quiet"
    # the files are kvmshell's: not images, not upload targets
    assert "autostart" not in alice.ssh_command(f"images {vm}").stdout
    r = alice.ssh_command(f"rm {vm} {autostart_files.OPTIONS}")
    assert r.returncode == 2
    r = alice.ssh_command(f"autostart {vm} off")
    assert r.returncode == 0 and r.stdout == f"{vm}: autostart off\n"
    assert not (host.vm_path(vm) / autostart_files.FLAG).exists()


def test_autostart_forbidden_by_the_admin(host: Host, alice: User, sink: Sink) -> None:
    vm = _vm(host, alice, "-no-autostart")
    r = alice.ssh_command(f"autostart {vm} on")
    assert r.returncode == 2 and "-no-autostart" in r.stderr
    assert not (host.vm_path(vm) / autostart_files.FLAG).exists()
    assert sink.find(verb="autostart")["outcome"] == "refused"
    other = _vm(host, alice)
    assert alice.ssh_command(f"autostart {other} on").returncode == 0
    host.write_conf(log_socket=str(sink.path), shell=KVMSHELL, autostart="no")
    r = alice.ssh_command(f"autostart {other}")
    assert r.returncode == 0 and "will not start: autostart is off on this host" in r.stdout
    r = alice.ssh_command(f"autostart {other} on")
    assert r.returncode == 2 and "autostart = no" in r.stderr
    r = host.kvmadm("autostart")
    assert f"{other}: skipped: autostart is off on this host" in r.stdout
    assert alice.qemu_pids() == []
    assert sink.find(program="kvmadm", verb="autostart", vm=other)["outcome"] == "skipped"
    assert alice.ssh_command(f"autostart {other} off").returncode == 0


def test_autostart_at_boot(host: Host, alice: User, bob: User, guest: Path, sink: Sink) -> None:
    """Two marked VMs of one user with max_running = 1: after a simulated
    reboot, kvmadm autostart starts exactly the first, with its saved
    options, and the audit log shows both outcomes."""
    first, second = sorted(f"ab{secrets.token_hex(3)}{i}" for i in range(2))
    for vm in (first, second):
        host.create_vm(vm, alice, guest=guest)
    unmarked = _vm(host, bob, guest=guest)
    host.write_conf(log_socket=str(sink.path), shell=KVMSHELL, max_running="1")
    try:
        for vm, extra in ((first, "-no-acpi"), (second, "-no-reboot")):
            r = alice.ssh_command(f"start {vm} {BOOT} {extra}")
            assert r.returncode == 0, r.stderr
            assert alice.ssh_command(f"autostart {vm} on").returncode == 0
            assert alice.ssh_command(f"kill {vm}").returncode == 0
        assert bob.ssh_command(f"start {unmarked} {BOOT}").returncode == 0
        # the reboot: every QEMU and supervisor gone, marks and options kept
        kill_all(alice)
        kill_all(bob)
        wait_for(lambda: not alice.qemu_pids() and not bob.qemu_pids(), 20, "QEMUs gone")
        sink.clear()

        r = subprocess.run([KVMADM, "--config", str(host.conf), "autostart"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 1, (r.stdout, r.stderr)       # one marked VM did not start
        lines = [l for l in r.stdout.splitlines() if l.startswith(("ab", "op"))]
        assert lines[0].startswith(f"{first}: ok: ")
        assert lines[1].startswith(f"{second}: failed: ") and "limit" in lines[1]
        assert not any(l.startswith(unmarked) for l in lines)

        pids = alice.qemu_pids()
        assert len(pids) == 1 and bob.qemu_pids() == []
        argv = Path(f"/proc/{pids[0]}/cmdline").read_bytes().split(b"\0")
        assert f"guest={first}".encode() in b" ".join(argv)
        assert b"acpi=off" in b" ".join(argv) and b"-no-reboot" not in argv
        assert alice.status(first)["state"] == "running"
        assert alice.status(second)["state"] == "stopped"

        # the audit log: kvmshell's own record of each start, as the owner ...
        ok = sink.find(program="kvmshell", verb="start", vm=first)
        assert (ok["user"], ok["via"], ok["outcome"]) == (alice.name, "local", "ok")
        assert ok["options"] == f"{BOOT} -no-acpi"
        refused = sink.find(verb="start", vm=second)
        assert (refused["outcome"], refused["status"]) == ("refused", "1")
        assert "limit" in refused["reason"]
        # ... and kvmadm's, one per marked VM
        a = sink.find(program="kvmadm", verb="autostart", vm=first)
        b = sink.find(program="kvmadm", verb="autostart", vm=second)
        assert a.program == b.program == "kvmadm"
        assert (a["outcome"], a["owner"], a["options"]) == ("ok", alice.name, f"{BOOT} -no-acpi")
        assert b["outcome"] == "failed" and b["reason"] == refused["reason"]
        assert not [x for x in sink.seen if x.fields.get("vm") == unmarked]

        # run again: the running VM is left alone
        r = subprocess.run([KVMADM, "--config", str(host.conf), "autostart"],
                           capture_output=True, text=True, timeout=300)
        assert f"{first}: skipped: already running" in r.stdout
        assert alice.qemu_pids() == pids
    finally:
        kill_all(alice)
        kill_all(bob)
        host.write_conf()
        for vm in (first, second):
            alice.ssh_command(f"autostart {vm} off")


@pytest.mark.parametrize("kind", ["fifo", "symlink", "huge", "foreign", "binary"])
def test_autostart_reads_the_owners_files_safely(host: Host, alice: User, sink: Sink,
                                                 kind: str) -> None:
    """Root reads start-options as user data: a FIFO, a symlink to a device,
    a huge file, another owner's file or junk fail that VM alone, at once,
    and nothing is started."""
    vm = _vm(host, alice)
    d = host.vm_path(vm)
    (d / autostart_files.FLAG).touch()
    os.chown(d / autostart_files.FLAG, alice.uid, alice.gid)
    opts = d / autostart_files.OPTIONS
    if kind == "fifo":
        os.mkfifo(opts)
    elif kind == "symlink":
        os.symlink("/dev/zero", opts)
    elif kind == "huge":
        with open(opts, "wb") as f:
            f.truncate(1 << 40)
    elif kind == "foreign":
        opts.write_text("-snapshot\n")           # root's file in the user's directory
    else:
        opts.write_bytes(b"-append\nconsole=\x1b[2J\n")
    if kind not in ("symlink", "foreign"):
        os.chown(opts, alice.uid, alice.gid, follow_symlinks=False)
    t0 = time.monotonic()
    r = subprocess.run([KVMADM, "--config", str(host.conf), "autostart"], capture_output=True,
                       text=True, timeout=60)
    assert time.monotonic() - t0 < 30
    assert r.returncode == 1
    line = [l for l in r.stdout.splitlines() if l.startswith(vm)]
    assert len(line) == 1 and line[0].startswith(f"{vm}: failed: ") and "start-options" in line[0]
    assert sink.find(program="kvmadm", verb="autostart", vm=vm)["outcome"] == "failed"
    assert alice.qemu_pids() == []


@pytest.mark.security
@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_kvmadm_reads_the_pid_file_safely(host: Host, alice: User, tmp_path: Path,
                                          kind: str) -> None:
    """qemu.pid is the user's file (QEMU writes it): root's kvmadm (list,
    show, usage, autostart) must not block on a FIFO there nor follow a
    symlink to a device (here a FIFO outside the VM directory stands for a
    device whose open blocks, such as a serial port, or arms a watchdog)."""
    vm = _vm(host, alice)
    d = host.vm_path(vm)
    pidfile = d / "qemu.pid"
    if kind == "fifo":
        os.mkfifo(pidfile)
        os.chown(pidfile, alice.uid, alice.gid)
    else:
        fifo = tmp_path / "device"
        os.mkfifo(fifo)
        os.symlink(fifo, pidfile)
        os.chown(pidfile, alice.uid, alice.gid, follow_symlinks=False)
    (d / autostart_files.FLAG).touch()
    os.chown(d / autostart_files.FLAG, alice.uid, alice.gid)
    try:
        for verb in (["list"], ["show", vm], ["usage"]):
            r = subprocess.run([KVMADM, "--config", str(host.conf), *verb],
                               capture_output=True, text=True, timeout=20)
            assert "Traceback" not in r.stderr, r.stderr
            if verb[0] == "list":
                line = [l for l in r.stdout.splitlines() if l.startswith(vm)]
                assert len(line) == 1 and "stopped" in line[0]
    finally:
        pidfile.unlink()
        (d / autostart_files.FLAG).unlink()
