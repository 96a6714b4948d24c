"""A node's replication staging: the captured-but-not-yet-uploaded changes and the per-tenant cursors.

One SQLite file per node, ``<node>/.replica/staging.db``, whose captures and cursors are written by that
node's replicator (one process at a time: :class:`~shardlite.services.replicator.NodeReplicator` holds the
node's replicator lock), besides an erase and a drop (below), each in transactions of its own. A capture
and its tenant's new cursor are stored in one transaction, so a cursor never runs ahead of what is staged;
the rows of a pack are deleted in the transaction that records the pack as uploaded, so a crash between the
upload and that transaction re-uploads the same pack under the same name. A cursor also counts the bytes
of frames staged for its file since the file's last snapshot, that snapshot's size and its capture time
(``frame_bytes``, ``image_bytes``, ``snapshot_ns``: when a refreshed snapshot is due,
:mod:`shardlite.core.refresh`); a file written before they existed gets the sizes as 0 and the time as its
last capture's when opened.

Drops: a plain drop of a tenant on a replicated root stages a **drop record** here (table ``drops``: key,
incarnation, generation, when), written by the dropping process itself (:meth:`Staging.stage_drop`, called by
:func:`shardlite.services.drop_tail.fence_and_stage` from :func:`shardlite.services.lifecycle.drop`) in one
transaction with ``synchronous=FULL``, so it survives a crash of either process and a power loss once the drop
goes on, and is there whether a replicator runs or not. The replicator ships it in its next pack
(:meth:`staged_drops`, then :meth:`shipped`, which deletes the rows in the transaction that records the pack),
never before a capture of the same key staged earlier: a drop record reaches the replica no earlier than the
history it ends. The dropping process stages the tenant's uncaptured log tail in the same transaction as the
record (:mod:`shardlite.services.drop_tail`), so every commit made before the drop's fence is in the history,
replicator running or not. The transaction that records a pack holding drop records also records each of them
as shipped (table ``drops_shipped``: key, incarnation, generation, the pack, when), kept
:data:`SHIPPED_DROPS_KEEP` seconds: a writer's confirmation request for a commit to a file dropped meanwhile
is answered by it (:mod:`shardlite.services.confirm_answers`), whenever the request comes and whichever
process ships the pack.

Two processes may capture one tenant (its replicator, and a drop staging the tail), so a capture is staged
only if it still continues the stored cursor (``expect``, compared inside the ``BEGIN IMMEDIATE`` transaction
that stages it) and no drop record of its incarnation is staged: otherwise :class:`StaleCursor`, nothing
staged (the other process's capture already holds those commits; a stale one would repeat or rewind them).

Durability: ``synchronous=NORMAL``. A process crash loses nothing (the OS keeps written pages). A power
loss may lose the last staged rows *and* the cursor rows written with them, while the tenant's checkpoint
that followed reached its database file: the next capture then finds its cursor in an older log
generation and takes a snapshot (:mod:`shardlite.files.walcapture`), so history has no silent hole.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from typing import Any, cast

import apsw

from ..core import walformat as wf
from ..core.keyindex import pack_seq
from .engine import ensure_private_dir
from .replica_locks import STAGING_DIR
from .staging_rows import (
    ADDED_CURSOR_COLUMNS,
    ANY_CURSOR,
    SCHEMA,
    TABLES,
    Erased,
    Staged,
    StagedDrop,
    StaleCursor,
    Tail,
    TenantCursor,
)
from .walcapture import NO_CURSOR, Capture, Cursor

__all__ = ["Staging", "Staged", "StagedDrop", "TenantCursor", "Erased", "DROPS_PER_PACK", "SHIPPED_DROPS_KEEP",
           "StaleCursor", "Tail", "ANY_CURSOR"]

#: Drop records shipped in one pack at most (a larger backlog goes in the next packs).
DROPS_PER_PACK = 10_000
#: Seconds a shipped drop record stays recorded as shipped (``drops_shipped``): a confirmation request for a
#: commit to the dropped file is answered "shipped" until then (a writer waits ``durability_timeout``, 10 s by
#: default; ``wait_replicated`` as long as it is told). Pruned when later drop records ship.
SHIPPED_DROPS_KEEP = 86_400


class Staging:
    """The staging file of one node (module docstring). Not thread-safe: one replicator thread uses it."""

    def __init__(self, node_path: str) -> None:
        directory = os.path.join(node_path, STAGING_DIR)
        ensure_private_dir(directory)
        self.path = os.path.join(directory, "staging.db")
        if not os.path.exists(self.path):
            # created 0600 before SQLite opens it; an existing file is never opened raw here: another Staging of
            # it in this process (an erase beside a replicator) would lose its POSIX locks on the close
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                os.close(fd)
            except FileExistsError:
                pass
        self.conn = apsw.Connection(self.path, flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_NOFOLLOW)
        self.conn.set_busy_timeout(5000)
        self.conn.execute("PRAGMA journal_mode=WAL").fetchall()
        self.conn.execute("PRAGMA synchronous=NORMAL")
        have = {str(name) for (name,) in self.conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
        if not have >= TABLES:  # a reader (`replicate status`) of a complete file writes nothing
            with self._write():
                self.conn.execute(SCHEMA)
        if not self._columns() >= set(ADDED_CURSOR_COLUMNS):
            with self._write():  # read again inside: another process may have added them since
                columns = self._columns()
                for column in ADDED_CURSOR_COLUMNS:
                    if column not in columns:
                        self.conn.execute(f"ALTER TABLE cursors ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
                if "snapshot_ns" not in columns:  # the age of a snapshot staged before counts from then on
                    self.conn.execute("UPDATE cursors SET snapshot_ns = captured_ns")

    def close(self) -> None:
        self.conn.close()

    def _columns(self) -> set[str]:
        return {str(row[1]) for row in self.conn.execute("PRAGMA table_info(cursors)")}

    # -- cursors ---------------------------------------------------------------------------------------

    _CURSOR_COLUMNS = ("incarnation, generation, salt, ckpt_seq, frame, c1, c2, page_size, closed, captured_ns, "
                       "last_commit_ns, frame_bytes, image_bytes, snapshot_ns")

    @staticmethod
    def _tenant_cursor(row: tuple[Any, ...]) -> TenantCursor:
        inc, gen, salt, seq, frame, c1, c2, size, closed, captured, last, frame_bytes, image_bytes, snapped = row
        return TenantCursor(inc, gen, Cursor(salt, seq, frame, (c1, c2), size, bool(closed)), captured, last,
                            frame_bytes, image_bytes, snapped)

    def cursor(self, key: str) -> TenantCursor | None:
        for row in self.conn.execute(f"SELECT {self._CURSOR_COLUMNS} FROM cursors WHERE key = ?", (key,)):
            return self._tenant_cursor(row)
        return None

    def cursors(self) -> dict[str, TenantCursor]:
        """Every tenant's cursor, in one read (the replicator's reconcile pass reads them all)."""
        return {row[0]: self._tenant_cursor(row[1:]) for row in self.conn.execute(
            f"SELECT key, {self._CURSOR_COLUMNS} FROM cursors ORDER BY key")}

    def identities(self, after: str = "", upto: str | None = None) -> dict[str, tuple[str, int]]:
        """Per tenant with a cursor whose key sorts after ``after`` and not after ``upto`` (None: no bound; code
        point order, as the catalog's ``iter_tenants``), the (incarnation, generation) of the file it was taken
        on, in one read (the reconcile pass; a third of the memory of :meth:`cursors` at 100,000 tenants)."""
        return {str(key): (str(inc), int(gen)) for key, inc, gen in self._key_range(
            "key, incarnation, generation", after, upto)}

    def captured_times(self, after: str = "", upto: str | None = None) -> dict[str, int]:
        """Per tenant with a cursor in the key range of :meth:`identities`, when it was last captured (ns)."""
        return {str(key): int(at) for key, at in self._key_range("key, captured_ns", after, upto)}

    def _key_range(self, columns: str, after: str, upto: str | None) -> apsw.Cursor:
        # two statements, not "? IS NULL OR key <= ?": SQLite plans that as a scan of every cursor, which made
        # each slice of a reconcile pass read all 100,000 (a pass: 100 slices)
        if upto is None:
            return self.conn.execute(f"SELECT {columns} FROM cursors WHERE key > ?", (after,))
        return self.conn.execute(f"SELECT {columns} FROM cursors WHERE key > ? AND key <= ?", (after, upto))

    def keys(self) -> list[str]:
        return [row[0] for row in self.conn.execute("SELECT key FROM cursors ORDER BY key")]

    def _put_cursor(self, key: str, incarnation: str, generation: int, cursor: Cursor, captured_ns: int,
                    last_commit_ns: int, sizes: tuple[int, int, int]) -> None:
        c1, c2 = cursor.checksum
        self.conn.execute(
            f"INSERT OR REPLACE INTO cursors(key, {self._CURSOR_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
            "?, ?, ?)",
            (key, incarnation, generation, cursor.salt, cursor.checkpoint_seq, cursor.frame, c1, c2,
             cursor.page_size, int(cursor.closed), captured_ns, last_commit_ns, *sizes))

    def _sizes(self, key: str, incarnation: str, generation: int) -> tuple[int, int, int]:
        """(frame_bytes, image_bytes, snapshot_ns) stored for ``key`` when its cursor is of this file, else
        (0, 0, 0)."""
        for inc, gen, frame_bytes, image_bytes, snapshot_ns in self.conn.execute(
                "SELECT incarnation, generation, frame_bytes, image_bytes, snapshot_ns FROM cursors WHERE key = ?",
                (key,)):
            if (inc, gen) == (incarnation, generation):
                return int(frame_bytes), int(image_bytes), int(snapshot_ns)
        return 0, 0, 0

    def set_cursor(self, key: str, incarnation: str, generation: int, cursor: Cursor, last_commit_ns: int) -> None:
        """Store a cursor that moved without new data (a checkpoint closed its log generation); nothing once the
        incarnation's drop record is staged (the drop forgot the cursor)."""
        old = self.cursor(key)
        with self._write():
            if self.conn.execute("SELECT 1 FROM drops WHERE key = ? AND incarnation = ?",
                                 (key, incarnation)).fetchone() is not None:
                return
            self._put_cursor(key, incarnation, generation, cursor, old.captured_ns if old else 0, last_commit_ns,
                             self._sizes(key, incarnation, generation))

    def forget(self, key: str) -> None:
        with self._write():
            self.conn.execute("DELETE FROM cursors WHERE key = ?", (key,))

    # -- captures --------------------------------------------------------------------------------------

    def stage(self, key: str, incarnation: str, generation: int, got: Capture, commits: list[tuple[int, int]],
              captured_ns: int, expect: Cursor = ANY_CURSOR) -> None:
        """Stage ``got`` (not empty) with its commits' (frame, time) and store its cursor, in one transaction.
        ``expect``: the cursor the capture continued (:data:`~shardlite.files.walcapture.NO_CURSOR`: none of
        this file); :class:`StaleCursor` (nothing staged) when the stored one differs or the incarnation's drop
        record is staged (module docstring)."""
        with self._write():
            self._check_cursor(key, incarnation, generation, expect)
            self._insert_capture(key, incarnation, generation, got, commits, captured_ns)

    def _insert_capture(self, key: str, incarnation: str, generation: int, got: Capture,
                        commits: list[tuple[int, int]], captured_ns: int) -> None:
        frame_bytes, image_bytes, snapshot_ns = self._sizes(key, incarnation, generation)
        if got.snapshot is not None:
            kind, salt, first, last, data = "snapshot", got.cursor.salt.hex(), 0, got.cursor.frame, got.snapshot
            frame_bytes, image_bytes, snapshot_ns = 0, len(data), captured_ns
        else:
            kind, salt, first, last = "frames", got.cursor.salt.hex(), got.frames[0].number, got.frames[-1].number
            data = b"".join(wf.encode_frame(frame) for frame in got.frames)
            frame_bytes += len(data)
            snapshot_ns = snapshot_ns or captured_ns  # no snapshot counted for this file yet: from now on
        self.conn.execute(
            "INSERT INTO staged(key, incarnation, generation, kind, page_size, salt, first, last, commits, "
            "captured_ns, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, incarnation, generation, kind, got.page_size, salt, first, last, json.dumps(commits),
             captured_ns, data))
        self._put_cursor(key, incarnation, generation, got.cursor, captured_ns,
                         commits[-1][1] if commits else captured_ns, (frame_bytes, image_bytes, snapshot_ns))

    def _check_cursor(self, key: str, incarnation: str, generation: int, expect: Cursor) -> None:
        """Inside a write transaction: :class:`StaleCursor` unless the stored cursor of ``key`` is ``expect``
        (:data:`NO_CURSOR`: no cursor of this file) and no drop record of ``incarnation`` is staged."""
        if expect is ANY_CURSOR:
            return
        if self.conn.execute("SELECT 1 FROM drops WHERE key = ? AND incarnation = ?",
                             (key, incarnation)).fetchone() is not None:
            raise StaleCursor(f"tenant {key!r}: its drop record is staged (the drop staged its last commits)")
        stored = self.cursor(key)
        if stored is None or (stored.incarnation, stored.generation) != (incarnation, generation):
            current = NO_CURSOR
        else:
            current = stored.cursor
        if current != expect:
            raise StaleCursor(f"tenant {key!r}: another process staged a capture since this one read its cursor")

    def staged(self, limit_bytes: int) -> list[Staged]:
        """The oldest staged captures, at least one, stopping once ``limit_bytes`` are reached."""
        out: list[Staged] = []
        total = 0
        for row in self.conn.execute("SELECT id, key, incarnation, generation, kind, page_size, salt, first, "
                                     "last, commits, captured_ns, data FROM staged ORDER BY id"):
            ident, key, inc, gen, kind, size, salt, first, last, commits_json, captured, data = row
            commits = [(int(f), int(t)) for f, t in json.loads(commits_json)]
            out.append(Staged(ident, key, inc, gen, kind, size, salt, first, last, commits, captured, data))
            total += len(row[11])
            if total >= limit_bytes:
                break
        return out

    def has_staged(self) -> bool:
        """Whether anything waits for an upload: a capture or a drop record."""
        return bool(self.conn.execute("SELECT 1 FROM staged UNION ALL SELECT 1 FROM drops LIMIT 1").fetchall())

    def staged_count(self) -> tuple[int, int]:
        """(staged captures, their bytes)."""
        row = self.conn.execute("SELECT count(*), coalesce(sum(length(data)), 0) FROM staged").fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    def pending_by_key(self) -> dict[str, int]:
        """Per tenant with staged captures, the time of its oldest staged commit (ns)."""
        oldest: dict[str, int] = {}
        for key, commits in self.conn.execute("SELECT key, commits FROM staged ORDER BY id"):
            times = [int(t) for _f, t in json.loads(commits)]
            if times and key not in oldest:
                oldest[key] = min(times)
        return oldest

    def keys_staged(self, keys: set[str]) -> set[str]:
        """Which of ``keys`` have captures staged (not uploaded yet)."""
        return {key for key in keys
                if self.conn.execute("SELECT 1 FROM staged WHERE key = ? LIMIT 1", (key,)).fetchone() is not None}

    def next_seq(self) -> int:
        row = self.conn.execute("SELECT coalesce(max(seq), 0) + 1 FROM packs").fetchone()
        assert row is not None
        return int(row[0])

    def shipped(self, seq: int, name: str, created_ns: int, uploaded_ns: int, size: int, ids: list[int],
                drop_ids: list[int] | None = None) -> None:
        """Record pack ``seq`` as uploaded and drop its staged rows (captures ``ids``, drop records
        ``drop_ids``, recorded as shipped: module docstring), in one transaction."""
        with self._write():
            self.conn.execute("INSERT INTO packs VALUES (?, ?, ?, ?, ?, ?)",
                              (seq, name, created_ns, uploaded_ns, size, len(ids)))
            self.conn.executemany("DELETE FROM staged WHERE id = ?", [(i,) for i in ids])
            if drop_ids:  # a pack without drop records writes nothing more than before
                now = time.time_ns()
                self.conn.executemany(
                    "INSERT OR REPLACE INTO drops_shipped SELECT key, incarnation, generation, ?, ? FROM drops "
                    "WHERE id = ?", [(name, now, i) for i in drop_ids])
                self.conn.executemany("DELETE FROM drops WHERE id = ?", [(i,) for i in drop_ids])
                self.conn.execute("DELETE FROM drops_shipped WHERE shipped_ns < ?",
                                  (now - SHIPPED_DROPS_KEEP * 1_000_000_000,))

    # -- drop records --------------------------------------------------------------------------------------

    def stage_drop(self, key: str, incarnation: str, generation: int, dropped_ns: int,
                   tail: Tail | None = None) -> bool:
        """Stage the drop record of incarnation ``incarnation`` of ``key`` and forget its cursor (the tenant
        is no longer on this node), with ``tail`` (the commits its cursor had not reached, when not empty)
        staged before it, in one transaction with ``synchronous=FULL``: durable when this returns (module
        docstring). A record of the same incarnation already staged is kept, with its time, and the tail is
        then not staged again (a drop run again after a crash: the first run staged it). Returns whether a
        record was added. :class:`StaleCursor` (nothing staged) when ``tail`` no longer continues the stored
        cursor: the replicator staged a capture meanwhile; capture again."""
        self.conn.execute("PRAGMA synchronous=FULL")
        try:
            with self._write():
                if self.conn.execute("SELECT 1 FROM drops WHERE key = ? AND incarnation = ?",
                                     (key, incarnation)).fetchone() is not None:
                    return False
                if tail is not None:
                    self._check_cursor(key, incarnation, generation, tail.expect)
                    if not tail.capture.empty:
                        self._insert_capture(key, incarnation, generation, tail.capture, tail.commits,
                                             tail.captured_ns)
                self.conn.execute("INSERT INTO drops(key, incarnation, generation, dropped_ns) "
                                  "VALUES (?, ?, ?, ?)", (key, incarnation, generation, dropped_ns))
                self.conn.execute("DELETE FROM cursors WHERE key = ? AND incarnation = ?", (key, incarnation))
        finally:
            self.conn.execute("PRAGMA synchronous=NORMAL")
        return True

    def drop_staged(self, key: str, incarnation: str) -> bool:
        """Whether the drop record of incarnation ``incarnation`` of ``key`` is staged (not shipped yet)."""
        return self.conn.execute("SELECT 1 FROM drops WHERE key = ? AND incarnation = ?",
                                 (key, incarnation)).fetchone() is not None

    def staged_drops(self, shipping: list[Staged], limit: int = DROPS_PER_PACK) -> list[StagedDrop]:
        """The oldest staged drop records (at most ``limit``) that may ship in a pack with the captures
        ``shipping`` (the oldest staged, from :meth:`staged`): those whose key has no capture staged after
        them, so a drop record never reaches the replica before the history it ends."""
        after = max((s.id for s in shipping), default=0)
        return [StagedDrop(*row) for row in self.conn.execute(
            "SELECT id, key, incarnation, generation, dropped_ns FROM drops AS d WHERE NOT EXISTS "
            "(SELECT 1 FROM staged AS s WHERE s.key = d.key AND s.id > ?) ORDER BY id LIMIT ?", (after, limit))]

    def drop_shipped(self, key: str, incarnation: str, generation: int) -> str | None:
        """The pack that shipped the drop record of (``key``, ``incarnation``, ``generation``), if it shipped
        less than :data:`SHIPPED_DROPS_KEEP` seconds ago (and was not erased since)."""
        row = self.conn.execute("SELECT pack FROM drops_shipped WHERE key = ? AND incarnation = ? AND generation = ?",
                                (key, incarnation, generation)).fetchone()
        return None if row is None else str(row[0])

    def is_erased(self, incarnation: str) -> bool:
        """Whether ``incarnation`` is recorded as erased on this node (:meth:`erase`)."""
        return self.conn.execute("SELECT 1 FROM erased WHERE incarnation = ?", (incarnation,)).fetchone() is not None

    def drops_count(self) -> int:
        """Staged drop records (not uploaded yet)."""
        row = self.conn.execute("SELECT count(*) FROM drops").fetchone()
        assert row is not None
        return int(row[0])

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        """A write transaction begun as one (``BEGIN IMMEDIATE``, waiting up to the busy timeout): a deferred
        one that read first would fail at its first write, without waiting, whenever another process (the
        replicator, an erase, a compaction) committed since its read began (SQLITE_BUSY_SNAPSHOT)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def packs(self) -> Iterator[tuple[int, str, int, int, int, int]]:
        yield from self.conn.execute("SELECT seq, name, created_ns, uploaded_ns, bytes, entries FROM packs "
                                     "ORDER BY seq")

    def forget_packs(self, names: list[str]) -> int:
        """Forget the rows of packs a compaction deleted from the replica (the staging's pack list would
        otherwise grow for ever); the row of the highest sequence stays, so a sequence number is never
        reused. Returns how many rows went."""
        with self._write():
            top = self.conn.execute("SELECT coalesce(max(seq), 0) FROM packs").fetchone()
            assert top is not None
            gone = 0
            for name in names:
                numbered = pack_seq(name)  # a row is found by its sequence number (the key), not by a scan
                if numbered is None:
                    continue  # a compaction pack: never a row here
                self.conn.execute("DELETE FROM packs WHERE seq = ? AND name = ? AND seq < ?",
                                  (numbered[1], name, int(top[0])))
                gone += self.conn.changes()
        return gone

    # -- erase ----------------------------------------------------------------------------------------------

    def erase(self, key: str, incarnations: list[str], erased_ns: int) -> Erased:
        """Forget every staged capture, drop record (staged or recorded as shipped) and the cursor of ``key``
        (any incarnation) and record ``incarnations`` (with those found here) as erased, in one transaction:
        the replicator never uploads a capture of an erased incarnation staged later by a capture that was in
        flight (:meth:`discard_erased`), and a confirmation request for a write to one is answered "erased".
        The caller holds the node's erase lock."""
        # secure_delete: the erased captures' bytes are overwritten, not left in free pages of this file; the
        # scrub afterwards removes what earlier deletes (shipped packs) left in free pages, and the log.
        self.conn.execute("PRAGMA secure_delete=ON")
        with self._write():
            rows = self.conn.execute("SELECT incarnation, count(*), sum(length(data)) FROM staged WHERE key = ? "
                                     "GROUP BY incarnation", (key,)).fetchall()
            found = {str(inc) for inc, _n, _b in rows}
            cursor = self.conn.execute("SELECT incarnation FROM cursors WHERE key = ?", (key,)).fetchall()
            found.update(str(inc) for (inc,) in cursor)
            # drops recorded as shipped: their incarnations are erased too (a confirmation request for a write
            # to one is answered "erased", not "shipped"), and the key's rows go
            found.update(str(inc) for (inc,) in self.conn.execute(
                "SELECT incarnation FROM drops_shipped WHERE key = ?", (key,)))
            self.conn.executemany("INSERT OR IGNORE INTO erased VALUES (?, ?)",
                                  [(inc, erased_ns) for inc in sorted(found | set(incarnations))])
            self.conn.execute("DELETE FROM staged WHERE key = ?", (key,))
            self.conn.execute("DELETE FROM cursors WHERE key = ?", (key,))
            self.conn.execute("DELETE FROM drops WHERE key = ?", (key,))
            drops = self.conn.changes()
            self.conn.execute("DELETE FROM drops_shipped WHERE key = ?", (key,))
            shipped_drops = self.conn.changes()
        scrubbed = self.scrub()
        captures = size = 0
        for _inc, count, length in rows:
            captures += int(cast(int, count))
            size += int(cast(int, length or 0))
        return Erased(sorted(found), captures, size, bool(cursor), scrubbed, drops, shipped_drops)

    def scrub(self) -> bool:
        """Rewrite this file without free pages (``VACUUM``: rows deleted before, such as the captures of
        packs already shipped, leave their bytes in free pages otherwise) and empty its log (a TRUNCATE
        checkpoint). False when either could not finish (the replicator held the file past the busy timeout,
        or a reader held the log: its next checkpoint overwrites it)."""
        try:
            self.conn.execute("VACUUM")
            busy, _log, _done = self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()[0]
        except apsw.BusyError:
            return False
        return not busy

    def erased(self) -> set[str]:
        """The incarnations recorded as erased on this node."""
        return {str(inc) for (inc,) in self.conn.execute("SELECT incarnation FROM erased")}

    def discard_erased(self) -> int:
        """Delete the staged captures and cursors of erased incarnations (captures staged after the erase by a
        capture that was in flight); returns how many captures went. The caller holds the erase lock."""
        with self._write():
            gone = self.conn.execute("DELETE FROM staged WHERE incarnation IN (SELECT incarnation FROM erased) "
                                     "RETURNING id").fetchall()
            self.conn.execute("DELETE FROM cursors WHERE incarnation IN (SELECT incarnation FROM erased)")
            self.conn.execute("DELETE FROM drops WHERE incarnation IN (SELECT incarnation FROM erased)")
        if gone:
            self.scrub()  # their bytes leave the file's free pages and its log too, as the erase's own did
        return len(gone)

    def repacked(self, name: str, size: int, entries: int) -> None:
        """Record that an erase rewrote pack ``name`` to ``size`` bytes and ``entries`` captures (0, 0: deleted).
        The row stays, so a pack's sequence number is never reused."""
        with self._write():
            self.conn.execute("UPDATE packs SET bytes = ?, entries = ? WHERE name = ?", (size, entries, name))

    # -- notes -----------------------------------------------------------------------------------------

    def notes_offsets(self) -> dict[str, int]:
        return {name: int(at) for name, at in self.conn.execute("SELECT file, offset FROM notes_read")}

    def set_notes_offsets(self, offsets: dict[str, int], gone: list[str]) -> None:
        with self._write():
            self.conn.executemany("INSERT OR REPLACE INTO notes_read VALUES (?, ?)", list(offsets.items()))
            self.conn.executemany("DELETE FROM notes_read WHERE file = ?", [(name,) for name in gone])

