"""The web front door's ASGI application (Starlette): pages, JSON actions
and the console/display WebSockets.  Runs as ``web_user`` (kvmweb), never
root; see :mod:`kvmshell.web.server` for how it is served.

It adds no permission logic of its own: every VM action runs
``kvmshell VERB ...`` as the logged-in user (:mod:`kvmshell.web.runner`),
and kvmshell's one-line answer is what the page shows.  What it does
itself is the web's part of the job (:mod:`kvmshell.web.sessions`):

* login through the root helper, with rate limits, logged for fail2ban;
  no session before a login succeeds, a fresh id after;
* the ``__Host-kvmshell`` cookie: ``Secure; HttpOnly; SameSite=Strict``;
* every state-changing request: an allowed ``Origin`` and the session's
  CSRF token in ``X-CSRF-Token``; GET changes nothing;
* WebSockets: an allowed ``Origin``, the session cookie, and a one-time
  ticket (session, VM, kind; 30 s) as the first message;
* no console target ever comes from the client: the ticket names a VM, and
  kvmshell, as the user, finds its sockets;
* security headers on every answer (strict CSP with no inline script);
  Jinja2 autoescaping for every value in a page.

Routes (all JSON answers are objects; errors are ``{"error": LINE}``):

    GET  /                      the user's VMs (or a redirect to /login)
    GET  /login                 the login form
    POST /login                 {"user", "password"} -> {"ok": true} + cookie
    POST /logout                ends the session
    GET  /api/vms               list --json
    POST /api/vms/NAME/VERB     start (with {"options": [[OPT, VALUE|true], ...]}),
                                stop, kill, reset -> {"ok", "message"}
    POST /api/tickets           {"vm", "kind": console|force|spy|vnc} -> {"ticket"}
                                (kvmshell status VM first: its refusal, or a ticket)
    GET  /vms/NAME/console      xterm.js page (takeover: --force; spy: read-only;
                                display: noVNC)
    WS   /ws                    first message {"ticket"}; then the stream
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from kvmshell.common import optable, vmid
from kvmshell.common.config import Config
from kvmshell.common.errors import KvmshellError
from kvmshell.web import events, runner
from kvmshell.web.sessions import KINDS, Limiter, Session, Store, address_key

HERE = os.path.dirname(os.path.abspath(__file__))
COOKIE = "__Host-kvmshell"
CSRF_HEADER = "x-csrf-token"
BODY_MAX = 64 * 1024
VERBS = ("start", "stop", "kill", "reset")
# Page -> ticket kind.
PAGE_KINDS = {"console": "console", "takeover": "force", "spy": "spy", "display": "vnc"}
FIRST_MESSAGE_SECONDS = 10.0
END_SECONDS = 10.0
STREAMS_PER_SESSION = 8
WS_FRAME_MAX = 1 << 20
LOGIN_FAILED = "login incorrect"
LOGIN_LIMITED = "too many failed logins; try again later"

CSP = ("default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; "
       "object-src 'none'")
HEADERS = [
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=(), usb=(), serial=()"),
]


def csp(nonce: str | None = None) -> str:
    """The Content-Security-Policy: *nonce* lets the page's own script give
    the style elements xterm.js creates the nonce (static/nonce.js): no
    ``'unsafe-inline'`` for styles either."""
    if nonce is None:
        return CSP
    return CSP + f"; style-src 'self' 'nonce-{nonce}'"


class SecurityHeaders:
    """Adds the security headers to every HTTP answer (a page's own CSP,
    with its nonce, wins); ``Cache-Control: no-store`` outside /static."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = str(scope.get("path", "")).startswith("/static/")
        https = scope.get("scheme") == "https"

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                headers += [h for h in HEADERS if h[0] not in names]
                if b"content-security-policy" not in names:
                    headers.append((b"content-security-policy", CSP.encode()))
                if not static and b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-store"))
                if https:
                    headers.append((b"strict-transport-security", b"max-age=31536000"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


class Web:
    """The application's state: config, sessions, limits, templates."""

    def __init__(self, cfg: Config) -> None:
        w = cfg.web
        self.cfg = cfg
        self.origins = frozenset(w.origins)
        self.store = Store(w.idle_timeout, w.session_lifetime)
        self.by_address = Limiter(w.login_failures_per_address, w.login_window)
        self.by_user = Limiter(w.login_failures_per_user, w.login_window)
        self.templates = Environment(loader=FileSystemLoader(os.path.join(HERE, "templates")),
                                     autoescape=select_autoescape(default=True),
                                     auto_reload=False)
        self.user_options = [o for o in optable.TABLE if o.cls == optable.USER]

    # ---- helpers -------------------------------------------------------------

    def session(self, request: Request | WebSocket) -> Session | None:
        return self.store.get(request.cookies.get(COOKIE))

    def origin_ok(self, request: Request | WebSocket) -> bool:
        origin = request.headers.get("origin")
        return origin is not None and origin.lower() in self.origins

    def page(self, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        nonce = secrets.token_urlsafe(18)
        html = self.templates.get_template(name).render(nonce=nonce, **context)
        return HTMLResponse(html, status_code=status,
                            headers={"content-security-policy": csp(nonce)})

    def error_page(self, session: Session | None, message: str, status: int) -> HTMLResponse:
        return self.page("error.html", status, title="kvmshell", message=message,
                         session=session)

    def guarded(self, request: Request, *, csrf: bool = True) -> Session | Response:
        """The session of a state-changing request, or the refusal: an
        allowed Origin, then a live session, then its CSRF token."""
        if not self.origin_ok(request):
            events.log(f"refused cross-site {request.method} {request.url.path} from "
                       f"{client(request)}: Origin {request.headers.get('origin', '-')[:80]!r}")
            return _error("kvmshell-web: refused: cross-site request", 403)
        s = self.session(request)
        if s is None:
            return _error("kvmshell-web: not logged in", 401)
        if csrf and not s.csrf_ok(request.headers.get(CSRF_HEADER)):
            events.log(f"refused {request.method} {request.url.path} for {s.user} from "
                       f"{client(request)}: missing or wrong CSRF token")
            return _error("kvmshell-web: refused: missing or wrong CSRF token", 403)
        return s

    # ---- pages ---------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        s = self.session(request)
        if s is None:
            return RedirectResponse("/login", status_code=303)
        vms, error = await runner.list_vms(self.cfg, s.user)
        return self.page("vms.html", title="Your VMs", session=s, vms=vms, error=error,
                         options=self.user_options, started=_started_text)

    async def login_page(self, request: Request) -> Response:
        if self.session(request) is not None:
            return RedirectResponse("/", status_code=303)
        return self.page("login.html", title="Log in", session=None)

    async def vm_page(self, request: Request) -> Response:
        s = self.session(request)
        if s is None:
            return RedirectResponse("/login", status_code=303)
        name, kind = request.path_params["name"], request.path_params["kind"]
        if kind not in PAGE_KINDS:
            return self.error_page(s, "kvmshell-web: no such page", 404)
        bad = _bad_name(name)
        if bad:
            return self.error_page(s, bad, 400)
        # kvmshell says whether this VM is the user's: its answer, word for
        # word, is the page's refusal.  (Whether it runs, kvmshell console
        # or vnc says, through the WebSocket.)
        r = await runner.run(self.cfg, s.user, ["status", name, "--json"])
        if r.status != 0:
            return self.error_page(s, r.message, _http_status(r.status))
        template = "display.html" if kind == "display" else "console.html"
        return self.page(template, title=f"{name}: {kind}", session=s, vm=name,
                         kind=PAGE_KINDS[kind])

    # ---- JSON ----------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        if not self.origin_ok(request):
            events.log(f"refused cross-site login from {client(request)}: "
                       f"Origin {request.headers.get('origin', '-')[:80]!r}")
            return _error("kvmshell-web: refused: cross-site request", 403)
        body = await _json_body(request)
        if body is None or not isinstance(body.get("user"), str) \
                or not isinstance(body.get("password"), str):
            return _error("kvmshell-web: expected JSON {\"user\", \"password\"}", 400)
        user, password = body["user"], body["password"]
        addr = client(request)
        akey, ukey = address_key(addr), user.lower()[:64]
        if self.by_address.blocked(akey) or self.by_user.blocked(ukey):
            events.log(f"login refused for {_log_name(user)} from {addr}: too many failures")
            return _error(LOGIN_LIMITED, 429)
        self.by_address.hit(akey)
        self.by_user.hit(ukey)
        ok = False
        if _user_name_ok(user) and 0 < len(password.encode("utf-8")) <= 1024 \
                and "\0" not in password and "\n" not in password and "\r" not in password:
            ok = await runner.check_login(self.cfg, user, password, _helper_address(addr))
        if not ok:
            # The line fail2ban's filter matches (fail2ban/filter.d/kvmshell-web.conf).
            events.log(f"authentication failure for {_log_name(user)} from {addr}")
            return _error(LOGIN_FAILED, 401)
        self.by_address.forgive(akey)
        self.by_user.forgive(ukey)
        old = request.cookies.get(COOKIE)
        if old:
            self.store.drop(old)  # whatever the browser held goes; never promoted
        s = self.store.create(user, addr)
        events.log(f"login {user} from {addr}")
        resp = JSONResponse({"ok": True})
        resp.set_cookie(COOKIE, s.id, path="/", secure=True, httponly=True, samesite="strict")
        return resp

    async def logout(self, request: Request) -> Response:
        g = self.guarded(request)
        if isinstance(g, Response):
            return g
        self.store.drop(g.id)
        events.log(f"logout {g.user} from {client(request)}")
        resp = JSONResponse({"ok": True})
        resp.delete_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="strict")
        resp.headers["clear-site-data"] = '"cookies", "storage"'
        return resp

    async def api_vms(self, request: Request) -> Response:
        s = self.session(request)
        if s is None:
            return _error("kvmshell-web: not logged in", 401)
        vms, error = await runner.list_vms(self.cfg, s.user)
        if error:
            return _error(error, 409)
        return JSONResponse({"vms": vms})

    async def act(self, request: Request) -> Response:
        g = self.guarded(request)
        if isinstance(g, Response):
            return g
        name, verb = request.path_params["name"], request.path_params["verb"]
        if verb not in VERBS:
            return _error(f"kvmshell-web: {verb[:20]!r}: not an action here", 404)
        bad = _bad_name(name)
        if bad:
            return _error(bad, 400)
        words = [verb, name]
        if verb == "start":
            body = await _json_body(request)
            options = _option_words(body)
            if options is None:
                return _error('kvmshell-web: expected JSON {"options": [[OPTION, VALUE], ...]}',
                              400)
            words += options
        r = await runner.run(self.cfg, g.user, words)
        events.log(f"{g.user} from {client(request)}: {verb} {name}: "
                   f"{'ok' if r.status == 0 else r.message[:200]}")
        if r.status != 0:
            return _error(r.message, _http_status(r.status))
        return JSONResponse({"ok": True, "message": r.stdout.strip().splitlines()[-1:][0]
                             if r.stdout.strip() else f"{name}: {verb}: done"})

    async def ticket(self, request: Request) -> Response:
        g = self.guarded(request)
        if isinstance(g, Response):
            return g
        body = await _json_body(request)
        if body is None or not isinstance(body.get("vm"), str) or body.get("kind") not in KINDS:
            return _error('kvmshell-web: expected JSON {"vm", "kind": '
                          'console|force|spy|vnc}', 400)
        bad = _bad_name(body["vm"])
        if bad:
            return _error(bad, 400)
        # kvmshell says whether the VM is the user's, in its own words: no
        # ticket otherwise.  (kvmshell console/vnc check again, as the user.)
        r = await runner.run(self.cfg, g.user, ["status", body["vm"], "--json"])
        if r.status != 0:
            return _error(r.message, _http_status(r.status))
        try:
            token = self.store.issue(g, body["vm"], body["kind"])
        except OverflowError:
            return _error("kvmshell-web: busy; try again", 503)
        return JSONResponse({"ticket": token})

    # ---- the WebSocket -------------------------------------------------------

    async def ws(self, websocket: WebSocket) -> None:
        if not self.origin_ok(websocket):
            events.log(f"refused cross-site WebSocket from {client(websocket)}: "
                       f"Origin {websocket.headers.get('origin', '-')[:80]!r}")
            await websocket.close(code=1008)   # before accept: HTTP 403
            return
        s = self.session(websocket)
        if s is None:
            await websocket.close(code=1008)
            return
        await websocket.accept()
        try:
            first = await asyncio.wait_for(websocket.receive(), FIRST_MESSAGE_SECONDS)
        except asyncio.TimeoutError:
            await _ws_refuse(websocket, "kvmshell-web: no ticket", 4401)
            return
        token = _ticket_of(first)
        t = self.store.redeem(token, s) if token else None
        if t is None:
            events.log(f"refused WebSocket for {s.user} from {client(websocket)}: "
                       "invalid, used or expired ticket")
            await _ws_refuse(websocket, "kvmshell-web: invalid, used or expired ticket", 4401)
            return
        words = {"console": ["console", t.vm, "--linger", "0"],
                 "force": ["console", t.vm, "--force", "--linger", "0"],
                 "spy": ["console", t.vm, "--spy", "--linger", "0"],
                 "vnc": ["vnc", t.vm]}[t.kind]
        if s.streams >= STREAMS_PER_SESSION:
            await _ws_refuse(websocket, f"kvmshell-web: at most {STREAMS_PER_SESSION} consoles "
                             "and displays at once per login", 4429)
            return
        events.log(f"{s.user} from {client(websocket)}: {t.kind} {t.vm}")
        s.streams += 1
        try:
            await Relay(self, s, websocket, t.kind, words).run()
        finally:
            s.streams -= 1

    def app(self) -> Starlette:
        hosts = sorted({_host_of(o) for o in self.origins}) or ["localhost"]
        return Starlette(
            routes=[
                Route("/", self.index),
                Route("/login", self.login_page, methods=["GET"]),
                Route("/login", self.login, methods=["POST"]),
                Route("/logout", self.logout, methods=["POST"]),
                Route("/api/vms", self.api_vms, methods=["GET"]),
                Route("/api/vms/{name}/{verb}", self.act, methods=["POST"]),
                Route("/api/tickets", self.ticket, methods=["POST"]),
                Route("/vms/{name}/{kind}", self.vm_page, methods=["GET"]),
                WebSocketRoute("/ws", self.ws),
                Mount("/static", StaticFiles(directory=os.path.join(HERE, "static")),
                      name="static"),
            ],
            middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts,
                                   www_redirect=False),
                        Middleware(SecurityHeaders)])


