"""What a compaction reads of a replica: a summary of every pack, and the headers of only the packs it plans over.

A replica holds every pack of the retention window (one per node per upload interval: about 7,200 an hour for a busy
node, 1.2 million over 7 days). A compaction that decoded every header each hour would hold the whole window in
memory and spend minutes of CPU on it. But it can only delete, or snapshot, what is older than the latest retention
start (``now`` minus the shortest window): a pack holding a capture or a drop record newer than that is kept
whatever the plan says. So a compaction plans over the *old* packs only: those whose newest capture and drop record
are at or before that cutoff (a compaction pack holds base snapshots, which carry the times of the captures they
stand for: old ones; a rollup part, its run's). Of the others it needs only what
:func:`shardlite.core.retention.plan` asks of packs it does not see, the keys that may be in them (``recent``), and
the key index their keys.

That is a :class:`Summary` per pack: the newest time in it and the 64-bit digests
(:func:`shardlite.core.keyindex.digest`) of the keys of its entries and of its drop records. Summaries of final
packs are kept in the root's header cache (:mod:`shardlite.files.headercache`) with the header they come from,
so a compaction reads from the replica, and decodes, only the headers of packs it has not seen; it decodes the
cached headers of the old packs only. A key digest shared by two keys makes ``recent`` true for both: a key kept
longer, never a capture lost.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from ..core import keyindex, pack
from ..files.headercache import HeaderCache
from ..replica.target import ReplicaTarget
from . import replica_index
from .replica_read import HEADER_BATCH, PackInfo, read_header_and_bytes

__all__ = ["Summary", "Scan", "summarize", "scan"]


@dataclass(frozen=True)
class Summary:
    """What a compaction needs of a pack it does not plan over."""

    newest_ns: int  #: the newest capture time or drop time in the pack (0: it holds neither)
    keys: bytes  #: sorted digests of its entries' keys, 8 bytes big-endian each
    dropped: bytes  #: sorted digests of its drop records' keys, 8 bytes big-endian each

    def key_digests(self) -> list[int]:
        return _ints(self.keys)

    def all_digests(self) -> list[int]:
        return _ints(self.keys) + _ints(self.dropped)


def _ints(blob: bytes) -> list[int]:
    return list(struct.unpack(f">{len(blob) // 8}Q", blob))


def _blob(keys: set[str]) -> bytes:
    digests = sorted({keyindex.digest(key) for key in keys})
    return struct.pack(f">{len(digests)}Q", *digests)


def summarize(header: pack.Header) -> Summary:
    """The summary of a (validated) pack header."""
    newest = max([*(e.captured_ns for e in header.entries), *(d.dropped_ns for d in header.drops)], default=0)
    return Summary(newest, _blob({e.key for e in header.entries}), _blob({d.key for d in header.drops}))


@dataclass
class Scan:
    summaries: dict[str, Summary]  #: every pack listed whose header is valid
    planned: dict[str, PackInfo]  #: the headers of the packs planned over, in listing order
    #: packs listed whose header is not valid (damaged, truncated, crafted) -> what is wrong: no summary, no plan
    damaged: dict[str, str]


def scan(target: ReplicaTarget, listed: list[tuple[str, int]], cache: HeaderCache, *, final: Callable[[str], bool],
         planned: Callable[[str, Summary], bool]) -> Scan:
    """The summary of every pack of ``listed`` ((name, size)), and the header of those ``planned`` says a
    compaction plans over. Summaries and headers of packs in ``cache`` (same name and size) come from it; the
    others are read from the replica in parallel, and those of packs ``final`` says will not change are cached.
    Rows of packs not listed are deleted from the cache. A pack whose header is not valid is in ``damaged``
    only: the caller decides nothing from it (it keeps it, and assumes it may hold any key)."""
    sizes = dict(listed)
    summaries = {name: Summary(*row) for name, row in cache.summaries(sizes).items()}
    infos: dict[str, PackInfo] = {}
    wanted = [name for name, summary in summaries.items() if planned(name, summary)]
    for name, head in cache.heads(wanted).items():
        try:
            header, payload_at = pack.decode_header(head, size=sizes[name])
        except pack.PackError:
            del summaries[name]  # a damaged cache row: read from the replica below
            continue
        infos[name] = PackInfo(name, sizes[name], header, payload_at)
    for name in wanted:
        if name not in infos:
            summaries.pop(name, None)
    missing = [(name, size) for name, size in listed if name not in summaries]
    damaged: dict[str, str] = {}
    pool = replica_index.readers()
    for at in range(0, len(missing), HEADER_BATCH):
        batch = missing[at:at + HEADER_BATCH]
        futures = [pool.submit(read_header_and_bytes, target, name, size) for name, size in batch]
        rows = []
        for (name, size), future in zip(batch, futures, strict=True):
            try:
                info, head = future.result()
            except pack.PackError as exc:
                damaged[name] = str(exc)
                continue
            summary = summaries[name] = summarize(info.header)
            if planned(name, summary):
                infos[name] = info
            if final(name):
                rows.append((name, size, bytes(head[:info.payload_at]), summary.newest_ns, summary.keys,
                             summary.dropped))
        if rows:
            cache.store(rows)
    cache.retain(sizes)
    return Scan(summaries, {name: infos[name] for name, _size in listed if name in infos}, damaged)
