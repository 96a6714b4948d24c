"""Erasing a tenant: drop it from the live root *and* remove its whole history from the replica, with a receipt.

``erase(store, key)`` (``Router.drop(key, erase=True)``, ``shardlite tenants drop KEY --erase``) is for requests
to erase a person's data: the key is the person, so every history of the key goes, whatever its incarnation
(earlier tenants under the same key included). In order:

1. **Lock** the root's and every node's erase lock (:func:`shardlite.files.replica_locks.erase_lock`), then the
   root's metadata upload lock (:func:`shardlite.services.replica_meta.upload_lock`). A node's replicator
   takes its node's lock from reading its staged captures to recording the pack as shipped, and the
   metadata's snapshots and deltas are read and uploaded under the upload lock, so while an erase holds them
   no pack, snapshot or delta is being built or uploaded, and every one uploaded before is in the replica's
   listing.
2. **Drop** the live tenant as a plain drop does (fence, catalog tombstone, files deleted), unless it is
   already dropped; the key's dead letters (event payloads it emitted) go from the live metadata too.
3. **Scan** the header of every pack for entries and drop records of the key (one ranged GET per pack).
4. **Staging**: on every node, the key's staged captures, drop records (``drop_tail.fence_and_stage``) and cursor
   are deleted and its incarnations recorded as erased, in one transaction (``secure_delete`` on), then the
   staging file is vacuumed and its log truncated: neither these captures nor those of packs shipped earlier
   linger in its free pages. A capture that was in flight during the drop and stages the key's frames
   afterwards is dropped by the replicator before its next upload (``Staging.discard_erased``, which vacuums
   the staging file again).
5. **Tombstones** ``v1/erased/<hash of the incarnation>.erased`` are written for every incarnation found,
   *before* any pack is touched: restores skip every capture of a tombstoned incarnation
   (:func:`shardlite.services.replica_read.captures_of`), so a restore during the erase, or after an erase
   interrupted half-way, never brings the tenant back. Tombstones hold no key, only when the erase ran.
6. **Rewrite** every pack holding an entry or a drop record of the key: the pack without them
   (:func:`shardlite.core.pack.without_key`: kept entries checked against their digests before and after) replaces
   the old object under the same name (a target's ``put`` is atomic: a reader sees the whole old or the whole
   new pack, never both nor a duplicate), and is read back and compared before the next pack; a pack left
   with no entry and no drop record is deleted and checked gone.
7. **Metadata** (under the root's metadata upload lock too, taken with the erase locks): when deltas exist, a
   snapshot of the live metadata (after step 2) is uploaded, then every delta is deleted (they are made
   against the snapshots this step rewrites, and may hold the key's rows themselves; the replicator is told
   to take a snapshot next: :func:`shardlite.services.replica_meta.note_erase`); then the snapshots holding
   dead letters or a pending-work row of the key are rewritten without them (the image opened inert, the
   rows deleted, vacuumed; same name, read back and compared). Restore points of the metadata over the last
   minutes are then the snapshots' alone.

Idempotent and crash-safe: each step can be repeated, so ``erase`` after a kill -9 at any point finishes the
job; on a key already erased it reports what it finds (nothing left, its tombstone present). A damaged pack
whose header cannot be read might hold the key: it is listed in the receipt as ``unreadable`` and the receipt
is ``complete: False`` (so is one whose staging could not be vacuumed).

Kept: metadata snapshots (``v1/meta/``) keep the key's catalog row (key, node, generation, incarnation,
state: identifiers, no tenant data). The live catalog keeps the same row as the key's
tombstone (generations are never reused), so every later snapshot holds it anyway, and a restore registers
only tenants that have captures, so the row never brings the tenant back. Objects a versioned bucket keeps
as old versions are out of reach of the S3 API calls an erase makes: a bucket holding a replica should not
keep versions (or expire them with a lifecycle rule).
"""

from __future__ import annotations

import datetime
import json
import os
import time
from typing import Any

import apsw
import xxhash

