"""Sessions (brief §4, rule 11): 256-bit tokens, only SHA-256 at rest, absolute and idle expiry with an
injected clock, throttled activity writes, revoke / revoke_all / rotate / purge, no token in files, logs,
exceptions or reprs, garbage input, async twins, the ``sessions purge`` CLI."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import apsw
import pytest
from helpers_routers import global_rows

import shardlite.cli
from shardlite import AsyncRouter, AuthenticationFailed, Router, UnknownAccount
from shardlite.front.accounts import ScryptParams
from shardlite.front.sessions import TOKEN_LENGTH, Session

FAST = ScryptParams(n=2**8)
T0 = 1_000_000.0
TABLES = ("_shardlite_accounts", "_shardlite_credentials", "_shardlite_sessions")
TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def router(make_router: Callable[..., Router], clock: Clock) -> Router:
    r = make_router(clock=clock)
    r.accounts.scrypt = FAST
    return r


@pytest.fixture
def uid(router: Router) -> int:
    return router.accounts.register("owner@example.com", password="owner-password", name="Owner")


def snapshot(router: Router) -> dict[str, list[tuple[Any, ...]]]:
    return {t: global_rows(router, f"SELECT * FROM {t} ORDER BY 1") for t in TABLES}


def session_row(router: Router, token: str) -> tuple[Any, ...] | None:
    rows = global_rows(router, "SELECT account_id, created, expires, idle_ttl, last_seen, revoked "
                                "FROM _shardlite_sessions WHERE token_hash = ?", (sha(token),))
    return rows[0] if rows else None


def sha(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii")).digest()


@pytest.fixture
def observer(root: str, router: Router) -> Iterator[apsw.Connection]:
    """A separate read-only connection on global.db: its ``PRAGMA data_version`` changes exactly when
    another connection commits a change."""
    conn = apsw.Connection(os.path.join(root, "global.db"), flags=apsw.SQLITE_OPEN_READONLY)
    yield conn
    conn.close()


def data_version(conn: apsw.Connection) -> int:
    value: Any = conn.execute("PRAGMA data_version").fetchall()[0][0]
    return int(value)


def grep_root(root: str, needles: list[bytes]) -> list[tuple[str, int]]:
    """(path, needle index) for every needle found in any file under ``root``."""
    hits: list[tuple[str, int]] = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                data = fh.read()
            hits.extend((path, i) for i, needle in enumerate(needles) if needle in data)
    return hits


GARBAGE: list[object] = [
    None, "", "x", "A" * 43, "A" * 42, "A" * 44, "!" * 43, "é" * 43, "\ud800" * 43, "\x00" * 43,
    b"A" * 43, 42, 4.2, ["A" * 43], "A" * 1_000_000, "' OR 1=1 --" + "A" * 32,
]


# -- tokens -----------------------------------------------------------------------------------------------


def test_token_has_256_bits_and_only_its_sha256_is_stored(router: Router, uid: int) -> None:
    tokens = [router.sessions.create(uid) for _ in range(200)]
    assert len(set(tokens)) == len(tokens)
    for token in tokens:
        assert isinstance(token, str) and len(token) == TOKEN_LENGTH == 43
        assert TOKEN_RE.match(token)
        raw = base64.urlsafe_b64decode(token + "=")
        assert len(raw) == 32  # 256 random bits
    rows = global_rows(router, "SELECT * FROM _shardlite_sessions")
    assert len(rows) == len(tokens)
    assert {row[0] for row in rows} == {hashlib.sha256(t.encode()).digest() for t in tokens}
    everything = repr(rows).encode()
    for token in tokens:
        assert token.encode() not in everything
        assert all(token not in str(value) for row in rows for value in row)
    # across all tokens, every base64 character position varies (not a counter or a timestamp)
    for position in range(43):
        assert len({t[position] for t in tokens}) > 8


def test_resolve_returns_a_session_without_the_token(router: Router, uid: int, clock: Clock) -> None:
    token = router.sessions.create(uid, ttl=3600, idle_ttl=600)
    session = router.sessions.resolve(token)
    assert isinstance(session, Session)
    assert session.account_id == uid
    assert session.created == T0 and session.expires == T0 + 3600
    assert session.idle_ttl == 600 and session.last_seen == T0 and session.idle_expires == T0 + 600
    digest = sha(token)
    for text in (repr(session), str(session), repr(tuple(session)), repr(session._asdict())):
        assert token not in text and digest.hex() not in text and repr(digest) not in text
    assert not any("token" in name for name in Session._fields)
    assert not hasattr(session, "__dict__")
    with pytest.raises(AttributeError):  # a snapshot: immutable
        session.last_seen = 0  # type: ignore[misc]


def test_default_ttl_and_invalid_ttls(router: Router, uid: int) -> None:
    token = router.sessions.create(uid)
    session = router.sessions.resolve(token)
    assert session is not None and session.expires == T0 + router.sessions.default_ttl
    assert session.idle_ttl is None and session.idle_expires is None
    before = snapshot(router)
    for kwargs in ({"ttl": 0}, {"ttl": -1}, {"ttl": float("nan")}, {"idle_ttl": 0}, {"idle_ttl": -5},
                   {"idle_ttl": float("nan")}):
        with pytest.raises(ValueError):
            router.sessions.create(uid, **kwargs)
    assert snapshot(router) == before


# -- expiry, with an injected clock -------------------------------------------------------------------------


def test_absolute_expiry(router: Router, uid: int, clock: Clock) -> None:
    token = router.sessions.create(uid, ttl=100)
    clock.now = T0 + 99.999
    assert router.sessions.resolve(token) is not None
    clock.now = T0 + 100
    assert router.sessions.resolve(token) is None
    clock.now = T0 + 10_000
    assert router.sessions.resolve(token) is None
    clock.now = T0 + 50  # expiry is a function of the clock, nothing was deleted by resolving
    assert router.sessions.resolve(token) is not None


def test_idle_expiry_and_activity_extends_it(router: Router, uid: int, clock: Clock) -> None:
    idle = router.sessions.create(uid, ttl=10_000, idle_ttl=100)
    busy = router.sessions.create(uid, ttl=10_000, idle_ttl=100)
    clock.now = T0 + 60
    assert router.sessions.resolve(busy) is not None  # activity at +60
    clock.now = T0 + 99.5
    assert router.sessions.resolve(idle) is not None  # still within the idle window (and touched)
    clock.now = T0 + 159
    assert router.sessions.resolve(busy) is not None  # 99 s after its last activity
    clock.now = T0 + 199.5
    assert router.sessions.resolve(idle) is None  # 100 s after its last activity at +99.5
    assert router.sessions.resolve(busy) is not None  # touched at +159, and now again at +199.5
    clock.now = T0 + 299.4
    assert router.sessions.resolve(busy) is not None  # touched at +299.4
    clock.now = T0 + 399.4
    assert router.sessions.resolve(busy) is None


def test_activity_never_extends_the_absolute_expiry(router: Router, uid: int, clock: Clock) -> None:
    token = router.sessions.create(uid, ttl=120, idle_ttl=50)
    for t in (40, 80, 119):
        clock.now = T0 + t
        session = router.sessions.resolve(token)
        assert session is not None and session.expires == T0 + 120
    clock.now = T0 + 120
    assert router.sessions.resolve(token) is None


def test_activity_writes_are_throttled(router: Router, uid: int, clock: Clock,
                                       observer: apsw.Connection) -> None:
    token = router.sessions.create(uid, ttl=10_000, idle_ttl=400)  # throttle = min(60, 400/4) = 60 s
    plain = router.sessions.create(uid, ttl=10_000)  # no idle expiry: never written by resolve
    version = data_version(observer)
    changes = router._store.meta.globaldb.writer.total_changes()

    for t in (0, 1, 30, 59.9):  # a resolve right after create, and a burst inside the interval
        clock.now = T0 + t
        assert router.sessions.resolve(token) is not None
        assert router.sessions.resolve(plain) is not None
    assert data_version(observer) == version  # nobody committed anything
    assert router._store.meta.globaldb.writer.total_changes() == changes
    assert session_row(router, token)[4] == T0  # type: ignore[index]  # last_seen unchanged

    clock.now = T0 + 60  # the throttle interval has passed: one write
    session = router.sessions.resolve(token)
    assert session is not None and session.last_seen == T0 + 60
    assert session_row(router, token)[4] == T0 + 60  # type: ignore[index]
    assert data_version(observer) != version
    assert router._store.meta.globaldb.writer.total_changes() == changes + 1

    version = data_version(observer)
    clock.now = T0 + 100
    assert router.sessions.resolve(token).last_seen == T0 + 60  # type: ignore[union-attr]
    clock.now = T0 + 10_000 - 1
    assert router.sessions.resolve(plain).last_seen == T0  # type: ignore[union-attr]
    assert data_version(observer) == version


def test_throttle_is_a_quarter_of_a_short_idle_ttl(router: Router, uid: int, clock: Clock) -> None:
    token = router.sessions.create(uid, ttl=10_000, idle_ttl=40)  # min(60, 40/4) = 10 s
    clock.now = T0 + 9.9
    assert router.sessions.resolve(token).last_seen == T0  # type: ignore[union-attr]
    clock.now = T0 + 10
    assert router.sessions.resolve(token).last_seen == T0 + 10  # type: ignore[union-attr]
    assert session_row(router, token)[4] == T0 + 10  # type: ignore[index]


# -- revoke, revoke_all, rotate, purge ----------------------------------------------------------------------


def test_revoke(router: Router, uid: int, clock: Clock) -> None:
    a, b = router.sessions.create(uid), router.sessions.create(uid)
    clock.now = T0 + 5
    assert router.sessions.revoke(a) is True
    assert router.sessions.resolve(a) is None
    assert router.sessions.revoke(a) is False  # already revoked
    assert session_row(router, a)[5] == T0 + 5  # type: ignore[index]
    assert router.sessions.resolve(b) is not None
    with pytest.raises(AuthenticationFailed):
        router.sessions.rotate(a)


def test_revoke_all(router: Router, uid: int) -> None:
    other = router.accounts.register("other@example.com")
    mine = [router.sessions.create(uid) for _ in range(3)]
    theirs = [router.sessions.create(other) for _ in range(2)]
    router.sessions.revoke(mine[0])
    assert router.sessions.revoke_all(uid) == 2
    assert all(router.sessions.resolve(t) is None for t in mine)
    assert all(router.sessions.resolve(t) is not None for t in theirs)
    assert router.sessions.revoke_all(uid) == 0
    assert router.sessions.revoke_all(999_999) == 0


def test_rotate(router: Router, uid: int, clock: Clock) -> None:
    old = router.sessions.create(uid, ttl=1000, idle_ttl=300)
    clock.now = T0 + 100
    new = router.sessions.rotate(old)
    assert new != old and TOKEN_RE.match(new)
    assert router.sessions.resolve(old) is None
    session = router.sessions.resolve(new)
    assert session is not None
    assert session.account_id == uid
    assert session.expires == T0 + 1000  # same absolute expiry
    assert session.idle_ttl == 300 and session.created == T0 + 100 and session.last_seen == T0 + 100
    assert session_row(router, old)[5] == T0 + 100  # type: ignore[index]  # old one revoked
    assert session_row(router, new)[0] == uid  # type: ignore[index]
    with pytest.raises(AuthenticationFailed):
        router.sessions.rotate(old)  # a rotated-away token cannot be rotated again
    newer = router.sessions.rotate(new)
    assert router.sessions.resolve(new) is None and router.sessions.resolve(newer) is not None
    clock.now = T0 + 1000
    before = snapshot(router)
    with pytest.raises(AuthenticationFailed):
        router.sessions.rotate(newer)  # expired
    assert snapshot(router) == before


def test_rotate_idle_expired_session_fails(router: Router, uid: int, clock: Clock) -> None:
    token = router.sessions.create(uid, ttl=1000, idle_ttl=50)
    clock.now = T0 + 50
    with pytest.raises(AuthenticationFailed):
        router.sessions.rotate(token)


def test_purge(router: Router, uid: int, clock: Clock) -> None:
    live = router.sessions.create(uid, ttl=1000, idle_ttl=500)
    expired = router.sessions.create(uid, ttl=10)
    idle = router.sessions.create(uid, ttl=1000, idle_ttl=20)
    revoked = router.sessions.create(uid, ttl=1000)
    router.sessions.revoke(revoked)
    clock.now = T0 + 30
    assert router.sessions.purge() == 3
    remaining = global_rows(router, "SELECT token_hash FROM _shardlite_sessions")
    assert remaining == [(sha(live),)]
    assert router.sessions.resolve(live) is not None
    assert router.sessions.purge() == 0
    assert all(router.sessions.resolve(t) is None for t in (expired, idle, revoked))


def test_sessions_need_an_existing_account(router: Router, uid: int) -> None:
    before = snapshot(router)
    for bad in (uid + 1, 0, -1, None, "nobody"):
        with pytest.raises(UnknownAccount):
            router.sessions.create(bad)  # type: ignore[arg-type]
    assert snapshot(router) == before


# -- garbage tokens -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("garbage", GARBAGE, ids=lambda g: repr(g)[:24])
def test_garbage_tokens(router: Router, uid: int, garbage: object) -> None:
    token = router.sessions.create(uid)
    before = snapshot(router)
    assert router.sessions.resolve(garbage) is None
    assert router.sessions.revoke(garbage) is False
    with pytest.raises(AuthenticationFailed) as info:
        router.sessions.rotate(garbage)
    assert info.value.__cause__ is None and not isinstance(info.value.__context__, apsw.Error)
    text = str(garbage)[:200]
    if len(text) >= 8:
        assert text not in str(info.value) and text not in repr(info.value)
    assert snapshot(router) == before
    assert router.sessions.resolve(token) is not None


def test_near_miss_tokens_do_not_resolve(router: Router, uid: int) -> None:
    token = router.sessions.create(uid)
    flipped = ("B" if token[0] != "B" else "C") + token[1:]
    for near in (token.upper() if token.upper() != token else token.lower(), flipped, token[:-1] + "=",
                 " " + token[1:], token + "=", token[:42]):
        assert near != token
        assert router.sessions.resolve(near) is None
        assert router.sessions.revoke(near) is False
    assert router.sessions.resolve(token) is not None


# -- tokens never leak: files, backups, logs, exceptions ----------------------------------------------------


def test_no_raw_token_in_any_file_under_the_root(router: Router, uid: int, root: str, clock: Clock) -> None:
    tokens = [router.sessions.create(uid, ttl=3600, idle_ttl=600) for _ in range(40)]
    tokens += [router.sessions.rotate(tokens[i]) for i in range(5)]
    router.sessions.revoke(tokens[6])
    clock.now = T0 + 300
    assert all(router.sessions.resolve(t) is not None for t in tokens[10:20])  # touches (writes) them
    needles = [t.encode() for t in tokens] + [base64.urlsafe_b64decode(t + "=") for t in tokens]

    wal = os.path.join(root, "global.db-wal")
    assert os.path.exists(wal) and os.path.getsize(wal) > 0  # the WAL is really grepped with data in it
    assert grep_root(root, needles) == []

    # a backup made with SQLite's backup API, inside the root
    backup = os.path.join(root, "backup-copy.db")
    source = apsw.Connection(os.path.join(root, "global.db"), flags=apsw.SQLITE_OPEN_READONLY)
    dest = apsw.Connection(backup)
    try:
        with dest.backup("main", source, "main") as copy:
            copy.step()
        assert dest.execute("SELECT count(*) FROM _shardlite_sessions").fetchall() == [(len(tokens),)]
    finally:
        dest.close()
        source.close()
    assert os.path.getsize(backup) > 0
    assert grep_root(root, needles) == []

    router.close()  # checkpoint: the main file now holds everything
    assert grep_root(root, needles) == []
    # the digests are there (the grep would find a token if it were stored)
    digests = [sha(t) for t in tokens]
    assert all(hits for hits in (grep_root(root, [d]) for d in digests))


def test_no_token_in_logs_or_exceptions(router: Router, uid: int, clock: Clock,
                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    token = router.sessions.create(uid, ttl=100, idle_ttl=50)
    router.sessions.resolve(token)
    clock.now = T0 + 20
    router.sessions.resolve(token)
    rotated = router.sessions.rotate(token)
    messages: list[str] = []
    for garbage in (token, token[::-1], "Z" * 43):
        with pytest.raises(AuthenticationFailed) as info:
            router.sessions.rotate(garbage)
        messages += [str(info.value), repr(info.value), repr(info.value.args)]
    router.sessions.revoke(rotated)
    clock.now = T0 + 200
    with pytest.raises(AuthenticationFailed) as info:
        router.sessions.rotate(rotated)
    messages += [str(info.value), repr(info.value)]
    logged = caplog.text + " ".join(r.getMessage() + repr(r.args) for r in caplog.records)
    for secret in (token, rotated, token[::-1]):
        assert secret not in logged
        assert all(secret not in m for m in messages)
        assert sha(secret).hex() not in logged


# -- async twins --------------------------------------------------------------------------------------------


def test_async_sessions(root: str) -> None:
    clock = Clock()

    async def main() -> None:
        async with AsyncRouter(root, clock=clock) as ar:
            ar.accounts.sync.scrypt = FAST
            uid = await ar.accounts.register("Async@Example.com", password="async-password", name="A")
            assert await ar.accounts.authenticate("ASYNC@example.com", "async-password") == uid
            with pytest.raises(AuthenticationFailed):
                await ar.accounts.authenticate("async@example.com", "wrong-password")
            token = await ar.sessions.create(uid, ttl=1000, idle_ttl=100)
            assert TOKEN_RE.match(token)
            stored = ar._store.meta.globaldb.read("SELECT token_hash FROM _shardlite_sessions")
            assert stored == [(hashlib.sha256(token.encode()).digest(),)]
            session = await ar.sessions.resolve(token)
            assert session is not None and session.account_id == uid and session.last_seen == T0
            clock.now = T0 + 25  # past the throttle (100/4): resolve writes on a worker thread
            session = await ar.sessions.resolve(token)
            assert session is not None and session.last_seen == T0 + 25
            assert ar._store.meta.globaldb.read("SELECT last_seen FROM _shardlite_sessions") == [(T0 + 25,)]
            rotated = await ar.sessions.rotate(token)
            assert await ar.sessions.resolve(token) is None
            assert (await ar.sessions.resolve(rotated)).expires == T0 + 1000  # type: ignore[union-attr]
            with pytest.raises(AuthenticationFailed):
                await ar.sessions.rotate(token)
            assert await ar.sessions.resolve("garbage") is None
            assert await ar.sessions.revoke("garbage") is False
            assert ar.sessions.digest_cache == ar.sessions.sync.digest_cache > 0
            ar.sessions.digest_cache = 0  # off: the same answers
            assert ar.sessions.sync.digest_cache == 0
            assert (await ar.sessions.resolve(rotated)) is not None and not ar.sessions.sync._digests
            assert await ar.sessions.revoke(rotated) is True
            assert await ar.sessions.resolve(rotated) is None
            others = [await ar.sessions.create(uid) for _ in range(3)]
            assert await ar.sessions.revoke_all(uid) == 3
            assert all([await ar.sessions.resolve(t) is None for t in others])
            clock.now = T0 + 5000
            assert await ar.sessions.purge() == 5
            # concurrent resolves of one session past the throttle: all live, at most one write
            again = await ar.sessions.create(uid, ttl=1000, idle_ttl=100)
            clock.now += 50
            results = await asyncio.gather(*(ar.sessions.resolve(again) for _ in range(20)))
            assert all(r is not None and r.account_id == uid for r in results)
            with pytest.raises(UnknownAccount):
                await ar.sessions.create(uid + 100)

    asyncio.run(main())


# -- CLI --------------------------------------------------------------------------------------------------


def test_cli_sessions_purge_json(router: Router, uid: int, root: str, clock: Clock,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    # The CLI's router runs on the real clock: sessions created at T0 (1970) are long expired, one created
    # "now" with a long ttl stays, a revoked one goes.
    expired = [router.sessions.create(uid, ttl=60) for _ in range(2)]
    clock.now = time.time()
    live = router.sessions.create(uid, ttl=30 * 24 * 3600)
    revoked = router.sessions.create(uid, ttl=30 * 24 * 3600)
    router.sessions.revoke(revoked)
    router.close()
    capsys.readouterr()
    assert shardlite.cli.main(["sessions", "purge", "--root", root, "--json"]) == 0
    out, _ = capsys.readouterr()
    assert json.loads(out) == {"purged": 3}
    assert shardlite.cli.main(["sessions", "purge", "--root", root, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"purged": 0}
    with Router(root) as again:
        assert again.sessions.resolve(live) is not None
        assert all(again.sessions.resolve(t) is None for t in expired + [revoked])
        assert global_rows(again, "SELECT count(*) FROM _shardlite_sessions") == [(1,)]
    assert shardlite.cli.main(["sessions", "purge", "--root", root]) == 0
    assert "purged 0" in capsys.readouterr().out


def test_remembered_digests_never_change_an_answer(router: Router, make_router: Callable[..., Router],
                                                    uid: int, clock: Clock) -> None:
    """resolve() remembers the digests of tokens it found; revocation (here by another router on the same
    root, as another process would), rotation and expiry are still read from the DB every time."""
    other = make_router(clock=clock)
    tokens = [router.sessions.create(uid, ttl=100) for _ in range(3)]
    assert all(router.sessions.resolve(t) is not None for t in tokens)  # now remembered
    assert other.sessions.revoke(tokens[0])
    assert router.sessions.resolve(tokens[0]) is None
    renewed = other.sessions.rotate(tokens[1])
    assert router.sessions.resolve(tokens[1]) is None and router.sessions.resolve(renewed) is not None
    assert other.sessions.revoke_all(uid) == 2
    assert router.sessions.resolve(tokens[2]) is None and router.sessions.resolve(renewed) is None
    live = router.sessions.create(uid, ttl=100)
    assert router.sessions.resolve(live) is not None
    clock.now += 100
    assert router.sessions.resolve(live) is None


def test_digest_memory_is_bounded_and_holds_only_found_tokens(router: Router, uid: int) -> None:
    sessions = router.sessions
    sessions.digest_cache = 2
    for _ in range(20):  # well-formed tokens no session has: looked up, never remembered
        assert sessions.resolve(base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()) is None
    assert len(sessions._digests) == 0
    tokens = [sessions.create(uid) for _ in range(5)]
    for token in tokens:
        assert sessions.resolve(token) is not None
        assert len(sessions._digests) <= 2
    assert sessions.revoke(tokens[-1]) and tokens[-1] not in sessions._digests
    sessions.digest_cache = 0
    assert len(sessions._digests) == 0
    assert all(sessions.resolve(t) is not None for t in tokens[:-1]) and len(sessions._digests) == 0
    for bad in ([1], {"a": 1}, b"x" * TOKEN_LENGTH, None, 7):
        assert sessions.resolve(bad) is None

    class Lookalike(str):  # equal to a remembered token, but not a str: never taken for it
        pass

    sessions.digest_cache = 8
    assert sessions.resolve(tokens[0]) is not None and tokens[0] in sessions._digests
    assert sessions.resolve(Lookalike(tokens[0])) is None
    with pytest.raises(ValueError):
        sessions.digest_cache = -1
