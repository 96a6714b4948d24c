"""The replica's pack index and retention horizon: small objects a compaction writes so that restoring one
tenant does not read every pack's header, and so that a restore before the retention window is refused.

**Key index** (format: :mod:`shardlite.core.keyindex`): which packs hold which tenants, sharded by key digest
inside each object so that a lookup reads its head and one section (two ranged GETs) whatever its size:

* a **base** ``v1/keyindex/base/<time>.kidx``, written by each compaction: every pack it kept or wrote, and as
  coverage per node the highest pack sequence number its replicator had recorded as shipped;
* a **segment** ``v1/keyindex/seg/<base time>-<time>.kidx``, written by the replication service every
  :data:`SEGMENT_EVERY` seconds (:class:`SegmentWriter`; one PUT, the previous segment deleted): every pack
  shipped since the base, read from the nodes' staging pack lists (recorded, hence final) and their headers;
* a **node marker** ``v1/keyindex/nodes/<node folder>``, written once when a replication service takes a
  node, before the node's first upload: a restore finds a node no index covers yet without listing every pack.

A one-tenant restore (:func:`candidates`) reads the newest base and its newest segment, lists each node's
packs past the coverage (a request per :data:`TAIL_BLOCK` sequence numbers, usually two) and its compaction
packs, and reads the headers of those and of the packs the index lists for the key, in parallel. So it reads
a few objects and the headers of the last interval or so, however many packs a week of replication left.
A pack the index covers is never re-read: coverage is by sequence number, and only packs recorded as
shipped are covered (a replicator uploads a pack again under the same name, possibly with more captures, only
after a crash before it recorded it); an erase only takes keys out of packs (the index may name a key a pack
no longer holds, or a pack deleted since: the restore then reads every header, :mod:`replica_read`). A
missing, damaged or foreign base is ignored (every header is read), a damaged segment head too (the base's
coverage is used): the index can make a restore faster, never different.

**Horizon** ``v1/retention/horizon.json``: when the last compaction ran and the windows it applied. A tenant's
history before ``compacted_ns - window(key)`` may be gone, so restores before it are refused
(:func:`check_time`). Written before the compaction deletes anything.

Both come back from storage as untrusted input: validated whole (sizes, counts, names, digests, windows).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import msgspec
import xxhash

from ..core import keyindex, pack, retention, rollup, timeline
from ..errors import ConfigurationError, ReplicaError, ReplicaObjectMissing
from ..files.replica_locks import STAGING_DIR, erase_lock
from ..files.staging import Staging
from ..front.store import Store
from ..replica.target import ReplicaTarget
from .pack_upload import pack_name

__all__ = ["HORIZON_NAME", "Horizon", "key_digest", "read_horizon", "write_horizon", "check_time",
           "retention_start", "without_expired", "KEYINDEX_PREFIX", "BASE_PREFIX", "SEGMENT_PREFIX", "NODE_PREFIX",
           "base_name", "segment_name", "node_part", "node_marker", "read_head", "read_shards", "read_all",
           "Candidates", "candidates", "write_base", "prune", "part_coverage", "SegmentWriter", "SEGMENT_EVERY",
           "HEADERS_PER_RUN", "READERS", "readers"]

#: Seconds between two segments of the key index (the replication service's :class:`SegmentWriter`): one
#: PUT every 15 s beside a pack every 0.5 s (+3 % PUTs); a one-tenant restore reads the headers of the packs
#: shipped since the last segment, at most about 15 s of packs (30 at the default interval).
SEGMENT_EVERY = 15.0
#: Pack headers a :class:`SegmentWriter` reads at most in one run (the rest in the next runs): 30 a run at
#: the default interval; more only when catching up, and then at most about a second of reads inside the
#: replicator's loop.
HEADERS_PER_RUN = 240

HORIZON_NAME = "v1/retention/horizon.json"
_MAX_HORIZON = 1 << 20


class Horizon(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: int
    compacted_ns: int
    windows: retention.Windows
    #: :func:`key_digest` of the incarnations of dropped tenants past their window whose captures a pack kept
    #: for other tenants still holds: restores ignore them (what is left of such a history is not all of it)
    expired: list[str] = msgspec.field(default_factory=list)


def key_digest(key: str) -> str:
    return xxhash.xxh3_128_hexdigest(key.encode("utf-8"))[:16]


# -- the key index (shardlite.core.keyindex): where, and reading it --------------------------------------------

KEYINDEX_PREFIX = "v1/keyindex/"
BASE_PREFIX = KEYINDEX_PREFIX + "base/"
SEGMENT_PREFIX = KEYINDEX_PREFIX + "seg/"
NODE_PREFIX = KEYINDEX_PREFIX + "nodes/"
#: The index before the key index (one object listing every pack): deleted by the next compaction.
LEGACY_PREFIX = "v1/index/"
#: The largest index object read.
MAX_INDEX = 4 * 1024 * 1024 * 1024
#: Bytes read first from an index object: its head (meta and shard table) when the index is not huge.
FIRST_READ = 128 * 1024
#: Numbered packs per listing of a node's tail (names ``<seq:020d>``: a prefix of 18 digits holds 100; a
#: listing of 1,000 names costs more to parse than the headers of a few packs).
TAIL_BLOCK = 100
#: Threads reading index objects, listings and pack headers at once (one pool per process, kept: starting a
#: thread costs milliseconds on a busy machine, more than the request it would make).
READERS = 8
_POOL: tuple[int, ThreadPoolExecutor] | None = None
_POOL_LOCK = threading.Lock()


def readers() -> ThreadPoolExecutor:
    """The process's pool of :data:`READERS` threads for replica reads (a new one in a forked child). Tasks
    submitted to it never wait for other tasks of it."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != os.getpid():
            _POOL = (os.getpid(), ThreadPoolExecutor(READERS, thread_name_prefix="shardlite-replica-read"))
        return _POOL[1]


