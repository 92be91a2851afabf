"""The admin's small files (the host config, the budget files, the host
list) are read by one reader (kvmshell/common/rootfile.py): each is
believed only as a regular file of root's that no group or other user can
write, within its size cap, opened without following a link or waiting
on a FIFO.  Its refusals, through each consumer, and through every root
helper (each reads the config at its stub's fixed path before its verb).

Real files in a root-owned temporary directory; nothing is mocked.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import KVMSHELL
from kvmshell.common import budgets, config, hosts
from kvmshell.common.errors import ConfigError

pytestmark = pytest.mark.security

LIB = str(Path(KVMSHELL).parents[1] / "lib")   # this checkout's package, as installed
NOBODY = 65534

GOOD = {"config": "accel = tcg\n",
        "budget file": "max_running = 2\n",
        "host list": "hosta 192.0.2.1\n"}
CAPS = {"config": config.MAX_BYTES, "budget file": budgets.MAX_FILE_BYTES,
        "host list": hosts.MAX_BYTES}


@contextmanager
def within(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging the suite) if the block takes longer."""
    def late(signum: int, frame: object) -> None:
        raise TimeoutError(f"no answer within {seconds} s")
    old = signal.signal(signal.SIGALRM, late)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def read_through(what: str, path: Path, tmp: Path) -> object:
    """*path* read by its consumer: config.load, budgets.read_file, hosts.load."""
    if what == "config":
        return config.load(str(path))
    if what == "budget file":
        return budgets.read_file(str(path))
    conf = tmp / "for-hosts.conf"
    conf.write_text(f"host_name = hosta\nhosts_file = {path}\n")
    os.chmod(conf, 0o644)
    return hosts.load(config.load(str(conf)))


def good_file(path: Path, what: str) -> Path:
    path.write_text(GOOD[what])
    os.chown(path, 0, 0)
    os.chmod(path, 0o644)
    return path


def symlink(path: Path, what: str) -> str:
    target = good_file(path.with_name(path.name + ".target"), what)
    path.symlink_to(target)
    return f"cannot read {what} {path}: Too many levels of symbolic links"


def fifo(path: Path, what: str) -> str:
    os.mkfifo(path, 0o644)       # no writer: a blocking open would wait for ever
    return f"{what} {path} must be a regular file owned by root"


def not_roots(path: Path, what: str) -> str:
    good_file(path, what)
    os.chown(path, NOBODY, NOBODY)
    return f"{what} {path} must be a regular file owned by root"


def group_writable(path: Path, what: str) -> str:
    good_file(path, what)
    os.chmod(path, 0o664)
    return f"{what} {path} must be a regular file owned by root and not group/world-writable"


def other_writable(path: Path, what: str) -> str:
    good_file(path, what)
    os.chmod(path, 0o646)
    return f"{what} {path} must be a regular file owned by root and not group/world-writable"


def oversized(path: Path, what: str) -> str:
    good_file(path, what)
    with open(path, "a") as f:     # valid lines all the way: only the size is wrong
        f.write("# padding\n" * (CAPS[what] // 10 + 1))
    return f"{what} {path}: over {CAPS[what]} bytes"


def a_directory(path: Path, what: str) -> str:
    path.mkdir(mode=0o755)
    return f"{what} {path} must be a regular file owned by root"


BAD: dict[str, Callable[[Path, str], str]] = {
    "symlink": symlink, "fifo": fifo, "not-roots": not_roots,
    "group-writable": group_writable, "other-writable": other_writable,
    "oversized": oversized, "directory": a_directory}


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    os.chmod(tmp_path, 0o755)
    return tmp_path


@pytest.mark.parametrize("what", list(GOOD))
def test_the_admins_file_is_read(tmp: Path, what: str) -> None:
    """The same file, root's and 0644, at its cap exactly: read whole."""
    path = good_file(tmp / "f", what)
    with open(path, "a") as f:
        f.write("#" * (CAPS[what] - path.stat().st_size - 1) + "\n")
    assert path.stat().st_size == CAPS[what]
    got = read_through(what, path, tmp)
    if what == "config":
        assert isinstance(got, config.Config) and got.accel == ["tcg"]
    else:
        assert got == {"budget file": {"max_running": 2},
                       "host list": {"hosta": "192.0.2.1"}}[what]


@pytest.mark.parametrize("what", list(GOOD))
@pytest.mark.parametrize("bad", list(BAD))
def test_the_reader_refuses(tmp: Path, what: str, bad: str) -> None:
    """Each refusal through each consumer: one ConfigError naming the file
    and what is wrong with it, at once (a FIFO without a writer included)."""
    path = tmp / "f"
    want = BAD[bad](path, what)
    with within(5), pytest.raises(ConfigError) as err:
        read_through(what, path, tmp)
    assert want in err.value.message, err.value.message
    assert "\n" not in err.value.message


@pytest.mark.parametrize("what", list(GOOD))
def test_a_missing_file(tmp: Path, what: str) -> None:
    """Missing: no budget file, no host list (one host) are answers; a
    config named but missing is an error (only the default path may be
    missing)."""
    path = tmp / "missing"
    if what == "config":
        with pytest.raises(ConfigError, match="cannot read config .*: no such file"):
            read_through(what, path, tmp)
    else:
        assert read_through(what, path, tmp) is None


# Each root helper, run as sudo runs it (root, SUDO_UID), with argv a
# well-formed request: argv, then the config its stub names.
HELPERS = {"nethelper": ["up", "x"], "cgrouphelper": ["attach", "x"],
           "pamhelper": ["auth", "nobody", "-"], "relayhelper": ["MUNGE:x:"]}


@pytest.mark.parametrize("helper", list(HELPERS))
@pytest.mark.parametrize("bad", ["fifo", "symlink", "not-roots"])
def test_every_root_helper_refuses_an_unsafe_config_at_once(tmp: Path, helper: str,
                                                            bad: str) -> None:
    """The config at the stub's path is a FIFO, a link or a user's file:
    the helper fails at once (exit 1), one line naming the file, and
    nothing on stdout."""
    path = tmp / "kvmshell.conf"
    want = BAD[bad](path, "config")
    code = (f"import sys; sys.path.insert(0, {LIB!r})\n"
            f"from kvmshell.privileged.{helper} import main\n"
            f"sys.exit(main({str(path)!r}))\n")
    env = {"PATH": "/usr/bin:/bin", "SUDO_UID": "0", "SUDO_GID": "0", "SUDO_USER": "root",
           "SUDO_COMMAND": helper}
    r = subprocess.run(["/usr/bin/python3", "-I", "-c", code, *HELPERS[helper]], env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10)
    prog = {"relayhelper": "kvmshell-relayd"}.get(helper, f"kvmshell-{helper}")
    assert (r.returncode, r.stdout) == (1, ""), r
    assert r.stderr.startswith(f"{prog}: ") and want in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
