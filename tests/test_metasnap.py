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


def test_version_2_records_when_the_read_began() -> None:
    import msgspec
    import xxhash

    header, _g, _a = metasnap.decode(metasnap.encode(123, "/data", b"g", b"a", read_ns=100))
    assert (header.version, header.read_time, header.created_ns) == (2, 100, 123)
    header, _g, _a = metasnap.decode(metasnap.encode(123, "/data", b"g", b"a"))
    assert (header.version, header.read_time) == (1, 123)  # written before read_ns: its own time
    for fields in ({"version": 2}, {"version": 1, "read_ns": 5}, {"version": 2, "read_ns": 124},
                   {"version": 2, "read_ns": -1}):
        empty = {"length": 0, "digest": xxhash.xxh3_128_hexdigest(b"")}  # valid parts: only the times are wrong
        raw = {"version": 1, "created_ns": 123, "root": "/r", "global_db": empty, "app_global_db": empty} | fields
        head = msgspec.json.encode(raw)
        try:
            metasnap.decode(metasnap.MAGIC + len(head).to_bytes(4, "big") + head)
        except metasnap.MetaSnapError:
            continue
        raise AssertionError(f"a header with {fields} was accepted")