def base_name(created_ns: int) -> str:
    return f"{BASE_PREFIX}{created_ns:020d}.kidx"


def segment_name(base_ns: int, created_ns: int) -> str:
    return f"{SEGMENT_PREFIX}{base_ns:020d}-{created_ns:020d}.kidx"


def node_part(node: str) -> str:
    """The folder of ``node``'s packs in ``v1/packs/``."""
    return pack_name(node, 0).split("/")[2]


def node_marker(node: str) -> str:
    """The object that says ``node`` uploads packs: written before its first upload (the replication
    service, when it takes the node), so a restore finds a node no index covers yet without listing every
    pack."""
    return f"{NODE_PREFIX}{node_part(node)}"


def read_head(target: ReplicaTarget, name: str, size: int) -> keyindex.Head:
    """The validated head of index object ``name`` of ``size`` bytes (:class:`ValueError` otherwise)."""
    if not 0 < size <= MAX_INDEX:
        raise ValueError("the key index is empty or too large")
    data = target.get_range(name, 0, min(size, FIRST_READ))
    need = keyindex.head_size(data)
    if need > len(data) and need <= size:
        data += target.get_range(name, len(data), need - len(data))
    return keyindex.decode_head(data, size)


def read_shards(target: ReplicaTarget, name: str, head: keyindex.Head, digests: set[int]) -> list[keyindex.PackRow]:
    """The rows of the shards ``digests`` fall in, with only those digests kept."""
    rows: list[keyindex.PackRow] = []
    for shard in sorted({keyindex.shard_of(d, head.meta.shards) for d in digests}):
        offset, length, _check = head.table[shard]
        section = keyindex.decode_shard(head, shard, target.get_range(name, offset, length) if length else b"")
        rows += [(pack, size, hit) for pack, size, keys in section if (hit := [k for k in keys if k in digests])]
    return rows


def read_all(target: ReplicaTarget, name: str, size: int) -> tuple[keyindex.Meta, list[keyindex.PackRow]]:
    """Every row of index object ``name`` (a segment writer taking over another's segment)."""
    if not 0 < size <= MAX_INDEX:
        raise ValueError("the key index is empty or too large")
    data = target.get(name)
    head = keyindex.decode_head(data, len(data))
    rows: list[keyindex.PackRow] = []
    for shard, (offset, length, _check) in enumerate(head.table):
        rows += keyindex.decode_shard(head, shard, data[offset:offset + length])
    return head.meta, rows


def _latest(listed: list[tuple[str, int]], prefix: str) -> tuple[str, int] | None:
    found = [(name, size) for name, size in listed if name.startswith(prefix) and name.endswith(".kidx")]
    return max(found) if found else None


