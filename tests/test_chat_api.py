"""The chat example's HTTP API (examples/chat/app.py) through FastAPI's TestClient.

One app per test on a fresh data root; its lifespan (AsyncRouter + in-process relay) runs in the first
client's event loop, and every further client (one per user, each with its own cookie jar) shares that loop.
Feeds are filled by the relay, so they are polled with a deadline; nothing here asserts on timing.
"""

from __future__ import annotations

import functools
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

from examples.chat.app import COOKIE, MAX_BODY, create_app  # noqa: E402
from examples.chat.domain import MAX_ROOM_NAME, MAX_TEXT  # noqa: E402

PASSWORD = "correct horse battery"
ORIGIN = "http://testserver"  # TestClient's own origin: state-changing requests must name it (as browsers do)
DEADLINE = 15.0  # seconds a relay delivery may take before a test gives up (never reached when healthy)


# -- fixtures and helpers ----------------------------------------------------------------------------------

@pytest.fixture
def app(tmp_path: pathlib.Path) -> FastAPI:
    return create_app(str(tmp_path / "data"))


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, headers={"Origin": ORIGIN}) as c:  # runs the lifespan: router open, relay running
        yield c


@pytest.fixture
def new_client(app: FastAPI, client: TestClient) -> Iterator[Callable[[], TestClient]]:
    """Another client (own cookie jar) on the same running app."""
    made: list[TestClient] = []

    def make() -> TestClient:
        c = TestClient(app, headers={"Origin": ORIGIN})
        c.portal = client.portal  # the lifespan's event loop, where the router and the relay live
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def signup(c: TestClient, email: str, name: str, password: str = PASSWORD) -> int:
    r = c.post("/api/signup", json={"email": email, "password": password, "name": name})
    assert r.status_code == 201, r.text
    uid = r.json()["id"]
    assert isinstance(uid, int)
    return uid


def login(c: TestClient, email: str, password: str = PASSWORD) -> dict[str, Any]:
    r = c.post("/api/login", json={"email": email, "password": password})
    assert r.status_code == 200, r.text
    assert c.cookies.get(COOKIE)
    return r.json()  # type: ignore[no-any-return]


def member(c: TestClient, email: str, name: str) -> int:
    uid = signup(c, email, name)
    assert login(c, email) == {"id": uid, "name": name}
    return uid


@pytest.fixture
def trio(client: TestClient, new_client: Callable[[], TestClient]) -> tuple[Any, ...]:
    """(alice, bob, carol) as (client, id) pairs, each logged in on its own client."""
    users = []
    for c, email, name in ((client, "alice@example.com", "Alice"), (new_client(), "bob@example.com", "Bob"),
                           (new_client(), "carol@example.org", "Carol")):
        users.append((c, member(c, email, name)))
    return tuple(users)


def poll(fetch: Callable[[], Any], done: Callable[[Any], bool], what: str, deadline: float = DEADLINE) -> Any:
    end = time.monotonic() + deadline
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() > end:
            pytest.fail(f"{what}: not reached within {deadline}s; last value {value!r}")
        time.sleep(0.02)


def feed(c: TestClient, **params: Any) -> list[dict[str, Any]]:
    r = c.get("/api/feed", params=params)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def readable(r: Any, *words: str) -> str:
    """A 422 (or other error) whose detail is a non-empty human sentence mentioning ``words``."""
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail.strip(), r.text
    for word in words:
        assert word.lower() in detail.lower(), (word, detail)
    return detail


def set_cookie_attrs(response: Any) -> dict[str, str]:
    headers = [h for h in response.headers.get_list("set-cookie") if h.startswith(COOKIE + "=")]
    assert len(headers) == 1, response.headers
    attrs: dict[str, str] = {}
    for part in headers[0].split(";")[1:]:
        name, _, value = part.strip().partition("=")
        attrs[name.lower()] = value
    return attrs


# -- accounts and sessions -------------------------------------------------------------------------------

