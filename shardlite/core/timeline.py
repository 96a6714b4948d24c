"""A tenant's replicated history, and its database image at any commit in it.

The replica holds, per tenant file (key, incarnation, generation), a run of captures in the order they
were taken: a snapshot (the whole database at one commit), then WAL frames continuing it, possibly a later
snapshot (after a gap), and so on (:mod:`shardlite.core.pack`). A file's history ends when the tenant
moves (the new file's history starts with a snapshot), is restored or dropped.

:func:`image_at` picks the history the tenant had at a time and replays it up to the last commit
acknowledged at or before that time (every commit carries its time). Continuity is checked as the log's
own rules allow: within one log generation, frames continue where the previous capture stopped; a new
generation starts at frame 1; anything else is a damaged history (:class:`TimelineError`), never a
silently wrong image.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from . import walformat as wf
from .pack import Entry

__all__ = ["Capture", "TimelineError", "Point", "Replay", "image_at", "histories", "points", "chosen_history",
           "plan_replay", "point_at", "replay"]


class TimelineError(ValueError):
    """The captures do not form a history that can be replayed (a hole, or frames that do not fit)."""


class Capture(NamedTuple):
    """One capture of a tenant file as read back from the replica: its entry, its order, its bytes."""

    order: tuple[int, int, int]  #: (capture time, pack sequence, position in the pack): the capture order
    entry: Entry
    data: bytes
    node: str = ""  #: the node whose replicator took it
    #: (pack name, offset) of the bytes when they were not read yet (``data`` is then empty): a reader
    #: fetches only what :func:`plan_replay` needs (:func:`shardlite.services.replica_read.fill`)
    where: tuple[str, int] | None = None


class Point(NamedTuple):
    """A restorable commit: its time, and where it lies."""

    time_ns: int
    incarnation: str
    generation: int
    frame: int


def histories(captures: Sequence[Capture]) -> dict[tuple[str, int], list[Capture]]:
    """Captures grouped by tenant file (incarnation, generation), each group in capture order."""
    groups: dict[tuple[str, int], list[Capture]] = {}
    for got in sorted(captures, key=lambda c: c.order):
        groups.setdefault((got.entry.incarnation, got.entry.generation), []).append(got)
    return groups


def _start_ns(group: list[Capture]) -> int | None:
    """When a file's history becomes restorable: the commit time of its first snapshot."""
    for got in group:
        if got.entry.kind == "snapshot":
            return got.entry.commits[0][1]
    return None


def points(captures: Sequence[Capture]) -> list[Point]:
    """Every restorable commit of these captures, oldest first."""
    out: list[Point] = []
    for (incarnation, generation), group in histories(captures).items():
        start = _start_ns(group)
        if start is None:
            continue
        seen = False
        for got in group:
            seen = seen or got.entry.kind == "snapshot"
            if seen:
                out.extend(Point(t, incarnation, generation, f) for f, t in got.entry.commits)
    return sorted(out)


def chosen_history(captures: Sequence[Capture], at_ns: int | None) -> list[Capture] | None:
    """The captures (in capture order) of the tenant file whose history :func:`image_at` replays for
    ``at_ns``: the newest file whose first snapshot is at or before the time (None: the latest file)."""
    chosen: list[Capture] | None = None
    chosen_start = -1
    for group in histories(captures).values():
        start = _start_ns(group)
        if start is None or (at_ns is not None and start > at_ns):
            continue
        if start >= chosen_start:
            chosen, chosen_start = group, start
    return chosen


class Replay(NamedTuple):
    """How :func:`image_at` reaches a commit: from snapshot ``chosen[base]``, the captures ``steps`` (index in
    ``chosen``, first and last frame replayed from it), ending at ``point``; ``whole``: the last index of ``chosen``
    replayed to its end (a capture ending at or before the time)."""

    chosen: list[Capture]
    base: int
    steps: list[tuple[int, int, int]]
    point: Point
    whole: int


