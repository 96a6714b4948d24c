"""Retention of a root's replica: how long history is kept (per key prefix), and what a compaction keeps,
snapshots and deletes.

**Windows.** A root keeps, for every tenant, every acknowledged commit of the last ``default`` (7 days unless
set), or of the window of the longest key prefix that matches the key (``"dm:" -> 30 days``). A tenant's
*retention start* is ``now - window``: a restore at any time from it on gives exactly what it gave before
any compaction; earlier times are refused.

**Compaction plan** (:func:`plan`, entries only: no bytes). For each tenant, the history
:func:`shardlite.core.timeline.image_at` would replay at the retention start keeps a *base*: the image at the
end of the last capture that ends at or before the start (a new snapshot, written by the compaction, unless that
capture is a snapshot already: then it stays where it is, or is copied when its pack would go otherwise and it
is at most half of that pack, see :func:`_carry`); every capture after it is kept, and so is every history that
starts after the retention start. A pack is deleted when none of its entries is kept. Then the plan checks
itself: for every tenant, at the retention start and at every history start and commit after it, the commit a
restore reaches after the compaction must be the one it reached before; a tenant that fails keeps all its
captures and gets no snapshot (its packs stay), until nothing fails.

Not kept at all: a tenant that is no longer live (dropped) and whose last capture and last drop record
are older than its retention start (a tenant dropped inside the window was live at its start, so its history
there stays), and a tenant with an erase tombstone (``erased``: compaction never writes a snapshot of it, so
it cannot come back).

**Drop records** (:class:`~shardlite.core.pack.Drop`, located by :class:`LocatedDrop`) are what keeps a
whole-root restore after a drop from bringing the tenant back, so a pack holding the drop record of an
incarnation is kept as long as any capture of that incarnation is (or a new snapshot stands for some), and
may go with the rest once none is.

Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import NamedTuple

import msgspec

from .keys import canonical
from .timeline import Capture, TimelineError, histories, plan_replay, point_at

__all__ = ["Windows", "DEFAULT_WINDOW_NS", "RetentionError", "parse_duration", "format_duration", "window_for",
           "encode_windows", "decode_windows", "Located", "LocatedDrop", "Snapshot", "Plan", "plan", "snapshot_capture",
           "MIN_WINDOW_NS", "MAX_WINDOW_NS", "MAX_PREFIXES"]

_NS = 1_000_000_000
DAY_NS = 86_400 * _NS
#: The default window: 7 days.
DEFAULT_WINDOW_NS = 7 * DAY_NS
#: The shortest window accepted (one minute) and the longest (ten years).
MIN_WINDOW_NS = 60 * _NS
MAX_WINDOW_NS = 3650 * DAY_NS
#: The most prefix overrides a root records.
MAX_PREFIXES = 1000
_UNITS = {"s": _NS, "m": 60 * _NS, "h": 3600 * _NS, "d": DAY_NS, "w": 7 * DAY_NS}
_DURATION = re.compile(r"([0-9]{1,6})([smhdw])")


class RetentionError(ValueError):
    """A retention setting that is not valid (the message says what is accepted)."""


def parse_duration(text: object) -> int:
    """``"7d"``, ``"12h"``, ``"90m"``, ``"2w"``, ``"3600s"`` as nanoseconds, between one minute and ten
    years; :class:`RetentionError` for anything else."""
    found = _DURATION.fullmatch(text.strip()) if isinstance(text, str) and len(text) <= 16 else None
    if found is None:
        shown = text[:32] if isinstance(text, str) else type(text).__name__
        raise RetentionError(f"{shown!r} is not a duration: a number and a unit (s, m, h, d, w), e.g. 7d or 12h")
    value = int(found.group(1)) * _UNITS[found.group(2)]
    if not MIN_WINDOW_NS <= value <= MAX_WINDOW_NS:
        raise RetentionError(f"a retention window lies between 1m and 3650d, not {found.group(0)}")
    return value


def format_duration(ns: int) -> str:
    """The shortest exact form of ``ns`` in :func:`parse_duration`'s units (``7d``, ``36h``)."""
    for unit in ("d", "h", "m", "s"):
        if ns % _UNITS[unit] == 0:
            return f"{ns // _UNITS[unit]}{unit}"
    return f"{ns // _NS}s"


