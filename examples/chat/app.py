"""The chat example's HTTP API (FastAPI) and static page. Run it with ``make demo`` or
``uvicorn --factory examples.chat.app:create_app`` (several ``--workers`` share the same files).

Routes (outside tests use these exact ones): POST /api/signup, /api/login, /api/logout; GET /api/me,
/api/users?q=; POST/GET /api/dm/{user_id}; POST /api/rooms, /api/rooms/{id}/join, /api/rooms/{id}/messages;
GET /api/rooms, /api/rooms/{id}/messages, /api/feed, /api/conversations.

Defences (``security.py``; options of :func:`create_app`): login throttling and a bound on concurrent
password checks, an Origin check on every state-changing request, security headers on every response, an
optionally Secure session cookie, and bounds on every id and paging parameter.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from shardlite import AsyncRouter, AuthenticationFailed, EmailTaken, InvalidEmail, InvalidPassword, ShardliteError

from .domain import GLOBAL_SCHEMA, MAX_TEXT, SCHEMA, Chat, Forbidden, Invalid, NotFound, User
from .security import LoginThrottle, OriginCheck, PasswordGate, SecurityHeaders, Throttled, parse_origins

__all__ = ["create_app", "COOKIE", "MAX_BODY"]

COOKIE = "shardlite_chat"
MAX_BODY = 16 * 1024  # bytes; larger request bodies are refused before they reach the database
SESSION_TTL = 7 * 24 * 3600
IDLE_TTL = 24 * 3600
STATIC = FilePath(__file__).with_name("static")
MAX_ID = 2**63 - 1  # SQLite's largest integer: user and room ids are rowids
MAX_CURSOR = 2**62  # the largest ``before`` cursor; the library's own "from the newest" value
MAX_PAGE = 200  # the largest ``limit`` of a history or feed page

# Query and path parameters, bounded so that no value can reach SQLite out of its integer range: anything
# outside these bounds (or not an integer) is a 422 with a readable message, never a 500.
UserId = Annotated[int, Path(ge=1, le=MAX_ID, description="a user id")]
RoomId = Annotated[int, Path(ge=1, le=MAX_ID, description="a room id")]
Before = Annotated[int | None, Query(ge=1, le=MAX_CURSOR, description="only entries with a smaller id")]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description="the page size")]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes, by Content-Length or while it streams in.

    The body is read (up to the limit) before the app sees any of it, then replayed, so nothing past the
    limit ever reaches a handler, and the refusal is a 413 however the body was framed."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await self._refuse(send)
                return
        buffered: list[Message] = []
        seen = 0
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > self.limit:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"detail":"request body too large"}'})


class ChatApp(FastAPI):
    """FastAPI with :class:`~examples.chat.security.SecurityHeaders` around its whole middleware stack,
    Starlette's error middleware included, so that every response carries the security headers, a 500 too."""

    def build_middleware_stack(self) -> Any:
        return SecurityHeaders(super().build_middleware_stack())


class Signup(BaseModel):
    email: str = Field(max_length=320)
    password: str = Field(max_length=1024)
    name: str = Field(min_length=1, max_length=80)


class Login(BaseModel):
    email: str = Field(max_length=320)
    password: str = Field(max_length=1024)


class Text(BaseModel):
    text: str = Field(max_length=MAX_TEXT * 2)


class RoomName(BaseModel):
    name: str = Field(max_length=200)


