"""The interactive prompt: kvmshell as a login shell on a terminal.

Each line goes through the same lexer and validator as an SSH command
(lexer.split, then the run_words that cli passes in): the prompt is a convenience, not another
way in.  readline gives line editing, in-memory history (the user's home
may not exist, so nothing is written) and completion of verbs and VM names.
"""

from __future__ import annotations

import sys
TYPE_CHECKING = False

from kvmshell.common.errors import KvmshellError

if TYPE_CHECKING:
    from collections.abc import Callable

    from kvmshell.shell.context import Context

LEAVE = ("exit", "quit", "logout")


def _vm_names(ctx: "Context") -> list[str]:
    from kvmshell.common import vmtree
    try:
        return [vm.name for vm in vmtree.owned(ctx.cfg, ctx.uid)]
    except KvmshellError:
        return []


def _completer(ctx: "Context") -> "object":
    import readline

    from kvmshell.shell.context import VERBS

    matches: list[str] = []

    def complete(text: str, state: int) -> str | None:
        nonlocal matches
        if state == 0:
            line = readline.get_line_buffer()[:readline.get_begidx()]
            if not line.strip():
                pool = list(VERBS) + list(LEAVE)
            elif line.split()[0] == "help" and len(line.split()) == 1:
                pool = list(VERBS)
            elif len(line.split()) == 1:
                pool = _vm_names(ctx)
            else:
                pool = []
            matches = [w + " " for w in pool if w.startswith(text)]
        return matches[state] if state < len(matches) else None

    return complete


def loop(ctx: "Context", run_words: "Callable[[Context, list[str]], int]") -> int:
    """Prompt, read and run lines until EOF or ``exit``; the last status."""
    from kvmshell.common.text import printable
    from kvmshell.shell import lexer
    try:
        import readline
        readline.set_completer(_completer(ctx))  # type: ignore[arg-type]
        readline.set_completer_delims(" \t")
        readline.parse_and_bind("tab: complete")
    except ImportError:  # no readline: a plain prompt still works
        pass
    sys.stdout.write("kvmshell: type 'help' for the commands, 'exit' to leave.\n")
    status = 0
    while True:
        try:
            line = input("kvmshell> ")
        except EOFError:
            sys.stdout.write("\n")
            return status
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            continue
        try:
            words = lexer.split(line)
            if not words:
                continue
            if words[0] in LEAVE and len(words) == 1:
                return status
            status = run_words(ctx, words)
        except KvmshellError as exc:
            sys.stderr.write(f"kvmshell: {printable(exc.message, backslash=False)}\n")
            status = exc.status
        except KeyboardInterrupt:
            sys.stderr.write("kvmshell: interrupted\n")
            status = 130
        sys.stdout.flush()
        sys.stderr.flush()
