"""Help, usage and refusal messages as a newcomer meets them.

Every table of help (kvmshell's verbs, ``help start``'s options, ``help
disk``, kvmadm's commands and admin options) is read from the real entry
points and checked against the tables it is made from (VERBS, the option
table, COMMAND_HELP): the layout rule of kvmshell/common/helptext.py, and
an option shown the same way in help and in the man page.  Then the
refusals: kvmadm's unknown command and ``--config`` without a path,
kvmshell's ``--config`` outside the admin's places and ``connect``
without a PORT: one line, naming the word, exit status 2.  The man pages
fit 80 columns, README's help block is what ``help`` prints, and the
lists of verbs that take ``--json`` (help --json, kvmshell(1)) come from
the table.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import KVMADM, KVMSHELL, Host, User, render_man

pytestmark = pytest.mark.operations

WIDTH = 79          # kvmshell/common/helptext.py: help fits 80-column terminals


def _table(out: str, rows: list[tuple[str, str]]) -> dict[str, str]:
    """Check that *rows* (a first word or two of each term, its description)
    stand in *out* as one help table: in this order, every description
    starting in one column C (on the term's line, two spaces past it, or
    alone on the next line when the term is longer), going on over lines
    indented to C, every line at most WIDTH characters; return each row's
    term as shown."""
    lines = out.split("\n")
    assert all(len(line) <= WIDTH for line in lines), [x for x in lines if len(x) > WIDTH]
    starts = []
    at = 0
    for key, _ in rows:
        at = next(i for i in range(at, len(lines))
                  if lines[i] == "  " + key or lines[i].startswith("  " + key + " "))
        starts.append(at)
        at += 1
    cols: set[int] = set()
    terms = {}
    for n, ((key, desc), first) in enumerate(zip(rows, starts)):
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        words = desc.split()
        line = lines[first]
        gap = line.find("  " + words[0], len("  " + key))
        if gap < 0:                              # the term alone on its line
            terms[key] = line.strip()
            col = len(lines[first + 1]) - len(lines[first + 1].lstrip(" "))
            assert len(line) + 2 > col, (key, "a term alone on its line though it fits")
            body = [lines[first + 1]]
            first += 1
        else:
            col = gap + 2
            terms[key] = line[:col].strip()
            body = [line]
        cols.add(col)
        for cont in lines[first + 1:end]:
            if not cont.startswith(" " * col) or cont[col:col + 1] == " ":
                break                            # the table ends (prose follows)
            body.append(cont)
        shown = " ".join(b[col:] for b in body)
        assert shown.split() == words, (key, shown, desc)
    assert len(cols) == 1, (cols, out)
    return terms


def _kvmshell(user: User, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(user.argv(KVMSHELL, "--config", str(user.host.conf), *args),
                          env=user.env(), capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def _kvmadm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KVMADM, *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def _one_line(r: subprocess.CompletedProcess[str], prog: str, status: int = 2) -> str:
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    assert r.stderr.startswith(prog + ": ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    return r.stderr


def _option_terms(out: str, cls: str) -> dict[str, str]:
    """The option table of class *cls* in *out*, checked; each option's term
    must be its name, then for a value one word (in brackets where the
    value is optional)."""
    from kvmshell.common import optable
    opts = [o for o in optable.TABLE if o.cls == cls and not o.gone]
    terms = _table(out, [(o.name, o.help) for o in opts])
    for o in opts:
        name, _, value = terms[o.name].partition(" ")
        assert name == o.name
        if o.arity == 0:
            assert value == "", o.name
        elif o.arity == optable.OPTIONAL:
            assert re.fullmatch(r"\[[^] ]+\]", value), (o.name, value)
        else:
            assert re.fullmatch(r"[^[ ][^ ]*", value), (o.name, value)
    return terms


@pytest.fixture(scope="module")
def man_pages(manpages: dict[str, Path]) -> dict[str, str]:
    return {name: render_man(page) for name, page in manpages.items()}


def _man_term(page: str, name: str, term: str, desc: str) -> None:
    """The man page shows option *name* as *term* (then its description,
    on the same line when the term is short)."""
    line = next(x.strip() for x in page.split("\n") if x.strip().startswith(name + " ")
                or x.strip() == name)
    assert line == term or re.match(re.escape(term) + " +" + re.escape(desc.split()[0]),
                                    line), (line, term)


# ---- help tables ----------------------------------------------------------------

def test_help_start_options_align_and_match_the_man_page(
        alice: User, man_pages: dict[str, str]) -> None:
    from kvmshell.common import optable
    r = _kvmshell(alice, "help", "start")
    assert r.returncode == 0, r.stderr
    terms = _option_terms(r.stdout, optable.USER)
    assert terms["-cloud-init"] == "-cloud-init [new]"
    assert terms["-hda"] == "-hda FILE" and terms["-snapshot"] == "-snapshot"
    for o in optable.TABLE:
        if o.cls == optable.USER:
            _man_term(man_pages["kvmshell.1"], o.name, terms[o.name], o.help)


def test_help_verbs_align(alice: User) -> None:
    from kvmshell.shell.context import VERBS
    r = _kvmshell(alice, "help")
    assert r.returncode == 0, r.stderr
    terms = _table(r.stdout, [(verb, summary) for verb, (_, summary) in VERBS.items()])
    for verb, (syn, _) in VERBS.items():
        assert terms[verb] == f"{verb} {syn}".strip()


@pytest.mark.parametrize("verb", ["disk", "snapshot"])
def test_help_disk_aligns(alice: User, verb: str) -> None:
    from kvmshell.shell.disks import DISK_VERBS, SNAPSHOT_VERBS
    r = _kvmshell(alice, "help", verb)
    assert r.returncode == 0, r.stderr
    rows = [(f"{v} {sub}", summary) for v, table in (("disk", DISK_VERBS),
                                                    ("snapshot", SNAPSHOT_VERBS))
            for sub, (_, _n, summary) in table.items()]
    _table(r.stdout, rows)


def test_kvmadm_help_lists_the_commands() -> None:
    from kvmshell.admin.kvmadm import COMMAND_HELP
    r = _kvmadm("help")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    terms = _table(r.stdout, [(c, summary) for c, (_, summary) in COMMAND_HELP.items()])
    for c, (syn, _) in COMMAND_HELP.items():
        assert terms[c] == f"{c} {syn}".strip()


@pytest.mark.parametrize("command", ["create", "set"])
def test_kvmadm_help_create_lists_the_admin_options(command: str,
                                                    man_pages: dict[str, str]) -> None:
    from kvmshell.admin.kvmadm import COMMAND_HELP
    from kvmshell.common import optable
    r = _kvmadm("help", command)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.startswith(f"usage: kvmadm [--config PATH] {command} "
                               f"{COMMAND_HELP[command][0]}\n")
    terms = _option_terms(r.stdout, optable.ADMIN)
    for o in optable.TABLE:
        if o.cls == optable.ADMIN and not o.gone:
            _man_term(man_pages["kvmadm.8"], o.name, terms[o.name], o.help)


def test_help_console_lists_its_options(alice: User) -> None:
    """'help console' is a table of console.OPTIONS (all of them, 80
    columns), under the usage line kvmshell's verb list gives."""
    from kvmshell.shell.console import OPTIONS
    from kvmshell.shell.context import VERBS
    r = _kvmshell(alice, "help", "console")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: console {VERBS['console'][0]}\n")
    terms = _table(r.stdout, [(opt.split()[0], desc) for opt, desc in OPTIONS.items()])
    assert [terms[o.split()[0]] for o in OPTIONS] == list(OPTIONS)
    assert {"--spy", "--force", "--no-replay", "--replay N", "--escape ^X",
            "--linger S"} == set(OPTIONS)


