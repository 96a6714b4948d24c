"""Metadata snapshots in the replica: the root's metadata (a ``global.db``-schema image, whichever backend
holds it) and the app's global tables (``app_global.db``), as of one moment, in one object.

An object is ``b"SLMETA1\\n"``, a 4-byte big-endian header length, a JSON header (when it was taken, the
root it came from, and for each part its length and xxh3-128), then the two images. Objects come back
from storage as untrusted input: :func:`decode` validates the header and both digests, and raises
:class:`MetaSnapError` on anything else.

Pure: no I/O.
"""

from __future__ import annotations

import struct

import msgspec
import xxhash

__all__ = ["MAGIC", "Part", "Header", "MetaSnapError", "encode", "decode", "object_name", "time_of", "PREFIX"]

MAGIC = b"SLMETA1\n"
PREFIX = "v1/meta/"
_LEN = struct.Struct(">I")
_MAX_HEADER = 1 << 16


class MetaSnapError(ValueError):
    """Bytes that are not a valid metadata snapshot."""


class Part(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    length: int
    digest: str


class Header(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: int
    created_ns: int
    root: str
    global_db: Part
    app_global_db: Part


def object_name(created_ns: int) -> str:
    """The object name of a snapshot taken at ``created_ns`` (names sort by time)."""
    return f"{PREFIX}{created_ns:020d}.meta"


def time_of(name: str) -> int | None:
    """The time in an object name :func:`object_name` made, or None for any other name."""
    stem = name[len(PREFIX):-len(".meta")] if name.startswith(PREFIX) and name.endswith(".meta") else ""
    return int(stem) if len(stem) == 20 and stem.isdigit() else None


def encode(created_ns: int, root: str, global_db: bytes, app_global_db: bytes) -> bytes:
    header = msgspec.json.encode(Header(1, created_ns, root,
                                        Part(len(global_db), xxhash.xxh3_128_hexdigest(global_db)),
                                        Part(len(app_global_db), xxhash.xxh3_128_hexdigest(app_global_db))))
    return b"".join([MAGIC, _LEN.pack(len(header)), header, global_db, app_global_db])


def decode(data: bytes) -> tuple[Header, bytes, bytes]:
    """The header and the two images (``global.db``, ``app_global.db``) of a snapshot, validated whole."""
    if len(data) < len(MAGIC) + _LEN.size or data[:len(MAGIC)] != MAGIC:
        raise MetaSnapError("not a shardlite metadata snapshot (bad magic)")
    (length,) = _LEN.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    if length > _MAX_HEADER or len(data) < start + length:
        raise MetaSnapError("the metadata snapshot's header is damaged")
    try:
        header = msgspec.json.decode(data[start:start + length], type=Header)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise MetaSnapError(f"the metadata snapshot's header is invalid: {exc}") from None
    if header.version != 1 or header.created_ns < 0:
        raise MetaSnapError(f"metadata snapshot version {header.version} is not supported")
    at = start + length
    parts = []
    for part in (header.global_db, header.app_global_db):
        if part.length < 0 or at + part.length > len(data):
            raise MetaSnapError("the metadata snapshot is shorter than its header says")
        body = data[at:at + part.length]
        if xxhash.xxh3_128_hexdigest(body) != part.digest:
            raise MetaSnapError("the metadata snapshot's images do not match their digests (damaged)")
        parts.append(body)
        at += part.length
    if at != len(data):
        raise MetaSnapError("the metadata snapshot has bytes after its images")
    return header, parts[0], parts[1]
