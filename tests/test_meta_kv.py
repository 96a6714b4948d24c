"""Conformance: the :class:`~shardlite.meta.kv.MetaKV` contract, over every metadata backend."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
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


def test_put_if_absent_keeps_the_first_value(meta: MetaStore) -> None:
    kv = meta.kv
    assert kv.put_if_absent("replicate", "file:///a") == "file:///a"
    assert kv.get("replicate") == "file:///a"
    assert kv.put_if_absent("replicate", "file:///a") == "file:///a"  # the same value again: stored
    assert kv.put_if_absent("replicate", "file:///b") == "file:///a"  # another one: the first stays
    assert kv.get("replicate") == "file:///a"
    assert kv.put_if_absent("empty", "") == ""  # an empty value is a value
    assert kv.put_if_absent("empty", "x") == ""
    with pytest.raises(ValueError):
        kv.put_if_absent("nul", "a\x00b")
    assert kv.get("nul") is None


_RACER = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
from helpers_meta import open_meta
store = open_meta(sys.argv[2], sys.argv[3], create=False)
go = sys.argv[4]
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.001)
print(store.kv.put_if_absent("replicate", sys.argv[5]), flush=True)
store.close()
"""


def test_put_if_absent_race_of_processes_has_one_winner(meta: MetaStore, meta_backend: str, root: str,
                                                        tmp_path: pathlib.Path) -> None:
    go = tmp_path / "go"
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    values = [f"file:///replica/{i}" for i in range(6)]
    children = [subprocess.Popen([sys.executable, "-c", _RACER, tests_dir, meta_backend, root, str(go), value],
                                 stdout=subprocess.PIPE, text=True) for value in values]
    for child in children:  # every child opened its store and waits for the signal
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
    go.touch()
    answers = []
    for child in children:
        out, _ = child.communicate(timeout=60)
        assert child.returncode == 0
        answers.append(out.strip())
    stored = meta.kv.get("replicate")
    assert stored in values
    assert answers == [stored] * len(values)  # every racer learned the one winner
