"""Conformance: the :class:`~shardlite.meta.store.MetaStore` contract as a whole, over every backend."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from helpers_meta import open_meta

from shardlite import ConfigurationError
from shardlite.meta import MetaStore


def test_open_creates_once_and_reopens(meta_backend: str, tmp_path: Path) -> None:
    root = os.fspath(tmp_path / "data")
    with pytest.raises(ConfigurationError):
        open_meta(meta_backend, root, create=False)
    first = open_meta(meta_backend, root)
    assert first.exists and not first.closed
    second = open_meta(meta_backend, root, create=False)
    assert second.exists
    second.close()
    first.close()
    assert first.closed
    first.close()  # idempotent


def test_many_openers_of_a_new_root_agree(meta_backend: str, tmp_path: Path) -> None:
    """Several openers of a new store at once: every one opens it, none fails, one schema results."""
    root = os.fspath(tmp_path / "data")
    opened: list[MetaStore] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def one() -> None:
        try:
            store = open_meta(meta_backend, root)
        except BaseException as exc:  # noqa: BLE001 - reported below
            with lock:
                failures.append(exc)
            return
        with lock:
            opened.append(store)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in opened:
        store.close()
    assert failures == [] and len(opened) == 8


def test_location_is_printable_and_names_no_secret(meta: MetaStore) -> None:
    assert meta.location.isprintable() and meta.location
    assert "password" not in meta.location.lower()
