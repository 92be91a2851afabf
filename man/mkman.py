#!/usr/bin/python3
"""Build the man pages kvmshell(1), kvmadm(8) and kvmshell.conf(5).

    python3 man/mkman.py OUTDIR

Run at build time (``make man``, and so ``make install``) from a checkout.
The prose is reStructuredText in ``man/*.rst``; the parts that must not
drift are filled in from the code's own tables before docutils' manpage
writer (rst2man) turns each page into roff:

    @VERBS@          kvmshell.shell.context.VERBS (synopsis, summary)
    @JSON_VERBS@     kvmshell.shell.context.JSON_VERBS
    @USER_OPTIONS@   kvmshell.common.optable.TABLE, user class
    @ADMIN_OPTIONS@  kvmshell.common.optable.TABLE, admin class
    @CONSOLE_HELP@   kvmshell.shell.console (ABOUT, OPTIONS, NOTES)
    @COMMANDS@       kvmshell.admin.kvmadm.COMMAND_HELP
    @SETTINGS@       kvmshell.common.config's defaults, each described by the
                     comment above it in the shipped kvmshell.conf

It fails (exit 1) if a setting has no description in kvmshell.conf, or the
shipped value differs from the default: the page and the file must agree.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PAGES = (("kvmshell.1.rst", "kvmshell.1"), ("kvmadm.8.rst", "kvmadm.8"),
         ("kvmshell.conf.5.rst", "kvmshell.conf.5"))


def text(s: str) -> str:
    """Free text for reStructuredText: inline-markup characters escaped."""
    out = []
    for c in s:
        out.append("\\" + c if c in "\\*`|_" else c)
    return "".join(out)


def literal(s: str) -> str:
    return f"``{s}``"


def synopsis(words: str) -> str:
    """A synopsis: UPPERCASE words (placeholders) in italics, the rest literal."""
    out = []
    for word in words.split():
        core = word.strip("[]|.")
        if core.isupper() and core.replace("-", "").isalpha():
            head, _, tail = word.partition(core)
            out.append((literal(head) + "\\ " if head else "")
                       + f"*{core}*" + ("\\ " + literal(tail) if tail else ""))
        else:
            out.append(literal(word))
    return " ".join(out)


def deflist(rows: list[tuple[str, str]]) -> str:
    return "\n\n".join(f"{term}\n    {body}" for term, body in rows)


def verbs() -> str:
    from kvmshell.shell.context import VERBS
    return deflist([(literal(v) + (" " + synopsis(syn) if syn else ""), text(summary))
                    for v, (syn, summary) in VERBS.items()])


def json_verbs() -> str:
    """The verbs of JSON_VERBS, in table order; for disk, the sub-verbs whose
    synopsis takes --json (disks.DISK_VERBS)."""
    from kvmshell.shell.context import JSON_VERBS, VERBS
    from kvmshell.shell.disks import DISK_VERBS
    names = []
    for v in VERBS:
        if v == "disk" and v in JSON_VERBS:
            names += [literal(f"disk {sub}") for sub, (syn, _n, _s) in DISK_VERBS.items()
                      if "--json" in syn]
        elif v in JSON_VERBS:
            names.append(literal(v))
    return ", ".join(names[:-1]) + " and " + names[-1]


def _options(cls: str) -> str:
    from kvmshell.common import optable
    rows = []
    for o in optable.TABLE:
        if o.cls != cls or o.gone:
            continue
        term = literal(o.name)
        value = optable.value_name(o)
        if value:
            # As help shows it (optable.usage): a placeholder in italics, a
            # word typed as it stands literal, an optional value in brackets.
            shown = literal(value) if value.isalpha() and value.islower() else f"*{text(value)}*"
            term += f" [{shown}]" if o.arity == optable.OPTIONAL else f" {shown}"
        body = text(o.help)
        if o.example is not None:
            body += f" (for example ``{o.name} {o.example}``)"
        rows.append((term, body))
    return deflist(rows)


def user_options() -> str:
    from kvmshell.common import optable
    return _options(optable.USER)


def admin_options() -> str:
    from kvmshell.common import optable
    return _options(optable.ADMIN)


def console_help() -> str:
    """'help console' as the page's prose: the synopsis, what it does, the
    options (console.OPTIONS) and the notes, reflowed by man to its width."""
    from kvmshell.shell import console
    from kvmshell.shell.context import VERBS
    return "\n\n".join([
        literal("console") + " " + synopsis(VERBS["console"][0]), text(console.ABOUT),
        deflist([(synopsis(opt), text(desc)) for opt, desc in console.OPTIONS.items()]),
        text(console.NOTES)])


def commands() -> str:
    from kvmshell.admin.kvmadm import COMMAND_HELP
    return deflist([(literal(c) + (" " + synopsis(syn) if syn else ""), text(summary))
                    for c, (syn, summary) in COMMAND_HELP.items()])


def shipped_settings() -> dict[str, tuple[str, str]]:
    """key -> (value, description) from the shipped kvmshell.conf: the
    comment above a setting describes it, and the settings right after it
    with no comment of their own; ``# ---- heading ----`` lines are not
    descriptions."""
    out: dict[str, tuple[str, str]] = {}
    comment: list[str] = []
    after_setting = False
    for line in (REPO / "kvmshell.conf").read_text().splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip()
            if text.startswith("----"):
                continue
            if after_setting:
                comment, after_setting = [], False
            comment.append(text)
        elif "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = (value.strip(), " ".join(comment))
            after_setting = True
        else:
            comment, after_setting = [], False
    return out


def settings() -> str:
    from kvmshell.common import config
    shipped = shipped_settings()
    rows = []
    for key, default in config._DEFAULTS.items():
        if key not in shipped or not shipped[key][1]:
            raise SystemExit(f"mkman: setting {key!r} has no description in kvmshell.conf")
        if shipped[key][0] != default:
            raise SystemExit(f"mkman: kvmshell.conf ships {key} = {shipped[key][0]!r}, "
                             f"the default is {default!r}")
        shown = literal(default) if default else "empty"
        rows.append((literal(key), f"{text(shipped[key][1])}  Default: {shown}."))
    return deflist(rows)


FILL = {"@VERBS@": verbs, "@JSON_VERBS@": json_verbs, "@USER_OPTIONS@": user_options,
        "@ADMIN_OPTIONS@": admin_options, "@CONSOLE_HELP@": console_help,
        "@COMMANDS@": commands, "@SETTINGS@": settings}


def source(name: str) -> str:
    """The reStructuredText of one page, tables filled in."""
    import kvmshell
    src = (REPO / "man" / name).read_text().replace("@VERSION@", kvmshell.__version__)
    for mark, fill in FILL.items():
        if mark in src:
            src = src.replace(mark, fill())
    return src


def build(outdir: Path) -> list[Path]:
    from docutils.core import publish_string
    outdir.mkdir(parents=True, exist_ok=True)
    made = []
    for src_name, page in PAGES:
        roff = publish_string(source(src_name), writer_name="manpage",
                              settings_overrides={"report_level": 2, "halt_level": 2,
                                                  "output_encoding": "utf-8"})
        # No hyphenation, ragged right: the pages are full of paths and
        # option names, which must be copied as printed.
        head, th, rest = roff.partition(b"\n.TH ")
        line, nl, body = rest.partition(b"\n")
        roff = head + th + line + nl + b".nh\n.ad l\n" + body
        path = outdir / page
        path.write_bytes(roff)
        made.append(path)
    return made


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: mkman.py OUTDIR")
    for p in build(Path(sys.argv[1])):
        print(p)
