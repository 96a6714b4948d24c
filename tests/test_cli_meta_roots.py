"""`shardlite meta roots` and `shardlite meta forget` (issue 15: several roots on one PostgreSQL database):
a lost root's rows keep its node names and tenant keys taken, so its backup cannot be restored into a new
root there until they go. Forgetting removes that root's rows only, is refused for a root alive on this
machine, and asks for --yes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers_routers import run_cli

from shardlite import Router, ShardliteError
from shardlite.meta.choose import ENV_VAR
from shardlite.services.restore import restore_root

SCHEMA = ["CREATE TABLE t(v TEXT)"]


def _root(path: Path, dsn: str, node: str, keys: list[str]) -> str:
    with Router(path, meta=dsn, nodes=[node], schema=SCHEMA) as router:
        for key in keys:
            with router.transaction(key) as tx:
                tx.execute("INSERT INTO t VALUES (?)", (key,))
        return router._store.meta.root_id  # type: ignore[attr-defined, no-any-return]


def test_a_lost_root_is_forgotten_then_its_backup_restores_on_the_same_database(
        tmp_path: Path, pg_dsn: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, pg_dsn)  # reopening a root: its record never holds the password
    keep = _root(tmp_path / "keep", pg_dsn, "k1", ["k:1", "k:2"])
    lost = _root(tmp_path / "lost", pg_dsn, "l1", ["l:1", "l:2", "l:3"])
    with Router(tmp_path / "lost") as router:
        router.backup(tmp_path / "backup")
    code, out, _ = run_cli(capsys, "meta", "roots", "--meta", pg_dsn, "--json")
    listed = {row["id"]: row for row in json.loads(out)["roots"]}
    assert code == 0 and listed[keep]["nodes"] == ["k1"] and listed[lost]["tenants"] == 3
    assert listed[lost]["label"] == os.fspath(tmp_path / "lost")
    assert "password" not in out and "secret" not in out

    code, _, err = run_cli(capsys, "meta", "forget", lost, "--meta", pg_dsn, "--yes")
    assert code == 2 and "looks alive" in err  # its directory is here, with its meta.json
    shutil.rmtree(tmp_path / "lost")  # the machine is gone
    with pytest.raises(ShardliteError, match="belongs to another root"):
        restore_root(os.fspath(tmp_path / "backup"), os.fspath(tmp_path / "again"))

    code, _, err = run_cli(capsys, "meta", "forget", lost)  # the database from SHARDLITE_META; no --yes
    assert code == 1 and "would forget" in err and "3 tenant rows" in err
    code, out, _ = run_cli(capsys, "meta", "forget", lost, "--yes", "--json")
    assert code == 0 and json.loads(out)["forgotten"]["id"] == lost
    code, out, _ = run_cli(capsys, "meta", "roots", "--json")
    assert [row["id"] for row in json.loads(out)["roots"]] == [keep]

    done = restore_root(os.fspath(tmp_path / "backup"), os.fspath(tmp_path / "again"))
    assert sorted(done.tenants) == ["l:1", "l:2", "l:3"]
    with Router(tmp_path / "again") as router:
        assert router.query("l:2", "SELECT v FROM t") == [("l:2",)]
    with Router(tmp_path / "keep") as router:
        assert sorted(router.tenants()) == ["k:1", "k:2"]
        assert router.query("k:1", "SELECT v FROM t") == [("k:1",)]


def test_forget_refuses_what_it_cannot_do(tmp_path: Path, pg_dsn: str, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    code, _, err = run_cli(capsys, "meta", "roots")
    assert code != 0 and "--meta" in err
    code, _, err = run_cli(capsys, "meta", "forget", "nope", "--meta", pg_dsn, "--yes")
    assert code != 0 and "holds no root 'nope'" in err
    code, _, err = run_cli(capsys, "meta", "roots", "--meta", "sqlite:///x")
    assert code != 0 and len(err.strip().splitlines()) == 1
