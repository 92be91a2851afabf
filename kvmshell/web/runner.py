"""How the web server acts: kvmshell as the logged-in user, and the login
helper, both through sudo, argv only (never a shell), with a fixed
environment.

    sudo -n -u USER -- WEB_KVMSHELL VERB ARGS...        (sudoers.d/kvmshell-web)
    sudo -n -- WEB_PAMHELPER auth USER ADDR  < password

The web server decides nothing about VMs: kvmshell, run as the user, is
the validator, and its one-line answer (stderr, ``kvmshell: ...``) is what
the pages show.
"""

from __future__ import annotations

import asyncio
import json

from kvmshell.common.config import Config

SUDO = "/usr/bin/sudo"
ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
OUTPUT_MAX = 1 << 20
ERROR_MAX = 1 << 16        # the end of kvmshell's stderr kept (its last line is the message)
DRAIN_SECONDS = 1.0        # how long output is read once kvmshell has exited
HELPER_SECONDS = 30.0
# At most this many login checks run at once (each is a root process).
_helpers = asyncio.Semaphore(4)
# At most this many kvmshell runs (not consoles: see app.STREAMS_PER_USER)
# at once per user; more requests wait.  Why: each is a sudo and a Python
# process, and one logged-in user's burst of requests must not fill the
# host with them.
RUNS_PER_USER = 4
_runs: dict[str, asyncio.Semaphore] = {}


class Result:
    """A finished kvmshell run: exit ``status``, ``stdout`` (text) and
    ``message`` (its last stderr line: kvmshell's one-line answer)."""

    __slots__ = ("status", "stdout", "message")

    def __init__(self, status: int, stdout: str, message: str) -> None:
        self.status = status
        self.stdout = stdout
        self.message = message


def argv(cfg: Config, user: str, words: list[str]) -> list[str]:
    """sudo's argv to run kvmshell *words* as *user*."""
    return [SUDO, "-n", "-u", user, "--", cfg.web.kvmshell, *words]


def last_line(data: bytes) -> str:
    lines = [ln for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1].strip()[:1000] if lines else ""


async def run(cfg: Config, user: str, words: list[str], timeout: float = 120.0) -> Result:
    """Run ``kvmshell WORDS`` as *user* to the end (stdin empty); at
    most RUNS_PER_USER at once per user (the wait counts in *timeout*)."""
    gate = _runs.setdefault(user, asyncio.Semaphore(RUNS_PER_USER))
    try:
        await asyncio.wait_for(gate.acquire(), timeout)
    except asyncio.TimeoutError:
        return Result(1, "", "kvmshell-web: busy: too many of your requests at once")
    try:
        return await _run(cfg, user, words, timeout)
    finally:
        gate.release()


async def _run(cfg: Config, user: str, words: list[str], timeout: float) -> Result:
    proc = await asyncio.create_subprocess_exec(
        *argv(cfg, user, words), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=ENV)
    # Why not communicate(): the pipes' writing ends are the user's to copy
    # out of kvmshell (pidfd_getfd) and to keep or pour into; the server
    # keeps OUTPUT_MAX of stdout and the end of stderr, and reads on for
    # at most DRAIN_SECONDS once kvmshell has exited.
    out_buf, err_buf = bytearray(), bytearray()
    assert proc.stdout is not None and proc.stderr is not None
    readers = [asyncio.ensure_future(_read_capped(proc.stdout, out_buf, OUTPUT_MAX, False)),
               asyncio.ensure_future(_read_capped(proc.stderr, err_buf, ERROR_MAX, True))]
    try:
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            return Result(1, "", f"kvmshell-web: '{words[0]}' took longer than {timeout:.0f} s")
        await asyncio.wait(readers, timeout=DRAIN_SECONDS)
    finally:
        for task in readers:
            task.cancel()
    out, err = bytes(out_buf), bytes(err_buf)
    status = proc.returncode if proc.returncode is not None else 1
    message = last_line(err)
    if status != 0 and not message.startswith("kvmshell: "):
        # sudo's own refusal (e.g. the user left the group): not for the page.
        message = "kvmshell-web: not allowed to act as this user"
    return Result(status, out[:OUTPUT_MAX].decode("utf-8", "replace"), message)


async def _read_capped(stream: asyncio.StreamReader, buf: bytearray, cap: int,
                       tail: bool) -> None:
    """Read *stream* to its end into *buf*, keeping at most *cap* bytes:
    the first ones, or the last ones if *tail*."""
    while chunk := await stream.read(65536):
        if tail:
            buf += chunk
            del buf[:-cap]
        elif len(buf) < cap:
            buf += chunk[:cap - len(buf)]


async def spawn(cfg: Config, user: str, words: list[str]) -> asyncio.subprocess.Process:
    """Start ``kvmshell WORDS`` as *user* with stdin, stdout and stderr as
    pipes (the console and display streams)."""
    return await asyncio.create_subprocess_exec(
        *argv(cfg, user, words), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=ENV)


async def list_vms(cfg: Config, user: str) -> tuple[list[dict[str, object]], str]:
    """(the user's VMs as ``list --json`` gives them, error line or '')."""
    r = await run(cfg, user, ["list", "--json"])
    if r.status != 0:
        return [], r.message
    try:
        docs = json.loads(r.stdout)
        docs = docs["vms"] if isinstance(docs, dict) else None   # docs/json.md
    except (ValueError, KeyError):
        return [], "kvmshell-web: unexpected answer from kvmshell"
    if not isinstance(docs, list) or not all(isinstance(d, dict) for d in docs):
        return [], "kvmshell-web: unexpected answer from kvmshell"
    return docs, ""


async def check_login(cfg: Config, user: str, password: str, address: str) -> bool:
    """Ask the login helper (root, through sudo) whether *password* is
    *user*'s, and the account may log in.  True only on its ``ok``."""
    async with _helpers:
        proc = await asyncio.create_subprocess_exec(
            SUDO, "-n", "--", cfg.web.pamhelper, "auth", user, address,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=ENV)
        try:
            out, _err = await asyncio.wait_for(
                proc.communicate(password.encode("utf-8") + b"\n"), HELPER_SECONDS)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            return False
    return proc.returncode == 0 and out == b"ok\n"