class Candidates(NamedTuple):
    packs: dict[str, int]  #: pack name -> size (the index's, or the listing's): read each header
    covered: int  #: numbered packs the index let the restore leave unread (at most: sequence numbers)


def candidates(target: ReplicaTarget, keys: set[str], pool: ThreadPoolExecutor,
               on_pack: Callable[[str, int], None] | None = None) -> Candidates | None:
    """The packs that may hold captures of ``keys``: those the newest base index and its newest segment
    list for their digests, the compaction packs they do not cover, and every numbered pack past their
    coverage (listed per node, :data:`TAIL_BLOCK` names a request, until a block of names past the coverage
    holds none). None when there is no usable base index (damaged, missing, foreign): the caller reads every
    header. A pack not returned holds none of the keys, whatever the replica's state: covered packs are
    final (a replicator re-uploads only a pack it never recorded as shipped, and indexes cover only recorded
    ones); an erase only takes keys out of a pack. ``on_pack(name, size)`` is called for each as soon as it
    is known (perhaps twice for one name), so its reading can start before the tails are listed."""
    listed = list(target.list(KEYINDEX_PREFIX))
    for _attempt in range(3):
        base = _latest(listed, BASE_PREFIX)
        if base is None:
            return None
        try:
            found = _candidates(target, keys, pool, listed, base, on_pack or (lambda _name, _size: None))
        except (ValueError, ReplicaObjectMissing):
            return None  # damaged, or replaced by a compaction meanwhile
        # a compaction that wrote a newer base meanwhile may have deleted packs past this one's coverage (a
        # rollup joins a range of them): the tails listed after it could stop at that gap, so read it again
        listed = list(target.list(KEYINDEX_PREFIX))
        if found is None or _latest(listed, BASE_PREFIX) == base:
            return found
    return None


def _candidates(target: ReplicaTarget, keys: set[str], pool: ThreadPoolExecutor, listed: list[tuple[str, int]],
                base: tuple[str, int], on_pack: Callable[[str, int], None]) -> Candidates | None:
    digests = {keyindex.digest(key) for key in keys}
    # the segment's head is read beside the base's (a segment is named after its base's time)
    seg = _latest(listed, SEGMENT_PREFIX + base[0][len(BASE_PREFIX):][:20] + "-")
    seg_read = pool.submit(read_head, target, *seg) if seg is not None else None
    base_head = read_head(target, *base)
    if base_head.meta.kind != "base":
        return None
    base_rows = pool.submit(read_shards, target, base[0], base_head, digests)
    metas = [base_head.meta]
    seg_rows = None
    if seg is not None and seg_read is not None:
        try:
            seg_head = seg_read.result()
            if (seg_head.meta.kind == "segment" and seg_head.meta.base_ns == base_head.meta.created_ns
                    and all(seg_head.meta.coverage.get(p, -1) >= s for p, s in base_head.meta.coverage.items())):
                seg_rows = pool.submit(read_shards, target, seg[0], seg_head, digests)
                metas.append(seg_head.meta)
        except (ValueError, ReplicaError):
            seg_rows = None  # a damaged segment: the base's coverage, and the tail listed after it
    coverage = metas[-1].coverage
    parts = set(coverage) | {name[len(NODE_PREFIX):] for name, _ in listed if name.startswith(NODE_PREFIX)}
    tails = {part: _Tail(target, pool, part, coverage.get(part, 0)) for part in sorted(parts)}
    packs: dict[str, int] = {}

    def add(name: str, size: int) -> None:
        if name not in packs:
            packs[name] = size
            on_pack(name, size)

    for meta in metas:
        for name, size in meta.unreadable:
            add(name, size)
    for name, size, _keys in base_rows.result():
        add(name, size)
    if seg_rows is not None:
        # a damaged section of the segment whose coverage the tails start from: ValueError, every header read
        for name, size, _keys in seg_rows.result():
            add(name, size)
    covered_extra = {name for meta in metas for name in meta.extra}
    covered = 0
    markers: list[tuple[str, int]] = []
    for part, tail in tails.items():
        found, compacted = tail.result()
        for name, size in found:
            add(name, size)
        for name, size in compacted:
            if not name.endswith(".pack"):
                markers.append((name, size))
            elif name not in covered_extra:
                add(name, size)
        covered += coverage.get(part, 0)
    # the markers of node folders the index names packs of but no tail lists (a node gone from the catalog)
    for part in sorted({name.split("/")[2] for name in packs} - set(tails)):
        markers.extend((name, size) for name, size in target.list(f"v1/packs/{part}/compact-")
                       if name.endswith(".done"))
    # a rollup's parts are read once its marker is listed, and the numbered packs it supersedes from then on
    # are not (core/rollup.py): the index may be older than the rollup
    return Candidates(dict(rollup.sort_out([*packs.items(), *markers]).packs), covered)


