"""Reading a root's replica back: the packs of every node, and one tenant's captures in them.

A pack's header is read with one ranged GET (a second when it is longer than the first read), and only
the byte ranges of the tenants asked for are fetched after it, so restoring one tenant reads a few
kilobytes per pack, not the packs; reading every tenant (a whole root) fetches each pack's payload in one
request instead. A one-tenant read reads only the packs the replica's key index
(:mod:`shardlite.services.replica_index`) names for the keys or does not cover, several at once; a missing
or stale index costs time (every header read), never captures. Captures of an erased incarnation (a tombstone
``v1/erased/<hash>.erased`` names it: :func:`tombstone_name`) are never returned, so a restore never brings an
erased tenant back, even from a pack an interrupted erase had not rewritten yet. Everything read is untrusted:
headers are validated whole (:func:`shardlite.core.pack.decode_header`) and every entry's bytes are checked
against its digest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass

import xxhash

from ..core import pack, rollup, timeline
from ..errors import ReplicaDamaged, ReplicaObjectMissing
from ..replica.target import ReplicaTarget
from . import replica_index

__all__ = ["PackInfo", "list_packs", "read_header", "read_header_and_bytes", "read_headers", "captures_of", "fill",
           "read_pack",
           "PACKS_PREFIX", "ERASED_PREFIX",
           "tombstone_name", "erased_names"]

PACKS_PREFIX = "v1/packs/"
#: Tombstones of erased tenant histories, one object per incarnation (services/erase.py).
ERASED_PREFIX = "v1/erased/"
#: Bytes read first from a pack: the magic, the length and (for packs of up to a few hundred captures) the
#: whole header.
FIRST_READ = 64 * 1024


@dataclass(frozen=True)
class PackInfo:
    name: str
    size: int
    header: pack.Header
    payload_at: int


def list_packs(target: ReplicaTarget, *, every: bool = False) -> list[tuple[str, int]]:
    """(name, size) of every pack readers read, in name order (per node, by sequence): not the numbered packs
    a compaction's rollup supersedes, nor the parts of a rollup left unfinished
    (:func:`shardlite.core.rollup.sort_out`). ``every``: every pack (an erase scrubs what readers ignore too)."""
    listed = list(target.list(PACKS_PREFIX))
    if every:
        return [(name, size) for name, size in listed if name.endswith(".pack")]
    return rollup.sort_out(listed).packs


def read_header(target: ReplicaTarget, name: str, size: int) -> PackInfo:
    """The validated header of pack ``name`` of ``size`` bytes (:class:`~shardlite.core.pack.PackError`
    when it is not a valid pack)."""
    return read_header_and_bytes(target, name, size)[0]


def read_header_and_bytes(target: ReplicaTarget, name: str, size: int) -> tuple[PackInfo, bytes]:
    """:func:`read_header`, and the pack's first bytes read for it (a small pack: all of it)."""
    head = target.get_range(name, 0, min(size, FIRST_READ))
    if len(head) >= len(pack.MAGIC) + 4 and head[:len(pack.MAGIC)] == pack.MAGIC:
        need = len(pack.MAGIC) + 4 + int.from_bytes(head[len(pack.MAGIC):len(pack.MAGIC) + 4], "big")
        if need > len(head) and need <= min(size, len(pack.MAGIC) + 4 + pack.MAX_HEADER):
            head += target.get_range(name, len(head), need - len(head))
    header, payload_at = pack.decode_header(head, size=size)
    return PackInfo(name, size, header, payload_at), head


#: Headers read at once by :func:`read_headers` (each read holds up to :data:`FIRST_READ` bytes until its
#: header is decoded).
HEADER_BATCH = 256


def read_headers(target: ReplicaTarget, listed: list[tuple[str, int]]) -> dict[str, PackInfo | pack.PackError]:
    """The header of every pack of ``listed`` ((name, size), in that order), or the
    :class:`~shardlite.core.pack.PackError` that says why it is not a valid pack, read from the replica in
    parallel (:func:`shardlite.services.replica_index.readers`). A replica that cannot be reached raises. (A
    compaction reads through its header cache instead: :mod:`shardlite.services.compact_scan`.)"""
    out: dict[str, PackInfo | pack.PackError] = {}
    pool = replica_index.readers()
    for at in range(0, len(listed), HEADER_BATCH):
        batch = listed[at:at + HEADER_BATCH]
        futures = [pool.submit(read_header_and_bytes, target, name, size) for name, size in batch]
        for (name, _size), future in zip(batch, futures, strict=True):
            try:
                out[name] = future.result()[0]
            except pack.PackError as exc:
                out[name] = exc
    return out


def tombstone_name(incarnation: str) -> str:
    """The tombstone object of an erased incarnation. The name is a hash of the incarnation (a random id that
    says nothing of the tenant; hashed so any text an entry holds makes a valid name): the replica keeps no
    trace of the erased key itself."""
    return f"{ERASED_PREFIX}{xxhash.xxh3_128_hexdigest(incarnation.encode('utf-8'))}.erased"


def erased_names(target: ReplicaTarget) -> set[str]:
    """The names of every tombstone in the replica."""
    return {name for name, _size in target.list(ERASED_PREFIX)}


