"""Retention windows and the compaction plan (shardlite.core.retention), over random histories (Hypothesis):
restores at every commit from the retention start on reach the same commit after the plan as before; deleted
packs hold nothing kept; erased tenants never get a snapshot; a second plan over the compacted replica writes
no snapshot and changes nothing a restore sees."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardlite.core import retention as rt
from shardlite.core import timeline
from shardlite.core.pack import Entry

PAGE = 512
KEYS = ["a:1", "a:2", "dm:1", "b"]


def _entry(key: str, inc: str, gen: int, kind: str, salt: str, first: int, last: int,
           commits: list[tuple[int, int]], captured: int) -> Entry:
    length = PAGE if kind == "snapshot" else (last - first + 1) * (24 + PAGE)
    return Entry(key, inc, gen, kind, PAGE, salt, first, last, commits, captured, 0, length, "0" * 32)  # type: ignore[arg-type]


@st.composite
def replicas(draw: st.DrawFn) -> tuple[list[rt.Located], int]:
    """Captures of a few tenants over time, packed a few per pack, as replicators write them: each history
    (incarnation, generation) starts with a snapshot, frames continue their log generation, a new log
    generation starts at frame 1, a gap is a new snapshot; a key's next history starts after the last."""
    clock = 1000
    per_pack: list[list[timeline.Capture]] = [[]]
    state: dict[str, tuple[str, int, str, int]] = {}  # key -> (inc, gen, salt, last frame)
    gens: dict[str, int] = {}
    salts = 0
    for _step in range(draw(st.integers(1, 40))):
        key = draw(st.sampled_from(KEYS))
        clock += draw(st.integers(0, 50))
        action = draw(st.sampled_from(["frames", "frames", "frames", "newlog", "gap", "newfile"]))
        current = state.get(key)
        if current is None or action in ("gap", "newfile"):
            if current is None or action == "newfile":
                gens[key] = gens.get(key, 0) + 1
                inc = f"i{gens[key] // 3}"
            else:
                inc = current[0]
            salts += 1
            salt = f"{salts:016x}"
            frame = draw(st.integers(0, 5))
            captured = clock + 1
            entry = _entry(key, inc, gens[key], "snapshot", salt if frame else "", 0, frame, [(frame, clock)],
                           captured)
            state[key] = (inc, gens[key], salt if frame else "", frame)
        else:
            inc, gen, salt, last = current
            if action == "newlog" or not salt:
                salts += 1
                salt, last = f"{salts:016x}", 0
            count = draw(st.integers(1, 4))
            frames = list(range(last + 1, last + 1 + count * 2, 2))
            commits = []
            for frame in frames:
                commits.append((frame + 1, clock))
                clock += draw(st.integers(0, 20))
            captured = clock + 1
            entry = _entry(key, inc, gen, "frames", salt, last + 1, frames[-1] + 1, commits, captured)
            state[key] = (inc, gen, salt, frames[-1] + 1)
        per_pack[-1].append(timeline.Capture((captured, len(per_pack), len(per_pack[-1])), entry, b"", "n1"))
        clock = captured + 1
        if draw(st.booleans()):
            per_pack.append([])
    located = [rt.Located(f"v1/packs/n1/{seq + 1:020d}.pack", got) for seq, caps in enumerate(per_pack)
               for got in caps]
    return located, clock


