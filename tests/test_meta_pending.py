"""Conformance: the :class:`~shardlite.meta.pending.PendingWork` and :class:`~shardlite.meta.pending.DeadLetters`
contracts, over every metadata backend (only through the contracts: no SQL, no file)."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable

import pytest
from helpers_meta import open_meta

from shardlite.meta import MetaStore
from shardlite.meta.pending import DeadLetter

#: Keys whose code-point order differs from a locale's (upper case before lower case, digits compared one
#: by one, accented and fullwidth letters after ASCII, an astral character after every BMP one).
#: The parts of the metadata store these tests exercise (helpers_meta.missing_parts).
META_PART = ("pending", "dead_letters")


ODD_KEYS = ["user:zoe", "user:Zoe", "user:émile", "user:eve", "user:\U0001f600", "user:ｚ", "user:ä", "user:E",
            "user:10", "user:9"]


def run_threads(count: int, body: Callable[[int], None]) -> None:
    """Run ``body(i)`` on ``count`` threads at once; re-raise the first failure."""
    failures: list[BaseException] = []
    start = threading.Barrier(count)

    def one(i: int) -> None:
        try:
            start.wait()
            body(i)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            failures.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


# -- PendingWork ----------------------------------------------------------------------------------------------


def test_a_flag_is_created_then_bumped_keeping_since_and_the_earliest_due(meta: MetaStore) -> None:
    pending = meta.pending
    assert pending.row("user:a") is None
    before = time.time()
    pending.flag_many(["user:a"])
    after = time.time()
    first = pending.row("user:a")
    assert first is not None and first.key == "user:a"
    assert before <= first.due <= after and first.since == first.due
    pending.flag_many(["user:a"])
    second = pending.row("user:a")
    assert second is not None
    assert second.version == first.version + 1 and second.since == first.since
    assert second.due == first.due  # the earlier due time is kept

    pending.set_due("user:a", time.time() + 3600)  # postponed...
    pending.flag_many(["user:a"])  # ...an emitter brings it back to now
    third = pending.row("user:a")
    assert third is not None and third.version == second.version + 1 and third.due <= time.time()

    pending.set_due("user:a", 5.0)  # due long ago: a flag keeps it
    pending.flag_many(["user:a"])
    fourth = pending.row("user:a")
    assert fourth is not None and fourth.due == 5.0 and fourth.version == third.version + 1


def test_flag_many_flags_every_key_at_once(meta: MetaStore) -> None:
    meta.pending.flag_many(["user:b", "user:a", "user:c"])
    assert [row.key for row in meta.pending.all()] == ["user:a", "user:b", "user:c"]
    meta.pending.flag_many([])  # nothing to do
    assert len(meta.pending.all()) == 3


def test_a_flag_is_durable_and_seen_by_another_opener(meta: MetaStore, meta_backend: str, root: str) -> None:
    meta.pending.flag_many(["user:a"])
    other = open_meta(meta_backend, root, create=False)
    try:
        row = other.pending.row("user:a")
        assert row is not None and row == meta.pending.row("user:a")
    finally:
        other.close()


def test_all_is_in_code_point_order(meta: MetaStore) -> None:
    meta.pending.flag_many(ODD_KEYS)
    assert [row.key for row in meta.pending.all()] == sorted(ODD_KEYS)  # Python orders str by code point


def test_due_returns_due_flags_earliest_first_up_to_the_limit(meta: MetaStore) -> None:
    pending = meta.pending
    for key, due in [("user:late", 300.0), ("user:b", 100.0), ("user:a", 100.0), ("user:é", 50.0),
                     ("user:later", 10_000.0)]:
        pending.set_due(key, due)
    assert [(r.key, r.due) for r in pending.due(1000.0, 10)] == [
        ("user:é", 50.0), ("user:a", 100.0), ("user:b", 100.0), ("user:late", 300.0)]
    assert [r.key for r in pending.due(1000.0, 2)] == ["user:é", "user:a"]
    assert pending.due(1000.0, 0) == []
    assert [r.key for r in pending.due(100.0, 10)] == ["user:é", "user:a", "user:b"]  # due <= now
    assert pending.due(49.0, 10) == []
    rows = pending.due(1000.0, 10)
    assert all(r == pending.row(r.key) for r in rows)  # the same rows, versions included


def test_set_due_moves_the_time_keeps_the_version_and_creates_a_missing_flag(meta: MetaStore) -> None:
    pending = meta.pending
    before = time.time()
    pending.set_due("user:new", 123.0)
    created = pending.row("user:new")
    assert created is not None and created.due == 123.0 and created.since >= before
    pending.flag_many(["user:a"])
    flagged = pending.row("user:a")
    assert flagged is not None
    pending.set_due("user:a", flagged.due + 60)
    moved = pending.row("user:a")
    assert moved is not None and moved.due == flagged.due + 60
    assert (moved.version, moved.since) == (flagged.version, flagged.since)
    pending.set_due("user:a", 1.0)  # earlier works too
    back = pending.row("user:a")
    assert back is not None and back.due == 1.0


def test_clear_deletes_only_an_unchanged_flag(meta: MetaStore) -> None:
    pending = meta.pending
    pending.flag_many(["user:a", "user:b", "user:c"])
    a, b, c = (pending.row(k) for k in ("user:a", "user:b", "user:c"))
    assert a is not None and b is not None and c is not None
    pending.flag_many(["user:b"])  # an emitter flagged b again after its version was read
    pending.clear_many([("user:a", a.version), ("user:b", b.version), ("user:c", c.version + 7),
                        ("user:none", 1)])  # a lost compare-and-set, and a missing key: silent
    assert pending.row("user:a") is None
    b_now = pending.row("user:b")
    assert b_now is not None and b_now.version == b.version + 1
    assert pending.row("user:c") == c
    pending.clear_many([])
    pending.clear_many([("user:b", b_now.version), ("user:c", c.version)])
    assert pending.all() == []


def test_park_is_a_compare_and_set_on_the_version_and_hides_the_flag_from_due(meta: MetaStore) -> None:
    pending = meta.pending
    pending.flag_many(["user:a", "user:b"])
    a, b = pending.row("user:a"), pending.row("user:b")
    assert a is not None and b is not None and a.parked is None
    assert not pending.park("user:a", a.version + 1)  # the version moved: nothing written
    assert not pending.park("user:none", 1)  # no flag at all
    assert pending.row("user:a") == a
    before = time.time()
    assert pending.park("user:a", a.version)
    parked = pending.row("user:a")
    assert parked is not None and parked.parked is not None and before <= parked.parked <= time.time()
    assert (parked.version, parked.due, parked.since) == (a.version, a.due, a.since)
    assert [r.key for r in pending.due(time.time() + 10, 10)] == ["user:b"]  # never a parked flag
    assert [r.key for r in pending.all()] == ["user:a", "user:b"]  # all() lists it, parked
    assert pending.park("user:a", a.version)  # parking a parked flag again: still True, time renewed
    again = pending.row("user:a")
    assert again is not None and again.parked is not None and again.parked >= parked.parked


def test_park_many_parks_in_one_unit_the_flags_whose_version_holds(meta: MetaStore) -> None:
    pending = meta.pending
    pending.flag_many(["user:a", "user:b", "user:c"])
    rows = {k: pending.row(k) for k in ("user:a", "user:b", "user:c")}
    a, b, c = rows["user:a"], rows["user:b"], rows["user:c"]
    assert a is not None and b is not None and c is not None
    assert pending.park_many([]) == []
    before = time.time()
    parked = pending.park_many([("user:c", c.version), ("user:none", 3), ("user:b", b.version + 1),
                                ("user:a", a.version), ("user:\x00", 1)])
    assert parked == ["user:c", "user:a"]  # in the order given; a moved version, no flag or NUL: not parked
    for key, row in (("user:a", a), ("user:c", c)):
        now = pending.row(key)
        assert now is not None and now.parked is not None and before <= now.parked <= time.time()
        assert (now.version, now.due, now.since) == (row.version, row.due, row.since)
    assert pending.row("user:b") == b
    assert [r.key for r in pending.due(time.time() + 10, 10)] == ["user:b"]
    assert pending.park_many([("user:a", a.version)]) == ["user:a"]  # parked already: still parked


def test_flag_many_and_set_due_un_park_a_parked_flag(meta: MetaStore) -> None:
    pending = meta.pending
    pending.set_due("user:a", time.time() + 3600)  # due far later, then parked
    pending.flag_many(["user:b"])
    for key in ("user:a", "user:b"):
        row = pending.row(key)
        assert row is not None and pending.park(key, row.version)
    before = time.time()
    pending.flag_many(["user:a"])
    a = pending.row("user:a")
    assert a is not None and a.parked is None and a.due <= time.time() and a.due >= before  # due now
    assert [r.key for r in pending.due(time.time(), 10)] == ["user:a"]
    pending.set_due("user:b", 5.0)
    b = pending.row("user:b")
    assert b is not None and b.parked is None and b.due == 5.0
    assert [r.key for r in pending.due(time.time(), 10)] == ["user:b", "user:a"]


def test_wake_many_makes_parked_flags_due_and_names_the_missing_ones(meta: MetaStore) -> None:
    pending = meta.pending
    pending.set_due("user:a", time.time() + 3600)
    pending.flag_many(["user:b", "user:c"])
    rows = {k: pending.row(k) for k in ("user:a", "user:b", "user:c")}
    assert all(r is not None for r in rows.values())
    a, b, c = rows["user:a"], rows["user:b"], rows["user:c"]
    assert a is not None and b is not None and c is not None
    assert pending.park("user:a", a.version) and pending.park("user:b", b.version)
    pending.flag_many(["user:b"])  # flagged again since the park: its old version is gone
    assert pending.wake_many([]) == []
    before = time.time()
    missing = pending.wake_many([("user:a", a.version), ("user:b", b.version), ("user:c", c.version),
                                 ("user:none", 7)])
    assert missing == [("user:b", b.version), ("user:none", 7)]
    woken = pending.row("user:a")
    assert woken is not None and woken.parked is None and woken.version == a.version
    assert before <= woken.due <= time.time() and woken.since == a.since
    assert pending.row("user:c") == c  # a due flag with that version is left as it is
    b_now = pending.row("user:b")
    assert b_now is not None and b_now.version == b.version + 1 and b_now.parked is None
    assert {r.key for r in pending.due(time.time(), 10)} == {"user:a", "user:b", "user:c"}
    assert pending.wake_many([("user:a", a.version)]) == []  # waking a due flag: no error, nothing missing


def test_parked_lists_parked_flags_idle_since_a_time_in_key_order_by_pages(meta: MetaStore) -> None:
    pending = meta.pending
    keys = sorted(ODD_KEYS)
    pending.flag_many(ODD_KEYS + ["user:due"])
    for key in ODD_KEYS:
        row = pending.row(key)
        assert row is not None and pending.park(key, row.version)
    assert [r.key for r in pending.parked(100, time.time())] == keys  # code points; the due flag left out
    assert all(r.parked is not None for r in pending.parked(100, time.time()))
    assert pending.parked(100, time.time() - 3600) == []  # none parked that long ago
    assert pending.parked(0, time.time()) == []
    pages: list[str] = []
    after = ""
    while True:
        page = pending.parked(3, time.time(), after)
        if not page:
            break
        assert len(page) <= 3
        pages += [r.key for r in page]
        after = page[-1].key
    assert pages == keys
    first = pending.row(keys[0])
    assert first is not None
    pending.wake_many([(first.key, first.version)])
    assert [r.key for r in pending.parked(100, time.time())] == keys[1:]


def test_clear_deletes_a_parked_flag_only_with_its_version(meta: MetaStore) -> None:
    pending = meta.pending
    pending.flag_many(["user:a"])
    a = pending.row("user:a")
    assert a is not None and pending.park("user:a", a.version)
    pending.clear_many([("user:a", a.version + 1)])
    assert pending.row("user:a") is not None
    pending.clear_many([("user:a", a.version)])
    assert pending.row("user:a") is None
    assert pending.wake_many([("user:a", a.version)]) == [("user:a", a.version)]


def test_versions_are_never_reused_for_a_key(meta: MetaStore) -> None:
    """A flag deleted and written again gets a version it never had: a relay still holding an old one
    cannot delete the new flag."""
    pending = meta.pending
    seen: list[int] = []
    for _ in range(20):
        pending.flag_many(["user:a"])
        pending.flag_many(["user:a"])
        row = pending.row("user:a")
        assert row is not None
        seen += [row.version - 1, row.version]
        pending.clear_many([("user:a", row.version)])
        assert pending.row("user:a") is None
    assert len(set(seen)) == len(seen)
    pending.set_due("user:a", 1.0)  # set_due creates a flag too: also with a fresh version
    row = pending.row("user:a")
    assert row is not None and row.version not in seen
    for old in seen:
        pending.clear_many([("user:a", old)])
    assert pending.row("user:a") == row


def test_concurrent_flags_lose_no_version_bump(meta: MetaStore) -> None:
    meta.pending.flag_many(["user:hot", "user:cold"])
    start = meta.pending.row("user:hot")
    assert start is not None

    def flagger(i: int) -> None:
        for _ in range(25):
            meta.pending.flag_many(["user:hot"] if i % 2 else ["user:cold", "user:hot"])

    run_threads(6, flagger)
    end = meta.pending.row("user:hot")
    assert end is not None and end.version == start.version + 6 * 25


def test_threads_flagging_and_clearing_never_lose_a_flag(meta: MetaStore) -> None:
    """The relay's protocol with the contract's compare-and-set: an emitter adds events and flags the key
    under the source's lock; a relay reads the flag's version and takes the events under that lock, and
    clears the flags it read after its pass. Whatever the interleaving, a key with events not taken is
    flagged (checked under the key's lock before every emit, and at the end)."""
    keys = [f"user:{i}" for i in range(3)]
    locks = {key: threading.Lock() for key in keys}
    emitted = dict.fromkeys(keys, 0)
    taken = dict.fromkeys(keys, 0)
    done = threading.Event()
    lost: list[str] = []

    def emitter(i: int) -> None:
        for n in range(80):
            key = keys[(i + n) % len(keys)]
            with locks[key]:  # the source's write transaction: the flag is written before its commit
                if taken[key] < emitted[key] and meta.pending.row(key) is None:
                    lost.append(key)
                meta.pending.flag_many([key])
                emitted[key] += 1

    def relay() -> None:
        while not done.is_set():
            emptied = []
            for flag in meta.pending.all():
                with locks[flag.key]:  # the acknowledging transaction, under the source's lock
                    row = meta.pending.row(flag.key)
                    taken[flag.key] = emitted[flag.key]
                if row is not None:
                    emptied.append((flag.key, row.version))
            meta.pending.clear_many(emptied)  # after the pass, as the relay does

    relays = [threading.Thread(target=relay) for _ in range(2)]
    for thread in relays:
        thread.start()
    try:
        run_threads(4, emitter)
    finally:
        done.set()
        for thread in relays:
            thread.join()
    assert lost == []
    for key in keys:
        if taken[key] < emitted[key]:
            assert meta.pending.row(key) is not None, f"{key}: events not taken, and no flag"


def _flag_in_process(backend: str, root: str, key: str, times: int) -> None:
    store = open_meta(backend, root, create=False)
    try:
        for _ in range(times):
            store.pending.flag_many([key])
    finally:
        store.close()


def test_flags_from_several_processes_lose_no_version_bump(meta: MetaStore, meta_backend: str, root: str) -> None:
    meta.pending.flag_many(["user:shared"])
    start = meta.pending.row("user:shared")
    assert start is not None
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_flag_in_process, args=(meta_backend, root, "user:shared", 30))
               for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    end = meta.pending.row("user:shared")
    assert end is not None and end.version == start.version + 90 and end.since == start.since


