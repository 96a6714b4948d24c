"""Reading and pruning the root's metadata in the replica: its snapshots (:mod:`shardlite.core.metasnap`) and
the deltas between them (:mod:`shardlite.core.metadelta`), uploaded by :mod:`shardlite.services.replica_meta`.

:func:`meta_at` gives the metadata at the newest restore point at or before a time: a snapshot, or a delta
applied to its snapshot. Points are named by the time *after* their images were read, so a point at or
before the time holds nothing later. A delta that cannot be used (its snapshot deleted, rewritten by an
erase or damaged, the delta itself damaged or deleted meanwhile, or inconsistent with its name) is logged and
the point before it is tried; a damaged snapshot is an error that says to pick an earlier time. Objects come
from storage as untrusted input: everything is validated before use.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

from ..core import metadelta, metasnap
from ..errors import ConfigurationError, ReplicaObjectMissing
from ..replica.target import ReplicaTarget

__all__ = ["MetaImage", "meta_at", "prune", "delta_names", "delete_deltas"]

log = logging.getLogger("shardlite.replicate")


class MetaImage(NamedTuple):
    """The metadata as of one restore point: its time (nothing later is in it), when its images began to be
    read (every commit acknowledged before that is in it), the root it came from, both images, and the
    objects it was read from."""

    created_ns: int
    read_ns: int
    root: str
    global_db: bytes
    app_global_db: bytes
    objects: tuple[str, ...]


def _listing(target: ReplicaTarget) -> tuple[list[tuple[int, str, int]], dict[int, str]]:
    """The deltas (time, name, its snapshot's time) and the snapshots (time -> name) in the replica. Deltas are
    listed first: a delta is uploaded after its snapshot, so every snapshot a listed delta needs is in the
    second listing unless it was deleted."""
    deltas = [(d[0], name, d[1]) for name, _ in target.list(metadelta.PREFIX) if (d := metadelta.times_of(name))]
    snapshots = {t: name for name, _ in target.list(metasnap.PREFIX) if (t := metasnap.time_of(name)) is not None}
    return deltas, snapshots


def delta_names(target: ReplicaTarget) -> list[str]:
    """Every delta in the replica."""
    return [name for name, _ in target.list(metadelta.PREFIX) if metadelta.times_of(name) is not None]


def delete_deltas(target: ReplicaTarget, names: list[str]) -> int:
    """Delete the deltas ``names``; how many."""
    if names:
        target.delete_many(names)
    return len(names)


def prune(target: ReplicaTarget, start_ns: int) -> int:
    """Retention: delete the snapshots before ``start_ns`` but the newest of them, then every delta whose
    snapshot is gone (and, with them, deltas left by a crash). Returns how many objects went."""
    deltas, snapshots = _listing(target)
    times = sorted(snapshots)
    old = [t for t in times if t <= start_ns][:-1]
    if old:
        target.delete_many([snapshots[t] for t in old])
    kept = set(times) - set(old)
    orphans = [name for _t, name, base in deltas if base not in kept]
    if orphans:
        target.delete_many(orphans)
    return len(old) + len(orphans)


class _Snapshots:
    """The snapshots a restore reads, each fetched and validated once (a damaged one too: its error is kept)."""

    def __init__(self, target: ReplicaTarget) -> None:
        self.target = target
        self.got: dict[str, tuple[metasnap.Header, bytes, bytes] | ConfigurationError] = {}

    def get(self, name: str) -> tuple[metasnap.Header, bytes, bytes]:
        if name not in self.got:
            try:
                found = metasnap.decode(self.target.get(name))
                if found[0].created_ns != metasnap.time_of(name):
                    raise metasnap.MetaSnapError("its header's time is not its name's")
                self.got[name] = found
            except metasnap.MetaSnapError as exc:
                self.got[name] = ConfigurationError(f"the replica's metadata snapshot {name} is damaged ({exc}); "
                                                    "pick an earlier time with --at")
        got = self.got[name]
        if isinstance(got, ConfigurationError):
            raise got
        return got


def _from_delta(target: ReplicaTarget, name: str, base: str, snapshots: _Snapshots) -> MetaImage:
    header, global_pages, app_pages = metadelta.decode(target.get(name))
    if header.base != base or metadelta.times_of(name) != (header.created_ns, metasnap.time_of(base)):
        raise metadelta.MetaDeltaError("its header does not match its name")
    base_header, global_db, app_global_db = snapshots.get(base)
    if base_header.root != header.root:
        raise metadelta.MetaDeltaError("it names another root than its snapshot")
    return MetaImage(header.created_ns, header.read_ns, header.root,
                     metadelta.apply(global_db, header.global_db, global_pages),
                     metadelta.apply(app_global_db, header.app_global_db, app_pages), (base, name))


def meta_at(target: ReplicaTarget, at_ns: int | None, describe: Callable[[int], str] = str) -> MetaImage:
    """The metadata at the newest restore point at or before ``at_ns`` (None: the newest), validated (module
    docstring). ``describe`` formats a time for messages."""
    deltas, snapshots = _listing(target)
    points: list[tuple[int, int, str, int | None]] = [(t, 1, name, None) for t, name in snapshots.items()]
    points += [(t, 0, name, base) for t, name, base in deltas]
    points = sorted((p for p in points if at_ns is None or p[0] <= at_ns), reverse=True)
    read = _Snapshots(target)
    for t, is_snapshot, name, base_ns in points:
        if is_snapshot:
            try:
                header, global_db, app_global_db = read.get(name)
            except ReplicaObjectMissing:
                continue  # pruned since the listing: an older point
            return MetaImage(header.created_ns, header.read_time, header.root, global_db, app_global_db, (name,))
        base = snapshots.get(base_ns) if base_ns is not None and base_ns <= t else None
        if base is None:
            log.warning("restore: metadata delta %s skipped: its snapshot is not in the replica", name)
            continue
        try:
            return _from_delta(target, name, base, read)
        except (metadelta.MetaDeltaError, ConfigurationError, ReplicaObjectMissing) as exc:
            log.warning("restore: metadata delta %s of %s skipped (%s); an earlier restore point is used", name,
                        describe(t), exc)
    until = "" if at_ns is None else f" at or before {describe(at_ns)}"
    raise ConfigurationError(f"the replica {target.url} holds no metadata snapshot{until} (a replicator uploads "
                             "the first one in its first round); restore tenants one by one with --key")