from ..core import metasnap, pack
from ..core.keys import canonical
from ..errors import Busy, ReplicaError
from ..files.copying import inert
from ..files.replica_locks import erase_lock
from ..files.staging import Staging
from ..front.store import Store
from ..replica.target import ReplicaTarget, open_target, redact
from . import lifecycle, replica_index, replica_meta, replica_meta_read, replica_owners
from .replica_read import list_packs, read_headers, tombstone_name

__all__ = ["erase", "LOCK_WAIT"]

#: Seconds an erase waits for each node's erase lock (a replicator holds it for one upload).
LOCK_WAIT = 60.0


def _iso(ns: int) -> str:
    when = datetime.datetime.fromtimestamp(ns / 1e9, tz=datetime.UTC)
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _drop_live(store: Store, key: str) -> dict[str, Any]:
    """Step 1: the live root. What the catalog said and what was done."""
    record = store.meta.tenants.lookup(key)
    if record is None:
        live: dict[str, Any] = {"catalog": "absent", "action": "none"}
    else:
        live = {"catalog": record.state, "node": record.node, "incarnation": record.incarnation,
                "generation": record.generation}
        if record.state == "dropped":
            live["action"] = "already dropped"
        else:
            lifecycle.drop(store, key)  # a tenant being moved raises TenantMoving: erase it after the move
            live["action"] = "dropped"
    letters = store.meta.dead_letters
    removed = 0
    for letter in letters.list(limit=max(1, letters.count())):
        if letter.source == key and letters.delete(letter.source, letter.incarnation, letter.seq):
            removed += 1
    live["dead_letters_removed"] = removed
    return live


def _nodes(store: Store) -> list[tuple[str, str]]:
    """(name, directory) of every node whose directory exists here, in name order."""
    found = []
    for node in store.meta.nodes.list():
        path = store.node_path(node.name)
        if os.path.isdir(path):
            found.append((node.name, path))
    return sorted(found)


def _lock_all(nodes: list[tuple[str, str]], wait: float) -> list[int]:
    fds: list[int] = []
    try:
        for name, path in nodes:
            fd = erase_lock(path, wait=wait)
            if fd is None:
                raise Busy(f"{name}'s erase lock stayed taken for {wait:.0f} s (a replicator uploading a "
                           "large backlog, or another erase); nothing was erased yet: retry")
            fds.append(fd)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _rewrite(target: ReplicaTarget, name: str, key: str) -> dict[str, Any]:
    """Step 6 for one pack: rewrite or delete it, verified. What was done."""
    blob = target.get(name)
    new, removed, dropped = pack.without_key(blob, key)
    done: dict[str, Any] = {"object": name, "captures_removed": len(removed),
                            "bytes_removed": sum(entry.length for entry in removed), "size_before": len(blob),
                            "drop_records_removed": len(dropped),
                            "incarnations": sorted({e.incarnation for e in removed} | {d.incarnation for d in dropped})}
    if not removed and not dropped:
        done.update(action="unchanged", size_after=len(blob), entries_after=-1)
        return done
    if new is None:
        target.delete_many([name])
        if target.head(name) is not None:
            raise ReplicaError(f"{target.url}: {name} is still there after its delete; run the erase again")
        done.update(action="deleted", size_after=0, entries_after=0)
        return done
    target.put(name, new)
    back = target.get(name)
    if xxhash.xxh3_128_hexdigest(back) != xxhash.xxh3_128_hexdigest(new):
        raise ReplicaError(f"{target.url}: {name} does not read back as written; run the erase again")
    done.update(action="rewritten", size_after=len(new), entries_after=len(pack.decode_header(new)[0].entries))
    return done


