"""The web front door: its login helper, the HTTP attacks it must survive,
and the whole path in a real browser (Debian's headless Chromium, driven
by Selenium through Debian's chromedriver).

Everything is real: the server runs as its own system user, logs users in
through sudo and the root login helper with real PAM passwords, and acts
through sudo as the users with the test copy of kvmshell; the guest is the
busybox test guest under TCG.  The rig is tests/webrig.py.  Screenshots of
each page go to build/web-*.png.

The server listens on 127.0.0.1 here and believes no X-Forwarded-For
(web_proxies may not name an address of this host); the rate-limit test
stands for clients at several addresses through a server of its own on a
unix socket, where the test is the proxy, as nginx is in the shipped setup.
"""

from __future__ import annotations

import grp
import json
import os
import re
import secrets
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from conftest import KVMSHELL, MARKER, REPO, Host, User, _drop_user, _make_user, console_log, \
    kill_all, wait_for
from webrig import WebRig

pytestmark = pytest.mark.web

PASSWORD = "Pw-" + secrets.token_hex(8)
VM = "webvm"
BOBVM = "webbob"
COOKIE = "__Host-kvmshell"
EVIL = "https://evil.example"
SHOTS = REPO / "build"
FAILURE_LINE = re.compile(r"^kvmshell-web: authentication failure for '(?P<user>[^']*)' "
                          r"from (?P<host>\S+)$", re.M)


@pytest.fixture(scope="module")
def web(host: Host, alice: User, bob: User) -> Iterator[WebRig]:
    rig = WebRig(host.root, KVMSHELL, host.conf, host.root / "lib",
                 web_login_failures_per_user="3", web_login_failures_per_address="6",
                 web_login_window="600")
    try:
        rig.add_user(alice.name, PASSWORD)
        rig.add_user(bob.name, PASSWORD)
        rig.start()
        yield rig
    finally:
        rig.close()


def unix_rig(host: Host, group: str | None = None, **settings: str) -> WebRig:
    """A rig listening on a unix socket in a directory of the web user's,
    mode 0750, of group *group* (the proxy's; default root's), as
    /etc/tmpfiles.d/kvmshell-web.conf makes it."""
    rig = WebRig(host.root, KVMSHELL, host.conf, host.root / "lib", **settings)
    run = rig.root / "run"
    run.mkdir()
    os.chown(run, rig.web_uid, 0 if group is None else grp.getgrnam(group).gr_gid)
    os.chmod(run, 0o750)
    rig.write_conf(web_listen=f"unix:{run}/web.sock")
    return rig


@pytest.fixture(scope="module")
def vms(host: Host, alice: User, bob: User, guest: Path) -> Iterator[dict[str, Path]]:
    paths = {VM: host.create_vm(VM, alice, "-m", "256", guest=guest),
             BOBVM: host.create_vm(BOBVM, bob, "-m", "128")}
    try:
        yield paths
    finally:
        for u in (alice, bob):
            kill_all(u)
        for name, path in paths.items():
            wait_for(lambda: not (path / "console.sock").exists(), 20, "the supervisor to go")
            host.kvmadm("remove", name, "--purge")


@pytest.fixture(scope="module")
def running(web: WebRig, alice: User, vms: dict[str, Path]) -> Path:
    """alice's VM, booted (started through the web, by the browser test if
    it ran first, else here)."""
    path = vms[VM]
    if alice.status(VM)["state"] != "running":
        b = Browser(web)
        assert b.login(alice.name, PASSWORD).status_code == 200
        r = b.post(f"/api/vms/{VM}/start", {"options": START_OPTIONS})
        assert r.status_code == 200, r.text
    wait_for(lambda: MARKER in console_log(path), 120, "the guest to boot")
    return path


START_OPTIONS = [["-kernel", "vmlinuz"], ["-initrd", "initrd.img"],
                 ["-append", "console=ttyS0"], ["-vnc", ":0"]]


# ---- an HTTP client that behaves like a browser on the allowed origin -----------

class Browser:
    """httpx with the session cookie handled by hand (httpx's jar, rightly,
    sends no Secure cookie over http) and the page's Origin on requests."""

    def __init__(self, rig: WebRig, forwarded_for: str | None = None) -> None:
        self.rig = rig
        listen = rig.settings["web_listen"]
        transport = httpx.HTTPTransport(uds=listen[5:]) if listen.startswith("unix:") else None
        self.http = httpx.Client(base_url=rig.origin, timeout=60, follow_redirects=False,
                                 trust_env=False, transport=transport)
        self.cookie: str | None = None
        self.csrf = ""
        self.forwarded_for = forwarded_for

    def headers(self, origin: str | None = "self", csrf: bool = True,
                cookie: str | None = None) -> dict[str, str]:
        h: dict[str, str] = {}
        if origin is not None:
            h["Origin"] = self.rig.origin if origin == "self" else origin
        c = cookie if cookie is not None else self.cookie
        if c:
            h["Cookie"] = f"{COOKIE}={c}"
        if csrf and self.csrf:
            h["X-CSRF-Token"] = self.csrf
        if self.forwarded_for:
            h["X-Forwarded-For"] = self.forwarded_for
        return h

    def login(self, user: str, password: str, **kw: Any) -> httpx.Response:
        r = self.http.post("/login", json={"user": user, "password": password},
                           headers=self.headers(**kw))
        if r.status_code == 200:
            self.cookie = session_cookie(r)
            page = self.get("/")
            m = re.search(r'name="kvmshell-csrf" content="([^"]+)"', page.text)
            assert m, page.text
            self.csrf = m.group(1)
        return r

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.http.get(path, headers=self.headers(**kw))

    def post(self, path: str, body: object = None, **kw: Any) -> httpx.Response:
        return self.http.post(path, json=body if body is not None else {},
                              headers=self.headers(**kw))

    def ticket(self, vm: str, kind: str) -> str:
        r = self.post("/api/tickets", {"vm": vm, "kind": kind})
        assert r.status_code == 200, r.text
        return str(r.json()["ticket"])

    def ws(self, origin: str | None = "self", cookie: str | None = None) -> Any:
        """Open /ws (raises websockets' InvalidStatus when the handshake is refused)."""
        from websockets.sync.client import connect
        h = self.headers(origin=None, csrf=False, cookie=cookie)
        return connect(f"ws://localhost:{self.rig.port}/ws", proxy=None, open_timeout=20,
                       origin=(self.rig.origin if origin == "self" else origin),  # type: ignore[arg-type]
                       additional_headers=h, compression=None)


def session_cookie(r: httpx.Response) -> str:
    """The session id from the login answer's Set-Cookie, after checking
    its attributes."""
    (header,) = [v for k, v in r.headers.multi_items() if k.lower() == "set-cookie"]
    name_value, *attrs = [p.strip() for p in header.split(";")]
    name, _, value = name_value.partition("=")
    assert name == COOKIE
    attrs_l = {a.lower() for a in attrs}
    assert {"secure", "httponly", "samesite=strict", "path=/"} <= attrs_l, header
    assert not any(a.startswith("domain") or a.startswith("max-age") for a in attrs_l), header
    assert len(value) >= 40
    return value


def kvmshell_line(user: User, command: str) -> str:
    """kvmshell's own one-line answer to *command* from *user* (as over ssh)."""
    r = user.ssh_command(command)
    assert r.returncode != 0 and r.stderr.count("\n") == 1, r
    return r.stderr.strip()


def no_console_clients(user: User) -> None:
    """Wait until no console client of *user* runs (a closed WebSocket's
    writer has left, so the next one is not told the console is busy)."""
    def none() -> bool:
        r = subprocess.run(["pgrep", "-u", str(user.uid), "-f", " console "],
                           capture_output=True)
        return r.returncode == 1
    wait_for(none, 20, "console clients to leave")


def ws_refused(fn: Any) -> int:
    """The HTTP status of a refused WebSocket handshake."""
    from websockets.exceptions import InvalidStatus
    with pytest.raises(InvalidStatus) as exc:
        fn().close()
    return int(exc.value.response.status_code)


def ws_answer(ws: Any, first: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """Send the first message; return the server's first (text) answer and
    the close frame if it closed."""
    from websockets.exceptions import ConnectionClosed
    ws.send(json.dumps(first))
    try:
        msg = ws.recv(timeout=30)
    except ConnectionClosed as exc:
        return {}, exc.rcvd
    assert isinstance(msg, str), msg
    doc = json.loads(msg)
    closed = None
    if "error" in doc:
        try:
            ws.recv(timeout=10)
        except ConnectionClosed as exc:
            closed = exc.rcvd
    return doc, closed


# ---- the browser -----------------------------------------------------------------

@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Debian's chromium through Debian's chromedriver (no downloaded browser)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    profile = tmp_path_factory.mktemp("chromium-profile")
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                "--window-size=1280,900"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def until(driver: Any, what: str, predicate: Any, timeout: float = 60) -> Any:
    from selenium.common.exceptions import WebDriverException
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except WebDriverException as exc:
            last = exc
        time.sleep(0.2)
    logs = driver.get_log("browser")
    raise AssertionError(f"timed out waiting for {what} (last: {last!r}; console: {logs})")


def shot(driver: Any, name: str) -> None:
    SHOTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"web-{name}.png"))


BUFFER_JS = """
const b = window.kvmshellTerm.buffer.active, out = [];
for (let i = 0; i < b.length; i++) out.push(b.getLine(i).translateToString(true));
return out.join('\\n');
"""

