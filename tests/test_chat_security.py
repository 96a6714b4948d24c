"""The chat example's defences (examples/chat/app.py, examples/chat/security.py), through FastAPI's TestClient
against the real app on a fresh data root, as in tests/test_chat_api.py.

* history and feed parameters and path ids are bounded: out-of-range values are 422, never a 500;
* every response, API or static, error or not, carries the Content-Security-Policy and framing headers;
* ``secure_cookies`` (``--secure-cookies``, ``CHAT_SECURE_COOKIES=1``) marks the session cookie Secure;
* every POST/PUT/PATCH/DELETE must name this site in Origin (or Referer), with or without a body, else 403
  and nothing changes;
* logins are throttled per client address and per account before any password is hashed (429 with
  Retry-After), on an injected clock; only failures count;
* at most ``password_checks`` password checks run at once, so other requests are served during a flood.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `examples` is a top-level directory, not an installed package
    sys.path.insert(0, str(REPO))

from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from test_chat_api import COOKIE, ORIGIN, PASSWORD, member, readable, set_cookie_attrs, signup  # noqa: E402

from examples.chat.app import MAX_BODY, MAX_CURSOR, MAX_ID, MAX_PAGE, create_app  # noqa: E402
from examples.chat.security import CONTENT_SECURITY_POLICY, LoginThrottle, origin_of, parse_origins  # noqa: E402

DEADLINE = 15.0
HTTPS = "https://testserver"


@pytest.fixture
def app(tmp_path: pathlib.Path) -> FastAPI:
    return create_app(str(tmp_path / "data"))


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    """A client that reports a server error as a 500 response instead of raising it."""
    with TestClient(app, raise_server_exceptions=False, headers={"Origin": ORIGIN}) as c:
        yield c


def poll(fetch: Any, done: Any, what: str) -> Any:
    end = time.monotonic() + DEADLINE
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() > end:
            pytest.fail(f"{what}: not reached within {DEADLINE}s; last value {value!r}")
        time.sleep(0.02)


# -- query and path parameters -------------------------------------------------------------------------------

BAD_PAGES: list[tuple[dict[str, Any], str]] = [
    ({"before": 2**63}, "before"),  # one past SQLite's integers: was an OverflowError, HTTP 500
    ({"before": 2**64}, "before"),
    ({"before": MAX_CURSOR + 1}, "before"),
    ({"before": 0}, "before"),
    ({"before": -1}, "before"),
    ({"before": "abc"}, "before"),
    ({"before": "1.5"}, "before"),
    ({"limit": 0}, "limit"),
    ({"limit": -5}, "limit"),
    ({"limit": MAX_PAGE + 1}, "limit"),
    ({"limit": 10**30}, "limit"),
    ({"limit": "many"}, "limit"),
]


def test_history_and_feed_parameters_out_of_range_are_422(client: TestClient) -> None:
    """Every paged route, with its tenant present (so a bad value would reach SQLite): 422 naming the
    parameter, and the server keeps answering."""
    me = member(client, "alice@example.com", "Alice")
    assert client.post(f"/api/dm/{me}", json={"text": "note to self"}).status_code == 201
    room = client.post("/api/rooms", json={"name": "general"}).json()["id"]
    assert client.post(f"/api/rooms/{room}/messages", json={"text": "hello room"}).status_code == 201
    poll(lambda: client.get("/api/feed").json(), lambda items: len(items) == 2, "alice's feed")
    paths = [f"/api/dm/{me}", f"/api/rooms/{room}/messages", "/api/feed"]
    for path in paths:
        for params, name in BAD_PAGES:
            r = client.get(path, params=params)
            assert r.status_code == 422, (path, params, r.status_code, r.text)
            readable(r, name)
        # the edges of the ranges are accepted
        for params in ({"before": MAX_CURSOR}, {"before": 1}, {"limit": 1}, {"limit": MAX_PAGE},
                       {"before": MAX_CURSOR, "limit": MAX_PAGE}):
            r = client.get(path, params=params)
            assert r.status_code == 200, (path, params, r.text)
        assert len(client.get(path, params={"before": MAX_CURSOR, "limit": 1}).json()) == 1
        assert client.get(path, params={"before": 1}).json() == []


BAD_IDS: list[object] = [0, -1, 2**63, 2**64, 10**30, "abc", "1.5", "1e3"]


def test_path_ids_out_of_range_are_422(client: TestClient) -> None:
    member(client, "alice@example.com", "Alice")
    room = client.post("/api/rooms", json={"name": "general"}).json()["id"]
    for bad in BAD_IDS:
        for method, path, body, name in (("GET", f"/api/dm/{bad}", None, "user_id"),
                                         ("POST", f"/api/dm/{bad}", {"text": "hi"}, "user_id"),
                                         ("POST", f"/api/rooms/{bad}/join", None, "room_id"),
                                         ("GET", f"/api/rooms/{bad}/messages", None, "room_id"),
                                         ("POST", f"/api/rooms/{bad}/messages", {"text": "hi"}, "room_id")):
            r = client.request(method, path, json=body)
            assert r.status_code == 422, (method, path, r.status_code, r.text)
            readable(r, name)
    # the largest possible id is a well-formed id of nobody
    for method, path in (("GET", f"/api/dm/{MAX_ID}"), ("POST", f"/api/rooms/{MAX_ID}/join"),
                         ("GET", f"/api/rooms/{MAX_ID}/messages")):
        assert client.request(method, path).status_code == 404, (method, path)
    assert client.get(f"/api/rooms/{room}/messages").json() == []


# -- security headers ------------------------------------------------------------------------------------------

def assert_security_headers(r: Any) -> None:
    where = (r.request.method, str(r.request.url), r.status_code)
    assert r.headers.get("content-security-policy") == CONTENT_SECURITY_POLICY, where
    assert r.headers.get("x-frame-options") == "DENY", where
    assert r.headers.get("x-content-type-options") == "nosniff", where
    assert r.headers.get("referrer-policy") == "same-origin", where
    assert len(r.headers.get_list("content-security-policy")) == 1, where


def test_content_security_policy_is_strict() -> None:
    """Only this origin, no inline code or eval, never framed."""
    directives = {d.split()[0]: d.split()[1:] for d in CONTENT_SECURITY_POLICY.split(";")}
    assert directives["default-src"] == ["'self'"]
    assert directives["frame-ancestors"] == ["'none'"]
    assert directives["object-src"] == ["'none'"]
    assert directives["base-uri"] == ["'none'"]
    for name, sources in directives.items():
        assert not {"'unsafe-inline'", "'unsafe-eval'", "*", "data:", "http:", "https:"} & set(sources), name


def test_every_response_carries_the_security_headers(app: FastAPI, client: TestClient) -> None:
    responses = [client.get("/"), client.get("/index.html"), client.get("/app.js"), client.get("/style.css"),
                 client.get("/no-such-file"), client.get("/api/me"), client.get("/openapi.json"),
                 client.post("/api/login", json={"email": "nobody@example.com", "password": "wrong password"}),
                 client.post("/api/signup", json={"email": "bad"}),
                 client.post("/api/signup", content=b"x" * (MAX_BODY + 1)),
                 client.get("/api/feed", params={"before": 2**63})]
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 404, 401, 200, 401, 422, 413, 401]
    member(client, "alice@example.com", "Alice")
    responses += [client.get("/api/me"), client.get("/api/feed", params={"before": 2**63}),
                  client.post("/api/rooms", json={"name": "general"}), client.post("/api/logout")]
    assert [r.status_code for r in responses[-4:]] == [200, 422, 201, 200]
    for r in responses:
        assert_security_headers(r)


def test_an_unhandled_error_carries_the_security_headers(app: FastAPI, client: TestClient) -> None:
    """Even the 500 written by Starlette's outermost error middleware."""
    from fastapi.routing import APIRoute

    def broken() -> None:
        raise RuntimeError("a bug in a handler")

    app.router.routes.insert(0, APIRoute("/api/broken", broken))  # ahead of the static mount at /
    r = client.get("/api/broken")
    assert r.status_code == 500
    assert_security_headers(r)


