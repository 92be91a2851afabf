"""Property-based tests (hypothesis) of the parser: lexer, user and admin
grammar, the mapping to QEMU argv, and the VM identifier.

The central property: for any command string, kvmshell either refuses it
(a UsageError, one line, naming a word of the input) or produces an argv in
which every option comes from the user class of the option table (or was
put there by the wrapper), and no user text sits inside an option string,
except the kernel command line, which is one whole argv element.
"""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typing import Callable

from kvmshell.shell import lexer
from kvmshell.common import adminopts
from kvmshell.common import optable
from kvmshell.shell import useropts
from kvmshell.common import vmid
from kvmshell.common.errors import KvmshellError, RefusedOption, TreeError, UsageError

pytestmark = pytest.mark.security

SETTINGS = settings(max_examples=600, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

USER_OPTS = [o for o in optable.TABLE if o.cls == optable.USER]

# ---- what an accepted argv may contain, derived from the table ---------------

# Placeholders are filled only with wrapper-made values: numbers, formats
# kvmshell chose, words from closed lists, its own socket name.
_HOLES = {
    "fd": r"\d+", "fdset": r"\d+", "format": r"(raw|qcow2)", "order": r"[acdn]{1,4}",
    "c": r"\d+", "h": r"\d+", "s": r"\d+", "t": r"(none|lba|auto)",
    "vnc_socket": re.escape("vnc.sock"), "cmdline": None,
    "node": r"(fda|fdb|hda|hdb|cdrom)", "id": r"(hda|hdb)",
}
_NODE = re.compile(r"(fda|fdb|hda|hdb|cdrom)(-\d+)?(-file)?")


def _wrapper_made_blockdev(value: str) -> bool:
    """A -blockdev node kvmshell built: JSON of a closed shape, every value
    its own (node names from the table, fdset numbers, closed formats)."""
    import json
    node = json.loads(value)
    if node.get("driver") == "file":
        return (set(node) == {"driver", "node-name", "filename", "read-only"}
                and re.fullmatch(r"/dev/fdset/\d+", node["filename"]) is not None
                and _NODE.fullmatch(node["node-name"]) is not None
                and node["node-name"].endswith("-file") and isinstance(node["read-only"], bool))
    keys = {"driver", "node-name", "file", "read-only"} | ({"backing"} if node.get("driver") == "qcow2" else set())
    return (node.get("driver") in ("raw", "qcow2") and set(node) == keys
            and _NODE.fullmatch(node["node-name"]) is not None
            and node["file"] == node["node-name"] + "-file"
            and (node.get("backing") is None or _NODE.fullmatch(node["backing"]) is not None)
            and isinstance(node["read-only"], bool))


def _pattern(template: str) -> str:
    out, pos = "", 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out += re.escape(template[pos:m.start()]) + str(_HOLES[m.group(1)])
        pos = m.end()
    return out + re.escape(template[pos:])


def _allowed() -> tuple[dict[str, int], list[re.Pattern[str]]]:
    arity: dict[str, int] = {"-add-fd": 1, "-device": 1, "-blockdev": 1}  # the wrapper's own
    values = [r"fd=\d+,set=\d+", "VGA",                         # -add-fd, -vnc's display
              _pattern(useropts.VIRTIO_DEVICE),                 # -hda/-hdb on virtio
              _pattern(useropts.Q35_HDACHS), useropts.Q35_FDC,   # on q35
              *(_pattern(t) for t in useropts.Q35_DEVICES.values())]
    for o in USER_OPTS:
        t = o.qemu
        for i, word in enumerate(t):
            if word.startswith("-"):
                has_value = i + 1 < len(t) and not t[i + 1].startswith("-")
                arity[word] = 1 if has_value else 0
            elif "{cmdline}" not in word:
                values.append(_pattern(word))
    values.append(r"acpi=off")  # -no-acpi, merged into one -machine
    return arity, [re.compile(v) for v in values]


ARITY, VALUES = _allowed()


def _fake_opened(req: useropts.UserRequest) -> dict[str, useropts.Opened]:
    """Descriptors as launcher.open_files would return them (no files needed)."""
    out = {}
    for n, (opt, value) in enumerate(req.files()):
        fmt = "qcow2" if value.endswith(".qcow2") else "raw"
        write = opt.kind == optable.DISK and not req.has("-snapshot")
        out[opt.name] = useropts.Opened(100 + 2 * n, fmt, not write, 101 + 2 * n if write else -1)
    return out


def check_argv(req: useropts.UserRequest, argv: list[str]) -> None:
    """The central property, on one accepted request."""
    i = 0
    appended = 0
    while i < len(argv):
        word = argv[i]
        assert word in ARITY, f"option {word!r} not from the user class"
        if ARITY[word] == 0:
            i += 1
            continue
        value = argv[i + 1]
        if word == "-blockdev":
            assert _wrapper_made_blockdev(value), f"-blockdev {value!r}: not wrapper-made"
        elif word == "-append":
            # The one place user text reaches QEMU: a whole argv element.
            assert value == req.values["-append"]
            appended += 1
        else:
            assert any(p.fullmatch(value) for p in VALUES), f"{word} {value!r}: not wrapper-made"
        i += 2
    assert appended == (1 if req.has("-append") else 0)


def run_command(command: str) -> list[str] | None:
    """lexer -> grammar -> argv; None when refused (and the refusal is checked)."""
    try:
        words = lexer.split(command)
        req = useropts.parse_user(words)
    except KvmshellError as exc:
        assert isinstance(exc, UsageError), exc
        assert "\n" not in exc.message and exc.message
        return None
    for name in req.values:
        assert optable.BY_NAME[name].cls == optable.USER
    argv = useropts.user_argv(req, _fake_opened(req), "vnc.sock")
    check_argv(req, argv)
    return argv


# ---- strategies ---------------------------------------------------------------

_PRINTABLE = st.characters(min_codepoint=32, max_codepoint=126)
_SPELLINGS = [o.name for o in optable.TABLE] + ["--" + o.name[1:] for o in optable.TABLE] + [
    "-readconfig", "-incoming", "-qmp", "-chardev", "-device", "-object", "-drive", "-add-fd",
    "-", "--", "-cdrom=x.iso", "-HDA", "-m64"]
_VALUES = st.one_of(
    st.sampled_from(["x.iso", "disk.qcow2", "vmlinuz", "d", "dc", ":0", "on", "1024,16,63,lba",
                     "console=ttyS0", "/etc/passwd", "../x", "a,b", "file:x", "json:{}",
                     "x.iso;sh", "$(id)", "`id`", "-x", "", " ", "'", "\\"]),
    st.text(_PRINTABLE, max_size=30),
)
_WORD = st.one_of(st.sampled_from(_SPELLINGS), _VALUES)


def _quote(word: str) -> str:
    """Quote a word for kvmshell's lexer (single quotes, as a user would)."""
    return "'" + word.replace("'", "'\\''") + "'"


# ---- properties ------------------------------------------------------------------

@SETTINGS
@given(st.text(max_size=300))
def test_any_string_is_refused_or_safe(command: str) -> None:
    """P1: any text at all (control characters, non-ASCII, quotes)."""
    run_command(command)


@SETTINGS
@given(st.lists(_WORD, max_size=12))
def test_option_soup_is_refused_or_safe(words: list[str]) -> None:
    """P2: words built from every table spelling and hostile values, quoted."""
    run_command(" ".join(_quote(w) for w in words))


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(USER_OPTS), st.one_of(st.none(), _VALUES)), max_size=8))
def test_user_options_map_safely(pairs: list[tuple[optable.Option, str | None]]) -> None:
    """P3: sequences of user-class options with their example value (None)
    or an arbitrary one: those accepted give a safe argv, the others are
    refused naming a word of the input."""
    words: list[str] = []
    for opt, value in pairs:
        words += [opt.name] + ([opt.example or "x" if value is None else value] if opt.arity else [])
    try:
        req = useropts.parse_user(words)
    except RefusedOption as exc:
        assert any(exc.message.startswith(w + ":") for w in words), (words, exc.message)
        return
    check_argv(req, useropts.user_argv(req, _fake_opened(req), "vnc.sock"))


