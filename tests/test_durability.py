"""Rule 13: durability is explicit. ``synchronous`` reaches every connection the router opens (tenant and
global DB), NORMAL is the default, and an unknown level is refused before anything is created."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardlite import ConfigurationError, Router

LEVELS = {"NORMAL": 1, "FULL": 2, "EXTRA": 3}


@pytest.mark.parametrize("level", [None, "NORMAL", "FULL", "EXTRA", "full"])
def test_synchronous_reaches_every_connection(tmp_path: Path, level: str | None) -> None:
    kwargs = {} if level is None else {"synchronous": level}
    expected = LEVELS[(level or "NORMAL").upper()]
    with Router(tmp_path / "data", schema=["CREATE TABLE t(x)"], **kwargs) as router:
        with router.transaction("k:1") as tx:
            assert tx.execute("PRAGMA synchronous").fetchall() == [(expected,)]
            assert tx.execute("PRAGMA journal_mode").fetchall() == [("wal",)]
        assert router.query("k:1", "PRAGMA synchronous") == [(expected,)]
        assert router._store.meta.globaldb.writer.execute("PRAGMA synchronous").fetchall() == [(expected,)]
        assert router.settings.synchronous == (level or "NORMAL").upper()


@pytest.mark.parametrize("level", ["OFF", "0", "fast", ""])
def test_unknown_levels_are_refused_and_create_nothing(tmp_path: Path, level: str) -> None:
    with pytest.raises(ConfigurationError):
        Router(tmp_path / "data", synchronous=level)
    assert not (tmp_path / "data").exists()