CANVAS_JS = """
const c = document.querySelector('#screen canvas');
if (!c || !c.width) return null;
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
const seen = new Set();
for (let i = 0; i < d.length && seen.size < 50; i += 4) seen.add((d[i] << 16) | (d[i+1] << 8) | d[i+2]);
return [c.width, c.height, seen.size];
"""

# After logout: open the console WebSocket with a ticket taken before it.
WS_AFTER_LOGOUT_JS = """
const [ticket, done] = [arguments[0], arguments[arguments.length - 1]];
const ws = new WebSocket(`ws://${location.host}/ws`);
let opened = false;
ws.onopen = () => { opened = true; ws.send(JSON.stringify({ticket})); };
ws.onmessage = (ev) => done({opened, message: String(ev.data)});
ws.onclose = (ev) => done({opened, code: ev.code});
"""

TICKET_JS = """
const done = arguments[arguments.length - 1];
const csrf = document.querySelector('meta[name="kvmshell-csrf"]').content;
fetch('/api/tickets', {method: 'POST', headers: {'Content-Type': 'application/json',
  'X-CSRF-Token': csrf}, body: JSON.stringify({vm: arguments[0], kind: 'console'})})
  .then(r => r.json()).then(d => done(d.ticket));
"""


def test_in_a_real_browser(web: WebRig, alice: User, vms: dict[str, Path],
                           chromium: Any) -> None:
    """Login with a real PAM password, the VM list, start, the serial
    console (type, read xterm.js's buffer), the display (noVNC canvas not
    blank), logout, and then the console WebSocket is refused."""
    from selenium.webdriver.common.by import By

    d = chromium
    d.get(f"{web.origin}/")
    until(d, "the login page", lambda: d.current_url == f"{web.origin}/login")
    assert d.get_cookies() == []                 # no session, no cookie, before login
    d.find_element(By.ID, "user").send_keys(alice.name)
    d.find_element(By.ID, "password").send_keys("wrong-" + PASSWORD)
    d.find_element(By.ID, "login-submit").click()
    until(d, "the refusal", lambda: d.find_element(By.ID, "message").text == "login incorrect")
    shot(d, "login")
    d.find_element(By.ID, "password").send_keys(PASSWORD)
    d.find_element(By.ID, "login-submit").click()
    until(d, "the VM list", lambda: d.current_url == f"{web.origin}/"
          and d.find_elements(By.CSS_SELECTOR, f'tr[data-vm="{VM}"]'))
    (cookie,) = d.get_cookies()
    assert cookie["name"] == COOKIE and cookie["secure"] and cookie["httpOnly"]
    assert cookie["sameSite"] == "Strict"
    row = d.find_element(By.CSS_SELECTOR, f'tr[data-vm="{VM}"]')
    assert row.get_attribute("data-state") == "stopped"
    assert not d.find_elements(By.CSS_SELECTOR, f'tr[data-vm="{BOBVM}"]')    # not hers

    # Start, with a refusal first: kvmshell's line, shown as text.
    row.find_element(By.TAG_NAME, "summary").click()
    form = row.find_element(By.CSS_SELECTOR, "form.start-form")

    def field(option: str) -> Any:
        return form.find_element(By.CSS_SELECTOR, f'input[data-option="{option}"]')

    field("-cdrom").send_keys("<img src=x id=xss>.iso")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    msg = until(d, "the refusal", lambda: d.find_element(By.ID, "message").text.startswith(
        "kvmshell: ") and d.find_element(By.ID, "message").text)
    assert msg == kvmshell_line(alice, f"start {VM} -cdrom '<img src=x id=xss>.iso'")
    assert not d.find_elements(By.ID, "xss")              # text, not markup
    field("-cdrom").clear()
    for option, value in START_OPTIONS:
        field(option).send_keys(value)
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    until(d, "the VM to run", lambda: d.find_element(
        By.CSS_SELECTOR, f'tr[data-vm="{VM}"]').get_attribute("data-state") == "running", 120)
    row = d.find_element(By.CSS_SELECTOR, f'tr[data-vm="{VM}"]')
    pid = int(row.find_element(By.CLASS_NAME, "pid").text)
    assert (alice.status(VM)["state"], alice.status(VM)["pid"]) == ("running", pid)
    assert row.find_element(By.CLASS_NAME, "started").text
    assert "started" in d.find_element(By.ID, "message").text
    shot(d, "vms")
    wait_for(lambda: MARKER in console_log(vms[VM]), 120, "the guest to boot")

    # The serial console.
    row.find_element(By.LINK_TEXT, "Console").click()
    box = until(d, "the console", lambda: d.find_element(By.ID, "terminal"))
    until(d, "the console stream", lambda: box.get_attribute("data-state") == "open")
    until(d, "the window-size notice", lambda: "stty rows" in d.execute_script(BUFFER_JS))
    keys = d.find_element(By.CSS_SELECTOR, ".xterm-helper-textarea")
    keys.send_keys("\n")
    until(d, "the guest's prompt", lambda: "guest# " in d.execute_script(BUFFER_JS), 60)
    keys.send_keys("echo web-$((6*7)); echo VNC-TEST-PATTERN > /dev/tty1\n")
    until(d, "the guest's answer", lambda: re.search(
        r"^web-42$", d.execute_script(BUFFER_JS), re.M), 60)
    # Paste goes in as input too (xterm.js's paste path).
    d.execute_script("window.kvmshellTerm.paste('echo pasted-$((100+11))\\r')")
    until(d, "the pasted command's answer", lambda: re.search(
        r"^pasted-111$", d.execute_script(BUFFER_JS), re.M), 60)
    shot(d, "console")

    # The display.
    d.get(f"{web.origin}/vms/{VM}/display")
    screen = until(d, "the display", lambda: d.find_element(By.ID, "screen"))
    until(d, "noVNC to connect", lambda: screen.get_attribute("data-state") == "connected")
    size = until(d, "a canvas that is not blank", lambda: (
        (r := d.execute_script(CANVAS_JS)) and r[2] > 1 and r), 60)
    assert size[0] >= 320 and size[1] >= 200, size
    shot(d, "display")

    # Logout: then the console WebSocket is refused, even with a ticket
    # taken just before.
    d.get(f"{web.origin}/")
    until(d, "the VM list", lambda: d.find_elements(By.ID, "logout"))
    d.set_script_timeout(30)
    ticket = d.execute_async_script(TICKET_JS, VM)
    assert ticket
    d.find_element(By.ID, "logout").click()
    until(d, "the login page", lambda: d.current_url == f"{web.origin}/login")
    assert d.get_cookies() == []
    shot(d, "logged-out")
    answer = d.execute_async_script(WS_AFTER_LOGOUT_JS, ticket)
    assert answer == {"opened": False, "code": 1006}, answer    # handshake refused
    d.get(f"{web.origin}/vms/{VM}/console")
    until(d, "the login page", lambda: d.current_url == f"{web.origin}/login")
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"
              and "Content Security Policy" in e["message"]]
    assert not errors, errors                  # xterm.js and noVNC ran under the CSP


# ---- the login helper ----------------------------------------------------------

def test_helper_accepts_the_right_password(web: WebRig, alice: User) -> None:
    r = web.helper(alice.name, PASSWORD.encode() + b"\n", "192.0.2.7")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"ok\n", b"")


def test_helper_refuses_a_wrong_password(web: WebRig, alice: User) -> None:
    r = web.helper(alice.name, b"not-" + PASSWORD.encode())
    assert (r.returncode, r.stdout, r.stderr) == (2, b"denied\n", b"")


@pytest.fixture()
def stranger(web: WebRig) -> Iterator[str]:
    """A user with the right password who is not in the VM users' group."""
    name = _make_user("s")
    try:
        web.add_user(name, PASSWORD, member=False)
        yield name
    finally:
        _drop_user(name)


@pytest.fixture()
def member(web: WebRig) -> Iterator[str]:
    """A fresh group member with the right password (to lock or expire)."""
    name = _make_user("m")
    try:
        web.add_user(name, PASSWORD)
        yield name
    finally:
        _drop_user(name)


def test_helper_refuses_a_user_outside_the_group(web: WebRig, stranger: str) -> None:
    r = web.helper(stranger, PASSWORD.encode())
    assert (r.returncode, r.stdout, r.stderr) == (2, b"denied\n", b"")


def test_helper_refuses_a_locked_account(web: WebRig, member: str) -> None:
    assert web.helper(member, PASSWORD.encode()).stdout == b"ok\n"
    subprocess.run(["usermod", "-L", member], check=True)
    r = web.helper(member, PASSWORD.encode())
    assert (r.returncode, r.stdout) == (2, b"denied\n")


def test_helper_refuses_an_expired_account(web: WebRig, member: str) -> None:
    """The password is right; account management (pam_acct_mgmt) says no."""
    subprocess.run(["chage", "-E", "0", member], check=True)
    r = web.helper(member, PASSWORD.encode())
    assert (r.returncode, r.stdout) == (2, b"denied\n")