def test_signup_login_me_logout(client: TestClient, new_client: Callable[[], TestClient]) -> None:
    uid = signup(client, "alice@example.com", "Alice")
    assert client.get("/api/me").status_code == 401  # signing up does not log in
    assert login(client, "alice@example.com") == {"id": uid, "name": "Alice"}
    assert client.get("/api/me").json() == {"id": uid, "name": "Alice"}
    token = client.cookies[COOKIE]

    r = client.post("/api/logout")
    assert r.status_code == 200
    assert client.get("/api/me").status_code == 401
    # the token is revoked server-side, not just dropped by this client
    replay = new_client()
    replay.cookies.set(COOKIE, token)
    assert replay.get("/api/me").status_code == 401
    # and logging in again gives a working, different session
    login(client, "alice@example.com")
    assert client.cookies[COOKIE] != token
    assert client.get("/api/me").json()["id"] == uid


def test_session_cookie_is_httponly_and_samesite(client: TestClient) -> None:
    signup(client, "alice@example.com", "Alice")
    r = client.post("/api/login", json={"email": "alice@example.com", "password": PASSWORD})
    assert r.status_code == 200
    attrs = set_cookie_attrs(r)
    assert "httponly" in attrs
    assert attrs.get("samesite", "").lower() in ("strict", "lax")
    assert attrs.get("path") == "/"
    assert int(attrs.get("max-age", "0")) > 0


def test_login_failures_are_401_without_a_cookie(client: TestClient) -> None:
    signup(client, "alice@example.com", "Alice")
    for body in ({"email": "alice@example.com", "password": "wrong password"},
                 {"email": "nobody@example.com", "password": PASSWORD},
                 {"email": "not-an-address", "password": PASSWORD},
                 {"email": "alice@example.com", "password": "short"}):
        r = client.post("/api/login", json=body)
        assert r.status_code == 401, (body, r.text)
        readable(r)
        assert not r.headers.get_list("set-cookie")
    assert COOKIE not in client.cookies
    assert client.get("/api/me").status_code == 401


def test_login_accepts_a_variant_of_the_address(client: TestClient) -> None:
    uid = signup(client, "alice@example.com", "Alice")
    assert login(client, "ALICE@Example.com")["id"] == uid
    assert login(client, "\uff41\uff4c\uff49\uff43\uff45@example.com")["id"] == uid  # fullwidth "alice"


VARIANTS = [
    "alice@example.com",
    "Alice@Example.COM",
    "ALICE@EXAMPLE.COM",
    "\uff41\uff4c\uff49\uff43\uff45\uff20\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45\uff0e\uff43\uff4f\uff4d",
    "\uff21\uff2c\uff29\uff23\uff25@example.com",  # fullwidth capitals
]


def test_signup_variant_address_is_409(client: TestClient) -> None:
    uid = signup(client, "alice@example.com", "Alice")
    for variant in VARIANTS:
        r = client.post("/api/signup", json={"email": variant, "password": "another password", "name": "Mallory"})
        assert r.status_code == 409, (variant, r.text)
        readable(r, "already")
        # the intruder's password does not open the account
        r = client.post("/api/login", json={"email": variant, "password": "another password"})
        assert r.status_code == 401
    # the original account is untouched, and no other account appeared
    assert login(client, "alice@example.com") == {"id": uid, "name": "Alice"}
    assert client.get("/api/users", params={"q": "mallory"}).json() == []


def test_signup_distinct_addresses_get_distinct_ids(client: TestClient) -> None:
    ids = {signup(client, f"user{i}@example.com", f"User {i}") for i in range(3)}
    assert len(ids) == 3