class Relay:
    """One console or display: the WebSocket <-> ``kvmshell console|vnc``'s
    stdio, until either side ends or the session does.

    Frames, browser -> server: binary = keystrokes / RFB bytes; text = JSON
    ``{"resize": [COLS, ROWS]}`` (console).  Server -> browser: binary =
    output; text = JSON ``{"ok": KIND}`` (streaming starts), ``{"notice":
    LINE}`` (the console's window-size hint) or ``{"error": LINE}``
    (kvmshell's answer when it ends with a failure), then the close."""

    def __init__(self, web: Web, session: Session, ws: WebSocket, kind: str,
                 words: list[str]) -> None:
        self.web = web
        self.session = session
        self.ws = ws
        self.kind = kind
        self.words = words
        self.stderr = b""

    async def run(self) -> None:
        proc = await runner.spawn(self.web.cfg, self.session.user, self.words)
        assert proc.stdin and proc.stdout and proc.stderr
        err_task = asyncio.ensure_future(self._drain_stderr(proc.stderr))
        tasks: list[asyncio.Future[Any]] = []
        try:
            first = b""
            if self.kind == "vnc":
                # noVNC takes the socket over after "ok": anything but RFB
                # bytes after that would break it, so wait for the server's
                # first bytes (or kvmshell's refusal) before saying ok.
                try:
                    first = await asyncio.wait_for(proc.stdout.read(65536), 30.0)
                except asyncio.TimeoutError:
                    first = b""
                if not first:
                    return
            await self.ws.send_text(json.dumps({"ok": self.kind}))
            if first:
                await self.ws.send_bytes(first)
            tasks = [asyncio.ensure_future(self._out(proc.stdout)),
                     asyncio.ensure_future(self._in(proc.stdin)),
                     asyncio.ensure_future(self._watch_session())]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except (WebSocketDisconnect, ConnectionError, RuntimeError):
            pass
        finally:
            for t in tasks:
                t.cancel()
            await _end(proc)
            await err_task
            await self._close(proc.returncode)

    async def _close(self, status: int | None) -> None:
        """Close the WebSocket: with kvmshell's line if it failed (exit > 0),
        4401 if the session ended, else normally."""
        try:
            if status is not None and status > 0:
                line = runner.last_line(self.stderr) or "kvmshell-web: the console ended"
                if not line.startswith("kvmshell"):
                    line = "kvmshell-web: not allowed to act as this user"
                await self.ws.send_text(json.dumps({"error": line}))
                await self.ws.close(code=4000 + min(max(status or 1, 1), 99),
                                    reason=line.encode()[:120].decode("utf-8", "ignore"))
            elif self.session.ended.is_set() or not self.web.store.alive(self.session):
                await self.ws.close(code=4401, reason="logged out")
            else:
                await self.ws.close(code=1000)
        except (RuntimeError, ConnectionError, WebSocketDisconnect):
            pass

    async def _drain_stderr(self, stream: asyncio.StreamReader) -> None:
        while True:
            data = await stream.read(4096)
            if not data:
                return
            self.stderr = (self.stderr + data)[-4096:]

    async def _out(self, stream: asyncio.StreamReader) -> None:
        while True:
            data = await stream.read(65536)
            if not data:
                return
            await self.ws.send_bytes(data)

    async def _in(self, stdin: asyncio.StreamWriter) -> None:
        while True:
            msg = await self.ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            data = msg.get("bytes")
            if data is not None:
                if len(data) > WS_FRAME_MAX:
                    return
                self.session.last_seen = self.web.store.clock()
                if self.kind != "spy":       # a spy's keys go nowhere
                    stdin.write(data)
                    await stdin.drain()
                continue
            text = msg.get("text")
            if text is not None and self.kind != "vnc":
                notice = _resize_notice(text)
                if notice:
                    await self.ws.send_text(json.dumps({"notice": notice}))

    async def _watch_session(self) -> None:
        """Return when the session ends (logout) or times out."""
        while self.web.store.alive(self.session):
            try:
                await asyncio.wait_for(self.session.ended.wait(), 5.0)
            except asyncio.TimeoutError:
                continue