class _Tail:
    """Node folder ``part``'s numbered packs past sequence ``high``, and its compaction packs and rollup markers:
    the first two blocks and the compaction packs listed at once, further blocks one after the other."""

    def __init__(self, target: ReplicaTarget, pool: ThreadPoolExecutor, part: str, high: int) -> None:
        self.target, self.high = target, high
        self.folder = f"v1/packs/{part}/"
        self.block = (high + 1) // TAIL_BLOCK
        self.first = [pool.submit(self._list, self.block), pool.submit(self._list, self.block + 1)]
        self.compacted = pool.submit(lambda: [(name, size) for name, size in target.list(f"{self.folder}compact-")
                                              if name.endswith((".pack", ".done"))])  # .done: rollup markers

    def _list(self, block: int) -> list[tuple[str, int]]:
        found = []
        for name, size in self.target.list(f"{self.folder}{block:018d}"):
            seq = keyindex.pack_seq(name)
            if seq is not None and seq[1] > self.high:
                found.append((name, size))
        return found

    def result(self) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        found: list[tuple[str, int]] = []
        block = self.block
        while True:
            some = self.first[block - self.block].result() if block - self.block < 2 else self._list(block)
            found += some
            # sequence numbers follow each other, so a whole block of them past the coverage with no pack is
            # the end: an erase writes a segment covering every pack it may delete first (SegmentWriter.run,
            # erase.py), and a compaction (its plan, its rollups) deletes packs only after writing a base
            # covering them, which candidates() notices and reads instead
            if not some and block * TAIL_BLOCK > self.high:
                break
            block += 1
        return found, self.compacted.result()


def write_base(target: ReplicaTarget, created_ns: int, coverage: dict[str, int], rows: Iterable[keyindex.PackRow],
               extra: Iterable[str], unreadable: Iterable[tuple[str, int]] = ()) -> str:
    """Write a base index (a compaction's); its name. ``unreadable``: covered packs whose header is not valid
    ((name, size): restores read them themselves)."""
    name = base_name(created_ns)
    target.put(name, keyindex.encode("base", created_ns, created_ns, coverage, rows, extra=extra,
                                     unreadable=unreadable))
    return name


def prune(target: ReplicaTarget, base: str) -> int:
    """Delete the index objects older than base index ``base`` (older bases, their segments, the legacy
    index); how many."""
    created = base[len(BASE_PREFIX):-len(".kidx")]
    old = [name for name, _ in target.list(KEYINDEX_PREFIX)
           if (name.startswith(BASE_PREFIX) and name < base)
           or (name.startswith(SEGMENT_PREFIX) and name[len(SEGMENT_PREFIX):][:20] < created)]
    old += [name for name, _ in target.list(LEGACY_PREFIX)]
    if old:
        target.delete_many(old)
    return len(old)


def part_coverage(store: Store, listed: Iterable[str]) -> dict[str, int]:
    """Per node folder, the highest sequence number an index may cover: the highest its replicator recorded
    as shipped (a pack uploaded and not recorded may be uploaded again with other captures after a crash);
    for a folder without a staging file here (a node gone), the highest listed."""
    out: dict[str, int] = {}
    for name in listed:
        seq = keyindex.pack_seq(name)
        if seq is not None:
            out[seq[0]] = max(out.get(seq[0], 0), seq[1])
    for node in store.meta.nodes.list():
        part = node_part(node.name)
        path = store.node_path(node.name)
        if not os.path.exists(os.path.join(path, STAGING_DIR, "staging.db")):
            out.setdefault(part, 0)  # every node of the root is covered (from 0: none of its packs yet)
            continue
        staging = Staging(path)
        try:
            out[part] = staging.next_seq() - 1
        finally:
            staging.close()
    return out


