"""Conformance: :class:`~shardlite.meta.sessions.SessionStore` over every metadata backend (the ``meta``
fixture), through the contract only."""

from __future__ import annotations

import os

import pytest
from helpers_threads import race

from shardlite import AuthenticationFailed, UnknownAccount
from shardlite.front.sessions import Session
from shardlite.meta import MetaStore

#: The parts of the metadata store these tests exercise (helpers_meta.missing_parts).
META_PART = ("accounts", "sessions")


T0 = 1_700_000_000.0


def digest(n: int) -> bytes:
    return n.to_bytes(4, "big") * 8


def account(meta: MetaStore, name: str = "a") -> int:
    return meta.accounts.create(f"{name}@x.io", f"{name}@x.io", name, "{}", T0)


def test_insert_and_live(meta: MetaStore) -> None:
    uid = account(meta)
    meta.sessions.insert(digest(1), uid, T0, T0 + 100, 30.0)
    meta.sessions.insert(digest(2), uid, T0, T0 + 50, None)
    assert meta.sessions.live(digest(1)) == Session(uid, T0, T0 + 100, 30.0, T0)
    assert type(meta.sessions.live(digest(1))) is Session
    assert meta.sessions.live(digest(2)) == Session(uid, T0, T0 + 50, None, T0)
    assert meta.sessions.live(digest(3)) is None
    assert meta.sessions.known(digest(1)) and not meta.sessions.known(digest(3))
    assert meta.sessions.count_live(uid) == 2


def test_live_does_not_judge_expiry(meta: MetaStore) -> None:
    uid = account(meta)
    meta.sessions.insert(digest(1), uid, T0 - 1000, T0 - 500, 1.0)  # long expired, idle-expired
    assert meta.sessions.live(digest(1)) == Session(uid, T0 - 1000, T0 - 500, 1.0, T0 - 1000)


def test_insert_for_an_unknown_account(meta: MetaStore) -> None:
    with pytest.raises(UnknownAccount):
        meta.sessions.insert(digest(1), 424242, T0, T0 + 1, None)
    assert not meta.sessions.known(digest(1))


def test_touch_is_monotonic(meta: MetaStore) -> None:
    uid = account(meta)
    meta.sessions.insert(digest(1), uid, T0, T0 + 100, 50.0)
    meta.sessions.touch(digest(1), T0 + 10)
    assert meta.sessions.live(digest(1)).last_seen == T0 + 10  # type: ignore[union-attr]
    meta.sessions.touch(digest(1), T0 + 5)  # an older clock reading never moves it back
    assert meta.sessions.live(digest(1)).last_seen == T0 + 10  # type: ignore[union-attr]
    race(6, lambda i: meta.sessions.touch(digest(1), T0 + 20 + i))
    assert meta.sessions.live(digest(1)).last_seen == T0 + 25  # type: ignore[union-attr]
    meta.sessions.touch(digest(9), T0)  # unknown: no error


def test_revoke_is_a_compare_and_set(meta: MetaStore) -> None:
    uid = account(meta)
    meta.sessions.insert(digest(1), uid, T0, T0 + 100, None)
    assert meta.sessions.revoke(digest(1), T0 + 1) is True
    assert meta.sessions.revoke(digest(1), T0 + 2) is False
    assert meta.sessions.revoke(digest(2), T0 + 2) is False
    assert meta.sessions.live(digest(1)) is None and meta.sessions.known(digest(1))
    assert meta.sessions.count_live(uid) == 0


def test_threads_revoking_one_session_exactly_one_wins(meta: MetaStore) -> None:
    uid = account(meta)
    meta.sessions.insert(digest(1), uid, T0, T0 + 100, None)
    assert race(8, lambda i: meta.sessions.revoke(digest(1), T0 + i)).count(True) == 1


def test_revoke_all(meta: MetaStore) -> None:
    uid, other = account(meta, "a"), account(meta, "b")
    for n in range(3):
        meta.sessions.insert(digest(n), uid, T0, T0 + 100, None)
    meta.sessions.insert(digest(9), other, T0, T0 + 100, None)
    meta.sessions.revoke(digest(0), T0)
    assert meta.sessions.revoke_all(uid, T0 + 1) == 2
    assert meta.sessions.revoke_all(uid, T0 + 2) == 0
    assert meta.sessions.count_live(uid) == 0 and meta.sessions.count_live(other) == 1


def test_rotate(meta: MetaStore) -> None:
    uid = account(meta)
    meta.sessions.insert(digest(1), uid, T0, T0 + 100, 40.0)
    meta.sessions.rotate(digest(1), digest(2), T0 + 10)
    assert meta.sessions.live(digest(1)) is None
    assert meta.sessions.live(digest(2)) == Session(uid, T0 + 10, T0 + 100, 40.0, T0 + 10)
    with pytest.raises(AuthenticationFailed):
        meta.sessions.rotate(digest(1), digest(3), T0 + 11)  # revoked
    with pytest.raises(AuthenticationFailed):
        meta.sessions.rotate(digest(7), digest(3), T0 + 11)  # unknown
    assert not meta.sessions.known(digest(3))


