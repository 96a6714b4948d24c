"""shardlite.core.pack: packs round-trip, and damaged or hostile packs raise PackError, nothing else."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardlite.core import pack

PS = 512


def _frames_entry(key: str, first: int, last: int) -> tuple[pack.Entry, bytes]:
    data = b"".join(bytes([n % 256]) * (24 + PS) for n in range(first, last + 1))
    entry = pack.Entry(key, "inc-1", 3, "frames", PS, "00112233aabbccdd", first, last,
                       [(last, 1_700_000_000_000_000_000 + last)], 1_700_000_000_000_000_001, 0, 0)
    return entry, data


def _snapshot_entry(key: str, pages: int) -> tuple[pack.Entry, bytes]:
    entry = pack.Entry(key, "inc-2", 1, "snapshot", PS, "0011223344556677", 0, 7, [(7, 5)], 6, 0, 0)
    return entry, b"\x07" * (PS * pages)


def _sample() -> tuple[bytes, list[tuple[pack.Entry, bytes]]]:
    items = [_frames_entry("user:1", 1, 3), _snapshot_entry("dm:alice:bob", 2), _frames_entry("org:ü", 4, 4)]
    return pack.encode("n1", 42, 123, items), items


def test_round_trip() -> None:
    blob, items = _sample()
    header, at = pack.decode_header(blob)
    assert (header.node, header.seq, header.created_ns) == ("n1", 42, 123)
    assert [e.key for e in header.entries] == ["user:1", "dm:alice:bob", "org:ü"]
    for entry, (_given, data) in zip(header.entries, items, strict=True):
        assert pack.entry_bytes(blob, at, entry) == data
    damaged = bytearray(blob)
    damaged[at + 5] ^= 1
    with pytest.raises(pack.PackError, match="digest"):
        pack.entry_bytes(bytes(damaged), at, header.entries[0])
    # the header alone, with the pack's size, is enough to plan range reads
    again, at2 = pack.decode_header(blob[:at], size=len(blob))
    assert again == header and at2 == at


def _tamper(header: pack.Header, **changes: object) -> bytes:
    entry = msgspec.structs.replace(header.entries[0], **changes)
    head = msgspec.json.encode(msgspec.structs.replace(header, entries=[entry, *header.entries[1:]]))
    return pack.MAGIC + len(head).to_bytes(4, "big") + head + b"\0" * 10_000


@pytest.mark.parametrize("changes", [
    {"key": "a\x00b"}, {"key": " user:1"}, {"key": ""}, {"incarnation": ""}, {"generation": -1},
    {"page_size": 1000}, {"page_size": 256}, {"offset": -1}, {"length": 10**9}, {"kind": "other"},
    {"salt": "zz112233aabbccdd"}, {"salt": "00"}, {"first": 0}, {"last": 0}, {"commits": []},
    {"commits": [(3, 1), (2, 1)]}, {"commits": [(9, 1)]}, {"commits": [(3, -1)]}, {"digest": "00"},
])
def test_hostile_entries_are_refused(changes: dict[str, object]) -> None:
    blob, _items = _sample()
    header, _at = pack.decode_header(blob)
    with pytest.raises(pack.PackError):
        pack.decode_header(_tamper(header, **changes))


def test_unknown_fields_versions_and_sizes_are_refused() -> None:
    blob, _items = _sample()
    header, at = pack.decode_header(blob)
    with pytest.raises(pack.PackError, match="magic"):
        pack.decode_header(b"SLPACK2\n" + blob[8:])
    with pytest.raises(pack.PackError):
        pack.decode_header(blob[:at - 1])
    with pytest.raises(pack.PackError):
        pack.decode_header(blob[:at], size=at - 1)
    with pytest.raises(pack.PackError, match="outside"):
        pack.decode_header(blob[:at], size=at + 10)  # entries reach past a pack this short
    head = blob[12:at].replace(b'"version":1', b'"version":2')
    with pytest.raises(pack.PackError, match="version"):
        pack.decode_header(pack.MAGIC + len(head).to_bytes(4, "big") + head + blob[at:])
    head = blob[12:at].replace(b'"seq":42', b'"seq":42,"extra":1')
    with pytest.raises(pack.PackError):
        pack.decode_header(pack.MAGIC + len(head).to_bytes(4, "big") + head + blob[at:])
    with pytest.raises(pack.PackError, match="limit"):
        pack.decode_header(pack.MAGIC + (pack.MAX_HEADER + 1).to_bytes(4, "big"))


@settings(max_examples=300, deadline=None)
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=4),
       cut=st.integers(0, 10**6))
def test_any_damage_is_a_pack_error_or_a_valid_pack(flips: list[tuple[int, int]], cut: int) -> None:
    blob, _items = _sample()
    data = bytearray(blob)
    for at, xor in flips:
        data[at % len(data)] ^= xor
    data = data[:cut % (len(data) + 1)]
    try:
        header, at = pack.decode_header(bytes(data))
    except pack.PackError:
        return
    for entry in header.entries:  # what passed is usable: every range lies inside the pack
        assert at + entry.offset + entry.length <= len(data)


def test_without_drops_every_entry_of_a_key_and_keeps_the_others_byte_for_byte() -> None:
    items = [_frames_entry("user:1", 1, 3), _snapshot_entry("dm:alice:bob", 2), _frames_entry("user:1", 4, 4),
             _frames_entry("org:ü", 4, 4)]
    blob = pack.encode("n1", 42, 123, items)
    new, removed = pack.without(blob, "user:1")
    assert new is not None and [e.key for e in removed] == ["user:1", "user:1"]
    header, at = pack.decode_header(new)
    assert (header.node, header.seq, header.created_ns) == ("n1", 42, 123)
    assert [e.key for e in header.entries] == ["dm:alice:bob", "org:ü"]
    assert [pack.entry_bytes(new, at, e) for e in header.entries] == [items[1][1], items[3][1]]
    assert b"\x01" * (24 + PS) not in new  # frame 1 of user:1 is gone
    assert pack.without(blob, "user:nobody") == (blob, [])
    alone = pack.encode("n1", 1, 1, [_frames_entry("user:1", 1, 2)])
    gone, removed = pack.without(alone, "user:1")
    assert gone is None and len(removed) == 1


def test_without_refuses_a_damaged_pack_rather_than_rewrite_it() -> None:
    blob, _items = _sample()
    _header, at = pack.decode_header(blob)
    damaged = bytearray(blob)
    damaged[-1] ^= 1  # inside org:ü's bytes, an entry the rewrite would keep
    with pytest.raises(pack.PackError, match="digest"):
        pack.without(bytes(damaged), "user:1")
