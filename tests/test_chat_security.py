"""The chat example's defences (examples/chat/app.py, examples/chat/security.py), through FastAPI's TestClient
against the real app on a fresh data root, as in tests/test_chat_api.py.

* history and feed parameters and path ids are bounded: out-of-range values are 422, never a 500;
* every response, API or static, error or not, carries the Content-Security-Policy and framing headers;
* ``secure_cookies`` (``--secure-cookies``, ``CHAT_SECURE_COOKIES=1``) marks the session cookie Secure;
* every POST/PUT/PATCH/DELETE must name this site in Origin (or Referer), with or without a body, else 403
  and nothing changes;
"""

from __future__ import annotations

import pathlib
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `examples` is a top-level directory, not an installed package
    sys.path.insert(0, str(REPO))

from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from test_chat_api import COOKIE, ORIGIN, PASSWORD, member, readable, set_cookie_attrs, signup  # noqa: E402

from examples.chat.app import MAX_BODY, MAX_CURSOR, MAX_ID, MAX_PAGE, create_app  # noqa: E402
from examples.chat.security import CONTENT_SECURITY_POLICY, origin_of, parse_origins  # noqa: E402

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