def test_helper_refuses_callers_other_than_the_web_user(web: WebRig, alice: User) -> None:
    # A VM user: the shipped sudoers has no rule for it, so sudo says no.
    r = web.helper(alice.name, PASSWORD.encode(), caller=[
        "setpriv", f"--reuid={alice.uid}", f"--regid={alice.gid}", "--init-groups", "--",
        "/usr/bin/sudo", "-n", "--"])
    assert r.returncode == 1 and r.stdout == b"" and b"password is required" in r.stderr
    # Root without sudo: no SUDO_UID.
    r = web.helper(alice.name, PASSWORD.encode(), caller=[])
    assert (r.returncode, r.stdout) == (2, b"")
    assert r.stderr == b"kvmshell-pamhelper: must be run through sudo (no SUDO_UID)\n"
    # Another user whom a careless sudoers line lets run it: the helper itself refuses.
    extra = Path(f"/etc/sudoers.d/kvmshell-web-test-{web.tag}-wide")
    extra.write_text(f"{alice.name} ALL=(root) NOPASSWD: {web.pamhelper}\n")
    os.chmod(extra, 0o440)
    try:
        r = web.helper(alice.name, PASSWORD.encode(), caller=[
            "setpriv", f"--reuid={alice.uid}", f"--regid={alice.gid}", "--init-groups", "--",
            "/usr/bin/sudo", "-n", "--"])
    finally:
        extra.unlink()
    assert (r.returncode, r.stdout) == (2, b"")
    assert r.stderr == (f"kvmshell-pamhelper: caller uid {alice.uid} is not the web user "
                        f"'{web.web_user}'\n").encode()


