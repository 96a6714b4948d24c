"""Metadata deltas in the replica: the pages of the root's embedded metadata (``global.db``) and of the app's
global tables (``app_global.db``) that changed since one metadata snapshot (:mod:`shardlite.core.metasnap`),
its *base*, as of one moment.

A delta is cumulative: applied to its base alone it gives both images as of its time, so a restore reads two
objects (the base and one delta), never a chain. It names its base by object name and by each part's
xxh3-128 digest; applying it checks that the base is the one it was made against and that the result has
the digest it records, so a delta never turns a wrong base into a plausible image.

An object is ``b"SLMDLT1\\n"``, a 4-byte big-endian header length, a JSON header (:class:`Header`), then the
changed pages of ``global.db`` and then those of ``app_global.db``, each part's pages in the order its
``pages`` list names them. Its name carries its time and its base's (:func:`object_name`), so a listing says
which base each delta needs without reading it. Objects come back from storage as untrusted input:
:func:`decode` validates every field, every count and every length, and raises :class:`MetaDeltaError` on
anything else.

Pages are compared by digest (:func:`page_digests`, xxh3-128 per page): a snapshot's page layout is the
file's own (SQLite's serialization of the database copies its pages as they are), so a commit that changes
a few rows changes a few pages.

Pure: no I/O.
"""

from __future__ import annotations

import re
import struct

import msgspec
import xxhash

__all__ = ["MAGIC", "PREFIX", "PartDelta", "Header", "MetaDeltaError", "page_size_of", "page_digests", "diff",
           "part_of", "encode", "decode", "apply", "object_name", "times_of"]

MAGIC = b"SLMDLT1\n"
PREFIX = "v1/metadelta/"
_LEN = struct.Struct(">I")
_MAX_HEADER = 64 * 1024 * 1024
#: A part's page size when its image is empty (no page to compare: any valid size does).
_EMPTY_PAGE = 4096
_NAME = re.compile(r"v1/metadelta/([0-9]{20})-([0-9]{20})\.delta", re.ASCII)
#: Header bytes allowed besides the page lists (the root's path and the fixed fields)
_HEADER_FIXED = 64 * 1024
#: Header bytes allowed per page of payload (a page number and its comma, in both parts' lists)
_HEADER_PER_PAGE = 24


class MetaDeltaError(ValueError):
    """Bytes that are not a valid metadata delta, or a delta that does not apply to the base given."""


