"""Conformance: the :class:`~shardlite.meta.kv.MetaKV` contract, over every metadata backend."""

from __future__ import annotations

import threading

import pytest
from helpers_meta import open_meta

from shardlite.meta import MetaStore

#: The parts of the metadata store these tests exercise (helpers_meta.missing_parts).
META_PART = "kv"


def test_get_put_replace(meta: MetaStore) -> None:
    kv = meta.kv
    assert kv.get("relay_last_error") is None
    kv.put("relay_last_error", '{"at": 1}')
    assert kv.get("relay_last_error") == '{"at": 1}'
    kv.put("relay_last_error", "")  # replaced (an empty value is a value)
    assert kv.get("relay_last_error") == ""
    kv.put("naïve ☃", "größer \U0001f600")
    assert kv.get("naïve ☃") == "größer \U0001f600"
    assert kv.get("naive ☃") is None


def test_a_value_is_durable_and_seen_by_another_opener(meta: MetaStore, meta_backend: str, root: str) -> None:
    meta.kv.put("k", "v1")
    other = open_meta(meta_backend, root, create=False)
    try:
        assert other.kv.get("k") == "v1"
        other.kv.put("k", "v2")
    finally:
        other.close()
    assert meta.kv.get("k") == "v2"


def test_nul_is_refused_and_nothing_is_written(meta: MetaStore) -> None:
    with pytest.raises(ValueError):
        meta.kv.put("k", "a\x00b")
    with pytest.raises(ValueError):
        meta.kv.put("k\x00", "v")
    assert meta.kv.get("k") is None


def test_concurrent_writers_leave_one_of_their_values(meta: MetaStore) -> None:
    written = [f"value {i}" for i in range(8)]
    start = threading.Barrier(len(written))

    def writer(value: str) -> None:
        start.wait()
        for _ in range(10):
            meta.kv.put("shared", value)

    threads = [threading.Thread(target=writer, args=(v,)) for v in written]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert meta.kv.get("shared") in written
    meta.kv.put("shared", "final")  # the last writer wins
    assert meta.kv.get("shared") == "final"