@pytest.mark.parametrize("args,password,error", [
    (("auth", "-rf", "127.0.0.1"), b"x", "invalid user name '-rf'"),
    (("auth", "a" * 33, "127.0.0.1"), b"x", "invalid user name"),
    (("auth", "root;id", "127.0.0.1"), b"x", "invalid user name 'root;id'"),
    (("auth", "USER", "127.0.0.1/8"), b"x", "invalid address '127.0.0.1/8'"),
    (("auth", "USER", "localhost"), b"x", "invalid address 'localhost'"),
    (("login", "USER", "127.0.0.1"), b"x", "unknown verb 'login'"),
    (("auth", "USER"), b"x", "usage: kvmshell-pamhelper auth USER ADDR (got 2 arguments)"),
    (("auth", "USER", "127.0.0.1"), b"x" * 1025, "password longer than 1024 bytes"),
    (("auth", "USER", "127.0.0.1"), b"a\0b", "password with a NUL or line break"),
    (("auth", "USER", "127.0.0.1"), b"a\nb", "password with a NUL or line break"),
    (("auth", "USER", "127.0.0.1"), b"", "no password on stdin"),
    (("auth", "USER", "127.0.0.1"), b"\xff\xfe", "password is not UTF-8"),
])
def test_helper_refuses_malformed_input(web: WebRig, alice: User, args: tuple[str, ...],
                                        password: bytes, error: str) -> None:
    """Closed input: refused before PAM is asked (one line, exit 2)."""
    argv = [a.replace("USER", alice.name) for a in args]
    r = subprocess.run(web.as_web_user("/usr/bin/sudo", "-n", "--", web.pamhelper, *argv),
                       input=password, capture_output=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin"})
    if r.returncode == 1 and b"sudo:" in r.stderr:
        # The shipped rule's argument pattern (auth USER ADDR) stops it even earlier.
        assert len(argv) != 3 or argv[0] != "auth", r.stderr
        return
    assert (r.returncode, r.stdout) == (2, b""), r
    line = r.stderr.decode()
    assert line.startswith("kvmshell-pamhelper: ") and line.count("\n") == 1
    assert error in line, line


def test_pam_faillock_keeps_working(web: WebRig, member: str, tmp_path: Path) -> None:
    """With pam_faillock in the service, failures through the helper count:
    after two, even the right password is refused (and not before)."""
    tally = tmp_path / "faillock"
    tally.mkdir()
    opts = f"dir={tally} deny=2 unlock_time=600"
    service = f"{web.service}-faillock"
    path = Path("/etc/pam.d") / service
    path.write_text(
        f"auth required pam_succeed_if.so quiet user ingroup {web.group}\n"
        f"auth required pam_faillock.so preauth {opts}\n"
        "auth [success=1 default=ignore] pam_unix.so nullok\n"
        f"auth [default=die] pam_faillock.so authfail {opts}\n"
        f"auth sufficient pam_faillock.so authsucc {opts}\n"
        "auth requisite pam_deny.so\n"
        f"account required pam_faillock.so {opts}\n"
        "account required pam_unix.so\n")
    web.write_conf(web_pam_service=service)
    try:
        assert web.helper(member, PASSWORD.encode()).stdout == b"ok\n"
        for _ in range(2):
            assert web.helper(member, b"wrong").stdout == b"denied\n"
        assert web.helper(member, PASSWORD.encode()).stdout == b"denied\n"
        faillock = subprocess.run(["faillock", "--dir", str(tally), "--user", member],
                                  capture_output=True, text=True)
        assert faillock.stdout.count(" V\n") + faillock.stdout.count(" V ") >= 2 \
            or faillock.stdout.count("RHOST") >= 1, faillock.stdout
    finally:
        web.write_conf(web_pam_service=web.service)
        path.unlink()


FAILLOCK_AUTH = """\
auth required pam_faillock.so preauth {opts}
auth [success=1 default=ignore] pam_unix.so nullok
auth [default=die] pam_faillock.so authfail {opts}
auth sufficient pam_faillock.so authsucc {opts}
auth requisite pam_deny.so
"""


@pytest.mark.security
def test_pam_faillock_never_counts_users_outside_the_group(web: WebRig, member: str,
                                                           stranger: str,
                                                           tmp_path: Path) -> None:
    """The shipped PAM service on a host whose common-auth has pam_faillock
    (the usual hardening): anyone on the web may type any account name, so
    an account outside the VM users' group (the admin's, say) must never
    reach the password stack, or a few failed web logins would lock it out
    of ssh, su and sudo host-wide.  Members are still counted."""
    tally = tmp_path / "faillock"
    tally.mkdir()
    opts = f"dir={tally} deny=3 unlock_time=600"
    text = (REPO / "pam" / "kvmshell").read_text()
    assert "@include common-auth\n" in text
    text = text.replace("ingroup kvmusers", f"ingroup {web.group}").replace(
        "@include common-auth\n", FAILLOCK_AUTH.format(opts=opts))
    service = f"{web.service}-fl"
    path = Path("/etc/pam.d") / service
    path.write_text(text)
    web.write_conf(web_pam_service=service)

    def records(user: str) -> int:
        r = subprocess.run(["faillock", "--dir", str(tally), "--user", user],
                           capture_output=True, text=True, check=True)
        return len(re.findall(r"^\d{4}-\d\d-\d\d ", r.stdout, re.M))
    try:
        for _ in range(3):
            assert web.helper(stranger, b"wrong").stdout == b"denied\n"
        assert web.helper(stranger, PASSWORD.encode()).stdout == b"denied\n"
        assert web.helper(member, b"wrong").stdout == b"denied\n"
        assert records(stranger) == 0
        assert records(member) == 1
    finally:
        web.write_conf(web_pam_service=web.service)
        path.unlink()


# ---- acting as the user: the sudoers rule ------------------------------------------

def test_shipped_sudoers_drop_in_is_valid() -> None:
    r = subprocess.run(["visudo", "-cf", str(REPO / "sudoers.d" / "kvmshell-web")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_web_user_may_run_only_kvmshell_verbs_as_group_members(
        web: WebRig, alice: User, stranger: str, vms: dict[str, Path]) -> None:
    def sudo(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(web.as_web_user("/usr/bin/sudo", "-n", *argv),
                              capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin"})

    ok = sudo("-u", alice.name, "--", str(web.kvmshell), "list", "--json")
    assert ok.returncode == 0, ok.stderr
    for argv in (
            ("-u", alice.name, "--", str(web.kvmshell), "--config", "/tmp/x", "list"),
            ("-u", alice.name, "--", str(web.kvmshell), "upload", "x"),
            ("-u", alice.name, "--", str(web.kvmshell)),
            ("-u", alice.name, "--", "/bin/sh", "-c", "id"),
            ("-u", "root", "--", str(web.kvmshell), "list"),
            ("-u", stranger, "--", str(web.kvmshell), "list"),
            ("-u", alice.name, "-s"),
            ("-u", alice.name, "-i"),
            ("-E", "-u", alice.name, "--", str(web.kvmshell), "list"),
            ("--", web.pamhelper, "auth"),
            ("-u", alice.name, "--", web.pamhelper, "auth", alice.name, "-")):
        r = sudo(*argv)
        assert r.returncode == 1 and r.stdout == "", (argv, r)
        assert "sudo:" in r.stderr, (argv, r.stderr)


# ---- sessions ---------------------------------------------------------------------------

def test_login_sets_a_fresh_host_cookie_and_logout_ends_it(web: WebRig, alice: User,
                                                           vms: dict[str, Path]) -> None:
    b = Browser(web)
    r = b.get("/login")
    assert r.status_code == 200 and "set-cookie" not in r.headers    # nothing before login
    assert b.get("/").headers["location"] == "/login"
    assert b.get("/api/vms").status_code == 401
    assert b.login(alice.name, PASSWORD).status_code == 200
    r = b.get("/api/vms")
    assert r.status_code == 200 and VM in [v["name"] for v in r.json()["vms"]]
    # Exactly what kvmshell's list --json says to the user over ssh.
    mine = alice.ssh_command("list --json")
    assert mine.returncode == 0 and r.json()["vms"] == json.loads(mine.stdout)["vms"]
    assert b.post("/logout").status_code == 200
    assert b.get("/api/vms").status_code == 401
    assert b.get("/").headers["location"] == "/login"


def test_session_fixation(web: WebRig, alice: User, bob: User, vms: dict[str, Path]) -> None:
    """A cookie set before login is never promoted: login always makes a
    new id, and the planted value (made up, or the attacker's own
    session) is dead afterwards."""
    planted = "A" * 43
    b = Browser(web)
    b.cookie = planted
    assert b.login(alice.name, PASSWORD).status_code == 200
    assert b.cookie != planted
    assert b.get("/api/vms", cookie=planted).status_code == 401
    attacker = Browser(web)
    assert attacker.login(bob.name, PASSWORD).status_code == 200
    victim = Browser(web)
    victim.cookie = attacker.cookie
    assert victim.login(alice.name, PASSWORD).status_code == 200
    assert victim.cookie != attacker.cookie
    assert VM in [v["name"] for v in victim.get("/api/vms").json()["vms"]]
    assert attacker.get("/api/vms").status_code == 401


@pytest.mark.security
def test_one_user_cannot_push_out_other_users_sessions_or_tickets() -> None:
    """The session and ticket stores are bounded (MAX_SESSIONS, MAX_TICKETS)
    for the whole server.  One logged-in user who logs in again and again,
    or asks for ticket after ticket, must use up only a share of their own:
    before, logging in MAX_SESSIONS times (a password the user knows, at the
    login helper's pace) logged every other user out, and MAX_TICKETS
    tickets within their 30 s made the server 'busy' for everyone.  The
    store's own code, with the server's limits (no HTTP: 10000 logins)."""
    from kvmshell.web.sessions import MAX_SESSIONS, MAX_TICKETS, Store
    store = Store(900, 28800)
    bob = store.create("bob", "192.0.2.1")
    mallory = [store.create("mallory", "192.0.2.66") for _ in range(MAX_SESSIONS)]
    assert store.get(bob.id) is bob
    assert store.get(mallory[-1].id) is mallory[-1]
    assert store.get(mallory[0].id) is None          # the user's own oldest went
    ticket = store.issue(bob, "vm", "console")
    for _ in range(MAX_TICKETS):
        store.issue(mallory[-1], "vm", "console")
    later = store.issue(bob, "vm", "spy")            # not "busy"
    assert store.redeem(ticket, bob) is not None and store.redeem(later, bob) is not None


def test_idle_timeout(host: Host, alice: User, vms: dict[str, Path]) -> None:
    rig = WebRig(host.root, KVMSHELL, host.conf, host.root / "lib", web_idle_timeout="3",
                 web_session_lifetime="8")
    try:
        rig.add_user(alice.name, PASSWORD)
        rig.start()
        b = Browser(rig)
        assert b.login(alice.name, PASSWORD).status_code == 200
        t0 = time.monotonic()
        for _ in range(4):                        # used: alive past the idle timeout
            time.sleep(1.5)
            assert b.get("/api/vms").status_code == 200
        assert time.monotonic() - t0 < 8
        time.sleep(max(0.0, 8.5 - (time.monotonic() - t0)))   # past the absolute lifetime
        assert b.get("/api/vms").status_code == 401
        assert b.login(alice.name, PASSWORD).status_code == 200
        time.sleep(3.5)                           # idle
        assert b.get("/api/vms").status_code == 401
    finally:
        subprocess.run(["gpasswd", "-d", alice.name, rig.group], capture_output=True)
        rig.close()


# ---- CSRF --------------------------------------------------------------------------------

def test_csrf(web: WebRig, alice: User, bob: User, running: Path) -> None:
    """Every state-changing request needs the session's token in the header
    and an allowed Origin; the VM is untouched by every refused one."""
    b = Browser(web)
    assert b.login(alice.name, PASSWORD).status_code == 200
    other = Browser(web)
    assert other.login(bob.name, PASSWORD).status_code == 200
    pid = alice.status(VM)["pid"]
    url = f"/api/vms/{VM}/kill"
    for kw in ({"csrf": False}, {"origin": None}, {"origin": EVIL},
               {"origin": f"http://localhost:{web.port + 1}"}, {"origin": "null"}):
        r = b.post(url, **kw)
        assert r.status_code == 403, (kw, r.text)
        assert r.json()["error"].startswith("kvmshell-web: refused: "), r.text
    b.csrf, good = other.csrf, b.csrf                       # bob's token, alice's cookie
    assert b.post(url).status_code == 403
    b.csrf = "x" * len(good)
    assert b.post(url).status_code == 403
    b.csrf = good
    # What a cross-site form can send: form-encoded, no header.
    r = b.http.post(url, data={"x": "1"}, headers={"Cookie": f"{COOKIE}={b.cookie}",
                                                    "Origin": EVIL})
    assert r.status_code == 403
    assert b.get(url).status_code == 405                   # GET changes nothing
    assert b.post("/logout", origin=EVIL).status_code == 403
    assert b.post("/logout", csrf=False).status_code == 403
    assert b.get("/api/vms").status_code == 200             # still logged in
    assert alice.status(VM)["pid"] == pid                    # still running, same QEMU
    # A login from another site is refused before the helper is asked.
    r = Browser(web).login(alice.name, PASSWORD, origin=EVIL)
    assert r.status_code == 403 and "set-cookie" not in r.headers
    assert Browser(web).login(alice.name, PASSWORD, origin=None).status_code == 403


def test_host_header_must_be_the_origins(web: WebRig) -> None:
    """DNS rebinding: a page of another name that resolves here gets nothing."""
    r = httpx.get(f"http://127.0.0.1:{web.port}/login", headers={"Host": "evil.example"},
                  trust_env=False)
    assert r.status_code == 400


# Bytes a client can put into a logged URL path (percent-encoded): NUL and
# line feed end a journal record (journald splits a service's stderr at
# both), so what follows them would be a record of its own -- here one that
# fail2ban's filter takes for a failed login from 203.0.113.99, a ban the
# client chose for someone else; ESC and the C1 controls steer the terminal
# of the admin reading the log.
FORGED = "authentication failure for 'x' from 203.0.113.99"


@pytest.mark.security
@pytest.mark.parametrize("sep", ["%00", "%0A", "%0D", "%1B[2J", "%7F", "%C2%9B", "%E2%80%A8"])
def test_no_control_characters_from_the_client_reach_the_log(web: WebRig, sep: str) -> None:
    """Log injection: an unauthenticated client's cross-site POST and a
    logged-in user's bad CSRF token are logged with the path; every
    control character in it arrives escaped, one line, cut short."""
    from urllib.parse import quote
    forged = quote(FORGED, safe="")
    path = f"/api/vms/x/{sep}{forged}{sep}"
    before = len(web.log.read_bytes())
    r = httpx.post(f"http://127.0.0.1:{web.port}{path}", trust_env=False, json={},
                   headers={"Host": f"localhost:{web.port}", "Origin": EVIL})
    assert r.status_code == 403, r.text
    r = httpx.post(f"http://127.0.0.1:{web.port}/api/vms/x/{'y%1B' * 3000}", trust_env=False,
                   json={}, headers={"Host": f"localhost:{web.port}", "Origin": EVIL})
    assert r.status_code == 403, r.status_code
    wait_for(lambda: web.log.read_bytes()[before:].count(b"refused cross-site") >= 2, 10,
             "the log lines")
    new = web.log.read_bytes()[before:]
    assert b"\x00" not in new and b"\x1b" not in new and b"\x7f" not in new \
        and b"\r" not in new, new[:300]
    text = new.decode()
    assert not re.search("[\x80-\x9f\u2028\u2029]", text), text[:300]
    for line in text.splitlines():
        assert line.startswith("kvmshell-web: refused cross-site POST /api/vms/x/"), line[:300]
        assert len(line) <= 2100
    assert not FAILURE_LINE.search(text)


@pytest.mark.security
def test_malformed_json_is_refused_without_a_traceback(web: WebRig, alice: User,
                                                       vms: dict[str, Path]) -> None:
    """JSON that parses into something no form sends -- a lone UTF-16
    surrogate (which cannot be encoded to UTF-8 for PAM or argv), nesting
    deep enough to exhaust the parser's recursion -- is a 400 with the
    page's one-line error, never a 500 with a traceback in the log, from
    anyone (login) or a logged-in user (start's options)."""
    before = len(web.log.read_bytes())
    base = f"http://127.0.0.1:{web.port}"
    hdr = {"Host": f"localhost:{web.port}", "Origin": web.origin,
           "Content-Type": "application/json"}
    for body in (b'{"user": "x", "password": "\\ud800"}',
                 b'{"user": "\\udc80", "password": "a"}',
                 b'[' * 50000):
        r = httpx.post(f"{base}/login", content=body, headers=hdr, trust_env=False)
        assert r.status_code in (400, 401), (body[:40], r.status_code, r.text)
        assert r.json()["error"], r.text
    b = Browser(web)
    assert b.login(alice.name, PASSWORD).status_code == 200
    for options in ([["-kernel", "\ud800"]], [["\udfff", True]]):
        r = b.http.post(f"/api/vms/{VM}/start", headers={**b.headers(),
                                                          "Content-Type": "application/json"},
                        content=json.dumps({"options": options}).encode())
        assert r.status_code == 400, (options, r.status_code, r.text)
        assert r.json()["error"], r.text
    with b.ws() as ws:                        # the WebSocket's first message
        ws.send("[" * 1020)
        assert json.loads(ws.recv(timeout=20)) == {
            "error": "kvmshell-web: invalid, used or expired ticket"}
    log = web.log.read_bytes()[before:]
    assert b"Traceback" not in log and b"Internal Server Error" not in log, log[-2000:]


# ---- cross-site WebSocket hijacking -----------------------------------------------------

def test_websocket_needs_origin_cookie_and_a_one_time_ticket(
        web: WebRig, alice: User, bob: User, running: Path) -> None:
    no_console_clients(alice)
    b = Browser(web)
    assert b.login(alice.name, PASSWORD).status_code == 200
    # Another site's page, with the user's cookie and a valid ticket: refused at the handshake.
    t = b.ticket(VM, "console")
    assert ws_refused(lambda: b.ws(origin=EVIL)) == 403
    assert ws_refused(lambda: b.ws(origin=None)) == 403
    assert ws_refused(lambda: b.ws(cookie="B" * 43)) == 403
    # The ticket is not used up by refused handshakes, and works once.
    with b.ws() as ws:
        doc, _ = ws_answer(ws, {"ticket": t})
        assert doc == {"ok": "console"}
    with b.ws() as ws:
        doc, closed = ws_answer(ws, {"ticket": t})
        assert doc == {"error": "kvmshell-web: invalid, used or expired ticket"}
        assert closed is not None and closed.code == 4401
    # No ticket, a made-up one, one in the URL, one of another session.
    for first in ({}, {"ticket": "C" * 43}, {"ticket": 1}):
        with b.ws() as ws:
            doc, closed = ws_answer(ws, first)
            assert "error" in doc and closed.code == 4401, (first, doc)
    # A ticket of another session (alice's own, from another login): tickets
    # are bound to the session that asked for them.
    other = Browser(web)
    assert other.login(alice.name, PASSWORD).status_code == 200
    with b.ws() as ws:
        doc, closed = ws_answer(ws, {"ticket": other.ticket(VM, "console")})
        assert "error" in doc and closed.code == 4401
    from websockets.sync.client import connect
    t = b.ticket(VM, "console")
    with connect(f"ws://localhost:{web.port}/ws?ticket={t}", proxy=None, origin=web.origin,  # type: ignore[arg-type]
                 additional_headers={"Cookie": f"{COOKIE}={b.cookie}"}) as ws:
        doc, closed = ws_answer(ws, {})
        assert "error" in doc and closed.code == 4401
    # The ticket was not used by that: a ticket travels in the first message only.
    with b.ws() as ws:
        assert ws_answer(ws, {"ticket": t})[0] == {"ok": "console"}


def test_ticket_expires(web: WebRig, alice: User, running: Path) -> None:
    b = Browser(web)
    assert b.login(alice.name, PASSWORD).status_code == 200
    t = b.ticket(VM, "console")
    time.sleep(31)
    with b.ws() as ws:
        doc, closed = ws_answer(ws, {"ticket": t})
        assert doc == {"error": "kvmshell-web: invalid, used or expired ticket"}


def test_logout_closes_open_consoles_and_tickets(web: WebRig, alice: User,
                                                 running: Path) -> None:
    no_console_clients(alice)
    from websockets.exceptions import ConnectionClosed
    b = Browser(web)
    assert b.login(alice.name, PASSWORD).status_code == 200
    spare = b.ticket(VM, "spy")
    cookie = b.cookie
    with b.ws() as ws:
        assert ws_answer(ws, {"ticket": b.ticket(VM, "console")})[0] == {"ok": "console"}
        assert b.post("/logout").status_code == 200
        t0 = time.monotonic()
        with pytest.raises(ConnectionClosed) as exc:
            while True:
                ws.recv(timeout=30)
        assert exc.value.rcvd is not None and exc.value.rcvd.code == 4401
        assert time.monotonic() - t0 < 10
    assert ws_refused(lambda: b.ws(cookie=cookie)) == 403
    del spare


def test_spy_is_read_only(web: WebRig, alice: User, running: Path) -> None:
    """The spy's keystrokes reach nothing; a writer's do, and the spy sees them."""
    no_console_clients(alice)
    b = Browser(web)
    assert b.login(alice.name, PASSWORD).status_code == 200
    with b.ws() as spy, b.ws() as writer:
        assert ws_answer(spy, {"ticket": b.ticket(VM, "spy")})[0] == {"ok": "spy"}
        assert ws_answer(writer, {"ticket": b.ticket(VM, "console")})[0] == {"ok": "console"}
        spy.send(b"echo spy-$((3*5))\r")
        writer.send(b"echo writer-$((4*5))\r")
        seen = b""
        deadline = time.monotonic() + 60
        while b"writer-20\r\n" not in seen and time.monotonic() < deadline:
            m = spy.recv(timeout=60)
            if isinstance(m, bytes):
                seen += m
        assert b"writer-20\r\n" in seen
    assert b"spy-15" not in console_log(running)


def _closed_by_server(s: Any) -> bool:
    """Has the server closed this socket (EOF or reset), after anything it sent?"""
    s.settimeout(0.5)
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return True
    except (TimeoutError, BlockingIOError):
        return False
    except OSError:
        return True


@pytest.mark.security
def test_connections_without_a_whole_request_are_closed(web: WebRig, alice: User,
                                                        running: Path) -> None:
    """Slowloris: uvicorn itself waits forever for a request's head, so
    connections that send nothing, half a head, or a head a byte at a time
    (also after a first request, on a kept-alive connection) or a body that
    never ends would each hold a descriptor until the server has none left
    (an unauthenticated attack on everyone, when it serves TLS itself).
    Each is closed within the server's deadlines; a console open for longer
    keeps working."""
    import socket
    import threading
    from kvmshell.web.app import BODY_SECONDS
    from kvmshell.web.server import HEAD_SECONDS
    host = f"localhost:{web.port}".encode()
    conns = {name: socket.create_connection(("127.0.0.1", web.port), timeout=10)
             for name in ("idle", "half", "trickle", "kept", "body")}
    conns["half"].sendall(b"POST /login HTTP/1.1\r\nHost: " + host + b"\r\n")
    conns["kept"].sendall(b"GET /login HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert conns["kept"].recv(12) == b"HTTP/1.1 200"
    conns["body"].sendall(b"POST /login HTTP/1.1\r\nHost: " + host + b"\r\nOrigin: "
                          + web.origin.encode() + b"\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 1000\r\n\r\n{\"user\": ")
    stop = threading.Event()

    def trickle() -> None:                  # one byte a second, never a whole head
        line = b"GET /login HTTP/1.1\r\nX-Slow: " + b"a" * 200
        for i in range(len(line)):
            for name in ("trickle", "kept"):
                try:
                    conns[name].send(line[i:i + 1])
                except OSError:
                    pass
            if stop.wait(1.0):
                return
    feeder = threading.Thread(target=trickle, daemon=True)
    feeder.start()
    no_console_clients(alice)
    b = Browser(web)
    assert b.login(alice.name, PASSWORD).status_code == 200
    try:
        with b.ws() as ws:
            assert ws_answer(ws, {"ticket": b.ticket(VM, "console")})[0] == {"ok": "console"}
            time.sleep(BODY_SECONDS + HEAD_SECONDS + 3)   # the body, then its answer
            ws.send(b"echo slow-$((6*7))\r")
            seen = b""
            deadline = time.monotonic() + 60
            while b"slow-42\r\n" not in seen and time.monotonic() < deadline:
                m = ws.recv(timeout=60)
                seen += m if isinstance(m, bytes) else b""
            assert b"slow-42\r\n" in seen
        closed = {name: _closed_by_server(s) for name, s in conns.items()}
        assert all(closed.values()), closed
    finally:
        stop.set()
        feeder.join()
        for s in conns.values():
            s.close()


@pytest.mark.security
def test_consoles_per_user_are_bounded(web: WebRig, alice: User, running: Path) -> None:
    """Each console is a sudo and a kvmshell process: at most eight per
    user, however many times the user logs in (a second login is no way
    round it)."""
    from contextlib import ExitStack
    b, again = Browser(web), Browser(web)
    assert b.login(alice.name, PASSWORD).status_code == 200
    assert again.login(alice.name, PASSWORD).status_code == 200
    with ExitStack() as stack:
        for _ in range(8):
            ws = stack.enter_context(b.ws())
            assert ws_answer(ws, {"ticket": b.ticket(VM, "spy")})[0] == {"ok": "spy"}
        for login in (b, again):
            with login.ws() as ws:
                doc, closed = ws_answer(ws, {"ticket": login.ticket(VM, "spy")})
                assert doc == {"error": "kvmshell-web: at most 8 consoles and displays at "
                                        "once per user"} and closed.code == 4429
    no_console_clients(alice)               # all eight clients leave with their sockets


@pytest.mark.security
def test_kvmshell_runs_per_user_are_bounded(web: WebRig, alice: User,
                                            vms: dict[str, Path]) -> None:
    """A logged-in user's burst of requests (each runs sudo and kvmshell
    as the user) runs at most RUNS_PER_USER kvmshell processes at once; the
    rest wait their turn and are answered."""
    import threading
    from kvmshell.web.runner import RUNS_PER_USER
    b = Browser(web)
    assert b.login(alice.name, PASSWORD).status_code == 200
    answers: list[int] = []
    seen = 0
    done = threading.Event()

    def request() -> None:
        with httpx.Client(base_url=web.origin, timeout=300, trust_env=False) as http:
            answers.append(http.get("/api/vms", headers=b.headers()).status_code)
    threads = [threading.Thread(target=request) for _ in range(24)]
    for th in threads:
        th.start()

    def watch() -> None:
        nonlocal seen
        while not done.is_set():
            r = subprocess.run(["pgrep", "-c", "-u", str(alice.uid), "-f",
                                f"{KVMSHELL} --config [^ ]+ list --json"],
                               capture_output=True, text=True)
            seen = max(seen, int(r.stdout.strip() or 0))
            time.sleep(0.02)
    watcher = threading.Thread(target=watch)
    watcher.start()
    for th in threads:
        th.join()
    done.set()
    watcher.join()
    assert answers == [200] * 24
    assert 1 <= seen <= RUNS_PER_USER, seen


def test_resize_notice(web: WebRig, alice: User, running: Path) -> None:
    no_console_clients(alice)
    b = Browser(web)
    assert b.login(alice.name, PASSWORD).status_code == 200
    with b.ws() as ws:
        assert ws_answer(ws, {"ticket": b.ticket(VM, "console")})[0] == {"ok": "console"}
        for bad in ('{"resize": [0, 24]}', '{"resize": [80]}', '{"resize": ["80", 24]}', "x"):
            ws.send(bad)
        ws.send('{"resize": [100, 30]}')
        while True:
            m = ws.recv(timeout=30)
            if isinstance(m, str):
                break
        assert json.loads(m) == {
            "notice": "window 100x30: in the guest, 'stty rows 30 cols 100' fits it"}


# ---- brute force --------------------------------------------------------------------------

@pytest.fixture()
def proxied(host: Host, member: str) -> Iterator[WebRig]:
    """A server on a unix socket, behind the test as its proxy (what the
    test sends as X-Forwarded-For is the client's address), with *member*."""
    rig = unix_rig(host, web_login_failures_per_user="3", web_login_failures_per_address="6",
                   web_login_window="600")
    try:
        rig.add_user(member, PASSWORD)
        rig.start()
        yield rig
    finally:
        rig.close()


def test_brute_force_limits_and_log(proxied: WebRig, member: str, tmp_path: Path) -> None:
    """Per account: the 4th try in the window is refused without asking PAM,
    even with the right password, from anywhere.  Per address: the 7th
    failure from one address blocks every account from there.  Each failure
    is one log line fail2ban's shipped filter matches."""
    web = proxied
    before = len(FAILURE_LINE.findall(web.log_text()))
    attacker = Browser(web, forwarded_for="198.51.100.7")
    for _ in range(3):
        assert attacker.login(member, "guess").status_code == 401
    r = attacker.login(member, PASSWORD)
    assert r.status_code == 429 and "set-cookie" not in r.headers
    assert Browser(web, forwarded_for="198.51.100.8").login(member, PASSWORD).status_code == 429
    # The address: three more names, then even a valid login from there is refused.
    for i in range(3):
        assert attacker.login(f"nosuch{i}x", "guess").status_code == 401
    r = attacker.login("nosuch9x", "guess")
    assert r.status_code == 429
    log = web.log_text()
    hits = FAILURE_LINE.findall(log)[before:]
    assert len(hits) == 6 and {h for _, h in hits} == {"198.51.100.7"}, hits
    assert f"login refused for '{member}' from 198.51.100.8: too many failures" in log
    # The shipped fail2ban filter, through fail2ban's own fail2ban-regex, finds
    # exactly these failures in the lines as syslog writes them.
    regex = REPO / "build" / "fail2ban" / "usr" / "bin" / "fail2ban-regex"
    if not regex.exists():
        subprocess.run(["make", "-C", str(REPO), "build/fail2ban/usr/bin/fail2ban-regex"],
                       check=True, capture_output=True)
    lines = [ln[len("kvmshell-web: "):] for ln in log.splitlines()
             if ln.startswith("kvmshell-web: ")]
    syslog = tmp_path / "auth.log"
    syslog.write_text("".join(f"2026-01-02T03:04:05.000000+00:00 testhost kvmshell-web[99]: "
                              f"{ln}\n" for ln in lines))
    r = subprocess.run(["/usr/bin/python3", str(regex), "--print-all-matched", str(syslog),
                        str(REPO / "fail2ban" / "filter.d" / "kvmshell-web.conf")],
                       capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(regex.parents[1] / "lib" / "python3" /
                                              "dist-packages"), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"Lines: (\d+) lines, 0 ignored, (\d+) matched, (\d+) missed", r.stdout)
    failures = [ln for ln in lines if ln.startswith(("authentication failure",
                                                     "login refused"))]
    assert m and int(m.group(2)) == len(failures) >= 9, r.stdout
    assert int(m.group(3)) == len(lines) - len(failures)


# ---- framing and XSS ----------------------------------------------------------------------

class _Scripts(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.inline: list[str] = []
        self.handlers: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {k for k, _ in attrs}
        self.handlers += [f"{tag} {k}" for k in names if k.startswith("on")]
        self.handlers += [f"{tag} {k}" for k, v in attrs if v and v.strip().lower()
                          .startswith("javascript:")]
        if tag == "script":
            self._in_script = True
            if "src" not in names:
                self.inline.append("(no src)")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append(data.strip()[:60])


def test_security_headers_and_no_inline_script(web: WebRig, alice: User,
                                               running: Path) -> None:
    b = Browser(web)
    assert b.login(alice.name, PASSWORD).status_code == 200
    for path in ("/", "/login", f"/vms/{VM}/console", f"/vms/{VM}/spy", f"/vms/{VM}/display",
                 "/vms/x/nope", "/api/vms", "/static/common.js", "/static/nope.js",
                 "/no/such/page"):
        r = b.get(path)
        csp = r.headers.get("content-security-policy", "")
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, (path, csp)
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, (path, csp)
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
        if r.headers.get("content-type", "").startswith("text/html"):
            p = _Scripts()
            p.feed(r.text)
            assert p.inline == [] and p.handlers == [], (path, p.inline, p.handlers)
            if path != "/login":
                assert r.headers["cache-control"] == "no-store"


def test_messages_and_names_are_escaped(web: WebRig, alice: User, vms: dict[str, Path]) -> None:
    b = Browser(web)
    assert b.login(alice.name, PASSWORD).status_code == 200
    r = b.get("/vms/<script>alert(1)/console")
    assert r.status_code == 400
    assert "<script>alert" not in r.text and "&lt;script&gt;alert(1)" in r.text, r.text
    # kvmshell's refusal naming a token full of markup: JSON, shown as text by the page.
    token = '"><img src=x onerror=alert(1)>'
    r = b.post(f"/api/vms/{VM}/start", {"options": [["-cdrom", token]]})
    expected = kvmshell_line(alice, f"start {VM} -cdrom '{token}'")
    assert r.status_code == 400 and r.json() == {"error": expected}
    assert r.headers["content-type"] == "application/json"


# ---- another user's VM ---------------------------------------------------------------------

def test_another_users_vm_gets_kvmshells_refusal_everywhere(
        web: WebRig, alice: User, bob: User, vms: dict[str, Path]) -> None:
    """alice, logged in, on bob's VM: every route answers with the line
    kvmshell itself gives alice for it, and bob's VM is untouched."""
    before = bob.status(BOBVM)
    b = Browser(web)
    assert b.login(alice.name, PASSWORD).status_code == 200
    line = kvmshell_line(alice, f"status {BOBVM}")
    assert BOBVM in line
    for kind in ("console", "spy", "display"):
        r = b.get(f"/vms/{BOBVM}/{kind}")
        assert r.status_code == 400, (kind, r.text)
        p = re.search(r'<p class="message error" id="message" role="alert">([^<]*)</p>', r.text)
        assert p and p.group(1).replace("&#39;", "'") == line, (kind, r.text)
    for verb in ("start", "stop", "kill", "reset"):
        r = b.post(f"/api/vms/{BOBVM}/{verb}", {"options": []} if verb == "start" else {})
        assert r.status_code == 400, (verb, r.text)
        assert r.json() == {"error": kvmshell_line(alice, f"{verb} {BOBVM}")}
    # The consoles: no ticket, kvmshell's line instead.
    for kind, command in (("console", "console VM"), ("force", "console VM --force"),
                          ("spy", "console VM --spy"), ("vnc", "vnc VM")):
        r = b.post("/api/tickets", {"vm": BOBVM, "kind": kind})
        assert r.status_code == 400, (kind, r.text)
        assert r.json() == {"error": kvmshell_line(alice, command.replace("VM", BOBVM))}
    assert bob.status(BOBVM) == before
    assert alice.qemu_pids() == [] or alice.status(VM)["state"] == "running"


def test_no_console_target_from_the_client(web: WebRig, alice: User, running: Path) -> None:
    """The ticket request names a VM and a kind from a closed set; anything
    else in it (host, port, path, socket) is never used."""
    no_console_clients(alice)
    b = Browser(web)
    assert b.login(alice.name, PASSWORD).status_code == 200
    for kind in ("tcp", "unix", "ssh", "../console", ""):
        r = b.post("/api/tickets", {"vm": VM, "kind": kind})
        assert r.status_code == 400, kind
    for vm in ("../x", "/etc/passwd", "x/../../y", "a" * 33):
        r = b.post("/api/tickets", {"vm": vm, "kind": "console"})
        assert r.status_code == 400 and r.json()["error"] == kvmshell_line(
            alice, f"status '{vm}'"), vm
    r = b.post("/api/tickets", {"vm": VM, "kind": "console", "host": "127.0.0.1", "port": 22,
                                "path": "/etc/passwd", "socket": "/run/x.sock"})
    with b.ws() as ws:
        doc, _ = ws_answer(ws, {"ticket": r.json()["ticket"], "host": "127.0.0.1", "port": 22,
                                "path": "/etc/passwd"})
        assert doc == {"ok": "console"}
        ws.send(b"echo target-$((7*7))\r")
        seen = b""
        while b"target-49\r\n" not in seen:
            m = ws.recv(timeout=60)
            seen += m if isinstance(m, bytes) else b""
    assert b"target-49" in console_log(running)           # it was the VM's console


# ---- behind the shipped nginx example ------------------------------------------------------

NGINX_MAIN = """\
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    include {d}/site.conf;
}}
"""


def test_behind_the_shipped_nginx_example(host: Host, alice: User, running: Path,
                                          tmp_path: Path) -> None:
    """nginx/kvmshell-web.conf, with only names, ports and paths replaced:
    TLS to the browser, login, the page, the client's own X-Forwarded-For
    replaced by nginx's view, HSTS, and the console WebSocket through it."""
    import ssl
    from websockets.sync.client import connect

    nginx = REPO / "build" / "nginx" / "usr" / "sbin" / "nginx"
    if not nginx.exists():
        subprocess.run(["make", "-C", str(REPO), "build/nginx/usr/sbin/nginx"], check=True,
                       capture_output=True)
    from webrig import free_port
    tls, plain = free_port(), free_port()
    d = tmp_path / "nginx"
    (d / "tmp").mkdir(parents=True)
    os.chmod(tmp_path, 0o755)
    os.chmod(d, 0o755)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
                   check=True, capture_output=True)
    # nginx's workers (its master runs as root here) are nobody:nogroup.
    rig = unix_rig(host, "nogroup", web_origins=f"https://localhost:{tls}")
    sock = rig.settings["web_listen"][5:]
    site = (REPO / "nginx" / "kvmshell-web.conf").read_text()
    for old, new in (("listen 443 ssl http2;", f"listen 127.0.0.1:{tls} ssl http2;"),
                     ("listen [::]:443 ssl http2;", ""),
                     ("listen 80;", f"listen 127.0.0.1:{plain};"), ("listen [::]:80;", ""),
                     ("server_name vm.example.org;", "server_name localhost;"),
                     ("/etc/ssl/certs/vm.example.org.pem", str(d / "cert.pem")),
                     ("/etc/ssl/private/vm.example.org.key", str(d / "key.pem")),
                     ("http://unix:/run/kvmshell-web/web.sock", f"http://unix:{sock}")):
        assert old in site, old
        site = site.replace(old, new)
    (d / "site.conf").write_text(site)
    (d / "nginx.conf").write_text(NGINX_MAIN.format(d=d))
    proc = None
    try:
        rig.add_user(alice.name, PASSWORD)
        rig.start()
        t = subprocess.run([str(nginx), "-t", "-p", str(d), "-c", str(d / "nginx.conf")],
                           capture_output=True, text=True)
        assert t.returncode == 0, t.stderr
        proc = subprocess.Popen([str(nginx), "-p", str(d), "-c", str(d / "nginx.conf")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        origin = f"https://localhost:{tls}"
        ctx = ssl.create_default_context(cafile=str(d / "cert.pem"))
        http = httpx.Client(base_url=origin, verify=ctx, trust_env=False, timeout=60)
        wait_for(lambda: _up(http), 20, "nginx")
        r = httpx.get(f"http://localhost:{plain}/login", trust_env=False)
        assert r.status_code == 301 and r.headers["location"] == "https://localhost/login"
        r = http.post("/login", json={"user": alice.name, "password": PASSWORD},
                      headers={"Origin": origin, "X-Forwarded-For": "203.0.113.66"})
        assert r.status_code == 200, (r.text, rig.log_text())
        assert r.headers["strict-transport-security"].startswith("max-age=")
        cookie = session_cookie(r)
        assert f"login {alice.name} from 127.0.0.1" in rig.log_text()
        assert "203.0.113.66" not in rig.log_text()
        page = http.get("/", headers={"Cookie": f"{COOKIE}={cookie}"})
        assert page.status_code == 200 and f'data-vm="{VM}"' in page.text
        csrf = re.search(r'name="kvmshell-csrf" content="([^"]+)"', page.text)
        assert csrf
        no_console_clients(alice)
        r = http.post("/api/tickets", json={"vm": VM, "kind": "console"},
                      headers={"Origin": origin, "Cookie": f"{COOKIE}={cookie}",
                               "X-CSRF-Token": csrf.group(1)})
        assert r.status_code == 200, r.text
        with connect(f"wss://localhost:{tls}/ws", ssl=ctx, proxy=None, origin=origin,  # type: ignore[arg-type]
                     additional_headers={"Cookie": f"{COOKIE}={cookie}"}) as ws:
            assert ws_answer(ws, {"ticket": r.json()["ticket"]})[0] == {"ok": "console"}
            ws.send(b"echo nginx-$((5*5))\r")
            seen = b""
            while b"nginx-25\r\n" not in seen:
                m = ws.recv(timeout=60)
                seen += m if isinstance(m, bytes) else b""
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        subprocess.run(["gpasswd", "-d", alice.name, rig.group], capture_output=True)
        rig.close()


def _up(http: httpx.Client) -> bool:
    try:
        return http.get("/login").status_code == 200
    except httpx.HTTPError:
        return False


# ---- what make install ships -------------------------------------------------------------

def test_shipped_files_agree() -> None:
    """kvmshell.conf's web settings name what the sudoers drop-in, the
    systemd unit and the nginx example name; and the Makefile's rewrite of
    the drop-in for another PREFIX still passes visudo."""
    from kvmshell.common import config
    cfg = config.load(str(REPO / "kvmshell.conf"), require_root=False)
    w = cfg.web
    sudoers = (REPO / "sudoers.d" / "kvmshell-web").read_text()
    assert f"= {w.pamhelper} ^auth " in sudoers
    assert f"= {w.kvmshell} ^(" in sudoers
    assert f"\n{w.user} ALL=(root) NOPASSWD: KVMSHELL_PAMHELPER\n" in sudoers
    assert f"\n{w.user} ALL=(%{cfg.group}) NOPASSWD: KVMSHELL_WEB_VERBS\n" in sudoers
    unit = (REPO / "systemd" / "kvmshell-web.service").read_text()
    assert f"\nUser={w.user}\n" in unit and "\nKillMode=process\n" in unit
    assert "NoNewPrivileges" not in unit.replace("# No NoNewPrivileges", "")
    assert w.listen == ("unix", "/run/kvmshell-web/web.sock", 0) and w.origins == []
    assert w.proxies == []
    assert "proxy_pass http://unix:/run/kvmshell-web/web.sock;" in \
        (REPO / "nginx" / "kvmshell-web.conf").read_text()
    assert "\nd /run/kvmshell-web 0750 kvmweb www-data -\n" in \
        (REPO / "tmpfiles.d" / "kvmshell-web.conf").read_text()
    make = (REPO / "Makefile").read_text()
    m = re.search(r"sed -e '(s\|/usr/local/libexec/kvmshell\|\$\(LIBEXEC\)\|)' -e "
                  r"'(s\|/usr/local/bin/kvmshell\|\$\(BIN\)/kvmshell\|)' \\\n\s+sudoers.d/kvmshell-web",
                  make)
    assert m, "the Makefile's sed for sudoers.d/kvmshell-web"
    prefix = "/opt/kvm"
    expr = [m.group(1).replace("$(LIBEXEC)", f"{prefix}/libexec/kvmshell"),
            m.group(2).replace("$(BIN)", f"{prefix}/bin")]
    out = subprocess.run(["sed", "-e", expr[0], "-e", expr[1],
                          str(REPO / "sudoers.d" / "kvmshell-web")],
                         capture_output=True, text=True, check=True).stdout
    assert f"{prefix}/libexec/kvmshell/kvmshell-pamhelper ^auth" in out
    assert f"{prefix}/bin/kvmshell ^(" in out and "/usr/local" not in out
    r = subprocess.run(["visudo", "-cf", "-"], input=out, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_package_ships_templates_and_assets(tmp_path: Path) -> None:
    """The installed package (a wheel built from the checkout) carries the
    templates, our scripts and every npm asset the pages load."""
    import zipfile
    from webrig import ensure_assets
    ensure_assets(None)
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    work = tmp_path / "src"
    shutil.copytree(REPO, work, ignore=shutil.ignore_patterns(
        "build", "node_modules", "__pycache__", ".git", "*.egg-info", ".mypy_cache"))
    subprocess.run(["/usr/bin/python3", "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path / "whl"), str(work)],
                   check=True, capture_output=True, env=env)
    (wheel,) = (tmp_path / "whl").glob("kvmshell-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    web = REPO / "kvmshell" / "web"
    want = {str(p.relative_to(REPO)) for p in web.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}
    assert want - names == set()
    assert "kvmshell/web/static/vendor/novnc/core/rfb.js" in names
    assert "kvmshell/web/static/vendor/xterm/xterm.mjs" in names


def test_kvmadm_check_reports_the_web_front_door(web: WebRig, alice: User,
                                                 tmp_path: Path) -> None:
    """kvmadm check's "web" line: PASS when not installed, PASS for the rig's
    installed layout, and FAIL with a fix for each breakage."""
    from kvmshell.admin import check
    from kvmshell.common import config
    etc = tmp_path / "etc"
    (etc / "sudoers.d").mkdir(parents=True)
    cfg = config.load(str(web.conf))
    res = check.check_web(check.Host(cfg, str(etc)))
    assert res.status == "PASS" and "not installed" in res.detail
    dropin = etc / "sudoers.d" / "kvmshell-web"
    dropin.write_text(web.sudoers_text())
    os.chmod(dropin, 0o440)
    res = check.check_web(check.Host(cfg, str(etc)))
    assert res.status == "PASS", res.detail
    assert res.detail.startswith(f"installed, on for {web.origin}; {web.web_user} may run")

    def fails(why: str) -> None:
        res = check.check_web(check.Host(config.load(str(web.conf)), str(etc)))
        assert res.status == "FAIL" and why in res.detail and res.fix, (why, res.detail)

    os.chmod(dropin, 0o666)
    fails("users must not write it")
    os.chmod(dropin, 0o440)
    dropin.write_text(web.sudoers_text() + "kvmweb ALL=(\n")
    fails("visudo -c -f")
    dropin.write_text(web.sudoers_text())
    web.write_conf(web_pamhelper="/usr/local/libexec/kvmshell/elsewhere")
    try:
        fails("does not name /usr/local/libexec/kvmshell/elsewhere")
    finally:
        web.write_conf(web_pamhelper=web.pamhelper)
    subprocess.run(["usermod", "-aG", web.group, web.web_user], check=True)
    try:
        fails("is root or a VM user")
    finally:
        subprocess.run(["gpasswd", "-d", web.web_user, web.group], check=True,
                       capture_output=True)
    os.chmod(web.pamhelper, 0o777)
    try:
        fails("a user could change it")
    finally:
        os.chmod(web.pamhelper, 0o755)


def test_serves_tls_itself_and_listens_on_a_unix_socket(host: Host, alice: User,
                                                        vms: dict[str, Path],
                                                        tmp_path: Path) -> None:
    """web_tls_cert/web_tls_key: HTTPS without a proxy (HSTS sent); and
    web_listen = unix:PATH, where the proxy's X-Forwarded-For is believed."""
    import ssl
    tls = host.root / f"tls-{secrets.token_hex(3)}"
    tls.mkdir(mode=0o755)
    cert, key = tls / "cert.pem", tls / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    os.chmod(cert, 0o644)
    rig = WebRig(host.root, KVMSHELL, host.conf, host.root / "lib",
                 web_tls_cert=str(cert), web_tls_key=str(key))
    port = rig.port
    rig.write_conf(web_origins=f"https://localhost:{port}")
    try:
        os.chmod(key, 0o400)                 # root's: one line, no traceback
        r = subprocess.run(rig.as_web_user("/usr/bin/python3", "-I", str(rig.server), "--config",
                                           str(rig.conf)), capture_output=True, text=True,
                           timeout=60, env={"PATH": "/usr/bin:/bin"})
        assert (r.returncode, r.stderr) == (2, f"kvmshell-web: web_tls_key: cannot read {key}: "
                                               f"Permission denied (it must be readable by "
                                               f"{rig.web_user})\n")
        os.chown(key, rig.web_uid, rig.web_gid)
        rig.add_user(alice.name, PASSWORD)
        rig.start()
        ctx = ssl.create_default_context(cafile=str(cert))
        r = httpx.post(f"https://localhost:{port}/login", verify=ctx, trust_env=False,
                       json={"user": alice.name, "password": PASSWORD},
                       headers={"Origin": f"https://localhost:{port}"})
        assert r.status_code == 200, rig.log_text()
        assert r.headers["strict-transport-security"].startswith("max-age=")
        session_cookie(r)
    finally:
        subprocess.run(["gpasswd", "-d", alice.name, rig.group], capture_output=True)
        rig.close()
    sock_dir = tls / "run"
    sock_dir.mkdir()
    rig = WebRig(host.root, KVMSHELL, host.conf, host.root / "lib",
                 web_origins="https://vm.example.org", web_listen=f"unix:{sock_dir}/web.sock")
    try:
        os.chown(sock_dir, rig.web_uid, 0)  # the proxy's group, in real life
        os.chmod(sock_dir, 0o750)
        rig.add_user(alice.name, PASSWORD)
        rig.start()
        http = httpx.Client(transport=httpx.HTTPTransport(uds=f"{sock_dir}/web.sock"),
                            base_url="http://vm.example.org", trust_env=False, timeout=60)
        r = http.post("/login", json={"user": alice.name, "password": PASSWORD},
                      headers={"Origin": "https://vm.example.org",
                               "X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"})
        assert r.status_code == 200, rig.log_text()
        assert f"login {alice.name} from 203.0.113.9" in rig.log_text()
    finally:
        subprocess.run(["gpasswd", "-d", alice.name, rig.group], capture_output=True)
        rig.close()


def _local_ipv4() -> str | None:
    """This host's address toward the outside (no packet is sent), if any."""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            return None
        addr = str(s.getsockname()[0])
    return None if addr.startswith("127.") else addr


@pytest.mark.security
def test_only_the_proxy_may_say_who_the_client_is(host: Host, alice: User) -> None:
    """X-Forwarded-For is the client's address for the rate limits,
    PAM_RHOST and the line fail2ban bans by.  A VM user (a compromised
    QEMU, or any guest with user networking: slirp connects from the host)
    can connect to any address of this host, so a proxy there may not be
    believed by address: kvmshell-web refuses such web_proxies, and behind
    a proxy on this host listens on a unix socket whose directory only the
    web user and the proxy's group may enter (refused otherwise).  With the
    layout make install makes, a VM user cannot reach the socket at all."""
    import socket
    from kvmshell.web.server import _local_address
    rig = WebRig(host.root, KVMSHELL, host.conf, host.root / "lib")

    def serve() -> subprocess.CompletedProcess[str]:
        return subprocess.run(rig.as_web_user("/usr/bin/python3", "-I", str(rig.server),
                                              "--config", str(rig.conf)),
                              capture_output=True, text=True, timeout=30,
                              env={"PATH": "/usr/bin:/bin"})

    def refused(why: str) -> None:
        r = serve()
        assert r.returncode == 2 and r.stderr.startswith("kvmshell-web: ") \
            and r.stderr.count("\n") == 1 and why in r.stderr, (r.returncode, r.stderr)

    assert _local_address("127.0.0.1") and not _local_address("198.51.100.10")
    try:
        rig.add_user(alice.name, PASSWORD)
        for addr in ["127.0.0.1", "127.0.0.2"] + [a for a in [_local_ipv4()] if a]:
            rig.write_conf(web_proxies=addr)
            refused(f"web_proxies: {addr} is an address of this host")
        rig.write_conf(web_proxies="")
        run = rig.root / "run"
        run.mkdir()
        rig.write_conf(web_listen=f"unix:{run}/web.sock")
        for uid, gid, mode, why in [
                (rig.web_uid, 0, 0o755, "lets every user reach the socket"),
                (rig.web_uid, grp.getgrnam(rig.group).gr_gid, 0o750,
                 f"lets VM user {alice.name} (through the directory's group)"),
                (alice.uid, 0, 0o700, f"lets its owner (uid {alice.uid}")]:
            os.chown(run, uid, gid)
            os.chmod(run, mode)
            refused(why)
        os.chown(run, rig.web_uid, 0)
        os.chmod(run, 0o750)
        rig.start()
        probe = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
                 f"try:\n    s.connect({str(run / 'web.sock')!r})\n"
                 "except PermissionError:\n    sys.exit(13)\n")
        r = subprocess.run(alice.argv("/usr/bin/python3", "-I", "-c", probe), env=alice.env(),
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 13, (r.returncode, r.stderr)
        with socket.socket(socket.AF_UNIX) as s:      # the proxy's side (root, here)
            s.connect(str(run / "web.sock"))
    finally:
        subprocess.run(["gpasswd", "-d", alice.name, rig.group], capture_output=True)
        rig.close()


def test_server_refuses_root_and_a_config_without_origins(web: WebRig) -> None:
    def serve(as_web_user: bool) -> subprocess.CompletedProcess[str]:
        argv = ["/usr/bin/python3", "-I", str(web.server), "--config", str(web.conf)]
        return subprocess.run(web.as_web_user(*argv) if as_web_user else argv,
                              capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin"})
    r = serve(False)
    assert (r.returncode, r.stderr) == (2, "kvmshell-web: refusing to run as root (run it as "
                                           "web_user, e.g. kvmweb)\n")
    origins = web.settings["web_origins"]
    web.write_conf(web_origins="")
    try:
        r = serve(True)
        assert r.returncode == 2 and r.stderr.startswith("kvmshell-web: ") \
            and "web_origins is empty" in r.stderr and r.stderr.count("\n") == 1, r.stderr
        web.write_conf(web_origins="https://vm.example.org/path")
        r = serve(True)
        assert r.returncode == 2 and "web_origins: 'https://vm.example.org/path' is not " \
            "scheme://host[:port]" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    finally:
        web.write_conf(web_origins=origins)
