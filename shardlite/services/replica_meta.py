"""The root's metadata in the replica: snapshots (:mod:`shardlite.core.metasnap`) and, between them, deltas
(:mod:`shardlite.core.metadelta`), uploaded by one process per root; and the metadata a restore reads.

**Uploading** (:class:`MetaUploader`, run by the replication process that holds ``<root>/.replica/meta.lock``
once per upload interval):

* nothing is uploaded while the files holding the metadata and the app's global tables (``global.db``,
  ``app_global.db`` and their logs) and an erase's note keep their sizes and times since the last look,
  nor when the images read are those last uploaded (a checkpoint rewrites a file, not its content);
* a **snapshot** (both images whole) at the first round, then when the metadata changed and the last
  snapshot is ``every`` seconds old (``META_EVERY`` of :mod:`shardlite.services.replication`, 30 s), and
  whenever a delta would not be smaller than half the images;
* between snapshots, with the metadata embedded (``global.db``), a **delta** when it changed: the pages that
  differ from the last snapshot's, at most once per upload interval (``META_DELTA_EVERY`` seconds apart at
  least), and less often when taking them costs more than :data:`DELTA_SHARE` of a core (each delta reads
  both images whole). So accounts, sessions and the catalog reach the replica about one interval after
  they change, not one snapshot interval. With the metadata on PostgreSQL (whose export is a new file each
  time, with no stable pages) only snapshots are taken, every ``every`` seconds;
* after each snapshot, the deltas older than :data:`FINE_WINDOW` are deleted: older restore points of the
  metadata are the snapshots alone;
* after each look, :data:`SHIPPED` records the object last uploaded and the time as of which the replica
  holds the metadata, for ``replicate status`` (:func:`shipped`).

Everything is read and uploaded under the root's erase lock (:func:`~shardlite.files.staging.erase_lock`),
and a snapshot's time, like a delta's, is taken *before* its images are read: a commit acknowledged before
that time is in them. An erase rewrites snapshots (:mod:`shardlite.services.erase`), after which the deltas
made against them no longer apply: it deletes every delta and calls :func:`note_erase` first, and an uploader
that sees the note takes a snapshot next instead of a delta.

**Reading** (:func:`meta_at`): the newest restore point at or before a time, a snapshot or a delta applied
to its snapshot. A delta that cannot be used (its snapshot deleted or rewritten since, or damaged) is
logged and the next older point is tried; a damaged snapshot is an error that says to pick an earlier time.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import xxhash

from ..core import metadelta, metasnap
from ..errors import ConfigurationError, ShardliteError
from ..files.staging import STAGING_DIR, erase_lock
from ..front.store import Store
from ..replica.target import ReplicaTarget
from .backup import standalone_image

__all__ = ["MetaUploader", "MetaImage", "meta_at", "note_erase", "prune", "shipped", "DELTA_SHARE", "FINE_WINDOW"]

log = logging.getLogger("shardlite.replicate")

#: The share of a core deltas may take: after a delta whose images cost ``c`` seconds of CPU to read and
#: compare, the next waits at least ``c / DELTA_SHARE`` seconds (a ``global.db`` of 100,000 tenants reads in
#: tens of milliseconds, so about one delta a second there).
DELTA_SHARE = 0.05
#: Seconds a delta is kept after a newer snapshot: restore points of the metadata are one interval apart over
#: the last ten minutes, one snapshot interval apart before that.
FINE_WINDOW = 600.0
#: The file an erase writes before it rewrites snapshots (:func:`note_erase`).
ERASE_NOTE = "meta-erased"
#: The file the uploader records its last upload in, for ``replicate status`` (:func:`shipped`).
SHIPPED = "meta-shipped.json"


class MetaImage(NamedTuple):
    """The metadata as of one restore point: its time, the root it came from, both images, and the objects
    it was read from."""

    created_ns: int
    root: str
    global_db: bytes
    app_global_db: bytes
    objects: tuple[str, ...]


@dataclass
class _Base:
    """The last snapshot this process uploaded: its name and, per image, its digest, page size and pages'
    digests (the bytes themselves are not kept)."""

    name: str
    created_ns: int
    digests: tuple[str, str]
    page_sizes: tuple[int, int]
    pages: tuple[list[int], list[int]]


def note_erase(root: str) -> None:
    """Record that an erase is about to rewrite metadata snapshots, so that the uploader's next upload is a
    snapshot (its deltas would be made against a snapshot that no longer exists as it was)."""
    directory = os.path.join(root, STAGING_DIR)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=directory, prefix=".meta-erased-")
    try:
        os.write(fd, str(time.time_ns()).encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, os.path.join(directory, ERASE_NOTE))


def _erase_noted(root: str) -> bytes:
    try:
        with open(os.path.join(root, STAGING_DIR, ERASE_NOTE), "rb") as handle:
            return handle.read(64)
    except FileNotFoundError:
        return b""


def _images(store: Store) -> tuple[bytes, bytes]:
    """Both images as of now (``global.db``'s schema, whichever backend holds the metadata)."""
    with tempfile.TemporaryDirectory(dir=os.path.join(store.root, STAGING_DIR)) as scratch:
        with store.meta.export_global(scratch) as path:
            global_db = standalone_image(path)
    return global_db, standalone_image(store.meta.app_global_path)


class MetaUploader:
    """Uploads the root's metadata snapshots and deltas (module docstring). One per replication process;
    only the process holding the root's metadata lock uploads."""

    def __init__(self, store: Store, target: ReplicaTarget, lock: Callable[[], int | None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.target = target
        self._lock = lock
        self.clock = clock
        self.fd: int | None = None  #: the metadata lock's descriptor, once held
        self._base: _Base | None = None
        self._snap_at: float | None = None  #: clock time of the last snapshot (or of the last look at one)
        self._delta_at = 0.0
        self._delta_every = 0.0
        self._seen: tuple[int, ...] | None = None  #: the files' signature at the last look at their images
        self._last: tuple[str, str] | None = None  #: the digests of the images last uploaded
        self._last_object = ""  #: the name of the object last uploaded, and when
        self._uploaded_ns = 0
        self._erase_seen = b""
        self._deltas: list[tuple[int, str]] | None = None  #: deltas in the replica (time, name), once listed
        self.snapshots = 0  #: snapshots this process uploaded
        self.deltas = 0  #: deltas this process uploaded

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _signature(self) -> tuple[int, ...] | None:
        """Sizes and times of the files holding the metadata and the app's global tables, and of an erase's
        note; None when the metadata is not in a local file (PostgreSQL)."""
        if not self.store.meta.local:
            return None
        paths = [self.store.meta.app_global_path, os.path.join(self.store.root, "global.db")]
        found: list[int] = []
        for path in [p + suffix for p in paths for suffix in ("", "-wal")] + [
                os.path.join(self.store.root, STAGING_DIR, ERASE_NOTE)]:
            try:
                info = os.stat(path)
                found += [info.st_size, info.st_mtime_ns]
            except FileNotFoundError:
                found += [0, 0]
        return tuple(found)

    def round(self, *, every: float, delta_every: float) -> None:
        """Upload what is due (module docstring): a snapshot when the last one is ``every`` seconds old and the
        metadata changed, else a delta when it changed and ``delta_every`` seconds (at least) went by."""
        if self.fd is None:
            self.fd = self._lock()
            if self.fd is None:
                return  # another process uploads the metadata
        now = self.clock()
        seen = self._signature()
        snapshot_due = self._snap_at is None or now - self._snap_at >= every
        if seen is not None and seen == self._seen:
            if snapshot_due:
                self._snap_at = now  # unchanged: the next snapshot is one interval after a change is seen
            return
        if not snapshot_due and (seen is None or now - self._delta_at < max(delta_every, self._delta_every)):
            return
        # the root's erase lock from the read to the upload: an erase waits for an upload under way (and then
        # rewrites the snapshots), and an upload waits for an erase (module doc of shardlite.services.erase)
        lock = erase_lock(self.store.root, wait=None)
        if lock is None:
            return  # an erase is running: the next round uploads
        try:
            self._upload(now, seen, snapshot_due)
        finally:
            os.close(lock)

    def _upload(self, now: float, seen: tuple[int, ...] | None, snapshot_due: bool) -> None:
        """Read both images and upload them as a delta or a snapshot, or nothing when they are the images
        last uploaded (a file rewritten with the same content: a checkpoint)."""
        noted = _erase_noted(self.store.root)
        erased = noted != self._erase_seen  # the snapshots may have been rewritten: the next upload is one
        created = time.time_ns()
        spent = time.thread_time()
        global_db, app_global_db = _images(self.store)
        digests = (xxhash.xxh3_128_hexdigest(global_db), xxhash.xxh3_128_hexdigest(app_global_db))
        self._seen = seen
        if digests == self._last and not erased:
            if snapshot_due:
                self._snap_at = now
        elif not snapshot_due and not erased and self._upload_delta(created, global_db, app_global_db):
            self._delta_every = (time.thread_time() - spent) / DELTA_SHARE
            self._delta_at, self._last = now, digests
        else:
            self._upload_snapshot(created, global_db, app_global_db, digests)
            self._erase_seen, self._last = noted, digests
            self._snap_at = self._delta_at = now
            self._prune_deltas(created)
        self._record(created)

    def _record(self, as_of_ns: int) -> None:
        """Write :data:`SHIPPED` for ``replicate status``: the object last uploaded and the time as of which the
        replica holds the metadata (that upload's, or a later look that found the same images). Not fsynced:
        a crash loses a status line, never metadata."""
        record = {"object": self._last_object, "uploaded_ns": self._uploaded_ns, "as_of_ns": as_of_ns}
        directory = os.path.join(self.store.root, STAGING_DIR)
        try:
            fd, temp = tempfile.mkstemp(dir=directory, prefix=".meta-shipped-")
            with os.fdopen(fd, "w") as handle:
                json.dump(record, handle)
            os.replace(temp, os.path.join(directory, SHIPPED))
        except OSError as exc:
            log.warning("replicate: cannot record the metadata's last upload for `replicate status` (%s)", exc)

    def _upload_snapshot(self, created: int, global_db: bytes, app_global_db: bytes, digests: tuple[str, str]) -> None:
        name = metasnap.object_name(created)
        self.target.put(name, metasnap.encode(created, self.store.root, global_db, app_global_db))
        self.snapshots += 1
        self._last_object, self._uploaded_ns = name, time.time_ns()
        self._base = None
        if self.store.meta.local:
            try:
                sizes = (metadelta.page_size_of(global_db), metadelta.page_size_of(app_global_db))
            except metadelta.MetaDeltaError:
                return  # not page-aligned (cannot happen with SQLite's images): snapshots only
            self._base = _Base(name, created, digests, sizes, (metadelta.page_digests(global_db, sizes[0]),
                                                               metadelta.page_digests(app_global_db, sizes[1])))

    def _upload_delta(self, created: int, global_db: bytes, app_global_db: bytes) -> bool:
        """Upload a delta against the last snapshot; False when a snapshot should be taken instead (no
        snapshot of this process yet, another page size, or a delta not smaller than half the images)."""
        base = self._base
        if base is None:
            return False
        parts = []
        changed = 0
        for i, image in enumerate((global_db, app_global_db)):
            try:
                found = metadelta.diff(base.pages[i], base.page_sizes[i], image)
            except metadelta.MetaDeltaError:
                return False
            if found is None:
                return False
            size, pages = found
            changed += len(pages) * size
            parts.append(metadelta.part_of(base.digests[i], image, size, pages))
        if 2 * changed >= len(global_db) + len(app_global_db):
            return False
        name = metadelta.object_name(created, base.created_ns)
        self.target.put(name, metadelta.encode(created, self.store.root, base.name, parts))
        self.deltas += 1
        self._last_object, self._uploaded_ns = name, time.time_ns()
        if self._deltas is not None:
            self._deltas.append((created, name))
        return True

    def _prune_deltas(self, now_ns: int) -> None:
        """Delete the deltas older than :data:`FINE_WINDOW` (after a snapshot: a newer point exists). A
        failure is logged; the next snapshot, or the next compaction, tries again."""
        try:
            if self._deltas is None:
                self._deltas = sorted((t[0], name) for name, _ in self.target.list(metadelta.PREFIX)
                                      if (t := metadelta.times_of(name)) is not None)
            horizon = now_ns - int(FINE_WINDOW * 1e9)
            old = [name for t, name in self._deltas if t < horizon]
            if old:
                self.target.delete_many(old)
                self._deltas = [(t, name) for t, name in self._deltas if t >= horizon]
        except ShardliteError as exc:
            log.warning("replicate: cannot delete old metadata deltas (%s); trying again later", exc)
            self._deltas = None


def shipped(store: Store, now_ns: int) -> dict[str, object] | None:
    """For ``replicate status``: the object last uploaded, when, the time as of which the replica holds the
    metadata and its age, and whether the metadata's files changed since (None with PostgreSQL metadata,
    whose changes they do not show; then ``lag_s`` is that age, an upper bound); None before any upload."""
    try:
        with open(os.path.join(store.root, STAGING_DIR, SHIPPED), "rb") as handle:
            record = json.loads(handle.read(4096))
        name, uploaded, as_of = str(record["object"]), int(record["uploaded_ns"]), int(record["as_of_ns"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # nothing uploaded yet (or a damaged status file: the next upload rewrites it)
    changed: bool | None = None
    if store.meta.local:
        times = []
        for path in (store.meta.app_global_path, os.path.join(store.root, "global.db")):
            for suffix in ("", "-wal"):
                try:
                    times.append(os.stat(path + suffix).st_mtime_ns)
                except FileNotFoundError:
                    pass
        changed = max(times, default=0) > as_of
    age = max(0, now_ns - as_of) / 1e9
    return {"object": name, "uploaded_ns": uploaded, "as_of_ns": as_of, "age_s": age, "changed_since": changed,
            "lag_s": 0.0 if changed is False else age}


def _listing(target: ReplicaTarget) -> tuple[list[tuple[int, str, int]], dict[int, str]]:
    """The deltas (time, name, base time) and the snapshots (time -> name) in the replica. Deltas are listed
    first: a delta is uploaded after its snapshot, so every snapshot a listed delta needs is in the second
    listing unless it was deleted."""
    deltas = [(d[0], name, d[1]) for name, _ in target.list(metadelta.PREFIX) if (d := metadelta.times_of(name))]
    snapshots = {t: name for name, _ in target.list(metasnap.PREFIX) if (t := metasnap.time_of(name)) is not None}
    return deltas, snapshots


def prune(target: ReplicaTarget, start_ns: int) -> int:
    """Retention: delete the snapshots before ``start_ns`` but the newest of them, then every delta whose
    snapshot is gone (and, with them, deltas left by a crash). Returns how many objects went."""
    deltas, snapshots = _listing(target)
    times = sorted(snapshots)
    old = [t for t in times if t <= start_ns][:-1]
    if old:
        target.delete_many([snapshots[t] for t in old])
    kept = set(times) - set(old)
    orphans = [name for _t, name, base in deltas if base not in kept]
    if orphans:
        target.delete_many(orphans)
    return len(old) + len(orphans)


def delete_deltas(target: ReplicaTarget) -> int:
    """Delete every delta (an erase rewrites the snapshots they were made against). How many went."""
    names = [name for name, _ in target.list(metadelta.PREFIX) if metadelta.times_of(name) is not None]
    if names:
        target.delete_many(names)
    return len(names)


def _snapshot(target: ReplicaTarget, name: str, cache: dict[str, tuple[metasnap.Header, bytes, bytes]]) -> tuple[
        metasnap.Header, bytes, bytes]:
    if name not in cache:
        try:
            cache[name] = metasnap.decode(target.get(name))
        except metasnap.MetaSnapError as exc:
            raise ConfigurationError(f"the replica's metadata snapshot {name} is damaged ({exc}); pick an earlier "
                                     "time with --at") from None
    return cache[name]


def _from_delta(target: ReplicaTarget, name: str, base: str,
                cache: dict[str, tuple[metasnap.Header, bytes, bytes]]) -> MetaImage:
    header, global_pages, app_pages = metadelta.decode(target.get(name))
    if header.base != base or metadelta.times_of(name) != (header.created_ns, metasnap.time_of(base)):
        raise metadelta.MetaDeltaError("its header does not match its name")
    _base_header, global_db, app_global_db = _snapshot(target, base, cache)
    return MetaImage(header.created_ns, header.root, metadelta.apply(global_db, header.global_db, global_pages),
                     metadelta.apply(app_global_db, header.app_global_db, app_pages), (base, name))


def meta_at(target: ReplicaTarget, at_ns: int | None,
            describe: Callable[[int], str] = str) -> MetaImage:
    """The metadata at the newest restore point at or before ``at_ns`` (None: the newest), validated (module
    docstring). ``describe`` formats a time for messages."""
    deltas, snapshots = _listing(target)
    points: list[tuple[int, int, str, str | None]] = [(t, 1, name, None) for t, name in snapshots.items()]
    points += [(t, 0, name, snapshots.get(base)) for t, name, base in deltas]
    points = sorted((p for p in points if at_ns is None or p[0] <= at_ns), reverse=True)
    cache: dict[str, tuple[metasnap.Header, bytes, bytes]] = {}
    for t, is_snapshot, name, base in points:
        if is_snapshot:
            header, global_db, app_global_db = _snapshot(target, name, cache)
            return MetaImage(header.created_ns, header.root, global_db, app_global_db, (name,))
        if base is None:
            log.warning("restore: metadata delta %s skipped: its snapshot is no longer in the replica", name)
            continue
        try:
            return _from_delta(target, name, base, cache)
        except (metadelta.MetaDeltaError, ConfigurationError) as exc:
            log.warning("restore: metadata delta %s of %s skipped (%s); an earlier restore point is used", name,
                        describe(t), exc)
    until = "" if at_ns is None else f" at or before {describe(at_ns)}"
    raise ConfigurationError(f"the replica {target.url} holds no metadata snapshot{until} (a replicator uploads "
                             "the first one in its first round); restore tenants one by one with --key")