def test_the_interactive_docs_are_off(client: TestClient) -> None:
    """/docs and /redoc would need inline and third-party scripts: they are not served (the page's own 404)."""
    for path in ("/docs", "/redoc"):
        r = client.get(path)
        assert r.status_code == 404, (path, r.text[:200])
        assert "swagger" not in r.text.lower() and "redoc" not in r.text.lower()


# -- the session cookie ----------------------------------------------------------------------------------------

def deletion_attrs(response: Any) -> dict[str, str]:
    attrs = set_cookie_attrs(response)
    assert attrs.get("max-age") == "0" or "expires" in attrs, attrs  # a deletion
    return attrs


def test_secure_cookies_mark_the_session_cookie_secure(tmp_path: pathlib.Path) -> None:
    app = create_app(str(tmp_path / "data"), secure_cookies=True)
    with TestClient(app, base_url=HTTPS, headers={"Origin": HTTPS}) as c:  # Secure cookies: over https only
        uid = signup(c, "alice@example.com", "Alice")
        r = c.post("/api/login", json={"email": "alice@example.com", "password": PASSWORD})
        assert r.status_code == 200, r.text
        attrs = set_cookie_attrs(r)
        assert "secure" in attrs and "httponly" in attrs, attrs
        assert attrs.get("samesite", "").lower() == "strict" and attrs.get("path") == "/"
        assert c.get("/api/me").json()["id"] == uid
        r = c.post("/api/logout")
        assert r.status_code == 200
        attrs = deletion_attrs(r)
        assert "secure" in attrs and "httponly" in attrs and attrs.get("samesite", "").lower() == "strict"
        assert c.get("/api/me").status_code == 401