SIGNUP_BAD_INPUT: list[tuple[dict[str, Any], list[str]]] = [
    ({"email": "no-at-sign.example.com", "password": PASSWORD, "name": "X"}, ["e-mail"]),
    ({"email": "two@@example.com", "password": PASSWORD, "name": "X"}, ["e-mail"]),
    ({"email": "a@localhost", "password": PASSWORD, "name": "X"}, ["e-mail"]),
    ({"email": "sp ace@example.com", "password": PASSWORD, "name": "X"}, ["e-mail"]),
    ({"email": "", "password": PASSWORD, "name": "X"}, ["e-mail"]),
    ({"email": "x@example.com", "password": "short", "name": "X"}, ["password"]),
    ({"email": "x@example.com", "password": PASSWORD, "name": ""}, ["name"]),
    ({"email": "x@example.com", "password": PASSWORD, "name": "n" * 81}, ["name"]),
    ({"email": "x@example.com", "password": PASSWORD}, ["name"]),
    ({"password": PASSWORD, "name": "X"}, ["email"]),
    ({"email": 42, "password": PASSWORD, "name": "X"}, ["email"]),
]


def test_signup_bad_input_is_422_readable(client: TestClient) -> None:
    for body, words in SIGNUP_BAD_INPUT:
        r = client.post("/api/signup", json=body)
        assert r.status_code == 422, (body, r.text)
        readable(r, *words)
    # nothing was created: the address is still free
    signup(client, "x@example.com", "X")


def test_signup_malformed_json_is_422(client: TestClient) -> None:
    r = client.post("/api/signup", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    readable(r)


def test_logout_without_session_is_harmless(client: TestClient) -> None:
    r = client.post("/api/logout")
    assert r.status_code == 200, r.text
    client.cookies.set(COOKIE, "forged-token")
    r = client.post("/api/logout")
    assert r.status_code == 200, r.text


PROTECTED: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/api/me", None),
    ("GET", "/api/users?q=a", None),
    ("POST", "/api/dm/{peer}", {"text": "hello"}),
    ("GET", "/api/dm/{peer}", None),
    ("GET", "/api/dm/{peer}?before=10&limit=5", None),
    ("POST", "/api/rooms", {"name": "lobby"}),
    ("GET", "/api/rooms", None),
    ("POST", "/api/rooms/{room}/join", None),
    ("POST", "/api/rooms/{room}/messages", {"text": "hello"}),
    ("GET", "/api/rooms/{room}/messages", None),
    ("GET", "/api/feed", None),
    ("GET", "/api/conversations", None),
]


def test_every_protected_route_is_401_without_a_session(client: TestClient,
                                                        new_client: Callable[[], TestClient]) -> None:
    peer = member(client, "alice@example.com", "Alice")
    r = client.post("/api/rooms", json={"name": "general"})
    assert r.status_code == 201
    room = r.json()["id"]
    client.post(f"/api/dm/{peer}", json={"text": "note to self"})
    for cookie in (None, "forged-token", "", client.cookies[COOKIE] + "x"):
        anonymous = new_client()
        if cookie is not None:
            anonymous.cookies.set(COOKIE, cookie)
        for method, path, body in PROTECTED:
            r = anonymous.request(method, path.format(peer=peer, room=room), json=body)
            assert r.status_code == 401, (cookie, method, path, r.status_code, r.text)
            readable(r)
    # nothing the anonymous client sent was stored
    assert client.get("/api/rooms").json() == [{"id": room, "name": "general"}]
    assert [m["text"] for m in client.get(f"/api/dm/{peer}").json()] == ["note to self"]
    assert client.get(f"/api/rooms/{room}/messages").json() == []


# -- users -----------------------------------------------------------------------------------------------

def test_user_search(trio: tuple[Any, ...]) -> None:
    (alice, alice_id), (bob, bob_id), (carol, carol_id) = trio
    assert alice.get("/api/users", params={"q": "bo"}).json() == [{"id": bob_id, "name": "Bob"}]
    assert alice.get("/api/users", params={"q": "BOB"}).json() == [{"id": bob_id, "name": "Bob"}]
    assert alice.get("/api/users", params={"q": "carol@example"}).json() == [{"id": carol_id, "name": "Carol"}]
    assert alice.get("/api/users", params={"q": "zzz"}).json() == []
    # the caller is never in the results
    assert alice.get("/api/users", params={"q": "alice"}).json() == []
    everyone = alice.get("/api/users").json()
    assert {u["id"] for u in everyone} == {bob_id, carol_id}
    assert {u["id"] for u in bob.get("/api/users", params={"q": ""}).json()} == {alice_id, carol_id}
    # hostile search text is just text
    for q in ("%", "_", "' OR 1=1 --", "\x00", "a" * 5000):
        r = alice.get("/api/users", params={"q": q})
        assert r.status_code == 200, (q, r.text)
        assert r.json() == []


