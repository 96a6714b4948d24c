"""shardlite.core.metasnap: snapshots round-trip; damaged ones raise MetaSnapError, nothing else."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shardlite.core import metasnap


def test_round_trip_and_names() -> None:
    blob = metasnap.encode(123, "/data", b"g" * 100, b"a" * 7)
    header, g, a = metasnap.decode(blob)
    assert (header.created_ns, header.root, g, a) == (123, "/data", b"g" * 100, b"a" * 7)
    assert metasnap.time_of(metasnap.object_name(123)) == 123
    assert metasnap.time_of("v1/meta/12.meta") is None and metasnap.time_of("v1/packs/x") is None


@settings(max_examples=300, deadline=None)
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=3),
       cut=st.integers(0, 10**6))
def test_damage_is_refused_or_harmless(flips: list[tuple[int, int]], cut: int) -> None:
    """Damaged bytes raise MetaSnapError, or (a change inside the header that keeps it valid, such as a
    letter of the root's name) still give exactly the images that were stored."""
    data = bytearray(metasnap.encode(1, "/r", b"g" * 300, b"a" * 50))
    for at, xor in flips:
        data[at % len(data)] ^= xor
    data = data[:max(1, cut % (len(data) + 1))]
    try:
        _header, g, a = metasnap.decode(bytes(data))
    except metasnap.MetaSnapError:
        return
    assert (g, a) == (b"g" * 300, b"a" * 50)