def test_cookies_are_not_secure_by_default(client: TestClient) -> None:
    """Plain http:// (``make demo``): a Secure cookie would never come back, so it is off unless asked for."""
    signup(client, "alice@example.com", "Alice")
    r = client.post("/api/login", json={"email": "alice@example.com", "password": PASSWORD})
    attrs = set_cookie_attrs(r)
    assert "secure" not in attrs and "httponly" in attrs and attrs.get("samesite", "").lower() == "strict"
    attrs = deletion_attrs(client.post("/api/logout"))
    assert "secure" not in attrs and "httponly" in attrs


def test_secure_cookies_from_the_environment(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for value, secure in (("1", True), ("0", False)):
        monkeypatch.setenv("CHAT_SECURE_COOKIES", value)
        with TestClient(create_app(str(tmp_path / f"data{value}")), base_url=HTTPS, headers={"Origin": HTTPS}) as c:
            signup(c, "alice@example.com", "Alice")
            r = c.post("/api/login", json={"email": "alice@example.com", "password": PASSWORD})
            assert ("secure" in set_cookie_attrs(r)) is secure, (value, r.headers)


@pytest.mark.slow
def test_secure_cookies_flag_of_the_server(tmp_path: pathlib.Path) -> None:
    """``python -m examples.chat --secure-cookies``: its (uvicorn worker) app sets Secure cookies."""
    import httpx
    from test_chat_workers import Server

    server = Server(tmp_path / "data", tmp_path / "server.log", workers=1, args=("--secure-cookies",))
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=30, headers={"Origin": server.url}) as c:
            assert c.post("/api/signup", json={"email": "a@example.com", "password": PASSWORD,
                                              "name": "A"}).status_code == 201
            r = c.post("/api/login", json={"email": "a@example.com", "password": PASSWORD})
            assert r.status_code == 200, r.text
            assert "secure" in set_cookie_attrs(r), r.headers
    finally:
        server.stop()


# -- cross-site request forgery: the Origin check ---------------------------------------------------------------

FOREIGN: list[dict[str, str]] = [
    {},  # neither Origin nor Referer
    {"Origin": "http://evil.example"},
    {"Origin": "null"},  # sandboxed frame, file: page
    {"Origin": "https://testserver"},  # another scheme
    {"Origin": "http://testserver:8080"},  # another port
    {"Origin": "http://testserver.evil.example"},
    {"Origin": "http://evil.example", "Referer": "http://testserver/"},  # Origin wins when present
    {"Origin": "http://testserver/some/path"},  # not an origin
    {"Origin": "testserver"},
    {"Referer": "http://evil.example/page"},
    {"Referer": "http://evil.example/?u=http://testserver/"},
    {"Referer": "not a url"},
]


def send(c: TestClient, method: str, path: str, headers: dict[str, str], body: Any = None) -> Any:
    """``method path`` with exactly ``headers`` as Origin/Referer (the client's default Origin removed)."""
    request = c.build_request(method, path, json=body, headers=headers)
    if "Origin" not in headers:
        del request.headers["Origin"]
    return c.send(request)


