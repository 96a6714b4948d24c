"""The chat example's web defences, each independent of the domain and of FastAPI's routing.

* :class:`SecurityHeaders`: ASGI middleware putting a strict Content-Security-Policy and the usual framing,
  sniffing and referrer headers on every response.
* :class:`OriginCheck`: ASGI middleware refusing (403) a state-changing request that does not come from a
  page of this site, with or without a body (cross-site request forgery).
* :class:`LoginThrottle`: token buckets limiting login attempts per client address and per account.
* :class:`PasswordGate`: a bound on concurrent password checks (scrypt), so that they cannot occupy every
  worker thread of the AsyncRouter, which every other offloaded operation needs too.

The throttle and the gate live in one process's memory: under ``uvicorn --workers N`` (``python -m
examples.chat --workers N``) each worker counts and bounds separately, so a client may get up to N times
the limits, depending on which worker its connections reach.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

__all__ = ["CONTENT_SECURITY_POLICY", "SECURITY_HEADERS", "UNSAFE_METHODS", "Attempt", "LoginThrottle",
           "OriginCheck", "PasswordGate", "SecurityHeaders", "Throttled", "origin_of", "parse_origins"]

T = TypeVar("T")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The page (static/index.html) loads one module script and one style sheet from its own origin and talks to
#: its own API with fetch; it has no inline script, style or event-handler attribute, so nothing else is
#: allowed: no inline code, no eval, no plugins, no <base>, forms post only here, and no page may frame it.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

#: Sent with every response, API and static alike (names lowercase, as ASGI carries them).
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),  # frame-ancestors for browsers that predate CSP level 2
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
)


class SecurityHeaders:
    """ASGI middleware: add :data:`SECURITY_HEADERS` to every HTTP response that does not already set them.

    Wrap the outermost application (outside Starlette's error middleware) so that error pages, 413s and
    403s produced by other middleware carry them too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {bytes(name).lower() for name, _ in headers}
                headers.extend((name, value) for name, value in SECURITY_HEADERS if name not in present)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_of(url: str) -> str | None:
    """The origin of an http(s) URL as a browser serialises it, normalised for comparison:
    ``scheme://host[:port]``, scheme and host lowercase, the scheme's default port left out. None for
    anything else: another scheme, no host, a bad port, ``null`` (an opaque origin)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"{scheme}://{host}" if port in (None, _DEFAULT_PORTS[scheme]) else f"{scheme}://{host}:{port}"


class OriginCheck:
    """ASGI middleware: a request whose method is in :data:`UNSAFE_METHODS` is refused with 403, before its
    body is read, unless it names where it comes from and that is this site.

    Where it comes from: its ``Origin`` header (browsers send one with every POST, PUT, PATCH and DELETE,
    same-origin fetches included); only when there is none, the origin of its ``Referer``. Exactly one such
    header must be present, and ``Origin: null`` (sandboxed frames, ``file:`` pages) is refused. This site:
    the request's own scheme and ``Host`` header (behind a proxy, uvicorn's ``--proxy-headers`` supplies the
    client-facing scheme), or one of ``allowed_origins`` (``https://chat.example.com``, compared after
    :func:`origin_of`). GET, HEAD and OPTIONS pass untouched: the app changes nothing on them."""

    def __init__(self, app: ASGIApp, allowed_origins: Iterable[str] = ()) -> None:
        self.app = app
        self.allowed = parse_origins(allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in UNSAFE_METHODS:
            await self.app(scope, receive, send)
            return
        problem = self.problem(scope)
        if problem is None:
            await self.app(scope, receive, send)
            return
        body = json.dumps({"detail": f"cross-site request refused: {problem}"}).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def problem(self, scope: Scope) -> str | None:
        """None when the request comes from this site, else why it is refused (a sentence)."""
        found: dict[bytes, list[str]] = {b"origin": [], b"referer": [], b"host": []}
        for name, value in scope.get("headers", []):
            if name in found:
                found[name].append(value.decode("latin-1"))
        if len(found[b"origin"]) > 1 or len(found[b"referer"]) > 1:
            return "more than one Origin or Referer header"
        if found[b"origin"]:
            claimed, what = found[b"origin"][0], "Origin"
            parts = urlsplit(claimed.strip())
            source = origin_of(claimed) if not (parts.path or parts.query or parts.fragment) else None
        elif found[b"referer"]:
            claimed, what = found[b"referer"][0], "Referer"
            source = origin_of(claimed)
        else:
            return "a state-changing request needs an Origin (or Referer) header naming this site"
        if source is None:
            return f"the {what} header ({claimed[:100]!r}) names no site"
        if source in self.allowed or source == self.own_origin(scope, found[b"host"]):
            return None
        return f"the {what} header names {source}, another site"

    @staticmethod
    def own_origin(scope: Scope, hosts: list[str]) -> str | None:
        """The origin the request was sent to: its scheme and its (single) Host header."""
        if len(hosts) != 1 or not hosts[0] or any(c in hosts[0] for c in "/?#@\\"):
            return None
        return origin_of(f"{scope.get('scheme', 'http')}://{hosts[0]}")


def parse_origins(origins: Iterable[str]) -> frozenset[str]:
    """``origins`` normalised by :func:`origin_of`; ValueError for an entry that is not ``scheme://host[:port]``."""
    normal: set[str] = set()
    for origin in origins:
        parsed = origin_of(origin)
        if parsed is None or urlsplit(origin.strip()).path not in ("", "/"):
            raise ValueError(f"not an origin (scheme://host[:port]): {origin!r}")
        normal.add(parsed)
    return frozenset(normal)


# -- login throttling -------------------------------------------------------------------------------------------