def _without_key(global_db: bytes, key: str) -> tuple[bytes | None, int, int]:
    """A metadata snapshot's ``global.db`` image without the key's dead letters and pending-work row
    (vacuumed: no free page keeps their bytes), with how many of each went; ``None`` when it holds neither.
    The image is untrusted: opened inert (no trigger of its schema fires)."""
    data = bytearray(global_db)
    if data[18:20] == b"\x02\x02":
        data[18:20] = b"\x01\x01"  # a WAL-mode header: the image alone, as a rollback-journal file
    conn = inert(apsw.Connection(":memory:"))
    try:
        conn.deserialize("main", bytes(data))
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
        letters = pending = 0
        if "_shardlite_dead_letters" in tables:
            letters = len(conn.execute("DELETE FROM _shardlite_dead_letters WHERE source = ? RETURNING 1",
                                       (key,)).fetchall())
        if "_shardlite_pending" in tables:
            pending = len(conn.execute("DELETE FROM _shardlite_pending WHERE key = ? RETURNING 1",
                                       (key,)).fetchall())
        if not letters and not pending:
            return None, 0, 0
        conn.execute("VACUUM")
        return conn.serialize("main"), letters, pending
    except apsw.Error as exc:
        raise metasnap.MetaSnapError(f"the snapshot's metadata image cannot be read ({exc})") from None
    finally:
        conn.close()


def _scrub_snapshots(target: ReplicaTarget, key: str, unreadable: list[dict[str, str]]) -> tuple[int, list[
        dict[str, Any]]]:
    """Step 7: every metadata snapshot holding dead letters or pending work of ``key`` rewritten without them
    (same name, verified). Returns how many snapshots were read and what was rewritten."""
    read, done = 0, []
    for name, _size in target.list(metasnap.PREFIX):
        if metasnap.time_of(name) is None:
            continue
        read += 1
        try:
            header, global_db, app_global_db = metasnap.decode(target.get(name))
            new_global, letters, pending = _without_key(global_db, key)
        except metasnap.MetaSnapError as exc:
            unreadable.append({"object": name, "error": str(exc)})
            continue
        if new_global is None:
            continue
        blob = metasnap.encode(header.created_ns, header.root, new_global, app_global_db)
        target.put(name, blob)
        if xxhash.xxh3_128_hexdigest(target.get(name)) != xxhash.xxh3_128_hexdigest(blob):
            raise ReplicaError(f"{target.url}: {name} does not read back as written; run the erase again")
        done.append({"object": name, "action": "rewritten", "dead_letters_removed": letters,
                     "pending_removed": pending})
    return read, done