@SETTINGS
@given(st.lists(st.text(_PRINTABLE, max_size=40), max_size=20))
def test_lexer_round_trip(words: list[str]) -> None:
    """P4: quoting then splitting gives back exactly the words (no shell)."""
    command = " ".join(_quote(w) for w in words)
    if len(command) > lexer.MAX_COMMAND_BYTES:
        return
    assert lexer.split(command) == words


_NAME = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}", fullmatch=True)
_ADMIN_WORD = st.text(_PRINTABLE, min_size=1, max_size=20)


@SETTINGS
@given(_NAME, st.lists(_ADMIN_WORD, max_size=6))
def test_vmid_round_trip(name: str, words: list[str]) -> None:
    """P5: decode(encode(name, words)) == (name, words)."""
    try:
        dirname = vmid.encode(name, words)
    except UsageError:
        return  # over the file-name limit: refused at create
    assert vmid.decode(dirname) == (name, words)
    assert "/" not in dirname and not dirname.startswith((".", "-"))


@SETTINGS
@given(st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=80))
def test_vmid_canonical_unique(dirname: str) -> None:
    """P6: any string that decodes is the one canonical spelling of what it
    decodes to, so one configuration has exactly one directory name."""
    try:
        name, words = vmid.decode(dirname)
    except TreeError:
        return
    assert vmid.encode(name, words) == dirname


