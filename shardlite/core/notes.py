"""Change notes: how writer processes tell a node's replicator which tenants committed, and when.

Every commit to a tenant of a replicated root appends one note to the writing process's notes file in the
tenant's node: the tenant's key, the number of frames in its WAL right after the commit (what SQLite's WAL
hook reports), and the commit's wall-clock time in nanoseconds. The replicator reads the notes to learn
which tenants changed (an idle tenant costs it nothing) and when each commit was acknowledged, which is
what a point-in-time restore needs (a capture happens later than the commits it holds).

A note is ``>HIQ`` (key length, frames, time_ns) followed by the key in UTF-8. A file is a run of notes
after an 8-byte magic; a writer killed in the middle of a note leaves a torn tail, which readers stop
before (and read again once it is complete: they only ever consume whole notes).

Pure: no I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

__all__ = ["MAGIC", "Note", "encode", "encoder", "decode", "MAX_KEY_BYTES"]

MAGIC = b"SLNOTES1"
_HEAD = struct.Struct(">HIQ")
#: Longer keys than a note can carry do not exist: shardlite's keys are far shorter (core.keys).
MAX_KEY_BYTES = 0xFFFF


class Note(NamedTuple):
    """One commit: the tenant, its WAL's frame count after the commit, the commit time (ns since the epoch)."""

    key: str
    frames: int
    time_ns: int


def encode(key: str, frames: int, time_ns: int) -> bytes:
    """One note's bytes (``ValueError`` for a key or number that does not fit)."""
    raw = key.encode("utf-8")
    if len(raw) > MAX_KEY_BYTES:
        raise ValueError("a key of more than 65,535 bytes cannot be noted")
    try:
        return _HEAD.pack(len(raw), frames, time_ns) + raw
    except struct.error as exc:
        raise ValueError(f"a note's frame count or time out of range: {exc}") from None


def encoder(key: str) -> Callable[[int, int], bytes]:
    """``(frames, time_ns) -> bytes``, the same as ``encode(key, frames, time_ns)``, for a writer that notes
    one key many times (the key is encoded once). ``ValueError`` for a key that does not fit; the function
    raises ``struct.error`` for a number out of range."""
    raw = key.encode("utf-8")
    if len(raw) > MAX_KEY_BYTES:
        raise ValueError("a key of more than 65,535 bytes cannot be noted")
    size, pack = len(raw), _HEAD.pack

    def encode_one(frames: int, time_ns: int) -> bytes:
        return pack(size, frames, time_ns) + raw
    return encode_one


def decode(data: bytes | memoryview) -> tuple[list[Note], int]:
    """The whole notes at the start of ``data`` (a file's bytes after :data:`MAGIC`, or a later part of
    them starting at a note boundary), and how many bytes they took: a torn last note is left for later.
    A note whose key is not UTF-8 is a damaged file: ``ValueError``."""
    view = memoryview(data)
    notes: list[Note] = []
    at, end, head = 0, len(view), _HEAD.size
    while at + head <= end:
        size, frames, time_ns = _HEAD.unpack_from(view, at)
        if at + head + size > end:
            break
        key = bytes(view[at + head:at + head + size]).decode("utf-8")
        notes.append(Note(key, frames, time_ns))
        at += head + size
    return notes, at