def create_app(root: str | None = None, *, relay: bool | None = None, secure_cookies: bool | None = None,
               allowed_origins: Iterable[str] | None = None, login_attempts_per_client: int = 30,
               login_attempts_per_account: int = 10, login_window: float = 60.0, password_checks: int = 2,
               throttle_clock: Callable[[], float] = time.monotonic) -> FastAPI:
    """The app on ``root`` (default ``$SHARDLITE_ROOT`` or ``./data``), running the relay in-process unless
    ``relay=False`` (default: ``$CHAT_RELAY`` is not ``0``; then ``examples.chat.relay`` delivers instead).

    Logins are throttled (:class:`~examples.chat.security.LoginThrottle`) before any password is checked:
    ``login_attempts_per_client`` per client address and ``login_attempts_per_account`` per account (its
    canonical e-mail key) per ``login_window`` seconds, as token buckets, failed attempts only; past them
    ``/api/login`` answers 429 with ``Retry-After`` and ``{"detail", "retry_after"}``. The counts live in
    this process (each ``--workers`` process counts separately) and the address is the one uvicorn reports
    (behind a proxy, run uvicorn with ``--proxy-headers --forwarded-allow-ips`` for the proxy, or every
    client shares the proxy's address). ``throttle_clock`` is the throttle's clock (seconds, monotonic).
    At most ``password_checks`` sign-up or login password checks (scrypt) run at once
    (:class:`~examples.chat.security.PasswordGate`), so the AsyncRouter's other worker threads keep
    serving everything else during a flood of logins.

    Every POST, PUT, PATCH and DELETE must name this site in its Origin header (or, without one, its
    Referer), else 403 (:class:`~examples.chat.security.OriginCheck`): the request's own scheme and Host, or
    one of ``allowed_origins`` (default: ``$CHAT_ALLOWED_ORIGINS``, comma-separated), e.g. the public
    ``https://`` origin when a proxy in front changes the scheme or the host. Browsers send Origin by
    themselves; other HTTP clients must set it (``examples/chat/load.py`` does).

    ``secure_cookies=True`` (default: ``$CHAT_SECURE_COOKIES`` is ``1``) marks the session cookie ``Secure``,
    so browsers send it over HTTPS only: set it whenever the app is served through TLS (a proxy in front
    included), and not on plain http://, where browsers would then never send the session back. The cookie
    is always HttpOnly and SameSite=Strict."""
    data_root = root or os.environ.get("SHARDLITE_ROOT", "./data")
    if relay is None:
        relay = os.environ.get("CHAT_RELAY", "1") != "0"
    if secure_cookies is None:
        secure_cookies = os.environ.get("CHAT_SECURE_COOKIES", "0") == "1"
    if allowed_origins is None:
        allowed_origins = [o for o in os.environ.get("CHAT_ALLOWED_ORIGINS", "").split(",") if o.strip()]
    origins = parse_origins(allowed_origins)  # a malformed entry fails here, not at the first request
    throttle = LoginThrottle(per_client=login_attempts_per_client, per_account=login_attempts_per_account,
                             window=login_window, clock=throttle_clock)
    if password_checks < 1:
        raise ValueError("password_checks must be at least 1")
    cookie_flags: dict[str, Any] = {"path": "/", "httponly": True, "samesite": "strict", "secure": secure_cookies}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ar = AsyncRouter(data_root, schema=SCHEMA, global_schema=GLOBAL_SCHEMA, relay=relay)
        await ar.__aenter__()
        app.state.chat = Chat(ar)
        app.state.password_gate = PasswordGate(password_checks)  # on the loop that serves the requests
        try:
            yield
        finally:
            await ar.aclose()

    # No interactive /docs or /redoc: their pages run inline and third-party scripts, which the page's
    # Content-Security-Policy refuses. The schema stays at /openapi.json.
    app = ChatApp(title="shardlite chat", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.login_throttle = throttle

    def chat(request: Request) -> Chat:
        return request.app.state.chat  # type: ignore[no-any-return]

    def password_gate(request: Request) -> PasswordGate:
        return request.app.state.password_gate  # type: ignore[no-any-return]

    async def current_user(request: Request, service: Chat = Depends(chat)) -> User:
        session = await service.ar.sessions.resolve(request.cookies.get(COOKIE))
        if session is None:
            raise HTTPException(401, "log in first")
        try:
            return await service.user(session.account_id)
        except NotFound:
            raise HTTPException(401, "log in first") from None

    @app.exception_handler(NotFound)
    async def not_found(_: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(Forbidden)
    async def forbidden(_: Request, exc: Forbidden) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=403)

    @app.exception_handler(Invalid)
    async def invalid(_: Request, exc: Invalid) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def unreadable(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"detail": problems or "invalid request"}, status_code=422)

    @app.exception_handler(Throttled)
    async def throttled(_: Request, exc: Throttled) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "retry_after": exc.retry_after}, status_code=429,
                            headers={"Retry-After": str(exc.retry_after)})

    @app.post("/api/signup", status_code=201)
    async def signup(body: Signup, service: Chat = Depends(chat),
                     gate: PasswordGate = Depends(password_gate)) -> dict[str, Any]:
        try:
            uid = await gate.run(lambda: service.ar.accounts.register(body.email, password=body.password,
                                                                      name=body.name.strip()))
        except EmailTaken:
            raise HTTPException(409, "this e-mail address is already registered") from None
        except (InvalidEmail, InvalidPassword) as exc:
            raise HTTPException(422, str(exc)) from None
        return {"id": uid}

    @app.post("/api/login")
    async def login(body: Login, request: Request, response: Response, service: Chat = Depends(chat),
                    gate: PasswordGate = Depends(password_gate)) -> dict[str, Any]:
        try:
            account: str | None = service.ar.accounts.sync.key(body.email)
        except InvalidEmail:
            account = None  # counted against the client only
        attempt = throttle.begin(request.client.host if request.client else "", account)  # or 429
        try:
            uid = await gate.run(lambda: service.ar.accounts.authenticate(body.email, body.password))
        except AuthenticationFailed:
            raise HTTPException(401, "wrong e-mail address or password") from None
        throttle.succeeded(attempt)
        token = await service.ar.sessions.create(uid, ttl=SESSION_TTL, idle_ttl=IDLE_TTL)
        response.set_cookie(COOKIE, token, max_age=SESSION_TTL, **cookie_flags)
        user = await service.user(uid)
        return {"id": user.id, "name": user.name}

    @app.post("/api/logout")
    async def logout(request: Request, response: Response, service: Chat = Depends(chat)) -> dict[str, Any]:
        await service.ar.sessions.revoke(request.cookies.get(COOKIE))
        response.delete_cookie(COOKIE, **cookie_flags)  # the same attributes, or a browser may keep it
        return {"ok": True}

    @app.get("/api/me")
    async def me(user: User = Depends(current_user)) -> dict[str, Any]:
        return {"id": user.id, "name": user.name}

    @app.get("/api/users")
    async def users(q: str = "", user: User = Depends(current_user), service: Chat = Depends(chat)) -> list[Any]:
        return [u for u in await service.find_users(q) if u["id"] != user.id]

    @app.post("/api/dm/{user_id}", status_code=201)
    async def send_dm(user_id: UserId, body: Text, user: User = Depends(current_user),
                      service: Chat = Depends(chat)) -> dict[str, Any]:
        return await service.send_dm(user, user_id, body.text)

    @app.get("/api/dm/{user_id}")
    async def dm_history(user_id: UserId, before: Before = None, limit: Limit = 50,
                         user: User = Depends(current_user), service: Chat = Depends(chat)) -> list[Any]:
        return await service.dm_history(user, user_id, before=before, limit=limit)

    @app.get("/api/rooms")
    async def rooms(user: User = Depends(current_user), service: Chat = Depends(chat)) -> list[Any]:
        return await service.rooms()

    @app.post("/api/rooms", status_code=201)
    async def create_room(body: RoomName, user: User = Depends(current_user),
                          service: Chat = Depends(chat)) -> dict[str, Any]:
        return await service.create_room(user, body.name)

    @app.post("/api/rooms/{room_id}/join")
    async def join_room(room_id: RoomId, user: User = Depends(current_user),
                        service: Chat = Depends(chat)) -> dict[str, Any]:
        return await service.join_room(user, room_id)

    @app.post("/api/rooms/{room_id}/messages", status_code=201)
    async def post_room(room_id: RoomId, body: Text, user: User = Depends(current_user),
                        service: Chat = Depends(chat)) -> dict[str, Any]:
        return await service.post_room(user, room_id, body.text)

    @app.get("/api/rooms/{room_id}/messages")
    async def room_history(room_id: RoomId, before: Before = None, limit: Limit = 50,
                           user: User = Depends(current_user), service: Chat = Depends(chat)) -> list[Any]:
        return await service.room_history(user, room_id, before=before, limit=limit)

    @app.get("/api/feed")
    async def feed(before: Before = None, limit: Limit = 50, user: User = Depends(current_user),
                   service: Chat = Depends(chat)) -> list[Any]:
        return await service.feed(user, before=before, limit=limit)

    @app.get("/api/conversations")
    async def conversations(user: User = Depends(current_user), service: Chat = Depends(chat)) -> list[Any]:
        return await service.conversations(user)

    @app.exception_handler(ShardliteError)
    async def shardlite_error(_: Request, exc: ShardliteError) -> JSONResponse:
        return JSONResponse({"detail": f"{type(exc).__name__}: {exc}"}, status_code=503)

    app.mount("/", StaticFiles(directory=STATIC, html=True), name="static")
    app.add_middleware(BodyLimit, limit=MAX_BODY)
    # added last, so it runs first: a cross-site request is refused before its body is read
    app.add_middleware(OriginCheck, allowed_origins=origins)
    return app
