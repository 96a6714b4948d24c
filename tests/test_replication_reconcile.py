"""The replication service's reconcile pass (every 30 s): one read of the catalog and of the cursors, no query
per tenant, and no re-capture of every tenant after a start when their logs did not change since their last
capture (both were found by benchmarks/replication.py: ~0.5 ms of CPU per tenant and pass); and reading every
tenant's captures (a whole-root restore) fetches each pack's payload in one request, not one per capture."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import shardlite
from shardlite.services import replication as replication_module
from shardlite.services.replication import Replication

SCHEMA = ["CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)"]
KEYS = ["user:a", "user:b", "user:c"]


def _write(router: shardlite.Router, key: str, body: str) -> None:
    with router.transaction(key) as tx:
        tx.execute("INSERT INTO notes(body) VALUES (?)", (body,))


def _backdate_logs(router: shardlite.Router, seconds: float) -> None:
    store = router._store
    for key in KEYS:
        record = store.meta.tenants.lookup(key)
        assert record is not None
        then = time.time() - seconds
        os.utime(store.path_of(record) + "-wal", (then, then))


@pytest.fixture
def router(tmp_path: Path) -> shardlite.Router:
    router = shardlite.Router(tmp_path / "root", schema=SCHEMA, replicate="file://" + str(tmp_path / "replica"))
    for key in KEYS:
        _write(router, key, "first")
    _backdate_logs(router, 10)  # written well before the first capture
    yield router
    router.close()


def test_cursors_are_read_at_once(router: shardlite.Router) -> None:
    replication = Replication(router._store)
    try:
        replication.run_round()
        staging = next(iter(replication.nodes.values())).replicator.staging
        assert set(staging.cursors()) == set(KEYS)
        assert staging.cursors() == {key: staging.cursor(key) for key in KEYS}
    finally:
        replication.close()


def test_reconcile_looks_up_no_tenant_and_recaptures_none_after_a_start(router: shardlite.Router,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    replication = Replication(router._store)
    try:
        first = replication.run_round()
        assert next(iter(first.values())).captured == 3
        node = next(iter(replication.nodes.values()))
        replication._reconcile(node)  # the first look at each log after its capture
        assert node.replicator.marked() == []
    finally:
        replication.close()
    _write(router, "user:b", "while no replicator ran")  # noted, but a reconcile pass must see it by itself

    def no_lookup(key: str) -> None:
        raise AssertionError(f"the reconcile pass looked {key!r} up")

    replication = Replication(router._store)  # a restart
    try:
        replication._claim_nodes()
        node = next(iter(replication.nodes.values()))
        monkeypatch.setattr(router._store.meta.tenants, "lookup", no_lookup)
        replication._reconcile(node)
        assert node.replicator.marked() == ["user:b"]  # changed since its capture; the others did not
        monkeypatch.undo()
        replication.run_round()
        _write(router, "user:c", "later")
        monkeypatch.setattr(router._store.meta.tenants, "lookup", no_lookup)
        replication._reconcile(node)
        assert node.replicator.marked() == ["user:c"]
    finally:
        monkeypatch.undo()
        replication.close()


def test_a_log_written_just_before_its_capture_is_looked_at_again(router: shardlite.Router) -> None:
    _write(router, "user:a", "just now")  # within the margin of the first capture: marked at the first look
    replication = Replication(router._store)
    try:
        replication.run_round()
        node = next(iter(replication.nodes.values()))
        replication._reconcile(node)
        assert node.replicator.marked() == ["user:a"]
    finally:
        replication.close()


class _Counting:
    """A replica target that counts its ranged reads."""

    def __init__(self, inner: object) -> None:
        self.inner, self.ranges = inner, 0

    def get_range(self, name: str, start: int, length: int) -> bytes:
        self.ranges += 1
        return self.inner.get_range(name, start, length)  # type: ignore[attr-defined, no-any-return]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def test_reading_every_tenant_reads_each_pack_payload_at_once(router: shardlite.Router, tmp_path: Path) -> None:
    """A whole-root restore read one ranged GET per capture (27 s for 1,000 tenants on SeaweedFS)."""
    from shardlite import ReplicaDamaged
    from shardlite.replica.target import open_target
    from shardlite.services import replica_read

    replication = Replication(router._store)
    try:
        replication.run_round()
    finally:
        replication.close()
    target = open_target("file://" + str(tmp_path / "replica"))
    try:
        counting = _Counting(target)
        every = replica_read.captures_of(counting, None)  # type: ignore[arg-type]
        assert sorted(every) == KEYS
        assert counting.ranges == 2  # the header, the payload
        one = replica_read.captures_of(target, ["user:b"])
        assert [c.data for c in one["user:b"]] == [c.data for c in every["user:b"]]
        (name, size), = replica_read.list_packs(target)
        path = tmp_path / "replica" / name
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF  # damage the last capture's bytes
        path.write_bytes(bytes(data))
        with pytest.raises(ReplicaDamaged) as caught:  # named, with what to do (tests/test_replica_damaged.py)
            replica_read.captures_of(target, None)
        assert [bad for bad, _why in caught.value.objects] == [name]
    finally:
        target.close()


def test_a_costly_pass_spaces_the_next_ones_out(router: shardlite.Router, monkeypatch: pytest.MonkeyPatch) -> None:
    """The passes stay within their share of a core: after a pass that cost c seconds of CPU the next waits
    c / RECONCILE_SHARE (at least RECONCILE_EVERY); a log changed without a note is still found then."""
    now = [1000.0]
    replication = Replication(router._store, clock=lambda: now[0])
    try:
        replication.run_round()  # the first pass, at start
        node = next(iter(replication.nodes.values()))
        assert node.reconcile_every == replication_module.RECONCILE_EVERY  # three tenants: a cheap pass
        monkeypatch.setattr(replication_module, "RECONCILE_SHARE", 1e-12)  # as if a pass were costly
        now[0] += replication_module.RECONCILE_EVERY
        replication.run_round()  # a pass: its cost sets the spacing of the next
        spaced = node.reconcile_every
        assert spaced > 1000 * replication_module.RECONCILE_EVERY
        node.replicator.staging.forget("user:a")  # no cursor: only a reconcile pass marks it again
        now[0] += replication_module.RECONCILE_EVERY
        replication._read_notes(node)
        replication.run_round()
        assert node.replicator.staging.cursor("user:a") is None  # not yet: the next pass is later
        now[0] += spaced
        replication.run_round()
        assert node.replicator.staging.cursor("user:a") is not None
    finally:
        replication.close()