def plan_replay(captures: Sequence[Capture], at_ns: int | None = None) -> Replay | None:
    """What :func:`image_at` replays for ``at_ns`` (entries only: no bytes are read), continuity checked
    (:class:`TimelineError`); None when no history holds a commit at or before the time.

    A frames capture that a snapshot of the same log position already covers (same log generation, frames
    ending at or before the snapshot's: compaction writes such snapshots, see
    :mod:`shardlite.core.retention`) is skipped, whichever of the two sorts first (and a snapshot past the time
    does not end the replay: the capture it stands for may hold commits before the time); one that begins at or before
    the position and ends after it (a compaction's rollup, :mod:`shardlite.core.rollup`) replays only its
    frames after it."""
    chosen = chosen_history(captures, at_ns)
    if chosen is None:
        return None
    limit = at_ns if at_ns is not None else max(t for got in chosen for _, t in got.entry.commits)
    base = max(i for i, got in enumerate(chosen)
               if got.entry.kind == "snapshot" and got.entry.commits[0][1] <= limit)
    snap = chosen[base].entry
    salt, last = snap.salt, snap.last
    point = Point(snap.commits[0][1], snap.incarnation, snap.generation, snap.last)
    steps: list[tuple[int, int, int]] = []
    whole = base
    for index in range(base + 1, len(chosen)):
        entry = chosen[index].entry
        if entry.kind == "snapshot":
            if entry.commits[0][1] > limit:
                continue  # later than the time; a compaction's snapshot sorts before the capture it ends, whose
                # earlier commits may still be at or before it (a later capture's commits are after it: break)
            if entry.salt == salt and entry.last == last:
                whole = index  # the same log position again (a compaction's snapshot): nothing to replay
                continue
            steps = []
            base, salt, last, whole = index, entry.salt, entry.last, index
            point = point._replace(time_ns=entry.commits[0][1], frame=entry.last)
            continue
        if entry.salt == salt and entry.last <= last:
            whole = index  # covered by a snapshot of this log position (compaction)
            continue
        # frames a snapshot of this log generation already stands for are skipped (a compaction's rollup may
        # join captures around the position a base snapshot stands for; a committed frame of one log
        # generation never changes, so overlapping captures hold the same frames)
        start = last + 1 if entry.salt == salt else 1
        upto = [f for f, t in entry.commits if t <= limit and f >= start]
        if not upto:
            break
        if entry.salt == salt and entry.first > start:
            raise TimelineError(f"{entry.key!r}: frames {entry.first}-{entry.last} do not continue frame {last}")
        if entry.salt != salt and entry.first != 1:
            raise TimelineError(f"{entry.key!r}: a log generation starts at frame {entry.first}, not 1")
        end = upto[-1]
        steps.append((index, start, end))
        salt, last = entry.salt, entry.last
        point = point._replace(time_ns=dict(entry.commits)[end], frame=end)
        if end != entry.last:
            break  # the time falls inside this capture: later commits are after it
        whole = index
    return Replay(chosen, base, steps, point, whole)


def point_at(captures: Sequence[Capture], at_ns: int | None = None) -> Point | None:
    """The commit :func:`image_at` restores for ``at_ns`` (entries only)."""
    found = plan_replay(captures, at_ns)
    return None if found is None else found.point


def replay(plan: Replay) -> bytearray:
    """The image ``plan`` reaches (the captures' bytes, checked as SQLite's recovery checks frames)."""
    chosen = plan.chosen
    if any(chosen[index].where is not None for index in (plan.base, *(step[0] for step in plan.steps))):
        raise ValueError("replay() needs the bytes of the captures it replays (replica_read.fill)")
    image = bytearray(chosen[plan.base].data)
    for index, start, end in plan.steps:
        got = chosen[index]
        entry = got.entry
        frames = list(wf.read_frames(got.data, entry.first, entry.page_size, bytes.fromhex(entry.salt)))
        if len(frames) != entry.last - entry.first + 1:
            raise TimelineError(f"{entry.key!r}: frames {entry.first}-{entry.last} carry other salts")
        # a database grows only by pages its commits write: a size past the image plus the frames' bytes
        # (with room to spare) is a crafted or damaged capture, refused before it allocates anything
        bound = 2 * (len(image) + len(got.data)) + (1 << 20)
        try:
            wf.replay(image, [f for f in frames if start <= f.number <= end], entry.page_size, max_bytes=bound)
        except wf.WalFormatError as exc:
            raise TimelineError(f"{entry.key!r}: {exc}") from None
    return image


def image_at(captures: Sequence[Capture], at_ns: int | None = None) -> tuple[bytearray, Point] | None:
    """The database image of the tenant at its last commit at or before ``at_ns`` (None: the latest), and
    which commit that is; None when no history holds such a commit.

    The history used is the newest file whose first snapshot is at or before the time; its captures are
    replayed from its last snapshot at or before the time (:func:`plan_replay`)."""
    plan = plan_replay(captures, at_ns)
    if plan is None:
        return None
    return replay(plan), plan.point
