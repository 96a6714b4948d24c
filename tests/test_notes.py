"""shardlite.core.notes: notes round-trip, a torn tail is left for later, damaged keys are refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardlite.core import notes


@settings(max_examples=200, deadline=None)
@given(items=st.lists(st.tuples(st.text(max_size=40), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1))),
       cut=st.integers(0, 10_000))
def test_round_trip_and_torn_tails(items: list[tuple[str, int, int]], cut: int) -> None:
    blob = b"".join(notes.encode(*item) for item in items)
    got, used = notes.decode(blob)
    assert [tuple(n) for n in got] == items and used == len(blob)
    cut %= len(blob) + 1
    head, used = notes.decode(blob[:cut])
    assert head == got[:len(head)] and used <= cut
    rest, more = notes.decode(blob[used:])  # reading again from where it stopped loses nothing
    assert head + rest == got and used + more == len(blob)


def test_limits() -> None:
    with pytest.raises(ValueError):
        notes.encode("k" * 70_000, 1, 1)
    with pytest.raises(ValueError):
        notes.encode("k", 2**32, 1)
    with pytest.raises(ValueError):
        notes.decode(notes.encode("ab", 1, 1)[:-2] + b"\xff\xfe")