async def _end(proc: asyncio.subprocess.Process) -> None:
    """Stop a console/display client.  Its input ends, and its output is
    read and dropped meanwhile (so it is never stuck writing): kvmshell
    console (``--linger 0``) and vnc leave by themselves on that.  Signals
    are a last try only: the client runs under sudo, as the user, so the
    web user may not signal it."""
    if proc.stdin is not None:
        try:
            proc.stdin.close()
        except (ConnectionError, RuntimeError):
            pass

    async def drain() -> None:
        if proc.stdout is not None:
            while await proc.stdout.read(65536):
                pass
        await proc.wait()

    try:
        await asyncio.wait_for(drain(), END_SECONDS)
        return
    except asyncio.TimeoutError:
        pass
    for how in (proc.terminate, proc.kill):
        try:
            how()
        except (ProcessLookupError, PermissionError):
            pass
        try:
            await asyncio.wait_for(proc.wait(), 2.0)
            return
        except asyncio.TimeoutError:
            continue
    events.log(f"a console client (pid {proc.pid}) did not leave")


async def _ws_refuse(ws: WebSocket, line: str, code: int) -> None:
    try:
        await ws.send_text(json.dumps({"error": line}))
        await ws.close(code=code, reason=line[:120])
    except (RuntimeError, ConnectionError, WebSocketDisconnect):
        pass


