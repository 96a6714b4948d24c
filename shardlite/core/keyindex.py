"""The keyed pack index: which packs hold which tenants, sharded by key digest inside one object, so that a
one-tenant restore reads a few kilobytes of it with two ranged GETs whatever its size.

An index object is::

    b"SLKIDX1\\n" | meta length (4 bytes) | table length (4 bytes) | xxh3-128 of meta + table (16 bytes)
    | meta (JSON) | table | shard sections

**Meta** (:class:`Meta`): its kind (``base``: written by a compaction; ``segment``: written by the replicator
between compactions, covering the packs uploaded since its base), when it was made, the base it extends, and
its **coverage**: per node (the node's folder in ``v1/packs/``) the highest pack sequence number it covers,
plus the compaction packs it covers by name (``extra``) and the covered packs whose header could not be read
(``unreadable``: a restore reads them itself). A pack of a covered sequence number holds no key but those the
shards list for it; a pack past the coverage is not covered at all (a restore lists and reads it).

**Table**: per shard, the offset and length of its section and the xxh3-128 of its bytes (28 bytes each).
**Shard** ``s``: msgpack of ``[[pack name, size, [key digest, ...]], ...]``, every pack holding a key whose
digest (:func:`digest`: the first 64 bits of xxh3-128 of the key) is ``s`` modulo the shard count, with only
those digests. A collision of digests only costs one header read.

Index objects come back from storage as untrusted input: the meta and the table are checked against their
digest before anything is used, every section against its own, every name, size, count and digest is
validated (:class:`ValueError` otherwise). Pure: no I/O.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable
from typing import Literal

import msgspec
import xxhash

from ..replica.target import check_name

__all__ = ["MAGIC", "Meta", "Head", "digest", "encode", "head_size", "decode_head", "decode_shard", "shard_of",
           "pack_seq", "MAX_SHARDS", "MAX_META", "MAX_SECTION", "PackRow"]

MAGIC = b"SLKIDX1\n"
_FIXED = struct.Struct(">II16s")
_ENTRY = struct.Struct(">QI16s")
#: Shards of one index object at most (a power of two).
MAX_SHARDS = 4096
#: Bytes of meta at most (the coverage of thousands of nodes and the compaction packs of a week).
MAX_META = 8 * 1024 * 1024
#: Bytes of one shard section at most.
MAX_SECTION = 64 * 1024 * 1024
#: (key digest, ...) pairs per shard the encoder aims at (a section of a few KB: decoding and checking one
#: costs well under a millisecond).
_PER_SHARD = 256
_PACK_NAME = re.compile(r"v1/packs/([^/]{1,255})/([0-9]{20})\.pack")
#: Numbered pack names that :func:`~shardlite.replica.target.check_name` accepts (checked without it: fast).
_NUMBERED = re.compile(r"v1/packs/[a-z0-9_][a-z0-9_.\-]{0,127}/[0-9]{20}\.pack")
_U64 = (1 << 64) - 1

#: (pack name, size in bytes, digests of the keys it holds)
PackRow = tuple[str, int, list[int]]


class Meta(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: int
    kind: Literal["base", "segment"]
    created_ns: int
    base_ns: int  #: a base: its own ``created_ns``; a segment: its base's
    coverage: dict[str, int]  #: node folder -> highest pack sequence number covered
    extra: list[str]  #: covered packs outside the numbered sequence (compaction packs)
    unreadable: list[tuple[str, int]]  #: covered packs whose header could not be read: restores read them
    shards: int


class Head(msgspec.Struct, frozen=True):
    meta: Meta
    table: list[tuple[int, int, bytes]]  #: per shard (offset, length, digest)
    size: int  #: bytes of magic, lengths, digest, meta and table


def digest(key: str) -> int:
    """The 64-bit digest of ``key`` the shards are keyed by."""
    return int.from_bytes(xxhash.xxh3_128_digest(key.encode("utf-8"))[:8], "big")


def shard_of(key_digest: int, shards: int) -> int:
    return key_digest & (shards - 1)


def pack_seq(name: str) -> tuple[str, int] | None:
    """(node folder, sequence number) of a numbered pack's name, None for any other name."""
    found = _PACK_NAME.fullmatch(name)
    return (found.group(1), int(found.group(2))) if found else None


def _check_pack_name(name: object) -> str:
    if not isinstance(name, str) or not name.startswith("v1/packs/") or not name.endswith(".pack"):
        raise ValueError("the key index names an object that is not a pack")
    if not _NUMBERED.fullmatch(name):
        check_name(name)
    return name


def _shard_count(pairs: int) -> int:
    shards = 1
    while shards < MAX_SHARDS and shards * _PER_SHARD < pairs:
        shards *= 2
    return shards