def test_state_changes_from_another_site_are_refused(app: FastAPI, client: TestClient) -> None:
    """Each POST route (body-less logout and room join included), and the other unsafe methods on any path:
    403 with a readable reason unless the request names this site, and nothing happened."""
    alice_id = member(client, "alice@example.com", "Alice")
    token = client.cookies[COOKIE]
    room = client.post("/api/rooms", json={"name": "general"}).json()["id"]
    bob = TestClient(app, headers={"Origin": ORIGIN})
    bob.portal = client.portal
    try:
        bob_id = member(bob, "bob@example.com", "Bob")
        attempts: list[tuple[TestClient, str, str, Any]] = [
            (client, "POST", "/api/logout", None),
            (bob, "POST", f"/api/rooms/{room}/join", None),
            (client, "POST", f"/api/dm/{bob_id}", {"text": "forged"}),
            (client, "POST", f"/api/rooms/{room}/messages", {"text": "forged"}),
            (client, "POST", "/api/rooms", {"name": "forged"}),
            (client, "POST", "/api/signup", {"email": "eve@example.com", "password": PASSWORD, "name": "Eve"}),
            (bob, "POST", "/api/login", {"email": "alice@example.com", "password": PASSWORD}),
            (client, "PUT", "/api/rooms", {"name": "forged"}),
            (client, "PATCH", f"/api/rooms/{room}", {"name": "forged"}),
            (client, "DELETE", f"/api/rooms/{room}", None),
            (client, "POST", "/index.html", None),
        ]
        for headers in FOREIGN:
            for who, method, path, body in attempts:
                r = send(who, method, path, headers, body)
                assert r.status_code == 403, (headers, method, path, r.status_code, r.text)
                readable(r, "cross-site")
                assert not r.headers.get_list("set-cookie"), (headers, path)
        # nothing changed: Alice is still logged in with the same session, Bob never joined, nothing was sent
        assert client.cookies[COOKIE] == token and client.get("/api/me").json()["id"] == alice_id
        assert bob.get(f"/api/rooms/{room}/messages").status_code == 403
        assert client.get(f"/api/dm/{bob_id}").json() == []
        assert client.get(f"/api/rooms/{room}/messages").json() == []
        assert client.get("/api/rooms").json() == [{"id": room, "name": "general"}]
        assert client.get("/api/users", params={"q": "eve"}).json() == []
        # reads need no Origin
        assert send(client, "GET", "/api/me", {}).status_code == 200
        assert send(client, "GET", "/", {"Origin": "http://evil.example"}).status_code == 200
    finally:
        bob.close()


def test_state_changes_from_this_site_pass(client: TestClient) -> None:
    """This site's origin in any spelling a browser may use, or only a same-site Referer."""
    alice_id = member(client, "alice@example.com", "Alice")
    room = client.post("/api/rooms", json={"name": "general"}).json()["id"]
    for n, headers in enumerate([{"Origin": "http://testserver"}, {"Origin": "HTTP://TestServer"},
                                 {"Origin": "http://testserver:80"}, {"Referer": "http://testserver/"},
                                 {"Referer": "http://testserver/index.html?x=1#y"}]):
        r = send(client, "POST", f"/api/dm/{alice_id}", headers, {"text": f"note {n}"})
        assert r.status_code == 201, (headers, r.text)
        assert send(client, "POST", f"/api/rooms/{room}/join", headers).status_code == 200, headers
    assert len(client.get(f"/api/dm/{alice_id}").json()) == 5
    r = send(client, "POST", "/api/logout", {"Referer": "http://testserver/"})
    assert r.status_code == 200 and client.get("/api/me").status_code == 401


def test_a_cross_site_body_is_refused_before_it_is_read(client: TestClient) -> None:
    """403, not 413: the Origin check runs before the body limit reads anything."""
    r = send(client, "POST", "/api/signup", {"Origin": "http://evil.example"}, {"padding": "p" * (MAX_BODY * 2)})
    assert r.status_code == 403, r.text