def erase(store: Store, key: object, *, target: ReplicaTarget | None = None,
          lock_wait: float = LOCK_WAIT) -> dict[str, Any]:
    """Drop tenant ``key`` and remove every capture of it from the root's replica (module docstring). Returns
    the receipt: what was found and deleted, where and when (JSON-ready; no credentials: the replica's
    location is :func:`~shardlite.replica.target.redact`-ed)."""
    canon = canonical(key)
    started = time.time_ns()
    receipt: dict[str, Any] = {"key": canon, "started": _iso(started)}
    if store.replicate is None:
        live = _drop_live(store, canon)
        receipt["live"] = live
        incarnations: set[str] = {live["incarnation"]} if "incarnation" in live else set()
        nodes_hit: set[str] = {live["node"]} if "node" in live else set()
        receipt.update(replica=None, incarnations=sorted(incarnations), nodes=sorted(nodes_hit), objects=[],
                       staged=[], tombstones=[], unreadable=[], complete=True,
                       note="this root does not replicate: there was no replica history to erase",
                       totals=_totals([], []), finished=_iso(time.time_ns()))
        return receipt
    owned = target is None
    target = target if target is not None else open_target(store.replicate)
    receipt["replica"] = redact(target.url)
    try:  # a location another root replicates to is not this root's to rewrite: nothing is erased then
        replica_owners.claim(target, store.meta.kv, store.replicate)
    except BaseException:
        if owned:
            target.close()
        raise
    nodes = _nodes(store)
    # the erase locks, then the metadata upload lock: a snapshot or delta being taken (its uploader holds that
    # lock from reading the images to the upload) is listed before the dead letters go, every later one is
    # taken without them
    fds = _lock_all([("the root", store.root), *[(f"node {name!r}", path) for name, path in nodes]], lock_wait)
    upload = replica_meta.upload_lock(store.root, wait=lock_wait)  # no metadata upload while snapshots change
    if upload is None:
        for fd in fds:
            os.close(fd)
        raise Busy(f"the root's metadata upload lock stayed taken for {lock_wait:.0f} s; nothing was erased yet: "
                   "retry")
    fds.append(upload)
    try:
        live = _drop_live(store, canon)
        receipt["live"] = live
        incarnations = {live["incarnation"]} if "incarnation" in live else set()
        nodes_hit = {live["node"]} if "node" in live else set()
        hits: list[str] = []
        unreadable: list[dict[str, str]] = []
        listed = list_packs(target, every=True)
        packs = len(listed)
        for name, info in read_headers(target, listed).items():
            if isinstance(info, pack.PackError):
                unreadable.append({"object": name, "error": str(info)})
                continue
            mine = [entry for entry in info.header.entries if entry.key == canon]
            mine_dropped = [drop for drop in info.header.drops if drop.key == canon]  # identifiers: they go too
            if mine or mine_dropped:
                hits.append(name)
                incarnations.update([e.incarnation for e in mine] + [d.incarnation for d in mine_dropped])
                nodes_hit.add(info.header.node)
        staged: list[dict[str, Any]] = []
        for name, path in nodes:
            staging = Staging(path)
            try:
                got = staging.erase(canon, sorted(incarnations), started)
            except apsw.BusyError:
                raise Busy(f"node {name!r}'s staging stayed locked by its replicator; the tenant is dropped, its "
                           "replica history not erased yet: run the erase again") from None
            finally:
                staging.close()
            if got.captures or got.cursor or got.drops or got.shipped_drops or not got.scrubbed:
                staged.append({"node": name, "captures_removed": got.captures, "bytes_removed": got.bytes,
                               "cursor_removed": got.cursor, "drop_records_removed": got.drops,
                               "shipped_drop_records_removed": got.shipped_drops,
                               "incarnations": got.incarnations, "staging_scrubbed": got.scrubbed})
                incarnations.update(got.incarnations)
            if got.captures or got.cursor or got.drops or got.shipped_drops:
                nodes_hit.add(name)
        tombstones = []
        for incarnation in sorted(incarnations):
            stone = tombstone_name(incarnation)
            existed = target.head(stone) is not None
            if not existed:
                target.put_if_absent(stone, json.dumps({"version": 1, "erased": _iso(started)}).encode("utf-8"))
            tombstones.append({"object": stone, "action": "present" if existed else "written"})
        # the key index's segment first covers every pack shipped (all are recorded: the node locks are held),
        # so the packs deleted below leave no gap past its coverage (services/replica_index.py, _tail)
        replica_index.SegmentWriter().run(store, target, locked=True)
        objects = [_rewrite(target, name, canon) for name in hits]
        # the deltas are made against the snapshots rewritten below, and may hold the key's rows themselves:
        # a snapshot of the live metadata (after the drop) first stands for the newest of them
        replica_meta.note_erase(store.root)
        deltas = replica_meta_read.delta_names(target)
        fresh = replica_meta.snapshot_now(store, target) if deltas else None
        deltas_deleted = replica_meta_read.delete_deltas(target, deltas)
        snapshots_read, snapshots = _scrub_snapshots(target, canon, unreadable)
        for _name, path in nodes:
            staging = Staging(path)
            try:
                for done in objects:
                    if done["action"] != "unchanged":
                        staging.repacked(done["object"], done["size_after"], done["entries_after"])
            finally:
                staging.close()
    finally:
        for fd in fds:
            os.close(fd)
        if owned:
            target.close()
    receipt.update(incarnations=sorted(incarnations), nodes=sorted(nodes_hit), packs_scanned=packs,
                   staged=staged, objects=objects, tombstones=tombstones, unreadable=unreadable,
                   complete=not unreadable and all(s["staging_scrubbed"] for s in staged),
                   totals=_totals(objects, staged),
                   snapshots_scanned=snapshots_read, snapshots=snapshots, metadata_deltas_deleted=deltas_deleted,
                   metadata_snapshot_taken=fresh,
                   metadata_snapshots="the key's catalog row is kept (identifiers, no tenant data), as the live "
                                      "catalog's tombstone keeps it",
                   finished=_iso(time.time_ns()))
    receipt["already_erased"] = (live["action"] != "dropped" and not objects and not snapshots
                                 and not any(s["captures_removed"] or s["cursor_removed"] for s in staged)
                                 and any(t["action"] == "present" for t in tombstones))
    return receipt


