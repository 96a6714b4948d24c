"""The chat example's web defences, each independent of the domain and of FastAPI's routing.

* :class:`SecurityHeaders`: ASGI middleware putting a strict Content-Security-Policy and the usual framing,
  sniffing and referrer headers on every response.
* :class:`OriginCheck`: ASGI middleware refusing (403) a state-changing request that does not come from a
  page of this site, with or without a body (cross-site request forgery).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

__all__ = ["CONTENT_SECURITY_POLICY", "SECURITY_HEADERS", "UNSAFE_METHODS", "OriginCheck", "SecurityHeaders",
           "origin_of", "parse_origins"]

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