# -- direct messages -------------------------------------------------------------------------------------

def test_dm_send_and_history(trio: tuple[Any, ...]) -> None:
    (alice, alice_id), (bob, bob_id), _ = trio
    r = alice.post(f"/api/dm/{bob_id}", json={"text": "  hi bob  "})
    assert r.status_code == 201, r.text
    sent = r.json()
    assert sent["author_id"] == alice_id and sent["author"] == "Alice" and sent["text"] == "hi bob"
    assert isinstance(sent["id"], int) and isinstance(sent["at"], float)

    assert bob.get(f"/api/dm/{alice_id}").json() == [sent]
    assert alice.get(f"/api/dm/{bob_id}").json() == [sent]

    ids = [sent["id"]]
    for i in range(5):
        who, peer = (bob, alice_id) if i % 2 == 0 else (alice, bob_id)
        r = who.post(f"/api/dm/{peer}", json={"text": f"message {i}"})
        assert r.status_code == 201
        ids.append(r.json()["id"])
    assert len(set(ids)) == len(ids)

    history = alice.get(f"/api/dm/{bob_id}").json()
    assert [m["id"] for m in history] == sorted(ids, reverse=True)  # newest first
    assert [m["text"] for m in history] == [f"message {i}" for i in reversed(range(5))] + ["hi bob"]
    assert bob.get(f"/api/dm/{alice_id}").json() == history

    page = alice.get(f"/api/dm/{bob_id}", params={"limit": 2}).json()
    assert page == history[:2]
    older = alice.get(f"/api/dm/{bob_id}", params={"limit": 2, "before": page[-1]["id"]}).json()
    assert older == history[2:4]
    rest = bob.get(f"/api/dm/{alice_id}", params={"before": older[-1]["id"]}).json()
    assert rest == history[4:]
    assert alice.get(f"/api/dm/{bob_id}", params={"before": min(ids)}).json() == []


def test_dm_history_with_nobody_yet_is_empty(trio: tuple[Any, ...]) -> None:
    (alice, _), (_, bob_id), _ = trio
    r = alice.get(f"/api/dm/{bob_id}")
    assert r.status_code == 200 and r.json() == []


def test_dm_pair_comes_from_the_session(trio: tuple[Any, ...]) -> None:
    """Carol can name Alice or Bob, but only ever reaches her own pair with them."""
    (alice, alice_id), (bob, bob_id), (carol, carol_id) = trio
    secret = alice.post(f"/api/dm/{bob_id}", json={"text": "alice-to-bob secret"}).json()
    bob.post(f"/api/dm/{alice_id}", json={"text": "bob-to-alice secret"})

    assert carol.get(f"/api/dm/{bob_id}").json() == []
    assert carol.get(f"/api/dm/{alice_id}").json() == []
    for params in ({"before": secret["id"] + 1}, {"limit": 200}, {"before": 1 << 62, "limit": 1}):
        assert carol.get(f"/api/dm/{bob_id}", params=params).json() == []

    # extra fields that try to pick an author or a conversation are ignored
    r = carol.post(f"/api/dm/{bob_id}",
                   json={"text": "carol here", "author_id": alice_id, "author": "Alice",
                         "conv": f"dm:{alice_id}:{bob_id}", "from_id": alice_id, "peer_id": alice_id})
    assert r.status_code == 201
    assert r.json()["author_id"] == carol_id and r.json()["author"] == "Carol"

    assert [m["text"] for m in carol.get(f"/api/dm/{bob_id}").json()] == ["carol here"]
    assert [m["text"] for m in bob.get(f"/api/dm/{carol_id}").json()] == ["carol here"]
    assert [m["text"] for m in alice.get(f"/api/dm/{bob_id}").json()] == ["bob-to-alice secret", "alice-to-bob secret"]
    assert alice.get(f"/api/dm/{carol_id}").json() == []

    # Carol's feed only ever holds her own conversation
    poll(lambda: feed(bob), lambda items: any(i["text"] == "carol here" for i in items), "bob's feed")
    items = poll(lambda: feed(carol), lambda items: len(items) >= 1, "carol's feed")
    assert [i["text"] for i in items] == ["carol here"]
    conversations = carol.get("/api/conversations").json()
    assert [c["title"] for c in conversations] == ["Bob"]