class SegmentWriter:
    """Writes the segment of the newest base index every :data:`SEGMENT_EVERY` seconds (the replication
    service that holds the root's metadata lock): one object covering every pack its node replicators
    recorded as shipped since the base, so that a one-tenant restore reads the headers of at most the packs
    of the last interval or so besides those holding the tenant. It keeps the segment's rows in memory and
    reads only the headers of packs shipped since its last segment (at most :data:`HEADERS_PER_RUN` a
    run); a segment it did not write (another process, before a restart) is read back whole first. With no
    base index yet it writes an empty one (coverage: nothing), so a replica never compacted gets segments
    too."""

    def __init__(self) -> None:
        self.base_ns: int | None = None
        self.written: str | None = None
        self.coverage: dict[str, int] = {}
        self.rows: dict[str, tuple[int, list[int]]] = {}
        self.unreadable: dict[str, int] = {}

    def run(self, store: Store, target: ReplicaTarget, now_ns: int | None = None, *,
            locked: bool = False) -> str | None:
        """Bring the segment up to date; the name of the segment written (None: nothing new, or an erase is
        running: it writes the segment itself). It takes the root's erase lock (``locked``: the caller, an
        erase, holds it), so a segment written before an erase's deletes is never followed by one that
        covers less."""
        fd = None if locked else erase_lock(store.root, wait=None)
        if not locked and fd is None:
            return None
        try:
            return self._run(store, target, now_ns)
        finally:
            if fd is not None:
                os.close(fd)

    def _run(self, store: Store, target: ReplicaTarget, now_ns: int | None) -> str | None:
        now = time.time_ns() if now_ns is None else now_ns
        listed = list(target.list(KEYINDEX_PREFIX))
        base = _latest(listed, BASE_PREFIX)
        head = None
        if base is not None:
            try:
                head = read_head(target, *base)
            except ValueError:
                head = None  # damaged: a new empty base supersedes it
        if head is None or head.meta.kind != "base":
            created = max(now, _time_in(base[0], BASE_PREFIX) + 1 if base is not None else 0)
            # every node this root has is covered up to sequence 0: a restore lists all its packs until the
            # first segment says more (a node with no marker yet is found all the same)
            known = {node_part(node.name): 0 for node in store.meta.nodes.list()}
            write_base(target, created, known, [], [])
            head = keyindex.Head(keyindex.Meta(1, "base", created, created, known, [], [], 1), [], 0)
        base_ns = head.meta.created_ns
        segment = _latest(listed, SEGMENT_PREFIX + f"{base_ns:020d}-")
        if self.base_ns != base_ns or (segment is not None and segment[0] != self.written):
            self._start(target, head.meta, segment)
        changed = self._add(store, target)
        if not changed:
            return None
        last = _time_in(self.written[-26:], "-") if self.written else 0
        name = segment_name(base_ns, max(now, last + 1, base_ns))
        target.put(name, keyindex.encode(
            "segment", max(now, last + 1, base_ns), base_ns, self.coverage,
            [(pack, size, keys) for pack, (size, keys) in self.rows.items()],
            unreadable=self.unreadable.items()))
        self.written = name
        old = [n for n, _ in listed if n.startswith(SEGMENT_PREFIX) and n < name]
        if old:
            target.delete_many(old)
        return name

    def _start(self, target: ReplicaTarget, base: keyindex.Meta, segment: tuple[str, int] | None) -> None:
        self.base_ns, self.written = base.base_ns, None
        self.coverage, self.rows, self.unreadable = dict(base.coverage), {}, {}
        if segment is None:
            return
        try:
            meta, rows = read_all(target, *segment)
        except (ValueError, ReplicaError):
            return  # damaged or gone: rebuilt from the base's coverage
        if meta.kind != "segment" or meta.base_ns != base.created_ns or any(
                meta.coverage.get(p, -1) < s for p, s in base.coverage.items()):
            return
        self.coverage, self.unreadable, self.written = dict(meta.coverage), dict(meta.unreadable), segment[0]
        for name, size, keys in rows:
            have = self.rows.get(name)
            self.rows[name] = (size, sorted(set(keys) | set(have[1] if have else ())))

    def _add(self, store: Store, target: ReplicaTarget) -> bool:
        budget = HEADERS_PER_RUN
        changed = False
        for node in store.meta.nodes.list():
            if node_part(node.name) not in self.coverage:
                self.coverage[node_part(node.name)] = 0
                changed = True
            path = store.node_path(node.name)
            if budget <= 0 or not os.path.exists(os.path.join(path, STAGING_DIR, "staging.db")):
                continue
            part = node_part(node.name)
            staging = Staging(path)
            try:
                shipped = list(staging.conn.execute(
                    "SELECT seq, name, bytes FROM packs WHERE seq > ? ORDER BY seq LIMIT ?",
                    (self.coverage.get(part, 0), budget)))
            finally:
                staging.close()
            for seq, name, size in shipped:
                if name != pack_name(node.name, seq) or seq != self.coverage.get(part, 0) + 1:
                    # not this node's numbering, or packs this staging did not write lie before it (a root
                    # restored from this replica continues past them): left to the restores' listing until a
                    # compaction's base, built from the listing, covers them
                    break
                budget -= 1
                if size > 0:
                    from .replica_read import read_header

                    try:
                        info = read_header(target, name, size)
                        keys = sorted({keyindex.digest(entry.key) for entry in info.header.entries})
                        if keys:
                            self.rows[name] = (size, keys)
                    except ReplicaObjectMissing:
                        pass  # deleted since (a compaction, an erase): it holds nothing
                    except pack.PackError:
                        self.unreadable[name] = size
                self.coverage[part] = seq
                changed = True
        return changed


