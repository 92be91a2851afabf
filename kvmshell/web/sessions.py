"""Server-side state of the web front door: sessions, console tickets and
login rate limits, all in the web server's memory (a restart logs
everyone out; nothing is written to disk).

Sessions.  Created only by a successful login, never from anything the
client sent before (no fixation): the id is 256 random bits, the client
holds it in the ``__Host-`` cookie only.  A session ends on logout, after
``idle`` seconds without a request or console input, and ``lifetime``
seconds after login, whichever comes first.  Each carries its own CSRF
token (256 random bits), sent back by the pages in a header.

Tickets.  A WebSocket needs one: 256 random bits, bound to the session
(so to its user), one VM and one kind of console (``console``, ``force``
(take the console over), ``spy`` (read-only), ``vnc``), usable once, within :data:`TICKET_SECONDS`.  They travel in a
POST answer and the WebSocket's first message, never in a URL.

Rate limits.  Failed (and pending) logins are counted per client address
(IPv6 per /64) and per account name, over a sliding window; over the limit
the helper is not even asked.

Times are ``time.monotonic()`` seconds.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import secrets
import time
from typing import Callable

TICKET_SECONDS = 30.0
KINDS = ("console", "force", "spy", "vnc")
MAX_SESSIONS = 10000
MAX_TICKETS = 10000
MAX_LIMITER_KEYS = 100000


class Session:
    """One logged-in browser: ``id`` (the cookie), ``user``, ``csrf``,
    ``address`` (the client's at login), times, ``ended`` (set when the
    session ends, so open consoles close with it) and ``streams`` (its open
    consoles and displays)."""

    __slots__ = ("id", "user", "csrf", "address", "created", "last_seen", "ended", "streams")

    def __init__(self, user: str, address: str, now: float) -> None:
        self.id = secrets.token_urlsafe(32)
        self.user = user
        self.csrf = secrets.token_urlsafe(32)
        self.address = address
        self.created = now
        self.last_seen = now
        self.ended = asyncio.Event()
        self.streams = 0            # open consoles and displays

    def csrf_ok(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token.encode(), self.csrf.encode())


class Ticket:
    __slots__ = ("session", "vm", "kind", "expires")

    def __init__(self, session: Session, vm: str, kind: str, expires: float) -> None:
        self.session = session
        self.vm = vm
        self.kind = kind
        self.expires = expires


class Store:
    """Sessions and tickets.  *idle*, *lifetime*: seconds."""

    def __init__(self, idle: float, lifetime: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.idle = idle
        self.lifetime = lifetime
        self.clock = clock
        self._sessions: dict[str, Session] = {}
        self._tickets: dict[str, Ticket] = {}

    def create(self, user: str, address: str) -> Session:
        """A new session for *user* (after a successful login)."""
        self._expire()
        if len(self._sessions) >= MAX_SESSIONS:
            oldest = min(self._sessions.values(), key=lambda s: s.last_seen)
            self.drop(oldest.id)
        s = Session(user, address, self.clock())
        self._sessions[s.id] = s
        return s

    def get(self, sid: str | None, touch: bool = True) -> Session | None:
        """The live session with id *sid*, or None (unknown, ended or timed
        out: a timed-out session is ended here)."""
        if not sid:
            return None
        s = self._sessions.get(sid)
        if s is None:
            return None
        if not self.alive(s):
            self.drop(s.id)
            return None
        if touch:
            s.last_seen = self.clock()
        return s

    def alive(self, s: Session) -> bool:
        now = self.clock()
        return (not s.ended.is_set() and now - s.last_seen < self.idle
                and now - s.created < self.lifetime)

    def drop(self, sid: str) -> None:
        """End a session: its tickets go, its open consoles are told."""
        s = self._sessions.pop(sid, None)
        if s is None:
            return
        s.ended.set()
        for key in [k for k, t in self._tickets.items() if t.session is s]:
            del self._tickets[key]

    def issue(self, s: Session, vm: str, kind: str) -> str:
        """A one-time ticket for a WebSocket of *kind* to *vm*."""
        if kind not in KINDS:
            raise ValueError(kind)
        self._expire()
        if len(self._tickets) >= MAX_TICKETS:
            raise OverflowError("too many open tickets")
        token = secrets.token_urlsafe(32)
        self._tickets[token] = Ticket(s, vm, kind, self.clock() + TICKET_SECONDS)
        return token

    def redeem(self, token: str, s: Session) -> Ticket | None:
        """The ticket *token* if it is live and belongs to session *s*; it is
        used up whatever the answer."""
        t = self._tickets.pop(token, None)
        if t is None or t.session is not s or self.clock() >= t.expires or not self.alive(s):
            return None
        return t

    def _expire(self) -> None:
        now = self.clock()
        for key in [k for k, t in self._tickets.items() if now >= t.expires]:
            del self._tickets[key]
        for s in [s for s in self._sessions.values() if not self.alive(s)]:
            self.drop(s.id)


class Limiter:
    """At most *limit* failures per key within *window* seconds.  A login
    counts as a failure from its start (so parallel guesses count) until it
    succeeds."""

    def __init__(self, limit: int, window: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self._hits: dict[str, collections.deque[float]] = {}

    def _recent(self, key: str) -> collections.deque[float]:
        hits = self._hits.get(key)
        if hits is None:
            if len(self._hits) >= MAX_LIMITER_KEYS:
                self._prune()
            hits = self._hits.setdefault(key, collections.deque())
        cutoff = self.clock() - self.window
        while hits and hits[0] <= cutoff:
            hits.popleft()
        return hits

    def blocked(self, key: str) -> bool:
        return self.limit > 0 and len(self._recent(key)) >= self.limit

    def hit(self, key: str) -> None:
        self._recent(key).append(self.clock())

    def forgive(self, key: str) -> None:
        """Take back the last hit (the login it counted succeeded)."""
        hits = self._recent(key)
        if hits:
            hits.pop()

    def _prune(self) -> None:
        cutoff = self.clock() - self.window
        for key in [k for k, h in self._hits.items() if not h or h[-1] <= cutoff]:
            del self._hits[key]
        while len(self._hits) >= MAX_LIMITER_KEYS:   # all recent: drop the oldest keys
            del self._hits[next(iter(self._hits))]


def address_key(addr: str) -> str:
    """The rate-limit key of a client address: the address, or its /64 for
    IPv6 (one host usually holds a whole /64)."""
    import ipaddress
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return addr
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)