def _start_of(now: int, windows: rt.Windows, scale: int) -> dict[str, int]:
    return {key: now - rt.window_for(windows, key) // scale for key in KEYS}


def _drawn(now: int, back: int, data: st.DataObject) -> tuple[dict[str, int], set[str], set[str]]:
    """Retention starts of windows of "7d" and "30d" (prefix dm:) scaled down to the drawn clock (1 day = 1 unit
    of the scale), and drawn live and erased keys."""
    windows = rt.Windows(default=rt.parse_duration("7d"), prefixes={"dm:": rt.parse_duration("30d")})
    starts = _start_of(now, windows, rt.DAY_NS // max(1, back))
    live = set(data.draw(st.sets(st.sampled_from(KEYS))))
    return starts, live, set(data.draw(st.sets(st.sampled_from(KEYS), max_size=1)))


def _after(located: list[rt.Located], result: rt.Plan) -> list[rt.Located]:
    gone = set(result.delete)
    out = [item for item in located if item.pack not in gone]
    for position, snap in enumerate(result.snapshots):
        out.append(rt.Located("v1/packs/compacted", rt.snapshot_capture(snap, position)))
    return out


def _points(located: list[rt.Located], key: str, times: list[int]) -> list[timeline.Point | None]:
    caps = [item.capture for item in located if item.capture.entry.key == key]
    return [timeline.point_at(caps, t) for t in times]


def _restores_unchanged(before: list[rt.Located], after: list[rt.Located], keys: set[str], starts: dict[str, int],
                        live: set[str], now: int) -> None:
    """Restores of each of ``keys`` at its retention start and at every commit after it reach the same commit
    from ``after`` as from ``before`` (but for a key dropped and expired: nothing is promised)."""
    for key in keys:
        caps = [item.capture for item in before if item.capture.entry.key == key]
        if not caps or (key not in live and max(c.entry.captured_ns for c in caps) < starts[key]):
            continue
        times = sorted({starts[key]} | {t for c in caps for _f, t in c.entry.commits if t >= starts[key]}
                       | {now + 10})
        try:
            expected = _points(before, key, times)
        except timeline.TimelineError:
            continue
        assert _points(after, key, times) == expected, key


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replicas(), st.integers(0, 100), st.data())
def test_restores_inside_the_window_reach_the_same_commits(replica: tuple[list[rt.Located], int], back: int,
                                                           data: st.DataObject) -> None:
    located, now = replica
    starts, live, erased = _drawn(now, back, data)
    result = rt.plan(located, starts.__getitem__, live=live, erased=erased)
    assert set(result.delete).isdisjoint(result.keep)
    after = _after(located, result)
    for snap in result.snapshots:
        assert snap.key not in erased
        assert snap.through[0].capture.entry.kind == "snapshot"
    _restores_unchanged(located, after, set(KEYS) - erased, starts, live, now)
    # a second compaction over the compacted replica: no new snapshot, restores unchanged
    again = rt.plan(after, starts.__getitem__, live=live, erased=erased)
    assert again.snapshots == []
    final = _after(after, again)
    for key in set(KEYS) - erased:
        caps = [item.capture for item in after if item.capture.entry.key == key]
        if not caps or (key not in live and max(c.entry.captured_ns for c in caps) < starts[key]):
            continue
        times = sorted({starts[key]} | {t for c in caps for _f, t in c.entry.commits if t >= starts[key]})
        assert _points(final, key, times) == _points(after, key, times)


def test_everything_old_goes_and_one_snapshot_stands_for_it() -> None:
    """A tenant with 10 packs of frames, all older than its window: one snapshot replaces them all."""
    snap = _entry("a:1", "i", 1, "snapshot", "00000000000000aa", 0, 3, [(3, 100)], 101)
    located = [rt.Located("p0", timeline.Capture((101, 1, 0), snap, b""))]
    last = 3
    for seq in range(2, 12):
        entry = _entry("a:1", "i", 1, "frames", "00000000000000aa", last + 1, last + 2,
                       [(last + 2, seq * 100)], seq * 100 + 1)
        located.append(rt.Located(f"p{seq}", timeline.Capture((seq * 100 + 1, seq, 0), entry, b"")))
        last += 2
    result = rt.plan(located, lambda _key: 5000, live={"a:1"})
    assert len(result.snapshots) == 1 and result.keep == []
    assert len(result.delete) == 11
    assert [i.pack for i in result.snapshots[0].through] == ["p0"] + [f"p{s}" for s in range(2, 12)]
    # a dropped tenant past its window leaves nothing, and gets no snapshot
    dropped = rt.plan(located, lambda _key: 5000, live=set())
    assert dropped.snapshots == [] and len(dropped.delete) == 11
    # an erase tombstone: nothing kept, whatever the catalog says
    erased = rt.plan(located, lambda _key: 5000, live={"a:1"}, erased={"a:1"})
    assert erased.snapshots == [] and len(erased.delete) == 11


@pytest.mark.parametrize("text,ns", [("7d", 7 * rt.DAY_NS), ("12h", 12 * 3600 * 10**9), ("2w", 14 * rt.DAY_NS),
                                     ("90m", 5400 * 10**9), (" 30d ", 30 * rt.DAY_NS)])
def test_durations(text: str, ns: int) -> None:
    assert rt.parse_duration(text) == ns
    assert rt.parse_duration(rt.format_duration(ns)) == ns


@pytest.mark.parametrize("text", ["", "7", "d", "-1d", "7 d", "1s", "59s", "3651d", "1e3d", "7D", "7d\n1d",
                                  "x" * 100, "９d", None, 7])
def test_bad_durations_are_refused(text: object) -> None:
    with pytest.raises(rt.RetentionError):
        rt.parse_duration(text)


def test_longest_prefix_wins_and_hostile_records_are_refused() -> None:
    windows = rt.Windows(prefixes={"dm:": 30 * rt.DAY_NS, "dm:vip:": 90 * rt.DAY_NS, "x": rt.DAY_NS}).check()
    assert rt.window_for(windows, "dm:vip:1") == 90 * rt.DAY_NS
    assert rt.window_for(windows, "dm:1") == 30 * rt.DAY_NS
    assert rt.window_for(windows, "user:1") == rt.DEFAULT_WINDOW_NS
    assert rt.decode_windows(rt.encode_windows(windows)) == windows
    assert rt.decode_windows(None) == rt.Windows()
    for bad in ['{"default": 1}', '{"default": "7d"}', '{"prefixes": {"\\u0000": 86400000000000}}',
                '{"prefixes": {" a": 86400000000000}}', '{"other": 1}', "[", '{"default": 1e30}',
                '{"prefixes": {"a\\u200b": 86400000000000}}']:
        with pytest.raises(rt.RetentionError):
            rt.decode_windows(bad)


def _old_and_recent(located: list[rt.Located], cutoff: int) -> tuple[list[rt.Located], set[str]]:
    """The captures of the packs holding nothing newer than ``cutoff`` (what a compaction plans over:
    shardlite.services.compact_scan), and the keys of the other packs."""
    newest: dict[str, int] = {}
    for item in located:
        newest[item.pack] = max(newest.get(item.pack, 0), item.capture.entry.captured_ns)
    old = [item for item in located if newest[item.pack] <= cutoff]
    return old, {item.capture.entry.key for item in located if newest[item.pack] > cutoff}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replicas(), st.integers(0, 100), st.data())
