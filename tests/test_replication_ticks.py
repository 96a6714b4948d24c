"""The run loop's ticks (``Replication.run``): between two uploads (one per interval) the noted tenants are
captured and staged, so an upload waits only for the last tick's captures; the reconcile pass of a loop runs
after its tick's upload; an idle tick writes nothing to the staging file. Ticks are called directly here (no
timing): ``Replication._tick`` is what each turn of the loop runs."""

from __future__ import annotations

from pathlib import Path

import apsw
import pytest

import shardlite
from shardlite.services import replication as replication_module
from shardlite.services.replication import Replication

SCHEMA = ["CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)"]
KEYS = ["user:a", "user:b", "user:c"]


def _write(router: shardlite.Router, key: str, body: str) -> None:
    with router.transaction(key) as tx:
        tx.execute("INSERT INTO notes(body) VALUES (?)", (body,))


@pytest.fixture
def replication(tmp_path: Path) -> tuple[shardlite.Router, Replication]:
    router = shardlite.Router(tmp_path / "root", schema=SCHEMA, replicate="file://" + str(tmp_path / "replica"))
    for key in KEYS:
        _write(router, key, "first")
    replication = Replication(router._store)
    replication.run_round()  # the first pass: every tenant's snapshot shipped
    yield router, replication
    replication.close()
    router.close()


def test_a_tick_between_uploads_captures_and_stages_and_the_upload_tick_ships(
        replication: tuple[shardlite.Router, Replication]) -> None:
    router, rep = replication
    (node,) = rep.nodes.values()
    staging = node.replicator.staging
    assert staging.staged_count() == (0, 0)
    _write(router, "user:a", "second")  # noted by the writer
    stats = rep._tick(upload=False, budget=1.0, loop=True)[node.name]
    assert (stats.captured, stats.uploaded_packs) == (1, 0)
    assert staging.staged_count()[0] == 1 and not node.replicator.marked()
    packs = len(list(staging.packs()))
    stats = rep._tick(upload=True, budget=1.0, loop=True)[node.name]
    assert (stats.captured, stats.uploaded_packs) == (0, 1)  # nothing left to capture: only the upload
    assert staging.staged_count() == (0, 0) and len(list(staging.packs())) == packs + 1


def test_the_loop_reconciles_after_the_upload_and_only_on_upload_ticks(
        replication: tuple[shardlite.Router, Replication]) -> None:
    router, rep = replication
    (node,) = rep.nodes.values()
    node.reconcile_every = 0.0  # due at every tick
    before = node.reconciled_at
    _write(router, "user:b", "second")
    stats = rep._tick(upload=False, budget=1.0, loop=True)[node.name]
    assert "reconcile" not in stats.phases and node.reconciled_at == before
    _write(router, "user:c", "second")
    stats = rep._tick(upload=True, budget=1.0, loop=True)[node.name]
    phases = list(stats.phases)
    assert stats.uploaded_packs == 1 and node.reconciled_at > before
    assert phases.index("reconcile") > phases.index("upload.put")  # the pass never delays the upload


def test_an_idle_tick_writes_nothing_to_the_staging_file(replication: tuple[shardlite.Router, Replication]) -> None:
    router, rep = replication
    (node,) = rep.nodes.values()
    _write(router, "user:a", "second")
    rep._tick(upload=True, budget=1.0, loop=True)  # captures, ships, stores the notes' offsets
    changes = node.replicator.staging.conn.total_changes()
    for upload in (False, True, False):
        stats = rep._tick(upload=upload, budget=1.0, loop=True)[node.name]
        assert (stats.captured, stats.uploaded_packs) == (0, 0)
    assert node.replicator.staging.conn.total_changes() == changes


def test_the_loop_reconciles_in_slices_and_a_slice_finds_a_log_changed_without_a_note(
        replication: tuple[shardlite.Router, Replication], monkeypatch: pytest.MonkeyPatch) -> None:
    """One slice of the pass per upload tick (a pass over 5,000 tenants held a tick's captures up 0.6 s at load
    8): slices in turn cover the catalog, and the slice holding a tenant whose log changed without a note marks
    it."""
    router, rep = replication
    (node,) = rep.nodes.values()
    monkeypatch.setattr(replication_module, "RECONCILE_SLICE", 1)
    store = router._store
    record = store.meta.tenants.lookup("user:c")
    assert record is not None
    conn = apsw.Connection(store.path_of(record))  # a writer that writes no note
    try:
        with conn:
            conn.execute("INSERT INTO notes(body) VALUES ('without a note')")
    finally:
        conn.close()
    node.reconcile_every = 0.0
    finished = node.reconciled_at
    starts, captured = [], []
    for _ in range(len(KEYS) + 1):
        stats = rep._tick(upload=True, budget=1.0, loop=True)[node.name]
        starts.append(node.pass_after)
        captured.append(stats.captured)
        if node.reconciled_at != finished:
            break
    assert starts == ["user:a", "user:b", "user:c", None]  # one tenant a slice, then the end of the catalog
    # the slice of user:c marked it (after that tick's captures); the next tick captured it
    assert captured == [0, 0, 0, 1] and not node.replicator.marked()
    assert node.replicator.staging.staged_count() == (0, 0)


def test_commits_made_after_the_tick_read_the_notes_keep_their_noted_times(
        replication: tuple[shardlite.Router, Replication], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A fast writer commits between a tick's read of the notes and the capture of its tenant: the capture
    holds those commits too. They used to get the capture's time (late: a restore at a time right after one
    missed it, and its note was ignored afterwards); the capture now reads the notes again first."""
    import time

    from shardlite.replica.target import open_target
    from shardlite.services.replica_restore import restore_tenant
    from shardlite.services.replicator import NodeReplicator

    router, rep = replication
    after: list[tuple[int, str]] = []  # (a time right after a commit, its body)
    real = NodeReplicator._capture_marked

    def writes_first(self: NodeReplicator, *args: object, **kwargs: object) -> None:
        for n in range(30):  # after this round's notes were read, before its captures
            _write(router, "user:a", f"late {n}")
            after.append((time.time_ns(), f"late {n}"))
        real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(NodeReplicator, "_capture_marked", writes_first)
    _write(router, "user:a", "noted")
    rep.run_round()
    monkeypatch.setattr(NodeReplicator, "_capture_marked", real)
    rep.run_round()
    target = open_target("file://" + str(tmp_path / "replica"))
    for i, (when, body) in enumerate(after[::7]):
        restore_tenant(router._store, target, "user:a", as_key=f"user:at{i}", at_ns=when)
        assert [tuple(r) for r in router.query(f"user:at{i}", "SELECT body FROM notes ORDER BY id")][-1] == (body,)
