"""Uploading the root's metadata to the replica: snapshots (:mod:`shardlite.core.metasnap`) and, between them,
deltas (:mod:`shardlite.core.metadelta`), by one process per root; reading them is
:mod:`shardlite.services.replica_meta_read`.

:class:`MetaUploader` runs in the replication process that holds ``<root>/.replica/meta.lock``, once per
upload interval:

* it looks at the metadata only when the files holding it and the app's global tables (``global.db``,
  ``app_global.db``, their logs) or an erase's note changed size or time since the last look, or when a
  snapshot is due; it uploads nothing when the images it reads are those it last uploaded (a checkpoint
  rewrites a file, not its content);
* a **snapshot** (both images whole) at the first look, then once ``every`` seconds (``META_EVERY`` of
  :mod:`shardlite.services.replication`, 30 s) have passed since the last snapshot and anything changed since
  it (the files, or a delta uploaded since), and whenever a delta would not be smaller than half the images;
* otherwise, with the metadata embedded (``global.db``), a **delta** when the files changed: the pages that
  differ from the last snapshot's, at most once per upload interval (``META_DELTA_EVERY`` seconds apart at
  least), and less often when looking at the images costs more than :data:`DELTA_SHARE` of a core (each look
  reads both images whole). So accounts, sessions and the catalog reach the replica about one interval after they
  change. With the metadata on PostgreSQL (whose export is a new file each time, with no stable pages) only
  snapshots are taken, every ``every`` seconds;
* after each snapshot, the deltas older than :data:`FINE_WINDOW` are deleted: a snapshot at most ``every``
  seconds after them holds what they held, so older restore points are about ``every`` seconds apart;
* after each look at the images, :data:`SHIPPED` records the object last uploaded and the time as of which
  the replica holds the metadata, for ``replicate status`` (:func:`shipped`).

A point's time (its name) is taken *after* its images were read: it holds nothing later. Its ``read_ns``,
taken before, is the time every commit acknowledged before is in it. Nothing is recorded as uploaded before
the upload succeeded: a failed upload is tried again at the next look.

Everything is read and uploaded under the root's metadata upload lock
(:data:`~shardlite.files.replica_locks.META_UPLOAD_LOCK`), which an erase holds while it rewrites snapshots
(:mod:`shardlite.services.erase`): an erase first calls :func:`note_erase`, uploads a snapshot of the live
metadata when deltas exist (:func:`snapshot_now`) and deletes every delta (they were made against snapshots
it may rewrite); an uploader that sees the note takes a snapshot next instead of a delta.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import xxhash

from ..core import metadelta, metasnap
from ..files.replica_locks import META_UPLOAD_LOCK, STAGING_DIR, erase_lock
from ..front.store import Store
from ..replica.target import ReplicaTarget
from .backup import standalone_image

__all__ = ["MetaUploader", "note_erase", "upload_lock", "snapshot_now", "shipped", "DELTA_SHARE", "FINE_WINDOW"]

log = logging.getLogger("shardlite.replicate")

#: The share of a core looks at the images (and deltas) may take: after a look that cost ``c`` seconds of CPU to
#: read, compare and upload, the next waits at least ``c / DELTA_SHARE`` seconds (``benchmarks/metadelta.py``:
#: 40 ms for the 19 MB ``global.db`` of 100,000 tenants, so a look every 0.8 s at most there).
DELTA_SHARE = 0.05
#: Seconds a delta is kept after a newer snapshot: restore points of the metadata are one interval apart over
#: the last ten minutes, about one snapshot interval apart before that.
FINE_WINDOW = 600.0
#: The file an erase writes before it rewrites snapshots (:func:`note_erase`).
ERASE_NOTE = "meta-erased"
#: The file the uploader records its last upload in, for ``replicate status`` (:func:`shipped`).
SHIPPED = "meta-shipped.json"
#: A file written this recently (ns) may be written again within the same tick of the file clock without its
#: size or time changing: its signature is not trusted as "seen" (the next round looks again).
RECENT_NS = 50_000_000


@dataclass
class _Base:
    """The last snapshot this process uploaded: its name and, per image, its digest, page size and pages'
    digests (the bytes themselves are not kept)."""

    name: str
    created_ns: int
    digests: tuple[str, str]
    page_sizes: tuple[int, int]
    pages: tuple[list[int], list[int]]


def upload_lock(root: str, *, wait: float | None) -> int | None:
    """The root's metadata upload lock (module docstring): a descriptor, or None when ``wait`` went by."""
    return erase_lock(root, wait=wait, name=META_UPLOAD_LOCK)


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
    scratch = (nullcontext(None) if store.meta.local
               else tempfile.TemporaryDirectory(dir=os.path.join(store.root, STAGING_DIR)))
    with scratch as directory:
        with store.meta.export_global(directory or store.root) as path:
            global_db = standalone_image(path)
    return global_db, standalone_image(store.meta.app_global_path)