def test_allowed_origins(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The allow-list adds origins (a proxy's public one) to the request's own; nothing else passes."""
    monkeypatch.setenv("CHAT_ALLOWED_ORIGINS", "https://env.example")
    for app, extra in ((create_app(str(tmp_path / "a"), allowed_origins=["https://chat.example.com:443/"]),
                        "https://chat.example.com"),
                       (create_app(str(tmp_path / "b")), "https://env.example")):
        with TestClient(app, headers={"Origin": ORIGIN}) as c:
            for n, origin in enumerate((extra, ORIGIN)):
                email = f"user{n}@example.com"
                r = send(c, "POST", "/api/signup", {"Origin": origin}, {"email": email, "password": PASSWORD,
                                                                     "name": "U"})
                assert r.status_code == 201, (origin, r.text)
            for origin in ("https://chat.example.org", "http://chat.example.com", "https://env.example.com"):
                r = send(c, "POST", "/api/signup", {"Origin": origin}, {"email": "x@example.com",
                                                                     "password": PASSWORD, "name": "X"})
                assert r.status_code == 403, (origin, r.text)
    for bad in ("chat.example.com", "https://chat.example.com/app", "ftp://chat.example.com", "null", ""):
        with pytest.raises(ValueError, match="not an origin"):
            create_app(str(tmp_path / "c"), allowed_origins=[bad])


def test_origin_of() -> None:
    assert origin_of("http://Example.COM") == "http://example.com"
    assert origin_of("https://example.com:443/x?y#z") == "https://example.com"
    assert origin_of("http://example.com:8000") == "http://example.com:8000"
    assert origin_of("http://[::1]:8000/") == "http://[::1]:8000"
    assert origin_of("http://user@example.com/") == "http://example.com"
    for bad in ("null", "", "example.com", "javascript:alert(1)", "file:///etc/passwd", "http://example.com:99999",
                "http://"):
        assert origin_of(bad) is None, bad
    assert parse_origins(["https://A.example", "https://a.example:443"]) == frozenset({"https://a.example"})


# -- login throttling ------------------------------------------------------------------------------------------

class Clock:
    """The throttle's clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextlib.contextmanager
def throttled_app(tmp_path: pathlib.Path, **options: Any) -> Iterator[tuple[FastAPI, Clock,
                                                                             Callable[[str], TestClient]]]:
    """(app, its throttle's clock, ``at(address)``: a client on the running app from that address)."""
    clock = Clock()
    app = create_app(str(tmp_path / "data"), throttle_clock=clock, **options)
    made: list[TestClient] = []
    with TestClient(app, headers={"Origin": ORIGIN}, client=("192.0.2.1", 50000)) as first:
        def at(address: str) -> TestClient:
            c = TestClient(app, headers={"Origin": ORIGIN}, client=(address, 50000))
            c.portal = first.portal  # the lifespan's event loop
            made.append(c)
            return c

        try:
            yield app, clock, at
        finally:
            for c in made:
                c.close()


def attempt(c: TestClient, email: str, password: str = PASSWORD) -> Any:
    return c.post("/api/login", json={"email": email, "password": password})


def assert_throttled(r: Any, seconds: int) -> None:
    assert r.status_code == 429, r.text
    assert r.headers["retry-after"] == str(seconds), r.headers
    assert r.json()["retry_after"] == seconds
    readable(r, "too many login attempts", f"try again in {seconds} second")
    assert not r.headers.get_list("set-cookie")


def checks(app: FastAPI) -> int:
    """Password checks started so far (sign-ups and logins)."""
    return int(app.state.password_gate.started)


def test_guesses_at_one_account_are_throttled_before_hashing(tmp_path: pathlib.Path) -> None:
    """10 per minute per account, whichever addresses they come from; the 11th is a 429 that hashes nothing,
    even with the right password; one more attempt per 6 s after that."""
    with throttled_app(tmp_path) as (app, clock, at):
        signup(at("192.0.2.1"), "alice@example.com", "Alice")
        for i in range(10):
            assert attempt(at(f"198.51.100.{i}"), "alice@example.com", "wrong password").status_code == 401
        before = checks(app)
        for address, email, password in (("198.51.100.50", "alice@example.com", "wrong password"),
                                         ("198.51.100.51", "ALICE@example.com", PASSWORD),  # same account key
                                         ("198.51.100.52", "\uff41lice@example.com", "wrong password")):
            assert_throttled(attempt(at(address), email, password), 6)
        assert checks(app) == before  # refused before any scrypt ran
        clock.now += 5.9
        assert_throttled(attempt(at("198.51.100.53"), "alice@example.com"), 1)
        clock.now += 0.1
        c = at("198.51.100.54")
        assert attempt(c, "alice@example.com").status_code == 200  # the owner, as soon as an attempt is free
        assert c.get("/api/me").json()["name"] == "Alice"
        # other accounts were never limited
        signup(at("192.0.2.1"), "bob@example.com", "Bob")
        assert attempt(at("198.51.100.55"), "bob@example.com").status_code == 200


def test_guesses_from_one_address_are_throttled_before_hashing(tmp_path: pathlib.Path) -> None:
    """30 per minute per client address across accounts, invalid addresses included; others unaffected."""
    with throttled_app(tmp_path) as (app, clock, at):
        signup(at("192.0.2.1"), "alice@example.com", "Alice")
        mallory = at("203.0.113.9")
        for i in range(30):
            email = f"user{i}@example.com" if i % 3 else f"not an address {i}"
            assert attempt(mallory, email, "wrong password").status_code == 401
        before = checks(app)
        assert_throttled(attempt(mallory, "someone@example.com", "wrong password"), 2)
        assert_throttled(attempt(mallory, "not an address", "wrong password"), 2)
        assert_throttled(attempt(mallory, "alice@example.com"), 2)
        assert checks(app) == before
        assert attempt(at("203.0.113.10"), "alice@example.com").status_code == 200  # another address
        clock.now += 2
        assert attempt(mallory, "nobody@example.com", "wrong password").status_code == 401
        assert_throttled(attempt(mallory, "nobody2@example.com", "wrong password"), 2)
        clock.now += 60
        for i in range(30):  # the whole burst is back after a window
            assert attempt(mallory, f"late{i}@example.com", "wrong password").status_code == 401


def test_successful_logins_are_not_locked_out_by_typos(tmp_path: pathlib.Path) -> None:
    with throttled_app(tmp_path) as (_, _, at):
        c = at("192.0.2.7")
        signup(c, "alice@example.com", "Alice")
        for _ in range(3):
            assert attempt(c, "alice@example.com", "typo typo typo").status_code == 401
        assert attempt(c, "alice@example.com").status_code == 200
        # the success forgot the typos: nine more and the right password still passes
        for _ in range(9):
            assert attempt(c, "alice@example.com", "typo typo typo").status_code == 401
        assert attempt(c, "alice@example.com").status_code == 200
        # successes never count: many logins from one address (a household, a load test) all pass
        for _ in range(31):
            assert attempt(c, "alice@example.com").status_code == 200


def test_a_success_does_not_forgive_an_address_its_failures(tmp_path: pathlib.Path) -> None:
    """Logging into one's own account between guesses at others gains no guesses."""
    with throttled_app(tmp_path) as (_, _, at):
        mallory = at("203.0.113.9")
        signup(mallory, "mallory@example.com", "Mallory")
        for i in range(29):
            assert attempt(mallory, f"victim{i}@example.com", "guess guess").status_code == 401
            if i % 10 == 0:
                assert attempt(mallory, "mallory@example.com").status_code == 200
        assert attempt(mallory, "victim29@example.com", "guess guess").status_code == 401
        assert_throttled(attempt(mallory, "victim30@example.com", "guess guess"), 2)
        assert_throttled(attempt(mallory, "mallory@example.com"), 2)


def test_login_limits_are_configurable(tmp_path: pathlib.Path) -> None:
    with throttled_app(tmp_path, login_attempts_per_account=2, login_attempts_per_client=3,
                       login_window=10.0) as (_, clock, at):
        c = at("192.0.2.7")
        for _ in range(2):
            assert attempt(c, "alice@example.com", "wrong password").status_code == 401
        assert_throttled(attempt(at("192.0.2.8"), "alice@example.com", "wrong password"), 5)
        assert attempt(c, "bob@example.com", "wrong password").status_code == 401
        assert_throttled(attempt(c, "carol@example.com", "wrong password"), 4)  # 10 s / 3, rounded up
        clock.now += 10
        assert attempt(c, "alice@example.com", "wrong password").status_code == 401
    for bad in ({"login_attempts_per_client": 0}, {"login_attempts_per_account": 0}, {"login_window": 0},
                {"password_checks": 0}):
        with pytest.raises(ValueError):
            create_app(str(tmp_path / "other"), **bad)


def test_the_throttle_forgets_full_buckets_and_bounds_its_memory() -> None:
    clock = Clock()
    throttle = LoginThrottle(per_client=2, per_account=2, window=10.0, clock=clock, max_keys=100)
    for i in range(1000):
        throttle.begin(f"client{i}", f"account{i}")
    assert throttle.tracked() == (100, 100)
    clock.now += 10  # every bucket refilled: nothing left to remember once touched
    for i in range(900, 1000):
        throttle.succeeded(throttle.begin(f"client{i}", f"account{i}"))
    assert throttle.tracked() == (0, 0)


# -- bounded password checks -------------------------------------------------------------------------------------

FLOOD = 16


def test_a_login_flood_leaves_workers_for_other_requests(tmp_path: pathlib.Path) -> None:
    """FLOOD logins from FLOOD addresses at once (each a scrypt on the AsyncRouter's worker threads, 4 of
    them): at most ``password_checks`` (2) run at once, the rest wait on the event loop, so a write that needs
    a worker (a first DM: its tenant is created there) is served while the flood is still queued. Without
    the bound every check sits in the workers' queue ahead of the write, which would then be answered only
    after at least FLOOD - 4 of the logins. The assertion is on order, not on time."""
    import httpx

    with throttled_app(tmp_path) as (app, _, at):
        alice = at("192.0.2.1")
        member(alice, "alice@example.com", "Alice")
        bob_id = signup(alice, "bob@example.com", "Bob")
        gate = app.state.password_gate
        assert gate.limit == 2

        async def flood() -> tuple[int, int, list[int]]:
            clients = [httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(f"198.51.100.{i}", 5000)),
                                         base_url=ORIGIN, headers={"Origin": ORIGIN}) for i in range(FLOOD)]
            writer = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("192.0.2.1", 5000)),
                                       base_url=ORIGIN, headers={"Origin": ORIGIN}, cookies=dict(alice.cookies))
            try:
                logins = [asyncio.ensure_future(c.post("/api/login", json={"email": f"nobody{i}@example.com",
                                                                           "password": "wrong password"}))
                          for i, c in enumerate(clients)]
                while gate.active + gate.waiting < FLOOD:  # every login has reached the gate
                    await asyncio.sleep(0.001)
                    assert not any(t.done() for t in logins), [t.result() for t in logins if t.done()]
                r = await writer.post(f"/api/dm/{bob_id}", json={"text": "during the flood"})
                finished = sum(t.done() for t in logins)
                statuses = [response.status_code for response in await asyncio.gather(*logins)]
                return r.status_code, finished, statuses
            finally:
                for c in [*clients, writer]:
                    await c.aclose()

        status, finished, statuses = alice.portal.call(flood)
        assert status == 201
        assert statuses == [401] * FLOOD
        assert finished < FLOOD - 4, f"the write waited for {finished} of {FLOOD} password checks"
        assert gate.peak == 2 and gate.active == 0 and gate.waiting == 0
        assert [m["text"] for m in alice.get(f"/api/dm/{bob_id}").json()] == ["during the flood"]


def test_a_cancelled_login_keeps_its_slot_until_its_check_ends(tmp_path: pathlib.Path) -> None:
    """A caller that stops waiting (client gone) does not free the slot while its scrypt still runs."""
    with throttled_app(tmp_path, password_checks=1) as (app, _, at):
        client = at("192.0.2.1")
        chat = app.state.chat
        gate = app.state.password_gate

        async def scenario() -> tuple[int, int]:
            first = asyncio.ensure_future(gate.run(lambda: chat.ar.accounts.authenticate("a@example.com",
                                                                                         "wrong password")))
            while gate.active == 0:
                await asyncio.sleep(0.001)
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await first
            held = gate.active  # the hash is still running on its worker
            second = asyncio.ensure_future(gate.run(lambda: chat.ar.accounts.authenticate("b@example.com",
                                                                                          "wrong password")))
            await asyncio.sleep(0)
            waiting = gate.waiting
            with contextlib.suppress(Exception):
                await second
            return held, waiting

        held, waiting = client.portal.call(scenario)
        assert (held, waiting) == (1, 1)
        assert gate.peak == 1 and gate.active == 0