# -- DeadLetters ----------------------------------------------------------------------------------------------

INC = "0123456789abcdef0123456789abcdef"


def letter(source: str = "user:a", seq: int = 1, *, died: float = 100.0, incarnation: str = INC,
           error: str = "RuntimeError: boom", dest: str = "user:b") -> DeadLetter:
    return DeadLetter(source, incarnation, seq, dest, "t", '{"n": 1}', 50.0, 3, error, died)


def test_a_dead_letter_is_added_once_and_kept_whole(meta: MetaStore) -> None:
    letters = meta.dead_letters
    assert letters.list() == [] and letters.count() == 0
    first = letter()
    assert letters.add(first) is True
    assert letters.add(letter(error="another error", died=200.0, dest="user:c")) is False  # same identity
    assert letters.list() == [first] and letters.count() == 1
    other_incarnation = letter(incarnation="f" * 32)
    assert letters.add(other_incarnation) is True  # the identity includes the incarnation
    assert letters.count() == 2


def test_dead_letters_are_listed_oldest_first_in_code_point_order(meta: MetaStore) -> None:
    letters = meta.dead_letters
    wanted = [letter("user:z", 1, died=10.0), letter("user:E", 9, died=20.0), letter("user:e", 1, died=20.0),
              letter("user:é", 1, died=20.0), letter("user:\U0001f600", 1, died=20.0),
              letter("user:é", 2, died=20.0, incarnation="0" * 32), letter("user:é", 2, died=20.0),
              letter("user:a", 1, died=30.0)]
    for one in reversed(wanted):
        letters.add(one)
    by_rule = sorted(wanted, key=lambda d: (d.died, d.source, d.seq, d.incarnation))
    assert letters.list() == by_rule
    assert [d.source for d in by_rule[1:5]] == ["user:E", "user:e", "user:é", "user:é"]
    assert letters.list(limit=3) == by_rule[:3]
    assert letters.list(limit=0) == []
    assert letters.count() == len(wanted)


def test_delete_says_whether_the_letter_was_there(meta: MetaStore) -> None:
    letters = meta.dead_letters
    letters.add(letter(seq=1))
    letters.add(letter(seq=2))
    assert letters.delete("user:a", INC, 1) is True
    assert letters.delete("user:a", INC, 1) is False
    assert letters.delete("user:a", "f" * 32, 2) is False  # another incarnation's seq 2: not this one
    assert [d.seq for d in letters.list()] == [2]


def test_text_with_nul_is_refused_and_nothing_is_written(meta: MetaStore) -> None:
    with pytest.raises(ValueError):
        meta.dead_letters.add(letter(error="bad\x00text"))
    assert meta.dead_letters.count() == 0


def test_concurrent_adds_of_one_letter_add_it_once(meta: MetaStore) -> None:
    results: list[bool] = []

    def add(i: int) -> None:
        results.append(meta.dead_letters.add(letter(error=f"from thread {i}")))

    run_threads(8, add)
    assert sorted(results) == [False] * 7 + [True]
    (kept,) = meta.dead_letters.list()
    assert kept.error.startswith("from thread ")
