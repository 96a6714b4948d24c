"""Rollups: a compaction joins a node's older packs into a few larger ones, so that the objects of a retention
window (one pack per upload interval: 1.2 million over 7 days of a busy node) do not all stay.

A **run** is a range of a node's numbered packs (sequence numbers ``first``..``last``; every pack of the range
that still exists is in it). Its captures are rewritten into the run's **parts**::

    v1/packs/<node folder>/compact-<created>-<first>-<last>-<part>.pack

(20-digit times and sequence numbers, 4-digit part numbers; ordinary packs of sequence 0 otherwise, so readers
of packs read them as they are). In a part:

* consecutive frames captures of one tenant file (same key, incarnation, generation and log generation, each
  continuing the last) are one entry: its frames, and every commit with its time, so every point a restore
  could reach before is still there (:func:`coalesce`; at most :data:`MAX_COMMITS` commits and
  :data:`MAX_ENTRY_BYTES` bytes an entry, so no header grows without bound);
* entries are ordered by key digest and cut into parts of about :data:`PART_HEADER` header bytes and at most
  :data:`PART_BYTES` payload bytes (:func:`split`), so one tenant's captures of a run lie in one or two parts
  and a one-tenant restore reads only those headers;
* the drop records of the run are in the first parts, at most :data:`~shardlite.core.pack.MAX_DROPS` a part.

A run's parts become visible together: after the last part, the compaction writes the run's **marker**
``v1/packs/<node folder>/compact-<created>-<first>-<last>.done`` (empty). A marked run *supersedes* the numbered
packs ``first``..``last`` of its folder: every reader ignores them (:func:`sort_out`), and compactions delete
them. The parts of a run without a marker (a compaction killed while writing them) are ignored by readers and
deleted by the next compaction. So a kill -9 at any point leaves each capture visible exactly once: in the
numbered packs until the marker is written, in the parts from then on. A part may later go like any pack (a
compaction's plan, an erase); a marker hides numbered packs only while a part of its run is listed (compactions
delete the packs a run superseded right after its marker, so by the time its parts go none is left); a marker
with no part left is deleted by the next compaction.

Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

import msgspec

from . import keyindex, pack

__all__ = ["RunName", "Listing", "parse", "part_name", "marker_name", "sort_out", "coalesce", "split",
           "MAX_COMMITS", "MAX_ENTRY_BYTES", "PART_HEADER", "PART_BYTES"]

#: The most commits one joined entry lists (about 40 KB of header).
MAX_COMMITS = 1024
#: The most bytes of frames one joined entry holds.
MAX_ENTRY_BYTES = 16 * 1024 * 1024
#: A part's header is cut near this many bytes: a restore of one tenant reads the whole header of each part
#: holding it, and one ranged GET of 64 KiB (``replica_read.FIRST_READ``) reads one this size whole.
PART_HEADER = 48 * 1024
#: A part's payload is cut near this many bytes.
PART_BYTES = 64 * 1024 * 1024

_RUN = r"(v1/packs/[^/]{1,255}/)compact-([0-9]{20})-([0-9]{20})-([0-9]{20})"
_PART = re.compile(_RUN + r"-([0-9]{4})\.pack")
_MARKER = re.compile(_RUN + r"\.done")
_NUMBERED = re.compile(r"(v1/packs/[^/]{1,255}/)([0-9]{20})\.pack")


class RunName(NamedTuple):
    folder: str  #: ``v1/packs/<node folder>/``
    created_ns: int
    first: int
    last: int
    part: int  #: -1 for the marker


def parse(name: str) -> RunName | None:
    """The run (and part) a rollup part's or marker's name says, None for any other name (or an impossible
    range)."""
    found = _PART.fullmatch(name)
    if found is not None:
        folder, created, first, last, part = found.groups()
        run = RunName(folder, int(created), int(first), int(last), int(part))
    else:
        marker = _MARKER.fullmatch(name)
        if marker is None:
            return None
        folder, created, first, last = marker.groups()
        run = RunName(folder, int(created), int(first), int(last), -1)
    return run if run.first <= run.last else None


def part_name(folder: str, created_ns: int, first: int, last: int, part: int) -> str:
    """The name of part ``part`` of the run ``first``..``last`` in ``folder`` (``v1/packs/<node folder>/``)."""
    return f"{folder}compact-{created_ns:020d}-{first:020d}-{last:020d}-{part:04d}.pack"


def marker_name(folder: str, created_ns: int, first: int, last: int) -> str:
    """The name of the marker of the run ``first``..``last`` in ``folder``."""
    return f"{folder}compact-{created_ns:020d}-{first:020d}-{last:020d}.done"


class Listing(NamedTuple):
    packs: list[tuple[str, int]]  #: (name, size) of the packs readers read, in listing order
    hidden: list[str]  #: packs readers ignore: parts of unmarked runs, numbered packs of marked runs
    markers: list[str]
    spent: list[str]  #: markers of runs with no part left


def sort_out(listed: Iterable[tuple[str, int]]) -> Listing:
    """The objects listed under ``v1/packs/`` sorted out for readers (module doc)."""
    items = list(listed)
    marked: set[tuple[str, int, int, int]] = set()
    with_parts: set[tuple[str, int, int, int]] = set()
    for name, _size in items:
        run = parse(name)
        if run is not None:
            (marked if run.part < 0 else with_parts).add(run[:4])
    # a marker hides numbered packs only while a part of its run is listed: one with no part left supersedes
    # nothing (a crafted marker, or a node folder whose sequence numbers started again, never hides packs)
    marked &= with_parts
    ranges: dict[str, list[tuple[int, int]]] = {}
    for folder, _created, first, last in marked:
        ranges.setdefault(folder, []).append((first, last))
    packs, hidden, markers = [], [], []
    for name, size in items:
        run = parse(name)
        if run is not None and run.part < 0:
            markers.append(name)
            continue
        if not name.endswith(".pack"):
            continue
        if run is not None:
            ok = run[:4] in marked
        else:
            numbered = _NUMBERED.fullmatch(name)
            ok = numbered is None or not any(first <= int(numbered.group(2)) <= last
                                             for first, last in ranges.get(numbered.group(1), ()))
        if ok:
            packs.append((name, size))
        else:
            hidden.append(name)
    spent = [name for name in markers if (run := parse(name)) is not None and run[:4] not in with_parts]
    return Listing(packs, hidden, markers, spent)


def _joins(open_entry: pack.Entry, size: int, entry: pack.Entry) -> bool:
    return (entry.kind == "frames" and open_entry.kind == "frames" and entry.salt == open_entry.salt
            and entry.page_size == open_entry.page_size and entry.first == open_entry.last + 1
            and len(open_entry.commits) + len(entry.commits) <= MAX_COMMITS
            and size + entry.length <= MAX_ENTRY_BYTES)


def coalesce(captures: Iterable[tuple[pack.Entry, bytes]]) -> list[tuple[pack.Entry, bytes]]:
    """``captures`` (entries with their bytes, checked, in capture order: by pack sequence, then position) with
    each tenant file's consecutive frames captures joined into one entry (module doc). A joined entry keeps the
    first capture's ``first`` and the last one's ``last`` and ``captured_ns``, and every commit. Snapshots and
    frames that do not continue are kept as they are, in order."""
    out: list[tuple[pack.Entry, list[bytes]] | None] = []
    open_at: dict[tuple[str, str, int], int] = {}  # tenant file -> index in out of its open frames entry
    sizes: dict[int, int] = {}
    for entry, data in captures:
        ident = (entry.key, entry.incarnation, entry.generation)
        at = open_at.get(ident)
        if at is not None:
            held = out[at]
            assert held is not None
            if _joins(held[0], sizes[at], entry):
                joined = msgspec.structs.replace(held[0], last=entry.last, commits=[*held[0].commits, *entry.commits],
                                                 captured_ns=entry.captured_ns)
                held[1].append(data)
                out[at] = (joined, held[1])
                sizes[at] += len(data)
                continue
            del open_at[ident]
        out.append((entry, [data]))
        if entry.kind == "frames":
            open_at[ident] = len(out) - 1
            sizes[len(out) - 1] = len(data)
    result = []
    for item in out:
        assert item is not None
        entry, chunks = item
        data = b"".join(chunks)
        result.append((msgspec.structs.replace(entry, offset=0, length=len(data)), data))
    return result


def _header_cost(entry: pack.Entry) -> int:
    """About the bytes ``entry`` takes in a JSON header."""
    return 300 + len(entry.key) + 40 * len(entry.commits)


def split(items: list[tuple[pack.Entry, bytes]]) -> list[list[tuple[pack.Entry, bytes]]]:
    """``items`` ordered by key digest (each key's entries in their order) and cut into parts (module doc);
    at least one part (empty when ``items`` is: a run of drop records only)."""
    order = sorted(range(len(items)), key=lambda i: (keyindex.digest(items[i][0].key), i))
    parts: list[list[tuple[pack.Entry, bytes]]] = [[]]
    header = payload = 0
    for i in order:
        entry, data = items[i]
        if parts[-1] and (header + _header_cost(entry) > PART_HEADER or payload + len(data) > PART_BYTES):
            parts.append([])
            header = payload = 0
        parts[-1].append((entry, data))
        header += _header_cost(entry)
        payload += len(data)
    return parts
