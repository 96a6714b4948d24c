"""A restore into a PostgreSQL database whose account space other roots share (issue 15): the space's
accounts are newer than a backup's and stay; only the accounts the space lacks come in; an account of the
backup whose e-mail key another account holds now refuses the restore, and nothing of it stays."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardlite import AuthenticationFailed, Router, ShardliteError
from shardlite.meta.choose import ENV_VAR
from shardlite.services.restore import restore_root

SCHEMA = ["CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)"]
KEYS = [f"b:{i}" for i in range(3)]
OLD, NEW = "old password 1234", "new password 5678"


class Fleet:
    """Roots ``a`` (node a1) and ``b`` (node b1) on one database; ``b`` is backed up, then the fleet goes on
    through ``a``: the account's profile and password change, its session is revoked, another registers."""

    def __init__(self, tmp_path: Path, dsn: str) -> None:
        self.a = Router(tmp_path / "a", meta=dsn, nodes=["a1"], schema=SCHEMA)
        self.b_root, self.backup = tmp_path / "b", tmp_path / "backup"
        with Router(self.b_root, meta=dsn, nodes=["b1"], schema=SCHEMA) as b:
            self.uid = b.accounts.register("u@x.io", password=OLD, name="then")
            self.token = b.sessions.create(self.uid, ttl=3600)
            self.gone = b.accounts.register("gone@x.io", name="deleted later")
            for key in KEYS:
                with b.transaction(key) as tx:
                    tx.execute("INSERT INTO t(v) VALUES (?)", (key,))
            b.backup(self.backup)
        self.a.accounts.update_profile(self.uid, name="now")
        self.a.accounts.set_password(self.uid, NEW)
        self.a.sessions.revoke(self.token)
        self.other = self.a.accounts.register("w@x.io")

    def lose_b(self, dsn: str) -> None:
        """Root b's disk is gone; the operator removes its rows from the shared database."""
        with Router(self.b_root, meta=dsn) as b:
            b._store.meta.nodes.forget_all()
        shutil.rmtree(self.b_root)


@pytest.fixture
def fleet(tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    monkeypatch.setenv(ENV_VAR, pg_dsn)  # the restored root's metadata goes to the same database
    made = Fleet(tmp_path, pg_dsn)
    yield made
    made.a.close()


def test_the_spaces_accounts_stay_and_the_tenants_come_back(fleet: Fleet, tmp_path: Path, pg_dsn: str) -> None:
    fleet.a.accounts.delete(fleet.gone)
    fleet.lose_b(pg_dsn)
    done = restore_root(os.fspath(fleet.backup), os.fspath(tmp_path / "b2"))
    # the database held u@x.io (kept); gone@x.io was deleted since, so it comes in again: an account space
    # cannot tell a deleted account from one it never had (documented under "Restoring")
    assert done.globals["_shardlite_accounts_kept"] == 1 and done.globals["_shardlite_accounts"] == 1
    assert sorted(done.tenants) == KEYS
    with Router(tmp_path / "b2", schema=SCHEMA) as b2:
        assert b2.accounts.authenticate("u@x.io", NEW) == fleet.uid
        with pytest.raises(AuthenticationFailed):
            b2.accounts.authenticate("u@x.io", OLD)
        account = b2.accounts.get(fleet.uid)
        assert account is not None and account.profile["name"] == "now"
        assert b2.sessions.resolve(fleet.token) is None  # revoked after the backup: stays revoked
        assert b2.accounts.get(fleet.other) is not None
        assert {key: b2.query(key, "SELECT v FROM t") for key in KEYS} == {key: [(key,)] for key in KEYS}
    assert fleet.a.accounts.authenticate("u@x.io", NEW) == fleet.uid


def test_an_email_key_held_by_another_account_refuses_the_restore(fleet: Fleet, tmp_path: Path,
                                                                   pg_dsn: str) -> None:
    fleet.a.accounts.delete(fleet.uid)
    again = fleet.a.accounts.register("U@x.io", password=NEW)  # the same e-mail key, a new id
    fleet.lose_b(pg_dsn)
    with pytest.raises(ShardliteError, match=f"e-mail key of account {again}.*nothing was imported"):
        restore_root(os.fspath(fleet.backup), os.fspath(tmp_path / "b2"))
    assert not (tmp_path / "b2").exists()
    assert fleet.a.accounts.authenticate("u@x.io", NEW) == again
    assert fleet.a.accounts.get(fleet.uid) is None