def snapshot_now(store: Store, target: ReplicaTarget) -> str:
    """Upload a snapshot of the live metadata now (an erase, after its drop); its name. The caller holds the
    metadata upload lock."""
    read_ns = time.time_ns()
    global_db, app_global_db = _images(store)
    created = time.time_ns()
    name = metasnap.object_name(created)
    target.put(name, metasnap.encode(created, store.root, global_db, app_global_db, read_ns=read_ns))
    return name


class MetaUploader:
    """Uploads the root's metadata snapshots and deltas (module docstring). One per replication process;
    only the process holding the root's metadata lock (``lock()`` returns its descriptor) uploads."""

    def __init__(self, store: Store, target: ReplicaTarget, lock: Callable[[], int | None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.target = target
        self._lock = lock
        self.clock = clock
        self.fd: int | None = None  #: the metadata lock's descriptor, once held
        self._base: _Base | None = None
        self._snap_at: float | None = None  #: clock time of the last snapshot uploaded
        self._outstanding = False  #: a delta was uploaded since the last snapshot
        self._looked_at = 0.0  #: clock time of the last look at the images
        self._look_every = 0.0  #: seconds the last look's CPU time asks between looks (DELTA_SHARE)
        self._seen: tuple[int, ...] | None = None  #: the files' signature at the last look at their images
        self._last: tuple[str, str] | None = None  #: the digests of the images last uploaded
        self._erase_seen = b""
        self._deltas: list[tuple[int, str]] | None = None  #: deltas in the replica (time, name), once listed
        self._last_object = ""  #: the name of the object last uploaded, and when
        self._uploaded_ns = 0
        self.snapshots = 0  #: snapshots this process uploaded
        self.deltas = 0  #: deltas this process uploaded

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _signature(self) -> tuple[tuple[int, ...], int] | None:
        """Sizes and times of the files holding the metadata and the app's global tables, and of an erase's
        note, with the newest time; None when the metadata is not in a local file (PostgreSQL)."""
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
        return tuple(found), max(found[1::2])

    def round(self, *, every: float, delta_every: float) -> None:
        """Upload what is due (module docstring): a snapshot once ``every`` seconds passed since the last one
        and anything changed since, else a delta when the files changed and ``delta_every`` seconds (at least,
        and as many as the last look's CPU time asks: :data:`DELTA_SHARE`) went by since the last look."""
        if self.fd is None:
            self.fd = self._lock()
            if self.fd is None:
                return  # another process uploads the metadata
        now = self.clock()
        signature = self._signature()
        seen = None if signature is None else signature[0]
        changed = seen is None or seen != self._seen
        snapshot_due = self._snap_at is None or (now - self._snap_at >= every and (changed or self._outstanding))
        if not snapshot_due and (seen is None or not changed
                                 or now - self._looked_at < max(delta_every, self._look_every)):
            return
        lock = upload_lock(self.store.root, wait=None)
        if lock is None:
            return  # an erase is rewriting the snapshots: the next round looks again
        try:
            self._upload(now, signature, snapshot_due)
        finally:
            os.close(lock)

    def _upload(self, now: float, signature: tuple[tuple[int, ...], int] | None, snapshot_due: bool) -> None:
        """Read both images; upload them as a delta or a snapshot, or nothing when they are the images last
        uploaded and no snapshot must stand for the deltas since the last one."""
        noted = _erase_noted(self.store.root)
        erased = noted != self._erase_seen  # the snapshots may have been rewritten: the next upload is one
        read_ns = time.time_ns()
        spent = time.thread_time()
        global_db, app_global_db = _images(self.store)
        created = time.time_ns()
        digests = (xxhash.xxh3_128_hexdigest(global_db), xxhash.xxh3_128_hexdigest(app_global_db))
        if digests == self._last and not erased and not (snapshot_due and self._outstanding):
            if signature is None:
                self._snap_at = now  # PostgreSQL: the next export one interval later
        elif not snapshot_due and not erased and self._upload_delta(created, read_ns, global_db, app_global_db):
            self._outstanding = True
        else:
            self._upload_snapshot(created, read_ns, global_db, app_global_db, digests)
            self._erase_seen = noted
            self._snap_at = now
            self._outstanding = False
            self._prune_deltas(created)
        self._last, self._looked_at = digests, now
        self._look_every = (time.thread_time() - spent) / DELTA_SHARE  # looks (and deltas) within the share
        # a file written within the file clock's tick may change again without its signature changing
        recent = signature is not None and signature[1] >= time.time_ns() - RECENT_NS
        self._seen = None if signature is None or recent else signature[0]
        self._record(read_ns)

    def _record(self, as_of_ns: int) -> None:
        """Write :data:`SHIPPED` for ``replicate status``: the object last uploaded and the time as of which the
        replica holds the metadata (that upload's, or a later look's that found the same images). Not fsynced:
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

    def _upload_snapshot(self, created: int, read_ns: int, global_db: bytes, app_global_db: bytes,
                         digests: tuple[str, str]) -> None:
        name = metasnap.object_name(created)
        self.target.put(name, metasnap.encode(created, self.store.root, global_db, app_global_db, read_ns=read_ns))
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

    def _upload_delta(self, created: int, read_ns: int, global_db: bytes, app_global_db: bytes) -> bool:
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
        self.target.put(name, metadelta.encode(created, read_ns, self.store.root, base.name, parts))
        self.deltas += 1
        self._last_object, self._uploaded_ns = name, time.time_ns()
        if self._deltas is not None:
            self._deltas.append((created, name))
        return True

    def _prune_deltas(self, now_ns: int) -> None:
        """Delete the deltas older than :data:`FINE_WINDOW` (after a snapshot, which holds what they held). A
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
        except Exception as exc:  # noqa: BLE001 - pruning is housekeeping: the next snapshot tries again
            log.warning("replicate: cannot delete old metadata deltas (%s); trying again later", exc)
            self._deltas = None


#: Times accepted in the status file (ns since the epoch: up to the year 2262)
_MAX_NS = (1 << 63) - 1


def shipped(store: Store, now_ns: int) -> dict[str, object] | None:
    """For ``replicate status``: the object last uploaded, when, the time as of which the replica holds the
    metadata and its age, and whether the metadata's files changed since (None with PostgreSQL metadata,
    whose changes they do not show; then ``lag_s`` is that age, an upper bound); None before any upload, or
    when the status file is not one the uploader wrote."""
    try:
        with open(os.path.join(store.root, STAGING_DIR, SHIPPED), "rb") as handle:
            record = json.loads(handle.read(4096))
        name, uploaded, as_of = record["object"], record["uploaded_ns"], record["as_of_ns"]
    except (OSError, ValueError, KeyError, TypeError, ArithmeticError):
        return None  # nothing uploaded yet (or a damaged status file: the next look rewrites it)
    if (not isinstance(name, str) or (metasnap.time_of(name) is None and metadelta.times_of(name) is None)
            or not all(isinstance(v, int) and 0 <= v <= _MAX_NS for v in (uploaded, as_of))):
        return None
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