def test_man_pages_fit_80_columns(manpages: dict[str, Path]) -> None:
    """At MANWIDTH=80 no line of any page is wider (a pasted help block in a
    literal paragraph was not reflowed: ~100 columns)."""
    for name, page in manpages.items():
        shown = render_man(page, width=80)
        assert "console" in shown or name != "kvmshell.1"
        wide = [line for line in shown.split("\n") if len(line) > 80]
        assert wide == [], (name, wide)


def test_readme_help_block_is_help(alice: User) -> None:
    """README's 'Commands (the user's side)' block is what 'help' prints."""
    r = _kvmshell(alice, "help")
    assert r.returncode == 0, r.stderr
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("\n    $ ssh alice@host help\n", 1)[1].split("\n\n", 1)[0]
    assert "\n".join(line[4:] for line in block.split("\n")) + "\n" == r.stdout


def test_json_verbs_come_from_the_table(alice: User, man_pages: dict[str, str]) -> None:
    """help --json's "json" and kvmshell(1)'s JSON OUTPUT list are JSON_VERBS
    (disk: its info); a disk sub-verb without --json refuses the word."""
    import json

    from kvmshell.shell.context import JSON_VERBS, VERBS
    from kvmshell.shell.disks import DISK_VERBS
    assert "disk" in JSON_VERBS and "--json" in DISK_VERBS["info"][0]
    r = _kvmshell(alice, "help", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert {v["verb"] for v in doc["verbs"] if v["json"]} == JSON_VERBS
    listed = [v if v != "disk" else "disk info" for v in VERBS if v in JSON_VERBS]
    text = " ".join(man_pages["kvmshell.1"].split())
    assert (", ".join(listed[:-1]) + " and " + listed[-1] + " take --json") in text, text
    err = _one_line(_kvmshell(alice, "disk", "create", "d.img", "1M", "--json"), "kvmshell")
    assert err == "kvmshell: --json: unexpected argument to 'disk create'\n"


def test_help_json_marks_an_optional_value(alice: User) -> None:
    """-cloud-init [new]: takes_value stays false (docs/json.md's shape),
    value_optional says the value may be given."""
    import json

    from kvmshell.common import optable
    r = _kvmshell(alice, "help", "start", "--json")
    assert r.returncode == 0, r.stderr
    options = {o["option"]: o for o in json.loads(r.stdout)["options"]}
    assert options["-cloud-init"]["takes_value"] is False
    assert options["-cloud-init"]["value_optional"] is True
    assert options["-hda"]["takes_value"] is True and options["-hda"]["value_optional"] is False
    assert options["-snapshot"] == {**options["-snapshot"], "takes_value": False,
                                    "value_optional": False, "value": None}
    for o in optable.TABLE:
        if o.cls == optable.USER:
            assert options[o.name]["value_optional"] == (o.arity == optable.OPTIONAL)


def test_kvmadm_help_of_one_command() -> None:
    r = _kvmadm("help", "list")
    assert r.returncode == 0
    assert r.stdout == ("usage: kvmadm [--config PATH] list [--json]\n"
                        "  list every VM: owner, state, admin options\n")
    assert "help: unknown command 'nope'" in _one_line(_kvmadm("help", "nope"), "kvmadm")
    assert "b: unexpected argument to 'help'" in _one_line(_kvmadm("help", "a", "b"), "kvmadm")
    # 'help' is a command like the others (the synopsis says 'kvmadm help [COMMAND]').
    r = _kvmadm("help", "help")
    assert r.returncode == 0 and r.stdout.startswith("usage: kvmadm [--config PATH] help [COMMAND]\n")


# ---- kvmadm's refusals ----------------------------------------------------------

@pytest.mark.parametrize("args,line", [
    (["bogus"], "kvmadm: unknown command 'bogus' (see 'kvmadm help')\n"),
    (["crate", "x"], "kvmadm: unknown command 'crate' (see 'kvmadm help')\n"),
    (["\x1b[2Jx"], "kvmadm: unknown command '\\x1b[2Jx' (see 'kvmadm help')\n"),
    ([], "kvmadm: no command given (see 'kvmadm help')\n"),
    (["--config", "/etc/kvmshell/kvmshell.conf"], "kvmadm: no command given (see 'kvmadm help')\n"),
])
def test_kvmadm_unknown_command(args: list[str], line: str) -> None:
    r = _kvmadm(*args)
    _one_line(r, "kvmadm")
    assert r.stderr == line


@pytest.mark.parametrize("args", [["--config"], ["--config", "--json", "list"],
                                  ["--config", "", "list"],
                                  ["--config", "/etc/kvmshell/kvmshell.conf", "--config"]])
def test_kvmadm_config_without_a_path(args: list[str]) -> None:
    err = _one_line(_kvmadm(*args), "kvmadm")
    assert err.startswith("kvmadm: --config: missing PATH"), err


def test_kvmadm_config_equals_path(host: Host) -> None:
    """--config=PATH, as GNU long options (and as completion reads it)."""
    r = _kvmadm(f"--config={host.conf}", "list", "--json")
    spaced = _kvmadm("--config", str(host.conf), "list", "--json")
    assert (r.returncode, r.stdout, r.stderr) == (spaced.returncode, spaced.stdout,
                                                  spaced.stderr)
    # That config was read: the listing, or its VM directory (not made yet) named.
    assert r.returncode == 0 or str(host.vmdir) in r.stderr, r.stderr
    err = _one_line(_kvmadm("--config=", "list"), "kvmadm")
    assert err.startswith("kvmadm: --config: missing PATH"), err


@pytest.mark.parametrize("args,line", [
    (["create", "x"], "kvmadm: create: missing --owner USER "
                      "(usage: kvmadm create NAME --owner USER [-- ADMIN-OPTIONS...])\n"),
    (["create", "x", "--owner"], "kvmadm: create: --owner: missing USER "
                                 "(usage: kvmadm create NAME --owner USER [-- ADMIN-OPTIONS...])\n"),
    (["create", "x", "--own", "u"], "kvmadm: create: unexpected argument '--own' "
                                    "(usage: kvmadm create NAME --owner USER [-- ADMIN-OPTIONS...])\n"),
    (["usage", "--bogus"], "kvmadm: usage: unexpected argument '--bogus' "
                           "(usage: kvmadm usage [--json])\n"),
])
def test_kvmadm_refusals_say_what_is_missing(host: Host, args: list[str], line: str) -> None:
    r = _kvmadm("--config", str(host.conf), *args)
    _one_line(r, "kvmadm")
    assert r.stderr == line


def test_kvmadm_smp_names_the_hosts_range(host: Host) -> None:
    """-smp 0 names 1 to this host's max_smp (help create says so), not
    QEMU's 255; nothing is created."""
    from kvmshell.common import config
    top = config.load(str(host.conf)).max_smp
    name = f"smp{secrets.token_hex(3)}"
    r = _kvmadm(f"--config={host.conf}", "create", name, "--owner", "root", "--", "-smp", "0")
    _one_line(r, "kvmadm")
    assert r.stderr == (f"kvmadm: -smp: invalid number of CPUs '0' "
                        f"(1 to {min(top, 255)}, this host's max_smp)\n")
    assert not os.path.lexists(host.vmdir / name)


# ---- kvmshell's refusals --------------------------------------------------------

def test_config_outside_the_admins_places_is_a_refused_word(host: Host, alice: User) -> None:
    """The exit status the man page promises for a refused request (2), with
    the path named; the tree is not looked at."""
    elsewhere = Path(f"/run/kvmshell-elsewhere-{secrets.token_hex(3)}")
    elsewhere.mkdir(mode=0o755)
    shutil.copy(host.conf, elsewhere / "k.conf")
    os.chmod(elsewhere / "k.conf", 0o644)
    try:
        for conf in (str(elsewhere / "k.conf"), "/etc/kvmshell/budgets/groups/g.conf",
                     "kvmshell.conf"):
            r = subprocess.run(alice.argv(KVMSHELL, "--config", conf, "list"), env=alice.env(),
                               capture_output=True, text=True, timeout=60,
                               stdin=subprocess.DEVNULL)
            err = _one_line(r, "kvmshell")
            assert f"config {conf}: " in err and "kvmshell takes" in err, err
        # --config=PATH, as GNU long options: the same rules.
        r = subprocess.run(alice.argv(KVMSHELL, f"--config={elsewhere}/k.conf", "list"),
                           env=alice.env(), capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        err = _one_line(r, "kvmshell")
        assert f"config {elsewhere}/k.conf: " in err and "kvmshell takes" in err, err
    finally:
        shutil.rmtree(elsewhere)
    r = subprocess.run(alice.argv(KVMSHELL, "--config"), env=alice.env(),
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert "--config: missing" in _one_line(r, "kvmshell")
    # The admin's place is taken as --config=PATH: that config is read (its
    # VM listing, or its VM directory, made at the first create, named).
    r = subprocess.run(alice.argv(KVMSHELL, f"--config={host.conf}", "list"), env=alice.env(),
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0 or str(host.vmdir) in r.stderr, r.stderr


@pytest.mark.parametrize("command,line", [
    ("connect myvm", "kvmshell: connect: missing PORT (usage: connect [VM] PORT)\n"),
    ("connect", "kvmshell: connect: missing PORT (usage: connect [VM] PORT)\n"),
    ("connect 99999", "kvmshell: 99999: not a port (a number from 1 to 65535)\n"),
    ("connect 22/tcp", "kvmshell: 22/tcp: not a port (a number from 1 to 65535)\n"),
    ("connect myvm ssh", "kvmshell: ssh: not a port (a number from 1 to 65535)\n"),
])
def test_connect_without_a_port(alice: User, command: str, line: str) -> None:
    r = alice.ssh_command(command)
    _one_line(r, "kvmshell")
    assert r.stderr == line


@pytest.mark.parametrize("command,line", [
    ("upload myvm disk.img --size", "kvmshell: --size: missing value (a number of bytes)\n"),
    ("status _x", "kvmshell: invalid VM name '_x': use letters, digits, '_' and '-' "
                  "(not '_' or '-' first)\n"),
])
def test_refusals_say_what_is_wrong(alice: User, command: str, line: str) -> None:
    """A newcomer's try-out: a missing value is called missing (not an
    'unexpected argument'), and the name rule is said whole."""
    r = alice.ssh_command(command)
    _one_line(r, "kvmshell")
    assert r.stderr == line
