"""Coverage-guided fuzzing (atheris) of kvmshell's parser.

The target feeds arbitrary bytes through everything that reads user or
tree text before anything runs: the lexer, the user grammar and its
mapping to QEMU argv, the admin grammar, and the VM identifier decoder.
A refusal (KvmshellError) is the expected answer; any other exception is a
finding, and so is an accepted request whose argv breaks the property of
tests/test_properties.py.

    make fuzz                      # runs for FUZZ_SECONDS (default 60)
    python3 tests/fuzz/fuzz_parser.py -max_total_time=60
"""

from __future__ import annotations

import os
import sys

import atheris

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.dirname(os.path.dirname(HERE))]

with atheris.instrument_imports():
    from kvmshell.shell import lexer
    from kvmshell.common import adminopts
    from kvmshell.shell import useropts
    from kvmshell.common import vmid
    from kvmshell.common.errors import KvmshellError

from test_properties import _fake_opened, check_argv  # noqa: E402


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    which = fdp.ConsumeIntInRange(0, 2)
    text = fdp.ConsumeUnicodeNoSurrogates(len(data))
    try:
        if which == 0:
            words = lexer.split(text)
            req = useropts.parse_user(words[1:] if words[:1] == ["start"] else words)
            check_argv(req, useropts.user_argv(req, _fake_opened(req), "vnc.sock"))
        elif which == 1:
            plan = adminopts.parse_admin(lexer.split(text))
            adminopts.admin_argv(plan, "vm", list(range(200, 200 + len(plan.taps))))
        else:
            name, words = vmid.decode(text)
            assert vmid.encode(name, words) == text
    except KvmshellError:
        pass


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