def _ticket_of(message: Message) -> str | None:
    text = message.get("text")
    if message.get("type") != "websocket.receive" or not isinstance(text, str) \
            or len(text) > 1024:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    token = doc.get("ticket") if isinstance(doc, dict) else None
    return token if isinstance(token, str) else None


def _resize_notice(text: str) -> str | None:
    """The console's window-size hint for a ``{"resize": [COLS, ROWS]}``
    message (the same words as kvmshell console's on a terminal)."""
    try:
        doc = json.loads(text) if len(text) < 256 else None
    except ValueError:
        return None
    size = doc.get("resize") if isinstance(doc, dict) else None
    if not (isinstance(size, list) and len(size) == 2
            and all(type(n) is int and 1 <= n <= 1000 for n in size)):
        return None
    cols, rows = size
    return f"window {cols}x{rows}: in the guest, 'stty rows {rows} cols {cols}' fits it"


def _error(line: str, status: int) -> JSONResponse:
    return JSONResponse({"error": line}, status_code=status)


def _http_status(kvmshell_status: int) -> int:
    """kvmshell's exit status as HTTP: 2 (refused) -> 400, else 409."""
    return 400 if kvmshell_status == 2 else 409


def _bad_name(name: str) -> str:
    """'' for a well-formed VM name, else kvmshell's own refusal line."""
    try:
        vmid.check_name(name)
    except KvmshellError as exc:
        return f"kvmshell: {exc.message}"
    return ""