def encode(kind: Literal["base", "segment"], created_ns: int, base_ns: int, coverage: dict[str, int],
           packs: Iterable[PackRow], *, extra: Iterable[str] = (), unreadable: Iterable[tuple[str, int]] = (),
           shards: int | None = None) -> bytes:
    """An index object of ``packs`` (those holding no key may be left out: coverage says they were seen)."""
    rows = [(name, size, sorted(set(keys))) for name, size, keys in packs if keys]
    count = shards if shards is not None else _shard_count(sum(len(keys) for _n, _s, keys in rows))
    if count < 1 or count > MAX_SHARDS or count & (count - 1):
        raise ValueError(f"an index has 1 to {MAX_SHARDS} shards, a power of two")
    sections: list[list[PackRow]] = [[] for _ in range(count)]
    for name, size, keys in sorted(rows):
        by: dict[int, list[int]] = {}
        for key in keys:
            by.setdefault(shard_of(key, count), []).append(key)
        for shard, some in by.items():
            sections[shard].append((name, size, some))
    meta = msgspec.json.encode(Meta(1, kind, created_ns, base_ns, dict(sorted(coverage.items())), sorted(set(extra)),
                                    sorted(set(unreadable)), count))
    blobs = [msgspec.msgpack.encode(section) for section in sections]
    at = len(MAGIC) + _FIXED.size + len(meta) + count * _ENTRY.size
    table = bytearray()
    for blob in blobs:
        table += _ENTRY.pack(at, len(blob), xxhash.xxh3_128_digest(blob))
        at += len(blob)
    check = xxhash.xxh3_128_digest(meta + bytes(table))
    return b"".join([MAGIC, _FIXED.pack(len(meta), len(table), check), meta, bytes(table), *blobs])


def head_size(first: bytes) -> int:
    """Bytes of the head (everything but the sections) of the index object that begins with ``first`` (at
    least ``len(MAGIC) + 24`` bytes)."""
    if len(first) < len(MAGIC) + _FIXED.size or first[:len(MAGIC)] != MAGIC:
        raise ValueError("not a shardlite key index")
    meta_len: int
    table_len: int
    meta_len, table_len, _check = _FIXED.unpack_from(first, len(MAGIC))
    if meta_len > MAX_META or table_len > MAX_SHARDS * _ENTRY.size:
        raise ValueError("the key index's head is past its limits")
    return len(MAGIC) + _FIXED.size + meta_len + table_len


def decode_head(data: bytes, size: int) -> Head:
    """The head of an index object of ``size`` bytes that begins with ``data``, validated whole."""
    need = head_size(data)
    if len(data) < need or need > size:
        raise ValueError("the key index is shorter than its head")
    meta_len, table_len, check = _FIXED.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + _FIXED.size
    body = data[start:need]
    if xxhash.xxh3_128_digest(body) != check:
        raise ValueError("the key index's head does not match its digest (damaged)")
    try:
        meta = msgspec.json.decode(body[:meta_len], type=Meta)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ValueError(f"the key index's meta is invalid: {exc}") from None
    if meta.version != 1 or meta.created_ns < 0 or meta.base_ns < 0 or (
            meta.kind == "base" and meta.base_ns != meta.created_ns) or meta.base_ns > meta.created_ns:
        raise ValueError("unsupported or inconsistent key index")
    shards = meta.shards
    if shards < 1 or shards > MAX_SHARDS or shards & (shards - 1) or table_len != shards * _ENTRY.size:
        raise ValueError("the key index's shard table is invalid")
    for part, seq in meta.coverage.items():
        check_name(f"v1/packs/{part}/x.pack")
        if "/" in part or not 0 <= seq <= _U64:
            raise ValueError("the key index's coverage is invalid")
    for name in meta.extra:
        _check_pack_name(name)
    for name, pack_size in meta.unreadable:
        _check_pack_name(name)
        if pack_size < 0:
            raise ValueError("the key index names a pack of a negative size")
    table = []
    end = need
    for position in range(shards):
        offset, length, section_digest = _ENTRY.unpack_from(body, meta_len + position * _ENTRY.size)
        if offset != end or length > MAX_SECTION or offset + length > size:
            raise ValueError("the key index's shard table points outside the object")
        table.append((offset, length, section_digest))
        end = offset + length
    if end != size:
        raise ValueError("the key index's size does not match its shard table")
    return Head(meta, table, need)


def decode_shard(head: Head, shard: int, data: bytes) -> list[PackRow]:
    """Section ``shard`` of the index whose head is ``head``, from its bytes ``data``, validated whole."""
    _offset, length, section_digest = head.table[shard]
    if len(data) != length or xxhash.xxh3_128_digest(data) != section_digest:
        raise ValueError("a key index section does not match its digest (damaged)")
    try:
        rows = msgspec.msgpack.decode(data, type=list[tuple[str, int, list[int]]])
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ValueError(f"a key index section is invalid: {exc}") from None
    for name, size, keys in rows:
        _check_pack_name(name)
        if size < 0 or not keys or any(not 0 <= k <= _U64 or shard_of(k, head.meta.shards) != shard for k in keys):
            raise ValueError("a key index section holds an invalid row")
    return rows
