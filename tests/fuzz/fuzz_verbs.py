"""Coverage-guided fuzzing (atheris) of every verb's arguments.

fuzz_parser.py drives the grammar of ``start``; this target drives what a
user can send to any verb, end to end through kvmshell's own dispatcher
(``cli.run_words`` and ``cli.parse_invocation``), on a real VM tree:

  * a temporary tree with VMs of an unprivileged user (``nobody``), one of
    them broken (mode 0750), with a few image files; the fuzzing process
    then drops to that user, as sshd runs kvmshell;
  * the config caps uploads and images, limits running VMs, and names
    ``/bin/false`` as QEMU: an accepted ``start`` really forks the
    supervisor, which execs it, and fails with "QEMU exited";
  * stdin is /dev/null (``upload`` stores empty files; the tree is reset
    every RESET inputs so that names do not run out).

Each input is one command: a verb picked from the table, then words from
the input's bytes (decoded as Python decodes argv and the environment:
UTF-8 with undecodable bytes kept as surrogates), given as argv words, as
one ``SSH_ORIGINAL_COMMAND`` string, or as ``-c`` text.  A refusal or
failure (KvmshellError) is the expected answer.  A finding is any other
exception ("internal error" for the user), or output that is not printable
ASCII (a terminal escape reaching the user).

    make fuzz                      # both targets, FUZZ_SECONDS in all
    python3 tests/fuzz/fuzz_verbs.py -max_total_time=60 -dict=tests/fuzz/verbs.dict

Runs as root (it builds the tree, then drops privileges); the parent
process removes the tree when the fuzzer ends.
"""

from __future__ import annotations

import io
import os
import pwd
import shutil
import sys
import tempfile

import atheris

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE))]

with atheris.instrument_imports():
    from kvmshell.common import vmid
    from kvmshell.common.errors import KvmshellError
    from kvmshell.shell import cli
    from kvmshell.shell.context import VERBS, Context
    # Imported lazily by the verbs; instrumented here so coverage sees them.
    from kvmshell.shell import console, images, launcher, limits, files, vnc
    from kvmshell.common import text, vmtree

_INSTRUMENTED = (console, images, launcher, limits, files, vnc, vmtree)

RESET = 2000
USER = "nobody"
FIXTURES = {"x.iso": b"\0" * 4096, "d.img": b"\0" * 65536, "k.bin": b"abcdefg",
            "q.qcow2": b"QFI\xfb" + (3).to_bytes(4, "big") + bytes(200),
            os.fsdecode(b"bad\xff.img"): b"x", "r\x1b[31mred.img": b"x"}
VERB_LIST = sorted(VERBS)
VM_NAMES = ["", "f1", "f2", "f3", "nosuch"]


class Tree:
    def __init__(self) -> None:
        pw = pwd.getpwnam(USER)
        self.uid, self.gid = pw.pw_uid, pw.pw_gid
        self.root = tempfile.mkdtemp(prefix="kvmshell-fuzz-")
        os.chmod(self.root, 0o755)
        self.vmdir = os.path.join(self.root, "vms")
        os.mkdir(self.vmdir, 0o755)
        self.conf = os.path.join(self.root, "kvmshell.conf")
        with open(self.conf, "w") as f:
            f.write(f"vmdir = {self.vmdir}\naccel = tcg\nqemu = /bin/false\n"
                    "max_running = 1\nmax_image_bytes = 1048576\nupload_max_bytes = 65536\n"
                    "stop_timeout = 1\n")
        os.chmod(self.conf, 0o644)
        self.dirs = []
        for name, words, mode in (("f1", ["-m", "32"], 0o700), ("f2", ["-m", "32", "-usb"], 0o700),
                                  ("f3", ["-m", "32"], 0o750)):
            dirname = vmid.encode(name, words)
            path = os.path.join(self.vmdir, dirname)
            os.mkdir(path)
            os.chown(path, self.uid, self.gid)
            os.chmod(path, mode)
            os.symlink(dirname, os.path.join(self.vmdir, name))
            self.dirs.append(path)

    def reset(self) -> None:
        """Put the fixtures back and drop what uploads made (as the user)."""
        for path in self.dirs[:2]:
            for leaf in os.listdir(path):
                if leaf not in FIXTURES:
                    try:
                        os.unlink(os.path.join(path, leaf))
                    except OSError:
                        pass
            for leaf, data in FIXTURES.items():
                p = os.path.join(path, leaf)
                if not os.path.exists(p):
                    with open(p, "wb") as f:
                        f.write(data)