def _log_name(user: str) -> str:
    """*user* quoted for the log, or ``'-'`` when it is no valid user name
    (so no client text, e.g. a quote, can dodge fail2ban's filter)."""
    return f"'{user}'" if _user_name_ok(user) else "'-'"


def _user_name_ok(user: str) -> bool:
    from kvmshell.common import username
    try:
        username.check_user_name(user)
    except KvmshellError:
        return False
    return True


def _option_words(body: dict[str, Any] | None) -> list[str] | None:
    """start's option words from ``{"options": [[NAME, VALUE|true], ...]}``:
    each value is one argv word (never split); kvmshell parses them."""
    if body is None:
        return None
    options = body.get("options", [])
    if not isinstance(options, list) or len(options) > 64:
        return None
    words: list[str] = []
    for item in options:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                and 0 < len(item[0]) <= 64):
            return None
        name, value = item
        if value is True:
            words.append(name)
        elif isinstance(value, str) and len(value) <= 4096:
            words += [name, value]
        else:
            return None
    return words


async def _json_body(request: Request) -> dict[str, Any] | None:
    """The request's JSON object (at most BODY_MAX bytes), or None."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        return None
    data = b""
    async for chunk in request.stream():
        data += chunk
        if len(data) > BODY_MAX:
            return None
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def client(request: Request | WebSocket) -> str:
    """The client's address (through a trusted proxy: the address it
    forwarded, see web_proxies), or '-'."""
    return request.client.host if request.client and request.client.host else "-"


def _helper_address(addr: str) -> str:
    import ipaddress
    try:
        return str(ipaddress.ip_address(addr))
    except ValueError:
        return "-"


def _host_of(origin: str) -> str:
    rest = origin.split("://", 1)[1]
    if rest.startswith("["):
        return rest.split("]")[0] + "]"
    return rest.rsplit(":", 1)[0] if ":" in rest else rest


def _started_text(epoch: object) -> str:
    import time
    if not isinstance(epoch, (int, float)):
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def create_app(cfg: Config) -> Starlette:
    """The ASGI application for the host config *cfg* (its ``web_*`` settings)."""
    return Web(cfg).app()

