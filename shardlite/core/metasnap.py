"""Metadata snapshots in the replica: the root's metadata (a ``global.db``-schema image, whichever backend
holds it) and the app's global tables (``app_global.db``), as of one moment, in one object.

An object is ``b"SLMETA1\\n"``, a 4-byte big-endian header length, a JSON header (when it was taken, the
root it came from, and for each part its length and xxh3-128), then the two images. Its time
(``created_ns``, also in its name) is taken *after* its images were read, so it holds nothing later than its
time; version 2 headers also record ``read_ns``, taken before the read, so every commit acknowledged before
it is in the images (version 1, written before: ``read_ns`` is ``created_ns``). Objects come back
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


class Header(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    version: int
    created_ns: int
    root: str
    global_db: Part
    app_global_db: Part
    read_ns: int | None = None  #: version 2: when the images began to be read (version 1: absent)

    @property
    def read_time(self) -> int:
        """When the images began to be read: every commit acknowledged before it is in them."""
        return self.created_ns if self.read_ns is None else self.read_ns


def object_name(created_ns: int) -> str:
    """The object name of a snapshot taken at ``created_ns`` (names sort by time)."""
    return f"{PREFIX}{created_ns:020d}.meta"


def time_of(name: str) -> int | None:
    """The time in an object name :func:`object_name` made, or None for any other name."""
    stem = name[len(PREFIX):-len(".meta")] if name.startswith(PREFIX) and name.endswith(".meta") else ""
    return int(stem) if len(stem) == 20 and stem.isascii() and stem.isdigit() else None


def encode(created_ns: int, root: str, global_db: bytes, app_global_db: bytes, *, read_ns: int | None = None
           ) -> bytes:
    """A snapshot whose images were read from ``read_ns`` to ``created_ns`` (version 2); without ``read_ns``,
    version 1, byte for byte as before it existed."""
    header = msgspec.json.encode(Header(1 if read_ns is None else 2, created_ns, root,
                                        Part(len(global_db), xxhash.xxh3_128_hexdigest(global_db)),
                                        Part(len(app_global_db), xxhash.xxh3_128_hexdigest(app_global_db)),
                                        read_ns))
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
    if header.version not in (1, 2) or header.created_ns < 0:
        raise MetaSnapError(f"metadata snapshot version {header.version} is not supported")
    if (header.read_ns is None) != (header.version == 1) or not 0 <= header.read_time <= header.created_ns:
        raise MetaSnapError("the metadata snapshot's times are invalid")
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