def _time_in(name: str, prefix: str) -> int:
    """The 20-digit time after ``prefix`` in an index object's name (0 when there is none)."""
    text = name[len(prefix):len(prefix) + 20]
    return int(text) if len(text) == 20 and text.isdigit() else 0


def write_horizon(target: ReplicaTarget, compacted_ns: int, windows: retention.Windows,
                  expired: list[str] | None = None) -> None:
    target.put(HORIZON_NAME, msgspec.json.encode(Horizon(1, compacted_ns, windows.check(), sorted(expired or []))))


def without_expired(horizon: Horizon | None, captures: list[timeline.Capture]) -> list[timeline.Capture]:
    """``captures`` without those of histories the horizon names as expired."""
    if horizon is None or not horizon.expired:
        return captures
    gone = set(horizon.expired)
    return [c for c in captures if key_digest(c.entry.incarnation) not in gone]


def read_horizon(target: ReplicaTarget) -> Horizon | None:
    """The last compaction's horizon, None when the replica was never compacted. A damaged one is a
    :class:`ConfigurationError` (a restore cannot tell which times are still exact)."""
    try:
        data = target.get(HORIZON_NAME)
    except ReplicaObjectMissing:
        return None
    try:
        if len(data) > _MAX_HORIZON:
            raise ValueError("too large")
        horizon = msgspec.json.decode(data, type=Horizon)
        if horizon.version != 1 or horizon.compacted_ns < 0:
            raise ValueError("unsupported version")
        horizon.windows.check()
        if any(len(k) != 16 or k.strip("0123456789abcdef") for k in horizon.expired):
            raise ValueError("an invalid incarnation digest")
    except (ValueError, msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ConfigurationError(f"the replica's retention horizon {HORIZON_NAME} is damaged ({exc}); run "
                                 "`shardlite replicate compact` on the root to write it again") from None
    return horizon


def retention_start(horizon: Horizon, key: str | None) -> int:
    """The earliest time a restore of ``key`` (None: of a whole root, every tenant at once) is exact at."""
    if key is None:
        shortest = min([horizon.windows.default, *horizon.windows.prefixes.values()])
        return horizon.compacted_ns - shortest
    return horizon.compacted_ns - retention.window_for(horizon.windows, key)


def check_time(target: ReplicaTarget, key: str | None, at_ns: int | None, shown: str) -> Horizon | None:
    """:class:`ConfigurationError` when ``at_ns`` lies before the retention window of ``key`` (None: of every
    tenant) as of the replica's last compaction; ``shown``: the time as the caller shows it. Returns the
    horizon (None: never compacted)."""
    horizon = read_horizon(target)
    if horizon is None or at_ns is None:
        return horizon
    start = retention_start(horizon, key)
    if at_ns < start:
        from .replica_restore import format_time

        what = f"tenant {key!r}" if key is not None else "a whole root (every tenant's window)"
        raise ConfigurationError(
            f"--at {shown} lies before the retention window of {what}: the replica {target.url} keeps history "
            f"from {format_time(start)} on (compacted at {format_time(horizon.compacted_ns)}); restore at or "
            "after that time, or from a backup")
    return horizon