TREE: Tree
CTX: Context
COUNT = 0


def _check_output(out: str) -> None:
    for ch in out:
        if ch != "\n" and not 32 <= ord(ch) < 127:
            raise AssertionError(f"unprintable output {ch!r} in {out[:200]!r}")


def one_input(data: bytes) -> None:
    global COUNT
    COUNT += 1
    if COUNT % RESET == 0:
        TREE.reset()
    fdp = atheris.FuzzedDataProvider(data)
    how = fdp.ConsumeIntInRange(0, 3)
    head = [fdp.PickValueInList(VERB_LIST)]
    vm = fdp.PickValueInList(VM_NAMES)
    if vm:
        head.append(vm)
    # Long words are what limits are about, and hard for a mutator to
    # grow: the last word may be repeated (a long name: "upload f1 aaa...").
    repeat = fdp.ConsumeIntInRange(1, 300) if fdp.ConsumeBool() else 1
    # No NUL: neither argv nor the environment can carry one.
    data = fdp.ConsumeBytes(fdp.remaining_bytes()).replace(b"\0", b"")
    first, space, last = data.rpartition(b" ")
    raw = (first + space + last * repeat)[:8192].decode("utf-8", "surrogateescape")
    out = io.StringIO()
    saved = sys.stdout
    sys.stdout = out
    try:
        if how == 0:                               # argv words (split on spaces only)
            cli.run_words(CTX, head + raw.split(" ") if raw else head)
        elif how == 1:                             # SSH_ORIGINAL_COMMAND
            os.environ["SSH_ORIGINAL_COMMAND"] = " ".join(head + [raw])
            try:
                _, words = cli.parse_invocation(["kvmshell", "--config", TREE.conf])
            finally:
                del os.environ["SSH_ORIGINAL_COMMAND"]
            cli.run_words(CTX, words or [])
        elif how == 2:                             # -c TEXT, as a login shell
            _, words = cli.parse_invocation(["kvmshell", "-c", " ".join(head + [raw])])
            cli.run_words(CTX, words or [])
        else:                                      # the raw text, verb or not
            _, words = cli.parse_invocation(["kvmshell", "-c", raw])
            cli.run_words(CTX, words or [])
    except KvmshellError as exc:
        if "\n" in exc.message:
            raise AssertionError(f"message of more than one line: {exc.message!r}") from exc
        _check_output(text.printable(exc.message, backslash=False))
    finally:
        sys.stdout = saved
    _check_output(out.getvalue())


def main() -> int:
    global TREE, CTX
    if os.geteuid() != 0:
        sys.exit("fuzz_verbs.py runs as root: it builds a VM tree, then drops to 'nobody'")
    TREE = Tree()
    # The fuzzer runs as the user: it must be able to write its corpus
    # directories and its crash artifacts (kept beside the corpus).
    argv = list(sys.argv)
    dirs = [a for a in argv[1:] if not a.startswith("-")]
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        os.chown(d, TREE.uid, TREE.gid)
    if not any(a.startswith("-artifact_prefix=") for a in argv):
        where = dirs[0] if dirs else tempfile.mkdtemp(prefix="kvmshell-fuzz-artifacts-")
        os.chown(where, TREE.uid, TREE.gid)
        argv.insert(1, f"-artifact_prefix={os.path.abspath(where)}/")
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        shutil.rmtree(TREE.root, ignore_errors=True)
        return os.waitstatus_to_exitcode(status)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.setgroups([])
    os.setgid(TREE.gid)
    os.setuid(TREE.uid)
    TREE.reset()
    CTX = Context(TREE.conf)
    atheris.Setup(argv, one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