class Throttled(Exception):
    """Too many login attempts: refused before any password check; ``retry_after`` whole seconds (at least 1)
    until the next attempt from the same client for the same account can be taken."""

    def __init__(self, retry_after: int, scope: str) -> None:
        super().__init__(f"too many login attempts {scope}; try again in {retry_after} "
                         f"second{'s' if retry_after != 1 else ''}")
        self.retry_after = retry_after


@dataclass
class _Bucket:
    tokens: float  # attempts left at time ``at``
    at: float


class _Buckets:
    """Token buckets of ``capacity`` attempts refilled at ``capacity / window`` per second, by key; at most
    ``max_keys`` kept, the least recently used dropped first (a full bucket carries nothing anyway)."""

    def __init__(self, capacity: int, window: float, max_keys: int) -> None:
        self.capacity, self.rate, self.max_keys = float(capacity), capacity / window, max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def level(self, key: str, now: float) -> float:
        bucket = self._buckets.get(key)
        if bucket is None:
            return self.capacity
        return min(self.capacity, bucket.tokens + max(0.0, now - bucket.at) * self.rate)

    def wait(self, key: str, now: float) -> float:
        """Seconds until ``key`` has an attempt (0 when it has one now)."""
        return max(0.0, (1.0 - self.level(key, now)) / self.rate)

    def add(self, key: str, now: float, tokens: float) -> None:
        level = min(self.capacity, self.level(key, now) + tokens)
        self._buckets.pop(key, None)
        if level >= self.capacity:
            return  # as if never seen
        self._buckets[key] = _Bucket(level, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass(frozen=True)
class Attempt:
    """One login attempt taken from the buckets of ``client`` and (when the address was valid) ``account``."""

    client: str
    account: str | None


class LoginThrottle:
    """Login attempts per client address and per account (canonical e-mail key), as token buckets in this
    process's memory: a client may make ``per_client`` attempts, and an account receive ``per_account``, in a
    burst, then one each ``window / limit`` seconds (defaults: 30 and 10 per minute).

    :meth:`begin` takes an attempt from both buckets before the password is checked, or raises
    :class:`Throttled` and takes nothing. Only failures keep counting: :meth:`succeeded` gives the client its
    attempt back (earlier failures stay counted, so logging into one's own account between guesses at
    others gains nothing) and refills the account's bucket (its owner proved the password; earlier typos
    are forgotten). An attacker can still spend an account's attempts and slow its owner's logins to one
    per ``window / per_account`` seconds: the price of bounding the guesses against any one account.

    ``clock`` (default :func:`time.monotonic`) is read for every decision; ``max_keys`` bounds the memory
    (per kind of key; past it the least recently used buckets are forgotten). Not thread-safe: call it from
    the event loop."""

    def __init__(self, *, per_client: int = 30, per_account: int = 10, window: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000) -> None:
        if per_client < 1 or per_account < 1 or not window > 0 or max_keys < 1:
            raise ValueError("login limits must be at least 1 attempt per a positive window")
        self.clock = clock
        self._clients = _Buckets(per_client, window, max_keys)
        self._accounts = _Buckets(per_account, window, max_keys)

    def begin(self, client: str, account: str | None) -> Attempt:
        """Take one attempt for ``client`` and ``account`` (None: an address that is not valid, counted
        against the client only); :class:`Throttled` when either has none left."""
        now = self.clock()
        waits = [(self._clients.wait(client, now), "from this address")]
        if account is not None:
            waits.append((self._accounts.wait(account, now), "for this account"))
        wait, scope = max(waits)
        if wait > 0:
            raise Throttled(max(1, math.ceil(wait)), scope)
        self._clients.add(client, now, -1.0)
        if account is not None:
            self._accounts.add(account, now, -1.0)
        return Attempt(client, account)

    def succeeded(self, attempt: Attempt) -> None:
        """The attempt's password was right: give the client its attempt back, refill the account's bucket."""
        now = self.clock()
        self._clients.add(attempt.client, now, 1.0)
        if attempt.account is not None:
            self._accounts.add(attempt.account, now, float("inf"))

    def tracked(self) -> tuple[int, int]:
        """(client addresses, accounts) with a bucket that is not full: the memory in use."""
        return len(self._clients), len(self._accounts)


# -- bounded password checks ------------------------------------------------------------------------------------

class PasswordGate:
    """At most ``limit`` password checks (scrypt, run on the AsyncRouter's worker threads) at once in this
    process; the others wait their turn here, on the event loop, rather than in the workers' queue, so
    the remaining workers keep serving every other offloaded operation. Keep ``limit`` below the
    AsyncRouter's ``workers`` (4 by default).

    A check that has started keeps its place until its work ends, even when its caller stops waiting
    (a cancelled request): its thread is still busy. A caller cancelled while waiting leaves the queue.
    ``active``, ``waiting``, ``peak`` (most checks at once so far) and ``started`` (checks begun) are counts
    for monitoring and tests. Create and use it on one event loop."""

    def __init__(self, limit: int = 2) -> None:
        if limit < 1:
            raise ValueError("password checks need at least one slot")
        self.limit = limit
        self._slots = asyncio.Semaphore(limit)
        self.active = self.waiting = self.peak = self.started = 0

    async def run(self, check: Callable[[], Awaitable[T]]) -> T:
        """``await check()`` once a slot is free; its result or its exception."""
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        self.started += 1
        self.peak = max(self.peak, self.active)
        task = asyncio.ensure_future(check())
        task.add_done_callback(self._release)
        return await asyncio.shield(task)

    def _release(self, task: asyncio.Future[Any]) -> None:
        self.active -= 1
        self._slots.release()
        if not task.cancelled():
            task.exception()  # retrieved here: a caller that stopped waiting never reads it