@SETTINGS
@given(_NAME, st.lists(_ADMIN_WORD, max_size=4), st.integers(0, 200), st.sampled_from("AZaz09-_=+/."))
def test_vmid_mutation_refused(name: str, words: list[str], pos: int, ch: str) -> None:
    """P7: changing or adding one character of a directory name never
    decodes to the same configuration."""
    try:
        dirname = vmid.encode(name, words)
    except UsageError:
        return
    pos %= len(dirname) + 1
    for mutated in (dirname[:pos] + ch + dirname[pos:], dirname[:pos] + ch + dirname[pos + 1:]):
        if mutated == dirname:
            continue
        try:
            assert vmid.decode(mutated) != (name, words)
        except TreeError:
            pass


_ADMIN_SPELLINGS = [o.name for o in optable.TABLE] + [
    "nic", "nic,model=virtio", "user", "tap,br=br0", "socket,listen=:1234", "none", "tablet",
    "virtio", "512", "tcp:2222::22", "/srv/tftp", "nic,vlan=1", "host:1:2",
    "q35", "pc", "efi", "bios", "max", "host", "Skylake-Client", "2", "0"]


@SETTINGS
@given(st.lists(st.one_of(st.sampled_from(_ADMIN_SPELLINGS), st.text(_PRINTABLE, max_size=25)),
                max_size=10))
def test_parse_admin_only_refuses(words: list[str]) -> None:
    """P8: parse_admin raises nothing but RefusedOption; what it accepts maps
    to an argv (tap descriptors are the helper's, faked as numbers here)."""
    try:
        plan = adminopts.parse_admin(words)
    except RefusedOption as exc:
        assert "\n" not in exc.message
        return
    argv = adminopts.admin_argv(plan, "vm", list(range(200, 200 + len(plan.taps))))
    assert argv[:2] == ["-m", str(plan.megs)]


@SETTINGS
@given(st.one_of(st.text(), st.binary().map(lambda b: b.decode("utf-8", "surrogateescape"))))
def test_printable_escapes_everything_and_round_trips(text: str) -> None:
    """P9: text.printable gives printable ASCII for any name (file names
    come as bytes: undecodable ones as surrogates), and unescape gives the
    same name back, so a name 'images' shows can be typed to 'rm'."""
    from kvmshell.common.text import printable, unescape
    out = printable(text)
    assert all(32 <= ord(c) < 127 for c in out), out
    assert unescape(out) == text
    safe = printable(text, backslash=False)
    assert all(32 <= ord(c) < 127 for c in safe)


# ---- the supervisor's QMP reader ----------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


def _outcome(loads: "Callable[[str], object]", text: str) -> tuple[str, str]:
    try:
        return "value", json.dumps(loads(text))
    except ValueError:
        return "refused", ""


@SETTINGS
@given(st.one_of(_JSON.map(json.dumps),
                 st.text(max_size=60),
                 st.text(" \t\r\n\x0b{}[]\":,0123456789.eE+-nultrfas\\", max_size=40)))
def test_supervisor_reads_json_as_json_does(text: str) -> None:
    """The supervisor reads QMP with CPython's C JSON scanner (the json
    module would cost every supervisor ~1.4 MB): for any text it gives what
    json.loads gives, or refuses where json.loads refuses, with ValueError."""
    from kvmshell.shell.supervisor import json_decoder

    assert _outcome(json_decoder(), text) == _outcome(json.loads, text)
