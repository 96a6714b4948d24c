"""Reading a root's replica back: the packs of every node, and one tenant's captures in them.

A pack's header is read with one ranged GET (a second when it is longer than the first read), and only
the byte ranges of the tenants asked for are fetched after it, so restoring one tenant reads a few
kilobytes per pack, not the packs; reading every tenant (a whole root) fetches each pack's payload in one
request instead. A one-tenant read skips the packs the replica's index (written by compaction,
:mod:`shardlite.services.replica_index`) knows hold none of the keys, and reads the header of every other
pack, so a missing or stale index costs time, never captures. Everything read is untrusted: headers are validated whole
(:func:`shardlite.core.pack.decode_header`) and every entry's bytes are checked against its digest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from ..core import pack, timeline
from ..replica.target import ReplicaTarget
from . import replica_index

__all__ = ["PackInfo", "list_packs", "read_header", "captures_of", "PACKS_PREFIX"]

PACKS_PREFIX = "v1/packs/"
#: Bytes read first from a pack: the magic, the length and (for packs of up to a few hundred captures) the
#: whole header.
FIRST_READ = 64 * 1024


@dataclass(frozen=True)
class PackInfo:
    name: str
    size: int
    header: pack.Header
    payload_at: int


def list_packs(target: ReplicaTarget) -> Iterator[tuple[str, int]]:
    """(name, size) of every pack in the replica, in name order (per node, by sequence)."""
    for name, size in target.list(PACKS_PREFIX):
        if name.endswith(".pack"):
            yield name, size


def read_header(target: ReplicaTarget, name: str, size: int) -> PackInfo:
    """The validated header of pack ``name`` of ``size`` bytes (:class:`~shardlite.core.pack.PackError`
    when it is not a valid pack)."""
    head = target.get_range(name, 0, min(size, FIRST_READ))
    if len(head) >= len(pack.MAGIC) + 4 and head[:len(pack.MAGIC)] == pack.MAGIC:
        need = len(pack.MAGIC) + 4 + int.from_bytes(head[len(pack.MAGIC):len(pack.MAGIC) + 4], "big")
        if need > len(head) and need <= min(size, len(pack.MAGIC) + 4 + pack.MAX_HEADER):
            head += target.get_range(name, len(head), need - len(head))
    header, payload_at = pack.decode_header(head, size=size)
    return PackInfo(name, size, header, payload_at)


def captures_of(target: ReplicaTarget, keys: Iterable[str] | None, *,
                on_pack: Callable[[PackInfo], None] | None = None) -> dict[str, list[timeline.Capture]]:
    """Every capture of each of ``keys`` (None: of every tenant) in the replica, with its bytes (digest
    checked)."""
    wanted = set(keys) if keys is not None else None
    found: dict[str, list[timeline.Capture]] = {key: [] for key in wanted or ()}
    index = replica_index.read_index(target) if wanted is not None else None
    skip = replica_index.Skip(index, wanted) if index is not None and wanted is not None else None
    for name, size in list_packs(target):
        if skip is not None and skip(name, size):
            continue
        info = read_header(target, name, size)
        if on_pack is not None:
            on_pack(info)
        # every tenant (a whole root): the payload in one read, not one request per capture
        payload = target.get_range(name, info.payload_at, size - info.payload_at) if wanted is None else None
        for position, entry in enumerate(info.header.entries):
            if wanted is not None and entry.key not in wanted:
                continue
            if payload is not None:
                data = payload[entry.offset:entry.offset + entry.length]
            else:
                data = target.get_range(name, info.payload_at + entry.offset, entry.length)
            pack.check_bytes(entry, data)
            order = (entry.captured_ns, info.header.seq, position)
            found.setdefault(entry.key, []).append(timeline.Capture(order, entry, data, info.header.node))
    return found
