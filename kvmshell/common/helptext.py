"""Help in two columns: one layout for every table kvmshell and kvmadm print.

A row is a *term* (a verb and its synopsis, an option and its value) and a
*description*.  The rule, which tests/test_help.py holds every help to:

* every description of a table starts in one column: two spaces past the
  longest term of at most ``MAX_TERM`` characters;
* a longer term stands alone on its line, and its description starts on
  the next line, in that column (as argparse does);
* a description that does not fit in ``WIDTH`` characters goes on over
  further lines, indented to that column (broken between words only).

Why a fixed width: the help is read over ssh in terminals of 80 columns.
"""

from __future__ import annotations

WIDTH = 79
MAX_TERM = 30


def column(terms: "list[str]", indent: int = 2) -> int:
    """The column (0-based) where the descriptions of a table of *terms* start."""
    return indent + max((len(t) for t in terms if len(t) <= MAX_TERM), default=0) + 2


def table(rows: "list[tuple[str, str]]", indent: int = 2, width: int = WIDTH) -> str:
    """*rows* of (term, description) as lines, by the rule above (no
    trailing newline).  Pure; the text is printed as given (escape it first)."""
    import textwrap     # only for help (about 8 ms, re included)
    col = column([term for term, _ in rows], indent)
    lines: list[str] = []
    for term, desc in rows:
        head = " " * indent + term
        if len(head) + 2 > col:          # too long for the column: a line of its own
            lines.append(head)
            head = ""
        lines += textwrap.wrap(desc, width, initial_indent=head.ljust(col),
                               subsequent_indent=" " * col, break_long_words=False,
                               break_on_hyphens=False) or [head]
    return "\n".join(lines)
