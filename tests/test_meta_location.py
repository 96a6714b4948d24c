"""Metadata locations and the root's record of them (``shardlite.meta.location``, ``shardlite.meta.record``):
parsing, comparing, never recording or printing a secret, and hostile record files refused."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardlite import ConfigurationError
from shardlite.meta.location import parse_location, recorded_location
from shardlite.meta.record import RECORD_NAME, read_record, write_record


def test_embedded_is_the_default() -> None:
    for text in (None, "", "sqlite", "  sqlite "):
        assert parse_location(text).embedded


def test_postgresql_urls_are_parsed_and_compared_by_database() -> None:
    a = parse_location("postgresql://alice:pw@127.0.0.1:5433/meta?sslmode=disable")
    b = parse_location("postgres://bob@127.0.0.1:5433/meta")
    c = parse_location("postgresql://alice@127.0.0.1:5433/other")
    assert a.backend == "postgresql" and not a.embedded
    assert a.printable == "postgresql://alice@127.0.0.1:5433/meta"
    assert a.same_store(b) and not a.same_store(c)
    assert "sslmode=disable" in a.recordable  # kept: a later connection needs it
    assert recorded_location(a.recordable).same_store(a)


@pytest.mark.parametrize("text", ["mysql://u@h/db", "sqlite:///x.db", "postgresql://h", "postgresql://a,b/db",
                                  "postgresql://h/d\nb", "postgresql://u@h/" + "d" * 5000, 42])
def test_other_locations_are_refused_with_what_is_accepted(text: object) -> None:
    with pytest.raises(ConfigurationError):
        parse_location(text)  # type: ignore[arg-type]


@given(st.text(alphabet=st.characters(codec="ascii", categories=["L", "N"]), min_size=8, max_size=40))
def test_a_password_is_never_recorded_printed_or_echoed(secret: str) -> None:
    password = f"ZQ{secret}"  # never a part of the URL's other words
    url = f"postgresql://alice:{password}@db.example:5432/meta?sslpassword={password}x"
    loc = parse_location(url)
    assert password in loc.dsn
    for shown in (loc.printable, loc.recordable, repr(loc), str(loc.identity)):
        assert password not in shown
    for refused in (f"mysql://alice:{password}@h/db", f"postgresql://alice:{password}%zz@h/db"):
        with pytest.raises(ConfigurationError) as info:
            parse_location(refused)
        assert password not in str(info.value) and password not in repr(info.value.__cause__)


def test_record_round_trip_private_and_first_writer_wins(tmp_path: Path) -> None:
    root = os.fspath(tmp_path)
    assert read_record(root) is None
    locs = [parse_location(f"postgresql://u:secret@127.0.0.1:{5000 + i}/db") for i in range(6)]
    results = []
    threads = [threading.Thread(target=lambda loc=loc: results.append(write_record(root, loc))) for loc in locs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({(r.location.identity, r.root_id) for r in results}) == 1  # every writer sees the one winner
    found = read_record(root)
    assert found is not None and found == results[0]
    path = tmp_path / RECORD_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "secret" not in path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == [RECORD_NAME]  # no temporary file left


@pytest.mark.parametrize("body", [
    b"\xff\xfe", b"not json", b"[]", b'{"format": 2, "backend": "postgresql"}',
    json.dumps({"format": 1, "backend": "postgresql", "location": "dbname=x", "root_id": "../etc"}).encode(),
    json.dumps({"format": 1, "backend": "postgresql", "location": "dbname=x password=s",
                "root_id": "a" * 32}).encode(),
    json.dumps({"format": 1, "backend": "postgresql", "location": "sqlite", "root_id": "a" * 32}).encode(),
    b" " * (70 * 1024),
])
def test_a_damaged_record_is_refused_naming_the_file(tmp_path: Path, body: bytes) -> None:
    (tmp_path / RECORD_NAME).write_bytes(body)
    with pytest.raises(ConfigurationError) as info:
        read_record(os.fspath(tmp_path))
    assert RECORD_NAME in str(info.value) and "s\n" not in str(info.value)


def test_a_symlinked_record_is_refused(tmp_path: Path) -> None:
    good = tmp_path / "elsewhere"
    good.mkdir()
    write_record(os.fspath(good), parse_location("postgresql://u@h/db"))
    (tmp_path / RECORD_NAME).symlink_to(good / RECORD_NAME)
    with pytest.raises(ConfigurationError):
        read_record(os.fspath(tmp_path))