class PartDelta(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One image's changes: the base image's digest, the result's length and digest, the page size, and the
    numbers (0-based) of the pages the payload holds, ascending."""

    base_digest: str
    length: int
    digest: str
    page_size: int
    pages: list[int]


class Header(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``created_ns`` (also in the name) is taken after the images were read: the delta holds nothing later;
    ``read_ns`` before: every commit acknowledged before it is in it."""

    version: int
    created_ns: int
    read_ns: int
    root: str
    base: str
    global_db: PartDelta
    app_global_db: PartDelta


def object_name(created_ns: int, base_ns: int) -> str:
    """The object name of a delta taken at ``created_ns`` against the snapshot taken at ``base_ns`` (names
    sort by time)."""
    return f"{PREFIX}{created_ns:020d}-{base_ns:020d}.delta"


def times_of(name: str) -> tuple[int, int] | None:
    """(its time, its base's time) from a name :func:`object_name` made; None for any other name."""
    match = _NAME.fullmatch(name)
    return None if match is None else (int(match.group(1)), int(match.group(2)))


def page_size_of(image: bytes) -> int:
    """The page size an SQLite image's header records (:data:`_EMPTY_PAGE` for an empty image)."""
    if not image:
        return _EMPTY_PAGE
    if len(image) < 100:
        raise MetaDeltaError("an image shorter than an SQLite header")
    raw = int.from_bytes(image[16:18], "big")
    size = 65536 if raw == 1 else raw
    if not _valid_page_size(size) or len(image) % size:
        raise MetaDeltaError(f"an image whose page size ({size}) does not divide its length ({len(image)})")
    return size


def _valid_page_size(size: int) -> bool:
    return 512 <= size <= 65536 and size & (size - 1) == 0


def page_digests(image: bytes, page_size: int) -> list[int]:
    """The xxh3-128 digest of each page of ``image``."""
    view = memoryview(image)
    return [xxhash.xxh3_128_intdigest(view[at:at + page_size]) for at in range(0, len(image), page_size)]


def diff(base_digests: list[int], base_page_size: int, image: bytes) -> tuple[int, list[int]] | None:
    """``image``'s page size and the numbers of its pages that differ from the base's (whose page digests and
    page size are given), or None when the page sizes differ (no page-wise delta: take a new snapshot)."""
    size = page_size_of(image) if image else base_page_size
    if image and base_digests and size != base_page_size:
        return None
    now = page_digests(image, size)
    return size, [n for n, digest in enumerate(now) if n >= len(base_digests) or base_digests[n] != digest]


def part_of(base_digest: str, image: bytes, page_size: int, pages: list[int]) -> tuple[PartDelta, bytes]:
    """One part of a delta: the base image's digest (the base itself need not be at hand), the current image,
    its page size and the numbers of its pages that changed (from :func:`diff`)."""
    body = b"".join(image[n * page_size:(n + 1) * page_size] for n in pages)
    return PartDelta(base_digest, len(image), xxhash.xxh3_128_hexdigest(image), page_size, list(pages)), body


def encode(created_ns: int, read_ns: int, root: str, base: str, parts: list[tuple[PartDelta, bytes]]) -> bytes:
    """A delta whose images were read from ``read_ns`` to ``created_ns``, against the snapshot named ``base``,
    from its two parts made by :func:`part_of` (``global.db``'s, then ``app_global.db``'s)."""
    if len(parts) != 2:
        raise ValueError("a delta has two parts: global.db and app_global.db")
    header = msgspec.json.encode(Header(1, created_ns, read_ns, root, base, parts[0][0], parts[1][0]))
    return b"".join([MAGIC, _LEN.pack(len(header)), header, parts[0][1], parts[1][1]])


def _check_part(part: PartDelta) -> int:
    """The payload bytes ``part`` names, after checking its fields."""
    if not _valid_page_size(part.page_size) or part.length < 0 or part.length % part.page_size:
        raise MetaDeltaError("a metadata delta part with an invalid page size or length")
    count = part.length // part.page_size
    last = -1
    for n in part.pages:
        if n <= last or n >= count:
            raise MetaDeltaError("a metadata delta part whose page numbers are not ascending within its length")
        last = n
    for digest in (part.base_digest, part.digest):
        if len(digest) != 32 or any(c not in "0123456789abcdef" for c in digest):
            raise MetaDeltaError("a metadata delta part with an invalid digest")
    return len(part.pages) * part.page_size


def decode(data: bytes) -> tuple[Header, bytes, bytes]:
    """The header and the two parts' page bytes of a delta, validated whole (not yet applied)."""
    if len(data) < len(MAGIC) + _LEN.size or data[:len(MAGIC)] != MAGIC:
        raise MetaDeltaError("not a shardlite metadata delta (bad magic)")
    (length,) = _LEN.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    if length > _MAX_HEADER or len(data) < start + length:
        raise MetaDeltaError("the metadata delta's header is damaged")
    if length > _HEADER_FIXED + _HEADER_PER_PAGE * ((len(data) - start - length) // 512):
        raise MetaDeltaError("the metadata delta's header is longer than its pages can need (damaged)")
    try:
        header = msgspec.json.decode(data[start:start + length], type=Header)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise MetaDeltaError(f"the metadata delta's header is invalid: {exc}") from None
    if header.version != 1:
        raise MetaDeltaError(f"metadata delta version {header.version} is not supported")
    if not 0 <= header.read_ns <= header.created_ns:
        raise MetaDeltaError("the metadata delta's times are invalid")
    at = start + length
    bodies = []
    for part in (header.global_db, header.app_global_db):
        size = _check_part(part)
        if at + size > len(data):
            raise MetaDeltaError("the metadata delta is shorter than its header says")
        bodies.append(data[at:at + size])
        at += size
    if at != len(data):
        raise MetaDeltaError("the metadata delta has bytes after its pages")
    return header, bodies[0], bodies[1]


def apply(base: bytes, part: PartDelta, body: bytes) -> bytes:
    """The image ``part`` (with its pages ``body``, from :func:`decode`) makes of the base image ``base``:
    refused unless ``base`` has the digest the delta was made against and the result has the digest it
    records."""
    if xxhash.xxh3_128_hexdigest(base) != part.base_digest:
        raise MetaDeltaError("the metadata delta was made against another snapshot than the one it names")
    size = part.page_size
    if len(base) % size:
        raise MetaDeltaError("the metadata delta's page size does not divide its snapshot's image")
    past = range(len(base) // size, part.length // size)
    if len(past) and (len(part.pages) < len(past) or part.pages[-len(past):] != list(past)):
        # every page past the base's end is a changed page: without them the result would be zero-filled
        # (and a hostile header could name any length)
        raise MetaDeltaError("the metadata delta lacks pages past its snapshot's end (damaged)")
    out = bytearray(base[:part.length])
    out.extend(bytes(part.length - len(out)))
    for i, n in enumerate(part.pages):
        out[n * size:(n + 1) * size] = body[i * size:(i + 1) * size]
    result = bytes(out)
    if xxhash.xxh3_128_hexdigest(result) != part.digest:
        raise MetaDeltaError("the metadata delta does not give the image it records (damaged)")
    return result
