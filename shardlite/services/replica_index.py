"""The replica's pack index and retention horizon: small objects a compaction writes so that restoring one
tenant does not read every pack's header, and so that a restore before the retention window is refused.

**Index** ``v1/index/<time>.index``: for every pack the compaction kept (and the packs it wrote), its name,
its size and the digests of the keys it holds (the first 64 bits of xxh3-128 of the key: no key is written in
clear, and a collision only costs one header read). A one-tenant restore lists the packs as before, and skips
a listed pack whose name and size the index holds without the key; a pack the index does not know (uploaded
since, or rewritten by an erase: another size) has its header read as before. A missing, damaged or foreign
index is ignored (every header is read): the index can make a restore faster, never different.

**Horizon** ``v1/retention/horizon.json``: when the last compaction ran and the windows it applied. A tenant's
history before ``compacted_ns - window(key)`` may be gone, so restores before it are refused
(:func:`check_time`). Written before the compaction deletes anything.

Both come back from storage as untrusted input: validated whole (sizes, counts, names, digests, windows).
"""

from __future__ import annotations

import msgspec
import xxhash

from ..core import retention, timeline
from ..errors import ConfigurationError, ReplicaError, ReplicaObjectMissing
from ..replica.target import ReplicaTarget, check_name

__all__ = ["INDEX_PREFIX", "HORIZON_NAME", "IndexPack", "Index", "Horizon", "key_digest", "encode_index",
           "decode_index", "read_index", "index_name", "read_horizon", "write_horizon", "check_time",
           "retention_start", "Skip", "without_expired"]

INDEX_PREFIX = "v1/index/"
HORIZON_NAME = "v1/retention/horizon.json"
_MAGIC = b"SLINDEX1\n"
#: The largest index read (about 4 million pack-key pairs).
MAX_INDEX = 128 * 1024 * 1024
_MAX_HORIZON = 1 << 20


class IndexPack(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    name: str
    size: int
    keys: list[str]  #: :func:`key_digest` of each key with an entry in the pack


class Index(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: int
    created_ns: int
    packs: list[IndexPack]


class Horizon(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: int
    compacted_ns: int
    windows: retention.Windows
    #: :func:`key_digest` of the incarnations of dropped tenants past their window whose captures a pack kept
    #: for other tenants still holds: restores ignore them (what is left of such a history is not all of it)
    expired: list[str] = msgspec.field(default_factory=list)


def key_digest(key: str) -> str:
    return xxhash.xxh3_128_hexdigest(key.encode("utf-8"))[:16]


def index_name(created_ns: int) -> str:
    return f"{INDEX_PREFIX}{created_ns:020d}.index"


def encode_index(index: Index) -> bytes:
    body = msgspec.json.encode(index)
    return _MAGIC + xxhash.xxh3_128_hexdigest(body).encode("ascii") + b"\n" + body


def decode_index(data: bytes) -> Index:
    """The index in ``data``, validated whole (:class:`ValueError` otherwise)."""
    head = len(_MAGIC) + 33
    if len(data) < head or data[:len(_MAGIC)] != _MAGIC or data[head - 1:head] != b"\n":
        raise ValueError("not a shardlite pack index")
    body = data[head:]
    if xxhash.xxh3_128_hexdigest(body).encode("ascii") != data[len(_MAGIC):head - 1]:
        raise ValueError("the pack index does not match its digest (damaged)")
    try:
        index = msgspec.json.decode(body, type=Index)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ValueError(f"the pack index is invalid: {exc}") from None
    if index.version != 1 or index.created_ns < 0:
        raise ValueError("unsupported pack index version")
    for item in index.packs:
        check_name(item.name)
        if not item.name.startswith("v1/packs/") or not item.name.endswith(".pack") or item.size < 0:
            raise ValueError("the pack index names an object that is not a pack")
        if any(len(k) != 16 or k.strip("0123456789abcdef") for k in item.keys):
            raise ValueError("the pack index holds an invalid key digest")
    return index


def read_index(target: ReplicaTarget) -> Index | None:
    """The newest index in the replica, or None when there is none or it cannot be used (damaged, too big,
    unreachable for a moment): the caller reads every header instead."""
    try:
        found = [(name, size) for name, size in target.list(INDEX_PREFIX) if name.endswith(".index")]
        if not found:
            return None
        name, size = found[-1]
        if size > MAX_INDEX:
            return None
        return decode_index(target.get(name))
    except (ValueError, ReplicaError):
        return None


class Skip:
    """Which packs a restore of ``keys`` need not open: those the index holds, at the listed size, without
    any of the keys."""

    def __init__(self, index: Index, keys: set[str]) -> None:
        wanted = {key_digest(key) for key in keys}
        self._known = {item.name: (item.size, not wanted.isdisjoint(item.keys)) for item in index.packs}

    def __call__(self, name: str, size: int) -> bool:
        known = self._known.get(name)
        return known is not None and known[0] == size and not known[1]


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
