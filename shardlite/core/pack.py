"""Packs: the objects a node's replicator uploads, each holding the captures of many tenants.

One pack per node per upload interval, so the number of objects (and PUTs) grows with time, not with the
number of tenants. A pack is::

    b"SLPACK1\\n" | header length (4 bytes, big-endian) | header (JSON) | payload

The header names the node, the pack's sequence number on that node, when it was made, and one
:class:`Entry` per capture: which tenant history it belongs to (key, incarnation, generation), whether it
is a ``snapshot`` (a whole database image) or ``frames`` (WAL frames ``first``..``last`` of the log
generation ``salt``, as SQLite wrote them: 24-byte header and page each), the commits it ends (frame
number and commit time), and where its bytes lie in the payload. A restore reads the header, then only
the byte ranges of the tenants it restores.

A pack may also carry **drop records** (:class:`Drop`: key, incarnation, generation, when it was dropped), one
per plain drop of a tenant on the node (``tenants drop KEY``), so that a whole-root restore at a time after
the drop leaves the tenant out (:func:`shardlite.services.replica_restore.materialize`). They are identifiers
only, never tenant data. A pack with drop records is version 2 (its header has a ``drops`` list); a pack
without is written as version 1, byte for byte as before, so readers of version 1 read every pack of a replica
without drops, and refuse a version-2 header whole (an unknown field) rather than misread it.

Packs come back from storage as untrusted input: :func:`decode_header` validates every field, every range
and every count before anything is used, and raises :class:`PackError` on anything else.

Pure: no I/O.
"""

from __future__ import annotations

import struct
from typing import Literal

import msgspec
import xxhash

from . import walformat as wf
from .keys import canonical

__all__ = ["MAGIC", "Entry", "Drop", "Header", "PackError", "encode", "decode_header", "entry_bytes", "check_bytes",
           "MAX_HEADER", "MAX_DROPS", "without", "without_key"]

MAGIC = b"SLPACK1\n"
_LEN = struct.Struct(">I")
#: A header larger than this is refused (a pack of ~100,000 captures stays well below it).
MAX_HEADER = 64 * 1024 * 1024
#: A pack carries at most this many drop records (a replicator ships more in its next packs).
MAX_DROPS = 100_000
#: Drop records up to this time (ns since the epoch: the year 2262) are accepted; later ones are damage.
_MAX_NS = (1 << 63) - 1


class PackError(ValueError):
    """Bytes that are not a valid pack (damaged, truncated, or not written by shardlite)."""


class Entry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One capture of one tenant's history inside a pack."""

    key: str
    incarnation: str
    generation: int
    kind: Literal["snapshot", "frames"]
    page_size: int
    #: hex of the log generation's 8 salt bytes (a snapshot: of the generation it was taken in; "" when the
    #: log held no commit then)
    salt: str
    first: int  #: first frame number (frames), 0 for a snapshot
    last: int  #: last frame number (frames); the log's last commit frame a snapshot stands for
    #: (frame number, commit time in ns) of each commit this capture ends, in order; a snapshot has one
    commits: list[tuple[int, int]]
    captured_ns: int
    offset: int  #: of this entry's bytes in the payload
    length: int
    digest: str = ""  #: xxh3-128 (hex) of this entry's bytes, filled in by :func:`encode`


