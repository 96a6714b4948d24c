"""shardlite.core.metadelta: a delta of real SQLite images applied to its base gives the later image; damaged
deltas, or a delta applied to another base, raise MetaDeltaError, nothing else."""

from __future__ import annotations

import apsw
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from shardlite.core import metadelta


def _image(rows: list[tuple[int, str]], page_size: int = 4096) -> tuple[apsw.Connection, bytes]:
    conn = apsw.Connection(":memory:")
    conn.execute(f"PRAGMA page_size={page_size}")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, body TEXT)")
    conn.executemany("INSERT INTO t VALUES (?, ?)", rows)
    return conn, conn.serialize("main")


def _delta(base: bytes, image: bytes, other_base: bytes = b"", other: bytes = b"") -> bytes:
    parts = []
    for old, new in ((base, image), (other_base, other)):
        size = metadelta.page_size_of(old)
        found = metadelta.diff(metadelta.page_digests(old, size), size, new)
        assert found is not None
        parts.append(metadelta.part_of(xxhash.xxh3_128_hexdigest(old), new, *found))
    return metadelta.encode(7, 6, "/root", "v1/meta/00000000000000000005.meta", parts)


def test_a_delta_holds_only_the_changed_pages_and_applies_to_its_base() -> None:
    conn, base = _image([(i, "x" * 200) for i in range(2000)])
    conn.execute("UPDATE t SET body = 'changed' WHERE id = 1500")
    conn.execute("INSERT INTO t VALUES (5000, 'new')")
    image = conn.serialize("main")
    blob = _delta(base, image)
    header, global_pages, app_pages = metadelta.decode(blob)
    pages = header.global_db.pages
    assert 1 <= len(pages) <= 6 and len(base) // 4096 > 100  # a few pages of a file of more than 100
    assert metadelta.apply(base, header.global_db, global_pages) == image
    assert metadelta.apply(b"", header.app_global_db, app_pages) == b""
    assert len(blob) < len(image) // 10


def test_a_shorter_or_longer_image_and_an_empty_base() -> None:
    conn, base = _image([(i, "y" * 500) for i in range(500)])
    conn.execute("DELETE FROM t")
    conn.execute("VACUUM")
    shorter = conn.serialize("main")
    assert len(shorter) < len(base)
    header, body, _ = metadelta.decode(_delta(base, shorter))
    assert metadelta.apply(base, header.global_db, body) == shorter
    header, body, _ = metadelta.decode(_delta(shorter, base))
    assert metadelta.apply(shorter, header.global_db, body) == base
    header, body, _ = metadelta.decode(_delta(b"", base))
    assert metadelta.apply(b"", header.global_db, body) == base


def test_another_base_or_page_size_is_refused() -> None:
    conn, base = _image([(1, "a")])
    conn.execute("INSERT INTO t VALUES (2, 'b')")
    header, body, _ = metadelta.decode(_delta(base, conn.serialize("main")))
    _, other = _image([(1, "z")])
    try:
        metadelta.apply(other, header.global_db, body)
    except metadelta.MetaDeltaError as exc:
        assert "another snapshot" in str(exc)
    else:
        raise AssertionError("a delta applied to another base was accepted")
    _, big_pages = _image([(1, "a")], page_size=8192)
    assert metadelta.diff(metadelta.page_digests(base, 4096), 4096, big_pages) is None


def test_names() -> None:
    name = metadelta.object_name(12, 3)
    assert metadelta.times_of(name) == (12, 3)
    assert metadelta.times_of("v1/metadelta/12-3.delta") is None
    assert metadelta.times_of("v1/meta/00000000000000000012.meta") is None
    assert metadelta.times_of(name + "x") is None
    assert metadelta.times_of(name + "\n") is None
    arabic = "".join(chr(0x660 + int(c)) for c in f"{12:020d}")  # digits to \\d, not to an object name
    assert metadelta.times_of(f"v1/metadelta/{arabic}-{3:020d}.delta") is None