def test_a_plan_over_the_old_packs_only_keeps_what_the_whole_plan_keeps(replica: tuple[list[rt.Located], int],
                                                                         back: int, data: st.DataObject) -> None:
    """A compaction plans over the packs older than the latest retention start only, told which keys the
    others hold: it deletes nothing the plan over every pack keeps, and restores from every retention start on
    reach the same commits."""
    located, now = replica
    starts, live, erased = _drawn(now, back, data)
    old, recent = _old_and_recent(located, max(starts.values()))
    whole = rt.plan(located, starts.__getitem__, live=live, erased=erased)
    part = rt.plan(old, starts.__getitem__, live=live, erased=erased, recent=recent.__contains__)
    assert set(part.delete) <= {item.pack for item in old}
    if not whole.pinned:
        assert set(part.delete) <= set(whole.delete)
    assert set(part.expired) <= set(whole.expired)
    _restores_unchanged(located, _after(located, part), set(KEYS) - erased, starts, live, now)


def _drop_world() -> tuple[list[rt.Located], list[rt.LocatedDrop]]:
    """Tenant a:1 (incarnation i): a snapshot and frames in old packs p1, p2; its drop record in pack p3."""
    snap = _entry("a:1", "i", 1, "snapshot", "00000000000000aa", 0, 3, [(3, 100)], 101)
    frames = _entry("a:1", "i", 1, "frames", "00000000000000aa", 4, 5, [(5, 200)], 201)
    located = [rt.Located("p1", timeline.Capture((101, 1, 0), snap, b"")),
               rt.Located("p2", timeline.Capture((201, 2, 0), frames, b""))]
    return located, [rt.LocatedDrop("p3", "a:1", "i", 300)]