def _totals(objects: list[dict[str, Any]], staged: list[dict[str, Any]]) -> dict[str, int]:
    return {"objects_rewritten": sum(o["action"] == "rewritten" for o in objects),
            "objects_deleted": sum(o["action"] == "deleted" for o in objects),
            "captures_removed": (sum(o["captures_removed"] for o in objects)
                                 + sum(s["captures_removed"] for s in staged)),
            "bytes_removed": sum(o["bytes_removed"] for o in objects) + sum(s["bytes_removed"] for s in staged),
            "object_bytes_freed": sum(o["size_before"] - o["size_after"] for o in objects)}


def describe(receipt: dict[str, Any]) -> list[str]:
    """The receipt as lines of text (the CLI prints them literally: the key is tenant data)."""
    live = receipt["live"]
    lines = [f"erase of tenant {receipt['key']!r}: started {receipt['started']}, finished {receipt['finished']}"]
    if live["catalog"] == "absent":
        lines.append("  live root: the catalog has no such key (nothing to drop)")
    else:
        lines.append(f"  live root: {live['action']} (node {live['node']!r}, generation {live['generation']}, "
                     f"incarnation {live['incarnation']}); {live['dead_letters_removed']} dead letters removed")
    if receipt["replica"] is None:
        lines.append(f"  replica: none ({receipt['note']})")
        return lines
    totals = receipt["totals"]
    lines.append(f"  replica: {receipt['replica']} ({receipt['packs_scanned']} packs scanned)")
    lines.append(f"  incarnations erased: {', '.join(receipt['incarnations']) or 'none found'}")
    lines.append(f"  nodes: {', '.join(repr(n) for n in receipt['nodes']) or 'none'}")
    for found in receipt["staged"]:
        lines.append(f"  staging of node {found['node']!r}: {found['captures_removed']} staged captures "
                     f"({found['bytes_removed']} bytes) removed, cursor removed: {found['cursor_removed']}, "
                     f"{found['drop_records_removed']} staged drop records and "
                     f"{found['shipped_drop_records_removed']} records of shipped drops removed"
                     + ("" if found["staging_scrubbed"] else "; NOT VACUUMED: its replicator held the file (free "
                        "pages may keep shipped captures): run the erase again"))
    for done in receipt["objects"]:
        lines.append(f"  {done['action']} {done['object']}: {done['captures_removed']} captures "
                     f"({done['bytes_removed']} bytes) removed, {done['size_before']} -> {done['size_after']} bytes")
    for done in receipt["snapshots"]:
        lines.append(f"  {done['action']} {done['object']}: {done['dead_letters_removed']} dead letters, "
                     f"{done['pending_removed']} pending-work rows of the tenant removed")
    for stone in receipt["tombstones"]:
        lines.append(f"  tombstone {stone['object']}: {stone['action']}")
    for bad in receipt["unreadable"]:
        lines.append(f"  UNREADABLE {bad['object']}: {bad['error']} (it may hold the tenant: inspect or delete it)")
    lines.append(f"  total: {totals['objects_rewritten']} objects rewritten, {totals['objects_deleted']} deleted, "
                 f"{totals['captures_removed']} captures ({totals['bytes_removed']} bytes of the tenant) removed")
    lines.append(f"  metadata snapshots: {receipt['snapshots_scanned']} scanned, {len(receipt['snapshots'])} "
                 f"rewritten, {receipt['metadata_deltas_deleted']} metadata deltas deleted; "
                 f"{receipt['metadata_snapshots']}")
    if receipt["already_erased"]:
        lines.append("  (already erased: nothing of it was left)")
    if not receipt["complete"]:
        lines.append("  INCOMPLETE: see the lines in capitals above")
    return lines

