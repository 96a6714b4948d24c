"""A compaction's rollups (:mod:`shardlite.core.rollup` for the format): which of a node's packs are joined,
reading them, and writing and checking the parts and the run's marker.

A run is chosen per node folder among the packs readers see, in sequence order: numbered packs whose replicator
recorded them as shipped (final: never uploaded again), whose newest capture and drop record are older than
:data:`ROLLUP_AFTER_NS`, each at most :data:`RUN_BYTES`, all within one :data:`SPAN_NS` of the clock, with at most
half of :data:`~shardlite.core.pack.MAX_DROPS` drop records together (by their keys). A pack that does not qualify
ends the run, and so does a pack the compaction's plan deletes (a run's marker hides every numbered pack of its
range at once, so a range holds only packs whose captures its parts carry). A run holds at most :data:`RUN_BYTES` of
packs and at least :data:`MIN_RUN` of them, and one compaction reads at most :data:`BUDGET_BYTES` for its rollups: a
backlog (a replica older than rollups) is joined over several.

The packs of a run are read whole, each entry checked against its digest; the parts are written, each read back
and compared byte for byte, and only then the marker, which makes them what readers read instead of the
numbered packs (the caller then deletes those).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..core import keyindex, pack, rollup
from ..errors import ReplicaError, ReplicaUnavailable
from ..replica.target import ReplicaTarget
from . import replica_index
from .compact_scan import Summary

__all__ = ["Run", "Rolled", "choose", "roll", "roll_all", "ROLLUP_AFTER_NS", "SPAN_NS", "RUN_BYTES", "BUDGET_BYTES",
           "MIN_RUN"]

#: Packs are joined once everything in them is this old (ns): an hour.
ROLLUP_AFTER_NS = 3600 * 10**9
#: A run's packs lie within one span of this many ns (by their newest times: an hour of the clock), so that a part
#: is never much wider than that: a compaction's plan reads a part once everything in it is older than the latest
#: retention start, so what the part holds is kept up to that much past its window.
SPAN_NS = 3600 * 10**9
#: Bytes of packs read for one run (held in memory with its parts).
RUN_BYTES = 128 * 1024 * 1024
#: Bytes of packs one compaction reads for its rollups.
BUDGET_BYTES = 4 * 1024 * 1024 * 1024
#: The fewest packs worth joining.
MIN_RUN = 2


@dataclass
class Run:
    folder: str  #: ``v1/packs/<node folder>/``
    first: int
    last: int
    packs: list[tuple[str, int]]  #: (name, size) of the packs joined, by sequence number


@dataclass
class Rolled:
    run: Run
    parts: list[tuple[str, int, list[str]]]  #: (name, size, keys) of each part written
    marker: str


def choose(packs: list[tuple[str, int]], summaries: dict[str, Summary], *, final: Callable[[str], bool],
           now_ns: int, deleting: set[str]) -> list[Run]:
    """The runs to join among ``packs`` (what readers see, in listing order), module doc."""
    runs: list[Run] = []
    budget = BUDGET_BYTES
    current: Run | None = None
    size = span = dropped = 0

    def close() -> None:
        nonlocal current, size, budget, dropped
        if current is not None and len(current.packs) >= MIN_RUN:
            runs.append(current)
            budget -= size
        current, size, dropped = None, 0, 0

    for name, pack_size in packs:
        seq = keyindex.pack_seq(name)
        if seq is None:
            continue  # not a numbered pack: outside every run's range
        folder = name.rsplit("/", 1)[0] + "/"
        if current is not None and current.folder != folder:
            close()
        summary = summaries.get(name)
        if (name in deleting or summary is None or not final(name) or summary.newest_ns > now_ns - ROLLUP_AFTER_NS
                or pack_size > RUN_BYTES):
            close()
            continue
        drops = len(summary.dropped) // 8
        if current is not None and (size + pack_size > min(RUN_BYTES, budget) or summary.newest_ns // SPAN_NS != span
                                    or dropped + drops > pack.MAX_DROPS // 2):
            close()
        if pack_size > budget:
            break
        if current is None:
            current, span = Run(folder, seq[1], seq[1], []), summary.newest_ns // SPAN_NS
        current.packs.append((name, pack_size))
        current.last = seq[1]
        size += pack_size
        dropped += drops
    close()
    return runs


def _read(target: ReplicaTarget, name: str) -> tuple[pack.Header, list[tuple[pack.Entry, bytes]]]:
    blob = target.get(name)
    header, payload_at = pack.decode_header(blob)
    return header, [(entry, pack.entry_bytes(blob, payload_at, entry)) for entry in header.entries]


def roll(target: ReplicaTarget, run: Run, created_ns: int, left_out: Callable[[str], bool]) -> Rolled:
    """Join ``run``: read its packs, write its parts and check them, then its marker. Captures and drop records
    of an incarnation ``left_out`` names (an erase tombstone, a dropped tenant past its window: readers ignore
    them) are not carried. Raises :class:`~shardlite.core.pack.PackError` for a pack that is not valid (nothing
    of the run written then)."""
    pool = replica_index.readers()
    read = [pool.submit(_read, target, name) for name, _size in run.packs]
    captures: list[tuple[pack.Entry, bytes]] = []
    drops: list[pack.Drop] = []
    node = ""
    for future in read:
        header, items = future.result()
        node = header.node
        captures.extend(item for item in items if not left_out(item[0].incarnation))
        drops.extend(drop for drop in header.drops if not left_out(drop.incarnation))
    joined = rollup.coalesce(captures)
    parts = rollup.split(joined) if joined or drops else []
    # drop records: at most MAX_DROPS a part (more parts, without captures, if a run holds more)
    drop_parts = [drops[at:at + pack.MAX_DROPS] for at in range(0, len(drops), pack.MAX_DROPS)]
    parts += [[] for _ in range(len(drop_parts) - len(parts))]
    written: list[tuple[str, int, list[str]]] = []
    for number, items in enumerate(parts):
        name = rollup.part_name(run.folder, created_ns, run.first, run.last, number)
        blob = pack.encode(node, 0, created_ns, items, drop_parts[number] if number < len(drop_parts) else None)
        target.put(name, blob)
        if target.get(name) != blob:
            raise ReplicaError(f"the rollup part {name} read back differs from what was written")
        written.append((name, len(blob), [entry.key for entry, _data in items]))
    marker = rollup.marker_name(run.folder, created_ns, run.first, run.last)
    target.put(marker, b"")
    return Rolled(run, written, marker)


def roll_all(target: ReplicaTarget, runs: list[Run], created_ns: int, left_out: Callable[[str], bool]
             ) -> tuple[list[Rolled], dict[str, str]]:
    """:func:`roll` each of ``runs``; the runs joined, and (first pack's name -> why) those left as they are: a run
    holding a pack that is not valid (a damaged payload) or gone, or whose part read back differs, is not joined,
    and the other runs are (a rollup saves objects; a damaged pack is reported, never a reason to stop retention
    for the whole root). A replica that cannot be reached raises."""
    done: list[Rolled] = []
    skipped: dict[str, str] = {}
    for run in runs:
        try:
            done.append(roll(target, run, created_ns, left_out))
        except ReplicaUnavailable:
            raise
        except (pack.PackError, ReplicaError) as exc:  # parts written and not marked are ignored, then deleted
            skipped[run.packs[0][0]] = str(exc)
    return done, skipped