@pytest.mark.parametrize("now, why", [(T0 + 100, "expired"), (T0 + 40, "idle-expired")])
def test_rotate_refuses_a_session_not_live_at_now(meta: MetaStore, now: float, why: str) -> None:
    uid = account(meta)
    meta.sessions.insert(digest(1), uid, T0, T0 + 100, 40.0)
    with pytest.raises(AuthenticationFailed):
        meta.sessions.rotate(digest(1), digest(2), now)
    assert meta.sessions.live(digest(1)) is not None and not meta.sessions.known(digest(2)), why


def test_threads_rotating_one_session_mint_exactly_one_new_session(meta: MetaStore) -> None:
    uid = account(meta)
    meta.sessions.insert(digest(0), uid, T0, T0 + 100, None)
    results = race(8, lambda i: meta.sessions.rotate(digest(0), digest(100 + i), T0 + 1))
    winners = [i for i, r in enumerate(results) if r is None]
    assert len(winners) == 1, results
    assert all(isinstance(r, AuthenticationFailed) for r in results if r is not None)
    assert [i for i in range(8) if meta.sessions.known(digest(100 + i))] == winners
    assert meta.sessions.count_live(uid) == 1


def test_purge(meta: MetaStore) -> None:
    uid = account(meta)
    meta.sessions.insert(digest(1), uid, T0, T0 + 100, None)    # live
    meta.sessions.insert(digest(2), uid, T0, T0 + 10, None)     # expired at T0 + 10
    meta.sessions.insert(digest(3), uid, T0, T0 + 100, 20.0)    # idle-expired at T0 + 20
    meta.sessions.insert(digest(4), uid, T0, T0 + 100, 20.0)    # touched: idle until T0 + 35
    meta.sessions.insert(digest(5), uid, T0, T0 + 100, None)    # revoked
    meta.sessions.touch(digest(4), T0 + 15)
    meta.sessions.revoke(digest(5), T0 + 1)
    assert meta.sessions.purge(T0 + 20) == 3
    assert [n for n in range(1, 6) if meta.sessions.known(digest(n))] == [1, 4]
    assert meta.sessions.purge(T0 + 20) == 0


def test_many_threads_read_and_write_sessions(meta: MetaStore) -> None:
    """Several threads each insert, resolve, touch and revoke their own sessions at once: every one sees its
    own writes and nothing of another's is lost."""
    uid = account(meta)

    def work(i: int) -> int:
        for n in range(20):
            d = os.urandom(32)
            meta.sessions.insert(d, uid, T0, T0 + 100, None)
            assert meta.sessions.live(d) is not None
            meta.sessions.touch(d, T0 + n)
            if n % 2:
                assert meta.sessions.revoke(d, T0 + n)
        return i

    assert race(6, work) == list(range(6))
    assert meta.sessions.count_live(uid) == 60


def test_the_policy_runs_on_the_contract_of_every_backend(meta: MetaStore) -> None:
    """``Accounts`` and ``Sessions`` (the policy) need nothing of a backend but its contracts (gap F9:
    ``Sessions.resolve`` used to read a private attribute of the SQLite connection holder)."""
    from shardlite.front.accounts import Accounts, ScryptParams
    from shardlite.front.sessions import Sessions

    now = [T0]
    accounts = Accounts(meta.accounts, meta.credentials, lambda: now[0], scrypt=ScryptParams(n=16, r=1, p=1))
    sessions = Sessions(meta.sessions, lambda: now[0], touch_interval=10)
    uid = accounts.register("Zoë@Example.com", password="long enough", name="Zoë")
    assert accounts.authenticate("zoë@example.com", "long enough") == uid
    token = sessions.create(uid, ttl=100, idle_ttl=40)
    assert sessions.resolve(token) == Session(uid, T0, T0 + 100, 40.0, T0)
    now[0] = T0 + 15
    assert sessions.resolve(token).last_seen == T0 + 15  # type: ignore[union-attr]  # the throttled touch
    fresh = sessions.rotate(token)
    assert sessions.resolve(token) is None and sessions.resolve(fresh) is not None
    with pytest.raises(AuthenticationFailed):
        sessions.rotate(token)
    with pytest.raises(ValueError):
        accounts.update_profile(uid, name="nul\0name")
    assert accounts.get(uid).name == "Zoë"  # type: ignore[union-attr]
    accounts.delete(uid)
    assert sessions.resolve(fresh) is None
