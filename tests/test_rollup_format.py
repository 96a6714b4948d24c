"""Rollups, pure (shardlite.core.rollup): joining a run of packs keeps every restore point of every tenant, also
after a compaction's plan (a base snapshot inside a joined capture); parts are bounded and hold every capture
once; names and listings (a run is read once marked, and then supersedes its numbered packs)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_retention_plan import KEYS, _after, _start_of, replicas

from shardlite.core import pack, rollup, timeline
from shardlite.core import retention as rt


def _joined(located: list[rt.Located], lo: int, hi: int) -> list[rt.Located]:
    """``located`` with the numbered packs ``lo``..``hi`` (by sequence) joined into one rollup part."""
    def seq(name: str) -> int | None:
        tail = name.rsplit("/", 1)[-1]
        return int(tail[:-5]) if tail[:-5].isdigit() else None

    inside = sorted((item for item in located if (s := seq(item.pack)) is not None and lo <= s <= hi),
                    key=lambda item: (seq(item.pack), item.capture.order[2]))
    items = [(item.capture.entry, bytes([len(item.capture.entry.key)]) * item.capture.entry.length)
             for item in inside]
    out = [item for item in located if item not in inside]
    for position, (entry, data) in enumerate(rollup.coalesce(items)):
        assert entry.length == len(data)
        out.append(rt.Located("v1/packs/n1/compact-r", timeline.Capture((entry.captured_ns, 0, position), entry, b"")))
    return out


def _same_points(before: list[rt.Located], after: list[rt.Located], key: str, start: int) -> None:
    caps = [item.capture for item in before if item.capture.entry.key == key]
    later = [item.capture for item in after if item.capture.entry.key == key]
    times = sorted({start} | {t for c in caps for _f, t in c.entry.commits if t >= start} | {1 << 62})
    try:
        expected = [timeline.point_at(caps, t) for t in times]
    except timeline.TimelineError:
        return
    assert [timeline.point_at(later, t) for t in times] == expected, key


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replicas(), st.data())
def test_joining_a_run_keeps_every_restore_point(replica: tuple[list[rt.Located], int], data: st.DataObject) -> None:
    located, _now = replica
    packs = sorted({int(item.pack.rsplit("/", 1)[1][:-5]) for item in located})
    lo = data.draw(st.sampled_from(packs))
    hi = data.draw(st.sampled_from([p for p in packs if p >= lo]))
    after = _joined(located, lo, hi)
    assert sum(i.capture.entry.length for i in after) == sum(i.capture.entry.length for i in located)
    for key in KEYS:
        _same_points(located, after, key, 0)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replicas(), st.integers(0, 100), st.data())
def test_joining_what_a_compaction_kept_keeps_every_restore_point_inside_the_window(
        replica: tuple[list[rt.Located], int], back: int, data: st.DataObject) -> None:
    """A compaction's plan, then a rollup of the packs it kept: a joined capture may straddle a base snapshot's
    position (restores replay only its frames after it)."""
    located, now = replica
    windows = rt.Windows(default=rt.parse_duration("7d"), prefixes={"dm:": rt.parse_duration("30d")})
    starts = _start_of(now, windows, rt.DAY_NS // max(1, back))
    live = set(KEYS)
    planned = rt.plan(located, starts.__getitem__, live=live)
    compacted = _after(located, planned)
    numbered = sorted({int(item.pack.rsplit("/", 1)[1][:-5]) for item in compacted
                       if item.pack.rsplit("/", 1)[1][:-5].isdigit()})
    if not numbered:
        return
    lo = data.draw(st.sampled_from(numbered))
    joined = _joined(compacted, lo, max(numbered))
    for key in KEYS:
        _same_points(located, joined, key, starts[key])


def _frames(key: str, first: int, last: int, commits: int, captured: int, salt: str = "00000000000000aa"
            ) -> tuple[pack.Entry, bytes]:
    entry = pack.Entry(key, "i", 1, "frames", 512, salt, first, last,
                       [(last - n, captured - n) for n in range(commits - 1, -1, -1)], captured, 0,
                       (last - first + 1) * (24 + 512))
    return entry, b"f" * entry.length


def test_coalesce_joins_only_what_continues() -> None:
    items = [_frames("a", 1, 2, 1, 10), _frames("b", 1, 1, 1, 11), _frames("a", 3, 5, 2, 12),
             _frames("a", 7, 7, 1, 13),  # a gap: not joined
             _frames("a", 1, 1, 1, 14, salt="00000000000000bb"),  # a new log generation
             _frames("a", 2, 3, 1, 15, salt="00000000000000bb")]
    out = rollup.coalesce(items)
    assert [(e.key, e.salt[-2:], e.first, e.last, len(e.commits), e.captured_ns) for e, _ in out] == [
        ("a", "aa", 1, 5, 3, 12), ("b", "aa", 1, 1, 1, 11), ("a", "aa", 7, 7, 1, 13), ("a", "bb", 1, 3, 2, 15)]
    assert [len(d) for _e, d in out] == [e.length for e, _ in out]
    # bounded: no joined entry past MAX_COMMITS commits
    many = [_frames("a", n, n, 1, 100 + n) for n in range(1, 2 * rollup.MAX_COMMITS + 2)]
    assert [len(e.commits) for e, _ in rollup.coalesce(many)] == [rollup.MAX_COMMITS, rollup.MAX_COMMITS, 1]


def test_split_bounds_parts_and_keeps_each_key_in_order() -> None:
    items = [_frames(f"k:{n % 37}", 3 * n, 3 * n + 2, 3, 1000 + n) for n in range(1, 2000)]
    parts = rollup.split(items)
    assert len(parts) > 1 and all(sum(rollup._header_cost(e) for e, _ in part) <= rollup.PART_HEADER for part in parts)
    flat = [entry for part in parts for entry, _ in part]
    assert sorted(flat, key=lambda e: e.captured_ns) == [e for e, _ in items]
    for key in {e.key for e in flat}:
        mine = [e.captured_ns for e in flat if e.key == key]
        assert mine == sorted(mine)
    assert rollup.split([]) == [[]]
    # a part holds the encoded header it was cut for
    blob = pack.encode("n1", 0, 1, parts[0])
    header, _at = pack.decode_header(blob)
    assert len(header.entries) == len(parts[0])


F = "v1/packs/n1/"


def test_names_and_listings() -> None:
    part = rollup.part_name(F, 5, 3, 9, 0)
    marker = rollup.marker_name(F, 5, 3, 9)
    assert rollup.parse(part) == rollup.RunName(F, 5, 3, 9, 0)
    assert rollup.parse(marker) == rollup.RunName(F, 5, 3, 9, -1)
    for name in (F + "compact-00000000000000000005-0000.pack", F + "00000000000000000003.pack",
                 rollup.part_name(F, 5, 9, 3, 0), F + "compact-5-3-9-0.pack", part + "\n"):
        assert rollup.parse(name) is None
    numbered = [(f"{F}{n:020d}.pack", 10) for n in range(1, 12)]
    other = [(f"v1/packs/n2/{n:020d}.pack", 10) for n in range(3, 6)]
    # unmarked: the parts are not read, the numbered packs are
    unmarked = rollup.sort_out([*numbered, (part, 5), *other])
    assert unmarked.packs == [*numbered, *other] and unmarked.hidden == [part]
    # marked: the parts are read, the numbered packs 3..9 of that folder only are not
    marked = rollup.sort_out([*numbered, (part, 5), (marker, 0), *other])
    assert [n for n, _ in marked.packs] == [n for n, _ in numbered if not 3 <= int(n[-25:-5]) <= 9] + [part] + [
        n for n, _ in other]
    assert set(marked.hidden) == {n for n, _ in numbered if 3 <= int(n[-25:-5]) <= 9}
    assert marked.markers == [marker] and marked.spent == []
    # a part deleted later (a plan, an erase): the run stays marked while another part is left
    other = rollup.part_name(F, 5, 3, 9, 1)
    assert rollup.sort_out([*numbered, (other, 5), (marker, 0)]).hidden == [
        n for n, _ in numbered if 3 <= int(n[-25:-5]) <= 9]
    # no part of the run left (or a crafted marker, or sequence numbers started again): it hides nothing, and
    # it is spent
    alone = rollup.sort_out([*numbered, (marker, 0)])
    assert alone.packs == numbered and alone.hidden == [] and alone.spent == [marker]
    crafted = rollup.sort_out([*numbered, (rollup.marker_name(F, 1, 1, 10**19), 0)])
    assert crafted.packs == numbered and crafted.hidden == []