def test_a_partial_plan_never_expires_a_key_the_packs_it_does_not_see_may_hold() -> None:
    """The drop record lies in a pack the plan does not see (newer than the cutoff): the dropped tenant was live
    inside its window, so its history stays; seen whole, the same plan keeps it too."""
    located, drops = _drop_world()
    whole = rt.plan(located, lambda _key: 250, live=set(), packs=["p1", "p2", "p3"], drops=drops)
    assert whole.expired == [] and "p2" in whole.keep or whole.snapshots
    blind = rt.plan(located, lambda _key: 250, live=set(), packs=["p1", "p2"])
    assert blind.expired == ["a:1"] and blind.delete == ["p1", "p2"]  # what a plan told nothing would do
    told = rt.plan(located, lambda _key: 250, live=set(), packs=["p1", "p2"], recent={"a:1"}.__contains__)
    assert told.expired == [] and (told.snapshots or set(told.keep) == {"p1", "p2"})


def test_a_drop_record_stays_while_packs_the_plan_does_not_see_may_hold_its_tenant() -> None:
    """The drop record lies in an old pack, a capture of the dropped incarnation in a newer one: the record's
    pack stays (a whole-root restore after the drop must leave the tenant out)."""
    located, _drops = _drop_world()
    old_drop = [rt.LocatedDrop("p0", "a:1", "i", 240)]
    seen = [item for item in located if item.pack == "p1"]  # p2 is past the cutoff: not seen
    blind = rt.plan(seen, lambda _key: 250, live=set(), packs=["p0", "p1"], drops=old_drop)
    assert set(blind.delete) == {"p0", "p1"}
    told = rt.plan(seen, lambda _key: 250, live=set(), packs=["p0", "p1"], drops=old_drop,
                   recent={"a:1"}.__contains__)
    assert "p0" in told.keep


def test_a_base_is_copied_out_of_a_pack_that_would_otherwise_go_but_a_pack_of_bases_stays() -> None:
    """An idle tenant's base snapshot in a pack whose other captures all go (a rollup part, a busy pack): the
    snapshot is copied into the compaction's snapshots and the pack goes, when the base is at most half of it.
    A pack of bases alone (a compaction pack) stays as it is: no copy at every compaction."""
    idle = _entry("a:1", "i", 1, "snapshot", "00000000000000aa", 0, 3, [(3, 100)], 101)
    busy = _entry("a:2", "j", 1, "snapshot", "00000000000000bb", 0, 1, [(1, 100)], 102)
    busy_frames = [_entry("a:2", "j", 1, "frames", "00000000000000bb", 2 + 4 * n, 5 + 4 * n, [(5 + 4 * n, 110 + n)],
                          111 + n) for n in range(3)]
    later = _entry("a:2", "j", 1, "frames", "00000000000000bb", 14, 14, [(14, 400)], 401)
    located = [rt.Located("part", timeline.Capture((101, 0, 0), idle, b"")),
               rt.Located("part", timeline.Capture((102, 0, 1), busy, b""))]
    located += [rt.Located("part", timeline.Capture((111 + n, 0, 2 + n), e, b"")) for n, e in enumerate(busy_frames)]
    located.append(rt.Located("p9", timeline.Capture((401, 9, 0), later, b"")))
    result = rt.plan(located, lambda _key: 300, live={"a:1", "a:2"})
    assert result.delete == ["part"] and result.keep == ["p9"]
    assert sorted(s.key for s in result.snapshots) == ["a:1", "a:2"]
    [copied] = [s for s in result.snapshots if s.key == "a:1"]
    assert [i.capture.entry for i in copied.through] == [idle]  # the base itself, copied
    # the compacted replica: a pack of the two bases and p9; the next plan leaves it alone
    after = [rt.Located("compact", rt.snapshot_capture(snap, n)) for n, snap in enumerate(result.snapshots)]
    after.append(located[-1])
    again = rt.plan(after, lambda _key: 350, live={"a:1", "a:2"})
    assert (again.snapshots, again.delete) == ([], [])