def _check_prefix(prefix: object) -> str:
    if not isinstance(prefix, str) or not prefix or len(prefix.encode("utf-8")) > 512:
        raise RetentionError("a key prefix is 1 to 512 bytes of text")
    try:
        # a prefix is the beginning of a canonical key: canonical itself (a trailing space is allowed
        # inside a key, so it is checked with a character after it)
        ok = canonical(prefix + "x")[:-1] == prefix
    except ValueError:
        ok = False
    if not ok:
        raise RetentionError(f"{prefix[:32]!r} cannot begin a key (keys are NFC text without control or "
                             "invisible characters, nor leading whitespace)")
    return prefix


class Windows(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A root's retention windows: ``default`` for every key, ``prefixes`` (key prefix -> window) for keys
    beginning with one of them (the longest wins). Nanoseconds."""

    default: int = DEFAULT_WINDOW_NS
    prefixes: dict[str, int] = msgspec.field(default_factory=dict)

    def check(self) -> Windows:
        """``self`` when every value is valid, else :class:`RetentionError`."""
        for value in (self.default, *self.prefixes.values()):
            if type(value) is not int or not MIN_WINDOW_NS <= value <= MAX_WINDOW_NS:
                raise RetentionError("a retention window lies between 1m and 3650d")
        if len(self.prefixes) > MAX_PREFIXES:
            raise RetentionError(f"at most {MAX_PREFIXES} prefix windows")
        for prefix in self.prefixes:
            _check_prefix(prefix)
        return self

    def longest(self) -> int:
        """The longest window (what whole-root restores and metadata snapshots keep)."""
        return max([self.default, *self.prefixes.values()])

    def shortest(self) -> int:
        """The shortest window (``now`` minus it is the latest retention start of any key)."""
        return min([self.default, *self.prefixes.values()])


def window_for(windows: Windows, key: str) -> int:
    """The window of ``key``: its longest matching prefix's, else the default."""
    best, size = windows.default, -1
    for prefix, value in windows.prefixes.items():
        if len(prefix) > size and key.startswith(prefix):
            best, size = value, len(prefix)
    return best


def encode_windows(windows: Windows) -> str:
    return msgspec.json.encode(windows.check()).decode("utf-8")


def decode_windows(text: str | None) -> Windows:
    """The windows a root recorded (None: the defaults); :class:`RetentionError` for a damaged record."""
    if text is None:
        return Windows()
    try:
        return msgspec.json.decode(text.encode("utf-8"), type=Windows).check()
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise RetentionError(f"the recorded retention windows are invalid ({exc})") from None


# -- compaction planning --------------------------------------------------------------------------------


class Located(NamedTuple):
    """A capture (its bytes may be absent: planning reads entries only) and the pack that holds it."""

    pack: str
    capture: Capture


class LocatedDrop(NamedTuple):
    """A drop record (:class:`~shardlite.core.pack.Drop`) and the pack that holds it."""

    pack: str
    key: str
    incarnation: str
    dropped_ns: int


class Snapshot(NamedTuple):
    """A snapshot the compaction writes: the image of ``through[-1]``'s end, replayed from ``through``
    (the captures of one history from its base snapshot on), standing in for them."""

    key: str
    through: list[Located]


class Plan(NamedTuple):
    snapshots: list[Snapshot]
    delete: list[str]  #: pack names, sorted
    keep: list[str]  #: pack names, sorted
    pinned: list[str]  #: keys whose history could not be compacted (kept whole; see the module doc)
    expired: list[str]  #: keys dropped and past their window (nothing of them is kept)


def snapshot_capture(snap: Snapshot, order_position: int, data: bytes = b"") -> Capture:
    """The capture a compaction's snapshot is, as restores will read it: a snapshot entry at the log position
    and commit where ``through`` ends, ordered at that capture's time (and before any later capture)."""
    import msgspec.structs

    last = snap.through[-1].capture.entry
    entry = msgspec.structs.replace(last, kind="snapshot", first=0, commits=[last.commits[-1]], offset=0,
                                    length=len(data) if data else last.page_size, digest="0" * 32)
    return Capture((last.captured_ns, 0, order_position), entry, data, snap.through[-1].capture.node)


def _critical_times(caps: Iterable[Capture], start: int) -> set[int]:
    times = {start}
    for got in caps:
        commits = got.entry.commits
        times.update(t for t in (commits[0][1], commits[-1][1]) if t >= start)
    return times


#: Capture boundaries after the retention start at which :func:`plan` compares restores (see :func:`_same`).
CHECKED_BOUNDARIES = 16


def _same(before: list[Capture], after: list[Capture], start: int) -> bool:
    """Whether restores at ``start``, at the first :data:`CHECKED_BOUNDARIES` capture boundaries after it, at
    every history start after it and at the last commit reach the same commit from ``after`` as from
    ``before``. A compaction changes captures before the base only, so later boundaries of one history replay
    the same captures; a history start is where another history may be chosen instead."""
    bounds = sorted(_critical_times(before, start) | _critical_times(after, start))
    starts = set()
    for group in (*histories(before).values(), *histories(after).values()):
        first = next((got for got in group if got.entry.kind == "snapshot"), None)
        if first is not None and first.entry.commits[0][1] >= start:
            starts.add(first.entry.commits[0][1])
    for when in sorted({*bounds[:CHECKED_BOUNDARIES], *starts, bounds[-1]}):
        try:
            if point_at(before, when) != point_at(after, when):
                return False
        except TimelineError:
            return False
    return True


def _with_drops(kept: set[str], by_key: dict[str, list[Located]], through: dict[str, list[Located]],
                drops: list[LocatedDrop], expired: list[str], recent: Callable[[str], bool]) -> set[str]:
    """``kept`` plus the packs of the drop records whose incarnation keeps a capture in a kept pack or a new
    snapshot (module doc), or whose key ``recent`` says may have one in a pack the plan does not see, until
    nothing more is added (a pack kept for a drop record keeps its captures). Captures of ``expired`` keys left
    in kept packs do not count: restores ignore them (the horizon)."""
    if not drops:
        return kept
    gone = set(expired)
    while True:
        alive = {(key, item.capture.entry.incarnation) for key, items in by_key.items() if key not in gone
                 for item in items if item.pack in kept}
        alive |= {(key, items[-1].capture.entry.incarnation) for key, items in through.items()}
        extra = {drop.pack for drop in drops if (drop.key, drop.incarnation) in alive or recent(drop.key)} - kept
        if not extra:
            return kept
        kept = kept | extra


def _carry(carry: dict[str, Located], deletable: set[str], held: dict[str, int], needed: dict[str, set[str]],
           through: dict[str, list[Located]]) -> None:
    """Decide, for each base that is a snapshot already, whether its pack stays for it or it is copied into the
    compaction's snapshots so that the pack can go: copied when nothing else keeps the pack and the bases it
    would keep are at most half of its bytes (a rollup part or a busy pack kept for an idle tenant's base goes;
    a compaction pack of bases stays, rather than be copied again at every compaction)."""
    carried: dict[str, int] = {}
    for item in carry.values():
        carried[item.pack] = carried.get(item.pack, 0) + item.capture.entry.length
    for key, item in carry.items():
        if item.pack in deletable and 2 * carried[item.pack] <= held[item.pack]:
            through[key] = [item]
        else:
            needed[key] |= {item.pack}
    carry.clear()


def _never(_key: str) -> bool:
    return False


def plan(located: Iterable[Located], start_of: Callable[[str], int], *, live: Iterable[str] = (),
         erased: Iterable[str] = (), packs: Iterable[str] = (), drops: Iterable[LocatedDrop] = (),
         recent: Callable[[str], bool] = _never) -> Plan:
    """What a compaction does (module doc). ``start_of(key)``: the key's retention start (ns); ``live``: the
    keys the catalog holds now; ``erased``: keys with an erase tombstone; ``packs``: every pack name (packs
    with no entry are deleted too); ``drops``: the drop records in the packs.

    The plan may see only some of the replica's packs (a *partial* plan: those holding nothing newer than the
    latest retention start, see :mod:`shardlite.services.compact_scan`) provided every pack it does not see
    is kept, and ``recent(key)`` is true for every key that may have a capture or a drop record in one of
    them: such a key is never expired, its drop records stay, and of its histories only the one a restore at
    its retention start replays loses captures (those before its base). So a partial plan changes nothing a
    restore from the retention start on reaches: the captures it does not see are kept, and a restore replays
    from the last snapshot at or before its time (Hypothesis, ``tests/test_retention_plan.py``, compares a
    plan over the old packs with one over every pack: it deletes no pack the whole plan keeps)."""
    live_set, erased_set = set(live), set(erased)
    drop_list = [drop for drop in drops if drop.key not in erased_set]
    dropped_at: dict[str, int] = {}
    for drop in drop_list:
        dropped_at[drop.key] = max(dropped_at.get(drop.key, 0), drop.dropped_ns)
    by_key: dict[str, list[Located]] = {}
    all_packs = set(packs)
    for item in located:
        by_key.setdefault(item.capture.entry.key, []).append(item)
        all_packs.add(item.pack)
    where: dict[int, str] = {}
    for items in by_key.values():
        for item in items:
            where[id(item.capture)] = item.pack
    needed: dict[str, set[str]] = {}  # key -> packs it keeps
    carry: dict[str, Located] = {}  # key -> its base, a snapshot already (kept where it is, or copied)
    through: dict[str, list[Located]] = {}  # key -> base..end captures a new snapshot stands for
    starts: dict[str, int] = {}
    expired: list[str] = []
    for key, items in by_key.items():
        if key in erased_set:
            continue  # erased: nothing kept, never a snapshot (no resurrection)
        start = starts[key] = start_of(key)
        caps = [item.capture for item in items]
        if (key not in live_set and max(c.entry.captured_ns for c in caps) < start and dropped_at.get(key, -1) < start
                and not recent(key)):
            expired.append(key)
            continue  # dropped before its window began
        keep: list[Capture] = []
        try:
            at_start = plan_replay(caps, start)
        except TimelineError:
            needed[key] = {item.pack for item in items}  # a damaged history is left as it is
            continue
        chosen = None
        if at_start is not None:
            chosen = (at_start.chosen[0].entry.incarnation, at_start.chosen[0].entry.generation)
        for ident, group in histories(caps).items():
            if ident == chosen:
                continue
            first = next((i for i, c in enumerate(group) if c.entry.kind == "snapshot"), None)
            if first is not None and group[first].entry.commits[0][1] > start:
                keep.extend(group[first:])
            elif recent(key):
                keep.extend(group)  # a partial plan may not see what supersedes it: kept whole
        if at_start is not None:
            group, base, whole = at_start.chosen, at_start.base, at_start.whole
            keep.extend(group[whole + 1:])
            end = group[whole].entry
            same = [c for c in group[base:whole + 1]
                    if c.entry.kind == "snapshot" and (c.entry.salt, c.entry.last) == (end.salt, end.last)]
            if same:  # a snapshot of the base position exists (an earlier compaction's): kept, or carried
                carry[key] = Located(where[id(same[-1])], same[-1])
            else:
                through[key] = [Located(where[id(c)], c) for c in group[base:whole + 1]]
        needed[key] = {where[id(c)] for c in keep}
    held: dict[str, int] = {}
    for items in by_key.values():
        for item in items:
            held[item.pack] = held.get(item.pack, 0) + item.capture.entry.length
    pinned: set[str] = set()
    while True:
        kept = _with_drops(set().union(*needed.values()) if needed else set(), by_key, through, drop_list, expired,
                           recent)
        deletable = all_packs - kept
        if carry:
            _carry(carry, deletable, held, needed, through)
            continue
        for key in list(through):
            if not any(item.pack in deletable for item in through[key]):
                needed[key] |= {item.pack for item in through.pop(key)}  # nothing of it goes: no snapshot
        failed = []
        for key, items in by_key.items():
            if key in erased_set or key in pinned or key not in needed:
                continue
            before = [item.capture for item in items]
            after = [item.capture for item in items if item.pack not in deletable]
            if key in through:
                after.append(snapshot_capture(Snapshot(key, through[key]), 0))
            if not _same(before, after, starts[key]):
                failed.append(key)
        if not failed:
            break
        for key in failed:
            pinned.add(key)
            through.pop(key, None)
            needed[key] = {item.pack for item in by_key[key]}
    snapshots = [Snapshot(key, items) for key, items in sorted(through.items())]
    kept = _with_drops(set().union(*needed.values()) if needed else set(), by_key, through, drop_list, expired,
                           recent)
    return Plan(snapshots, sorted(all_packs - kept), sorted(kept), sorted(pinned), sorted(expired))