class Drop(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A plain drop of one tenant file's history: from ``dropped_ns`` on, incarnation ``incarnation`` of
    ``key`` (last at generation ``generation``) is no longer live. Taken after the drop fenced the file, so
    every commit of that incarnation is older."""

    key: str
    incarnation: str
    generation: int
    dropped_ns: int


class Header(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """A pack's header (``drops``: version 2 only; left out of a version-1 header)."""

    version: int
    node: str
    seq: int
    created_ns: int
    entries: list[Entry]
    drops: list[Drop] = msgspec.field(default_factory=list)


def encode(node: str, seq: int, created_ns: int, items: list[tuple[Entry, bytes]],
           drops: list[Drop] | None = None) -> bytes:
    """A pack of ``items`` (entries whose ``offset``/``length`` are filled in here, with their bytes) and
    ``drops`` (version 2 when there are any, else version 1)."""
    entries, chunks, at = [], [], 0
    for entry, data in items:
        entries.append(msgspec.structs.replace(entry, offset=at, length=len(data),
                                               digest=xxhash.xxh3_128_hexdigest(data)))
        chunks.append(data)
        at += len(data)
    if drops and len(drops) > MAX_DROPS:
        raise ValueError(f"a pack carries at most {MAX_DROPS} drop records")
    header = msgspec.json.encode(Header(2 if drops else 1, node, seq, created_ns, entries, list(drops or [])))
    return b"".join([MAGIC, _LEN.pack(len(header)), header, *chunks])


def _check_identity(what: str, key: str, incarnation: str, generation: int) -> None:
    try:
        canonical_ok = canonical(key) == key
    except ValueError:
        canonical_ok = False
    if not canonical_ok:
        raise PackError(f"{what} names {key[:80]!r}, which is not a canonical key")
    if not incarnation or len(incarnation) > 128 or generation < 0:
        raise PackError(f"{what} of {key!r} has an invalid identity")


def _check_drop(drop: Drop) -> None:
    _check_identity("a drop record", drop.key, drop.incarnation, drop.generation)
    if not 0 <= drop.dropped_ns <= _MAX_NS:
        raise PackError(f"the drop record of {drop.key!r} has an impossible time")


def _check_entry(entry: Entry, payload_size: int) -> None:
    _check_identity("an entry", entry.key, entry.incarnation, entry.generation)
    size = entry.page_size
    if size < 512 or size > 65536 or size & (size - 1):
        raise PackError(f"the entry of {entry.key!r} has an impossible page size {size}")
    if len(entry.digest) != 32:
        raise PackError(f"the entry of {entry.key!r} has no valid digest")
    if entry.offset < 0 or entry.length < 0 or entry.offset + entry.length > payload_size:
        raise PackError(f"the entry of {entry.key!r} lies outside the pack")
    if entry.salt or entry.kind == "frames":
        if len(entry.salt) != 16:
            raise PackError(f"the entry of {entry.key!r} has an invalid salt")
        try:
            bytes.fromhex(entry.salt)
        except ValueError:
            raise PackError(f"the entry of {entry.key!r} has an invalid salt") from None
    if entry.kind == "frames":
        if entry.first < 1 or entry.last < entry.first:
            raise PackError(f"the frames of {entry.key!r} have an invalid range")
        if entry.length != (entry.last - entry.first + 1) * (wf.FRAME_HEADER_SIZE + size):
            raise PackError(f"the frames of {entry.key!r} do not fill their range")
    elif entry.length % size or entry.length == 0 or entry.first:
        raise PackError(f"the snapshot of {entry.key!r} is not a whole number of pages")
    frames = [frame for frame, _ in entry.commits]
    if not frames or frames != sorted(set(frames)) or any(t < 0 for _, t in entry.commits):
        raise PackError(f"the entry of {entry.key!r} lists its commits out of order")
    if frames[-1] != entry.last or (entry.kind == "frames" and frames[0] < entry.first):
        raise PackError(f"the commits of {entry.key!r} lie outside its frames")


def decode_header(data: bytes | memoryview, size: int | None = None) -> tuple[Header, int]:
    """The header of a pack whose first bytes are ``data`` (at least the magic, the length and the header),
    validated whole, and the offset of the payload in the pack. ``size``: the pack's total size when
    ``data`` is only its beginning (the entries' ranges are checked against it)."""
    view = memoryview(data)
    if len(view) < len(MAGIC) + _LEN.size or bytes(view[:len(MAGIC)]) != MAGIC:
        raise PackError("not a shardlite pack (bad magic)")
    (length,) = _LEN.unpack_from(view, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    if length > MAX_HEADER:
        raise PackError(f"a pack header of {length} bytes is past the limit")
    if len(view) < start + length:
        raise PackError("the pack is shorter than its header")
    try:
        header = msgspec.json.decode(view[start:start + length], type=Header)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise PackError(f"the pack header is invalid: {exc}") from None
    if header.version not in (1, 2):
        raise PackError(f"pack version {header.version} is not supported")
    if header.version == 1 and header.drops:
        raise PackError("a version-1 pack header carries drop records")
    if header.version == 2 and not header.drops:
        raise PackError("a version-2 pack header carries no drop records (shardlite writes those as version 1)")
    if len(header.drops) > MAX_DROPS:
        raise PackError(f"a pack header carries more than {MAX_DROPS} drop records")
    if header.seq < 0 or header.created_ns < 0 or not header.node or len(header.node) > 255:
        raise PackError("the pack header names an invalid node or sequence")
    payload = (size if size is not None else len(view)) - start - length
    if payload < 0:
        raise PackError("the pack is shorter than its header")
    for entry in header.entries:
        _check_entry(entry, payload)
    for drop in header.drops:
        _check_drop(drop)
    return header, start + length


def entry_bytes(pack: bytes | memoryview, payload_at: int, entry: Entry) -> bytes:
    """The bytes of ``entry`` in a whole ``pack`` (validated by :func:`decode_header`)."""
    start = payload_at + entry.offset
    data = bytes(memoryview(pack)[start:start + entry.length])
    if len(data) != entry.length:
        raise PackError(f"the pack ends inside the entry of {entry.key!r}")
    check_bytes(entry, data)
    return data


def check_bytes(entry: Entry, data: bytes) -> None:
    """:class:`PackError` unless ``data`` are the bytes ``entry`` describes (length and digest)."""
    if len(data) != entry.length or xxhash.xxh3_128_hexdigest(data) != entry.digest:
        raise PackError(f"the bytes of {entry.key!r}'s entry do not match its digest (a damaged pack)")


def without(blob: bytes, key: str) -> tuple[bytes | None, list[Entry]]:
    """:func:`without_key` without the drop records it took out: the pack and the entries."""
    out, removed, _dropped = without_key(blob, key)
    return out, removed


def without_key(blob: bytes, key: str) -> tuple[bytes | None, list[Entry], list[Drop]]:
    """The pack ``blob`` rewritten without any entry or drop record of ``key`` (any incarnation), and the
    entries and drop records taken out. Returns ``(None, ...)`` when nothing is left (the pack is to be
    deleted), ``(blob, [], [])`` unchanged when it holds nothing of the key. Every entry kept is checked
    against its digest before and after, and the new pack is decoded whole again: a damaged pack raises
    :class:`PackError` rather than be rewritten into another."""
    header, payload_at = decode_header(blob)
    removed = [entry for entry in header.entries if entry.key == key]
    dropped = [drop for drop in header.drops if drop.key == key]
    if not removed and not dropped:
        return blob, [], []
    kept = [(entry, entry_bytes(blob, payload_at, entry)) for entry in header.entries if entry.key != key]
    drops = [drop for drop in header.drops if drop.key != key]
    if not kept and not drops:
        return None, removed, dropped
    out = encode(header.node, header.seq, header.created_ns, kept, drops)
    new_header, new_at = decode_header(out)
    if (len(new_header.entries) != len(kept) or any(e.key == key for e in new_header.entries)
            or new_header.drops != drops):
        raise PackError(f"the rewrite of pack {header.seq} of node {header.node!r} did not drop {key!r}")
    for entry, (old, data) in zip(new_header.entries, kept, strict=True):
        if entry.digest != old.digest or entry_bytes(out, new_at, entry) != data:
            raise PackError(f"the rewrite of pack {header.seq} of node {header.node!r} changed another entry")
    return out, removed, dropped