def captures_of(target: ReplicaTarget, keys: Iterable[str] | None, *,
                on_pack: Callable[[PackInfo], None] | None = None, lazy: bool = False,
                damaged: list[tuple[str, str]] | None = None) -> dict[str, list[timeline.Capture]]:
    """Every capture of each of ``keys`` (None: of every tenant) in the replica, with its bytes (digest
    checked). With ``keys`` (and no ``on_pack``), only the packs the key index names or does not cover
    are read, in parallel (:func:`shardlite.services.replica_index.candidates`); anything the index says
    that the replica contradicts (a pack gone or changed since) and a missing or damaged index make it read
    every pack's header instead.

    ``lazy`` (with ``keys``): a capture whose bytes did not come with its pack's header is returned without
    them (``where`` set, ``data`` empty); :func:`fill` fetches those a replay needs (a restore reads only the
    captures from the last snapshot on, not a busy tenant's whole history).

    A pack that fails its checks (its header, or the bytes of a capture asked for: damaged, truncated or not
    written by shardlite) raises :class:`~shardlite.ReplicaDamaged` naming every such pack once all were read;
    with ``damaged`` (a list) they are skipped instead, each appended to it as (name, what is wrong). (A pack
    the key index names that fails is not counted here: every pack is read again, and it is met there.)"""
    wanted = set(keys) if keys is not None else None
    if lazy and wanted is None:
        raise ValueError("lazy reads are for named keys")
    if wanted is not None and on_pack is None:
        pool = replica_index.readers()
        erased = pool.submit(erased_names, target)
        reads: dict[str, Future[list[tuple[str, timeline.Capture]]]] = {}

        def start(name: str, size: int) -> None:  # each pack's reading starts as soon as it is named
            if name not in reads:
                reads[name] = pool.submit(read_pack, target, name, size, wanted, None, lazy)

        found = replica_index.candidates(target, wanted, pool, start)
        if found is not None:
            try:
                return _collect(wanted, [reads[name].result() for name in sorted(found.packs)], erased.result())
            except (pack.PackError, ReplicaObjectMissing):
                pass  # the index named a pack deleted or rewritten since: read every header
        erased.result()
    erased_now = erased_names(target)
    results, bad = [], []
    for name, size in list_packs(target):
        try:
            results.append(read_pack(target, name, size, wanted, on_pack, lazy))
        except pack.PackError as exc:
            bad.append((name, str(exc)))
    if bad and damaged is None:
        raise ReplicaDamaged(damaged_message(target, bad), bad)
    if damaged is not None:
        damaged.extend(bad)
    return _collect(wanted, results, erased_now)


def damaged_message(target: ReplicaTarget, bad: list[tuple[str, str]]) -> str:
    """What :class:`~shardlite.ReplicaDamaged` says: the objects (the first five), and what to do."""
    shown = "; ".join(f"{name!r} ({reason})" for name, reason in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return (f"{len(bad)} object(s) of the replica {target.url} failed their checks (damaged, truncated or not "
            f"written by shardlite): {shown}{more}. Nothing was restored: restore with --skip-damaged "
            "(skip_damaged=True) to use every other object (commits only these held are then missing; the report "
            "lists them), or restore from a backup")


def read_pack(target: ReplicaTarget, name: str, size: int, wanted: set[str] | None,
              on_pack: Callable[[PackInfo], None] | None, lazy: bool = False) -> list[tuple[str, timeline.Capture]]:
    """The captures of ``wanted`` (None: every tenant) in pack ``name``, digests checked; ``lazy``: those whose
    bytes are not in the first read come without them (:func:`captures_of`)."""
    info, head = read_header_and_bytes(target, name, size)
    # every tenant (a whole root): the payload in one read, not one request per capture
    payload = target.get_range(name, info.payload_at, size - info.payload_at) if wanted is None else None
    out = []
    for position, entry in enumerate(info.header.entries):
        if wanted is not None and entry.key not in wanted:
            continue
        start = info.payload_at + entry.offset
        if payload is not None:
            data = payload[entry.offset:entry.offset + entry.length]
        elif start + entry.length <= len(head):  # read with the header already
            data = head[start:start + entry.length]
        elif lazy:
            order = (entry.captured_ns, info.header.seq, position)
            out.append((entry.key, timeline.Capture(order, entry, b"", info.header.node, (name, start))))
            continue
        else:
            data = target.get_range(name, start, entry.length)
        pack.check_bytes(entry, data)
        order = (entry.captured_ns, info.header.seq, position)
        out.append((entry.key, timeline.Capture(order, entry, data, info.header.node)))
    if on_pack is not None:  # a pack whose bytes fail is not half used
        on_pack(info)
    return out


def _fetch(target: ReplicaTarget, got: timeline.Capture) -> timeline.Capture:
    assert got.where is not None
    name, start = got.where
    data = target.get_range(name, start, got.entry.length)
    pack.check_bytes(got.entry, data)
    return got._replace(data=data, where=None)


def fill(target: ReplicaTarget, captures: list[timeline.Capture]) -> list[timeline.Capture]:
    """``captures`` with the bytes of those read lazily (:func:`captures_of`) fetched, in parallel, digests
    checked (:class:`~shardlite.core.pack.PackError`; :class:`~shardlite.ReplicaObjectMissing` when a pack
    went since its header was read: a compaction deleted it, read the captures again)."""
    pool = replica_index.readers()
    futures = {i: pool.submit(_fetch, target, got) for i, got in enumerate(captures) if got.where is not None}
    return [futures[i].result() if i in futures else got for i, got in enumerate(captures)]


def _collect(wanted: set[str] | None, results: Iterable[list[tuple[str, timeline.Capture]]],
             erased: set[str]) -> dict[str, list[timeline.Capture]]:
    found: dict[str, list[timeline.Capture]] = {key: [] for key in wanted or ()}
    for got in results:
        for key, capture in got:
            if erased and tombstone_name(capture.entry.incarnation) in erased:
                continue  # an erased history: never restored
            found.setdefault(key, []).append(capture)
    return found