DM_BAD_TEXT: list[tuple[dict[str, Any], list[str]]] = [
    ({"text": ""}, ["empty"]),
    ({"text": "   \n\t "}, ["empty"]),
    ({"text": "x" * (MAX_TEXT + 1)}, [str(MAX_TEXT)]),
    ({"text": "x" * (MAX_TEXT * 2 + 1)}, ["text"]),
    ({"text": 123}, ["text"]),
    ({"text": None}, ["text"]),
    ({}, ["text"]),
    ({"message": "hi"}, ["text"]),
]


def test_dm_bad_text_is_422_readable(trio: tuple[Any, ...]) -> None:
    (alice, alice_id), (bob, bob_id), _ = trio
    for body, words in DM_BAD_TEXT:
        r = alice.post(f"/api/dm/{bob_id}", json=body)
        assert r.status_code == 422, (body, r.text)
        readable(r, *words)
    r = alice.post(f"/api/dm/{bob_id}", content=b'{"text": ', headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    readable(r)
    assert alice.get(f"/api/dm/{bob_id}").json() == []
    assert bob.get(f"/api/dm/{alice_id}").json() == []


def test_dm_longest_allowed_text(trio: tuple[Any, ...]) -> None:
    (alice, _), (bob, bob_id), _ = trio
    r = alice.post(f"/api/dm/{bob_id}", json={"text": "\u00e9" * MAX_TEXT})
    assert r.status_code == 201, r.text
    author = r.json()["author_id"]
    assert bob.get(f"/api/dm/{author}").json()[0]["text"] == "\u00e9" * MAX_TEXT


def test_dm_unknown_user_is_404(trio: tuple[Any, ...]) -> None:
    (alice, _), (_, bob_id), _ = trio
    for uid in (bob_id + 1000, (1 << 63) - 1):
        for r in (alice.post(f"/api/dm/{uid}", json={"text": "hello?"}), alice.get(f"/api/dm/{uid}")):
            assert r.status_code == 404, (uid, r.text)
            readable(r)
    for uid in (0, -1, 1 << 63, 1 << 70):  # not a possible id at all (tests/test_chat_security.py)
        for r in (alice.post(f"/api/dm/{uid}", json={"text": "hello?"}), alice.get(f"/api/dm/{uid}")):
            assert r.status_code == 422, (uid, r.text)
            readable(r, "user_id")
    for bad in ("abc", "1:2", "1.5", "%20"):
        r = alice.get(f"/api/dm/{bad}")
        assert r.status_code in (404, 422), (bad, r.text)
    assert alice.get("/api/conversations").json() == []


# -- rooms -----------------------------------------------------------------------------------------------

def test_rooms_create_join_post_read(trio: tuple[Any, ...]) -> None:
    (alice, alice_id), (bob, bob_id), (carol, _) = trio
    r = alice.post("/api/rooms", json={"name": "  general "})
    assert r.status_code == 201, r.text
    room = r.json()
    assert room["name"] == "general" and isinstance(room["id"], int)
    rid = room["id"]
    assert bob.get("/api/rooms").json() == [room]

    # the creator is a member; the others are not yet
    r = alice.post(f"/api/rooms/{rid}/messages", json={"text": "welcome"})
    assert r.status_code == 201, r.text
    welcome = r.json()
    assert welcome["author_id"] == alice_id
    for who in (bob, carol):
        r = who.get(f"/api/rooms/{rid}/messages")
        assert r.status_code == 403, r.text
        readable(r, "joined")
        r = who.post(f"/api/rooms/{rid}/messages", json={"text": "let me in"})
        assert r.status_code == 403, r.text
        readable(r)

    r = bob.post(f"/api/rooms/{rid}/join")
    assert r.status_code == 200, r.text
    assert r.json() == {"id": rid, "name": "general", "joined": True}
    assert bob.post(f"/api/rooms/{rid}/join").json()["joined"] is False  # idempotent
    r = bob.post(f"/api/rooms/{rid}/messages", json={"text": "hello all"})
    assert r.status_code == 201
    hello = r.json()
    assert hello["author_id"] == bob_id

    history = alice.get(f"/api/rooms/{rid}/messages").json()
    assert history == [hello, welcome]
    assert bob.get(f"/api/rooms/{rid}/messages").json() == history
    assert bob.get(f"/api/rooms/{rid}/messages", params={"limit": 1}).json() == [hello]
    assert bob.get(f"/api/rooms/{rid}/messages", params={"before": hello["id"]}).json() == [welcome]
    assert carol.get(f"/api/rooms/{rid}/messages").status_code == 403  # still not a member
    assert {"conv": f"room:{rid}", "kind": "room", "title": "general"} in bob.get("/api/conversations").json()

    # room messages reach the members' feeds (those who were members when it was posted), not Carol's
    poll(lambda: feed(alice), lambda items: {"hello all", "welcome"} <= {i["text"] for i in items}, "alice's feed")
    items = poll(lambda: feed(bob), lambda items: any(i["text"] == "hello all" for i in items), "bob's feed")
    item = next(i for i in items if i["text"] == "hello all")
    assert item["kind"] == "room" and item["room_id"] == rid and item["room"] == "general"
    assert item["from_id"] == bob_id and item["message_id"] == hello["id"]
    assert "welcome" not in {i["text"] for i in items}  # posted before Bob joined
    assert feed(carol) == []


def test_room_bad_name_is_422(client: TestClient) -> None:
    member(client, "alice@example.com", "Alice")
    for name, words in (("", ["empty"]), ("   ", ["empty"]), ("r" * (MAX_ROOM_NAME + 1), [str(MAX_ROOM_NAME)]),
                        ("r" * 201, ["name"]), (None, ["name"]), (7, ["name"])):
        r = client.post("/api/rooms", json={"name": name})
        assert r.status_code == 422, (name, r.text)
        readable(r, *words)
    r = client.post("/api/rooms", json={})
    assert r.status_code == 422
    readable(r, "name")
    assert client.get("/api/rooms").json() == []


def test_room_duplicate_name_is_refused(trio: tuple[Any, ...]) -> None:
    (alice, _), (bob, _), _ = trio
    assert alice.post("/api/rooms", json={"name": "General"}).status_code == 201
    r = bob.post("/api/rooms", json={"name": "general"})
    assert r.status_code == 422, r.text
    readable(r, "exists")
    assert len(bob.get("/api/rooms").json()) == 1


def test_room_bad_text_is_422(client: TestClient) -> None:
    alice = client
    member(alice, "alice@example.com", "Alice")
    rid = alice.post("/api/rooms", json={"name": "general"}).json()["id"]
    for body in ({"text": ""}, {"text": "  "}, {"text": "y" * (MAX_TEXT + 1)}, {}):
        r = alice.post(f"/api/rooms/{rid}/messages", json=body)
        assert r.status_code == 422, (body, r.text)
        readable(r)
    assert alice.get(f"/api/rooms/{rid}/messages").json() == []


def test_unknown_room_is_404(client: TestClient) -> None:
    alice = client
    member(alice, "alice@example.com", "Alice")
    rid = alice.post("/api/rooms", json={"name": "general"}).json()["id"]
    for unknown in (rid + 1, (1 << 63) - 1):
        for r in (alice.post(f"/api/rooms/{unknown}/join"),
                  alice.get(f"/api/rooms/{unknown}/messages"),
                  alice.post(f"/api/rooms/{unknown}/messages", json={"text": "anyone?"})):
            assert r.status_code == 404, (unknown, r.request.method, r.request.url, r.text)
            readable(r)
    for impossible in (0, -5):
        for r in (alice.post(f"/api/rooms/{impossible}/join"),
                  alice.get(f"/api/rooms/{impossible}/messages"),
                  alice.post(f"/api/rooms/{impossible}/messages", json={"text": "anyone?"})):
            assert r.status_code == 422, (impossible, r.request.method, r.request.url, r.text)
            readable(r, "room_id")
    for bad in ("abc", "1:2", "room:1"):
        assert alice.post(f"/api/rooms/{bad}/join").status_code in (404, 422)
        assert alice.get(f"/api/rooms/{bad}/messages").status_code in (404, 422)
    assert alice.get("/api/rooms").json() == [{"id": rid, "name": "general"}]


# -- the feed, filled by the outbox relay ---------------------------------------------------------------

def test_feed_fills_through_the_relay(trio: tuple[Any, ...]) -> None:
    (alice, alice_id), (bob, bob_id), _ = trio
    assert feed(alice) == [] and feed(bob) == []
    sent = [alice.post(f"/api/dm/{bob_id}", json={"text": f"dm {i}"}).json() for i in range(3)]

    def complete(items: list[dict[str, Any]]) -> bool:
        return {s["id"] for s in sent} <= {i.get("message_id") for i in items}

    for who, peer in ((bob, alice_id), (alice, bob_id)):  # both the recipient's and the sender's feed
        items = poll(functools.partial(feed, who), complete, "feed")
        assert len(items) == 3, items  # exactly once each
        assert [i["text"] for i in items] == ["dm 2", "dm 1", "dm 0"]  # newest first
        for item, message in zip(items, reversed(sent), strict=True):
            assert item["kind"] == "dm" and item["from_id"] == alice_id and item["from"] == "Alice"
            assert item["message_id"] == message["id"] and item["peer_id"] == peer
            assert isinstance(item["id"], int) and isinstance(item["at"], float)
        # paging
        assert feed(who, limit=1) == items[:1]
        assert feed(who, before=items[0]["id"]) == items[1:]

    # a reply lands on top of both feeds, still exactly once per message
    reply = bob.post(f"/api/dm/{alice_id}", json={"text": "got them"}).json()
    for who in (alice, bob):
        items = poll(functools.partial(feed, who), lambda items: bool(items) and items[0]["text"] == "got them",
                     "reply")
        assert items[0]["message_id"] == reply["id"] and items[0]["from_id"] == bob_id
        assert len(items) == 4


# -- body size limit ---------------------------------------------------------------------------------------

def test_oversized_body_is_413_and_nothing_is_stored(trio: tuple[Any, ...]) -> None:
    (alice, alice_id), (bob, bob_id), _ = trio
    padding = "p" * (MAX_BODY + 1)
    r = alice.post(f"/api/dm/{bob_id}", json={"text": padding})
    assert r.status_code == 413, r.text
    readable(r, "too large")
    r = alice.post(f"/api/dm/{bob_id}", json={"text": "fits", "padding": padding})
    assert r.status_code == 413, r.text
    r = alice.post("/api/rooms", json={"name": "big", "padding": padding})
    assert r.status_code == 413, r.text
    r = alice.post("/api/signup", json={"email": "big@example.com", "password": PASSWORD, "name": "Big",
                                        "padding": padding})
    assert r.status_code == 413, r.text
    rid = alice.post("/api/rooms", json={"name": "small"}).json()["id"]
    r = alice.post(f"/api/rooms/{rid}/messages", json={"text": "x" * (MAX_BODY * 4)})
    assert r.status_code == 413, r.text

    assert alice.get(f"/api/dm/{bob_id}").json() == []
    assert bob.get(f"/api/dm/{alice_id}").json() == []
    assert alice.get(f"/api/rooms/{rid}/messages").json() == []
    assert [room["name"] for room in alice.get("/api/rooms").json()] == ["small"]
    assert alice.get("/api/users", params={"q": "big"}).json() == []
    assert alice.post("/api/login", json={"email": "big@example.com", "password": PASSWORD}).status_code == 401
    # a body just under the limit still goes through
    r = alice.post(f"/api/dm/{bob_id}", json={"text": "ok", "padding": "p" * (MAX_BODY - 100)})
    assert r.status_code == 201, r.text
    assert feed(alice) == [] or all(i["text"] == "ok" for i in feed(alice))


def _chunks(total: int) -> Iterator[bytes]:
    yield b'{"text": "'
    for _ in range(total // 1024):
        yield b"x" * 1024
    yield b'"}'


def test_oversized_chunked_body_is_refused_and_nothing_is_stored(trio: tuple[Any, ...]) -> None:
    """No Content-Length (chunked upload): the limit is enforced while streaming."""
    (alice, alice_id), (bob, bob_id), _ = trio
    r = alice.post(f"/api/dm/{bob_id}", content=_chunks(MAX_BODY * 2), headers={"content-type": "application/json"})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert 400 <= r.status_code < 500, r.text
    assert alice.get(f"/api/dm/{bob_id}").json() == []
    assert bob.get(f"/api/dm/{alice_id}").json() == []


def test_oversized_chunked_body_is_413(trio: tuple[Any, ...]) -> None:
    (alice, _), (_, bob_id), _ = trio
    r = alice.post(f"/api/dm/{bob_id}", content=_chunks(MAX_BODY * 2), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text


def test_huge_room_id_is_422(app: FastAPI, client: TestClient) -> None:
    """Room ids past SQLite's integer range are refused as input, never bound (nor a 500)."""
    member(client, "alice@example.com", "Alice")
    quiet = TestClient(app, raise_server_exceptions=False, cookies=client.cookies, headers={"Origin": ORIGIN})
    quiet.portal = client.portal  # the running lifespan's loop
    try:
        for unknown in (1 << 63, 1 << 70):
            for r in (quiet.post(f"/api/rooms/{unknown}/join"), quiet.get(f"/api/rooms/{unknown}/messages"),
                      quiet.post(f"/api/rooms/{unknown}/messages", json={"text": "anyone?"})):
                assert r.status_code == 422, (unknown, r.request.method, r.request.url, r.status_code, r.text)
                readable(r, "room_id")
    finally:
        quiet.close()


def test_feeds_are_filled_by_a_standalone_relay_process(tmp_path: pathlib.Path) -> None:
    """`create_app(relay=False)` only emits; `shardlite relay run --app examples.chat.relay:router` in its own
    process delivers the feed entries (what `python -m examples.chat --relay-process` runs)."""
    import os
    import signal
    import subprocess

    root = str(tmp_path / "data")
    app = create_app(root, relay=False)
    with TestClient(app, headers={"Origin": ORIGIN}) as alice:
        bob = TestClient(app, headers={"Origin": ORIGIN})
        bob.portal = alice.portal
        try:
            member(alice, "alice@example.com", "Alice")
            bob_id = member(bob, "bob@example.com", "Bob")
            assert alice.post(f"/api/dm/{bob_id}", json={"text": "via the relay process"}).status_code == 201
            assert feed(bob) == []  # nothing delivers in this process
            env = dict(os.environ, SHARDLITE_ROOT=root)
            relay = subprocess.Popen([sys.executable, "-m", "shardlite", "relay", "run", "--app",
                                      "examples.chat.relay:router"], cwd=str(REPO), env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                items = poll(lambda: feed(bob), lambda items: len(items) == 1, "bob's feed from the relay process")
                assert items[0]["text"] == "via the relay process" and items[0]["from"] == "Alice"
                assert [i["text"] for i in feed(alice)] == ["via the relay process"]
            finally:
                relay.send_signal(signal.SIGTERM)
                out, err = relay.communicate(timeout=60)
            assert relay.returncode == 0, (out, err)
        finally:
            bob.close()