_, _BASE = _image([(i, "b" * 100) for i in range(300)])
_CONN, _ = _image([(i, "b" * 100) for i in range(300)])
_CONN.execute("UPDATE t SET body = 'c' WHERE id % 50 = 0")
_NEW = _CONN.serialize("main")
_BLOB = _delta(_BASE, _NEW, b"", b"")


@settings(max_examples=300, deadline=None)
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=3),
       cut=st.integers(0, 10**6))
def test_damage_is_refused_or_harmless(flips: list[tuple[int, int]], cut: int) -> None:
    """Damaged bytes raise MetaDeltaError (when decoded or when applied), or (a change inside the header that
    keeps it valid, such as a letter of the root's name) still give exactly the image that was stored."""
    data = bytearray(_BLOB)
    for at, xor in flips:
        data[at % len(data)] ^= xor
    data = data[:max(1, cut % (len(data) + 1))]
    try:
        header, body, app_body = metadelta.decode(bytes(data))
        image = metadelta.apply(_BASE, header.global_db, body)
        app = metadelta.apply(b"", header.app_global_db, app_body)
    except metadelta.MetaDeltaError:
        return
    assert (image, app) == (_NEW, b"")


@settings(max_examples=200, deadline=None)
@given(fields=st.fixed_dictionaries({
    "length": st.integers(-5, 1 << 20), "page_size": st.integers(-1, 1 << 17),
    "pages": st.lists(st.integers(-3, 300), max_size=6), "digest": st.text(max_size=40)}))
def test_hostile_headers_are_refused(fields: dict[str, object]) -> None:
    """A header with any field out of range raises MetaDeltaError, never another error."""
    import msgspec

    part = {"base_digest": "0" * 32, "length": fields["length"], "digest": fields["digest"],
            "page_size": fields["page_size"], "pages": fields["pages"]}
    header = msgspec.json.encode({"version": 1, "created_ns": 1, "read_ns": 0, "root": "/r", "base": "b",
                                  "global_db": part, "app_global_db": part})
    data = metadelta.MAGIC + len(header).to_bytes(4, "big") + header + b"\0" * 4096
    try:
        got, body, _ = metadelta.decode(data)
    except metadelta.MetaDeltaError:
        return
    assert len(body) == len(got.global_db.pages) * got.global_db.page_size


def _refused(part: metadelta.PartDelta, body: bytes, words: str) -> None:
    try:
        metadelta.apply(_BASE, part, body)
    except metadelta.MetaDeltaError as exc:
        assert words in str(exc)
    else:
        raise AssertionError("a damaged delta was applied")


def test_a_length_past_the_base_without_its_pages_is_refused_before_anything_is_allocated() -> None:
    header, body, _ = metadelta.decode(_BLOB)
    digest = header.global_db.base_digest
    past = len(_BASE) // 4096 + (1 << 18)  # one page a gigabyte past the base's end
    for pages, length, body_of in ((header.global_db.pages, 1 << 40, body),
                                   ([past], (past + 1) * 4096, b"\0" * 4096)):
        _refused(metadelta.PartDelta(digest, length, header.global_db.digest, 4096, pages), body_of, "past")


def test_a_header_longer_than_its_pages_need_is_refused() -> None:
    import msgspec

    part = {"base_digest": "0" * 32, "length": 0, "digest": "0" * 32, "page_size": 4096, "pages": [0] * 100_000}
    header = msgspec.json.encode({"version": 1, "created_ns": 1, "read_ns": 0, "root": "/r", "base": "b",
                                  "global_db": part, "app_global_db": part})
    data = metadelta.MAGIC + len(header).to_bytes(4, "big") + header + b"\0" * 4096
    try:
        metadelta.decode(data)
    except metadelta.MetaDeltaError as exc:
        assert "longer than its pages" in str(exc)
    else:
        raise AssertionError("a header of 100,000 page numbers over one page was decoded")
