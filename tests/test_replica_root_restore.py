"""A whole root restored from its replica: nodes, accounts, the app's global tables and every tenant, at the
latest state or at a time; the CLI's `restore --from URL --root NEW`; damaged metadata snapshots refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers_cli import run_script
from helpers_procs import child_env
from helpers_s3 import TargetFactory

import shardlite
from shardlite.core import metasnap
from shardlite.services import replica_meta
from shardlite.services.replica_restore import format_time, materialize, restore_root_from_replica
from shardlite.services.replication import Replication

SCHEMA = {"user": ["CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)"],
          "org": ["CREATE TABLE members(name TEXT PRIMARY KEY)"]}


def _write(router: shardlite.Router, key: str, body: str) -> None:
    with router.transaction(key) as tx:
        if key.startswith("user:"):
            tx.execute("INSERT INTO notes(body) VALUES (?)", (body,))
        else:
            tx.execute("INSERT OR REPLACE INTO members(name) VALUES (?)", (body,))


def _dump(router: shardlite.Router, keys: list[str]) -> dict[str, list[tuple[object, ...]]]:
    out = {}
    for key in keys:
        sql = "SELECT id, body FROM notes ORDER BY id" if key.startswith("user:") else \
            "SELECT name FROM members ORDER BY name"
        out[key] = [tuple(r) for r in router.query(key, sql)]
    return out


def metasnap_times(factory: TargetFactory) -> list[int]:
    target = factory()
    return sorted(t for name, _ in target.list(metasnap.PREFIX) if (t := metasnap.time_of(name)) is not None)


def test_a_whole_root_comes_back_at_the_latest_state_and_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   make_replica_target: TargetFactory) -> None:
    monkeypatch.setattr(replica_meta, "DELTA_SHARE", 1e9)  # rounds follow each other at once: no wait for the cost
    url = make_replica_target.url()
    keys = ["user:a", "user:b", "org:x"]
    with shardlite.Router(tmp_path / "root", schema=SCHEMA, replicate=url, nodes=["n1", "n2"]) as router:
        replication = Replication(router._store)
        try:
            account = router.accounts.register("ann@example.com", password="correct horse battery")
            for key in keys:
                _write(router, key, "one")
            replication.run_round()
            first = _dump(router, keys)
            first_ns = max(n.replicator.staging.cursor(k).last_commit_ns  # type: ignore[union-attr]
                           for n in replication.nodes.values() for k in n.replicator.staging.keys())
            first_ns = max(first_ns, metasnap_times(make_replica_target)[-1])
            assert replication.meta_snapshots == 1
            for key in keys:
                _write(router, key, "two")
            _write(router, "user:new", "created later")
            replication.run_round()  # the metadata changed (user:new registered): a delta
            assert replication.meta.deltas >= 1
            latest = _dump(router, [*keys, "user:new"])
        finally:
            replication.close()
    target = make_replica_target()
    done = restore_root_from_replica(target, str(tmp_path / "back"))
    assert sorted(done.tenants) == sorted([*keys, "user:new"])
    with shardlite.Router(tmp_path / "back", schema=SCHEMA, create=False) as back:
        assert _dump(back, [*keys, "user:new"]) == latest
        assert sorted(n.name for n in back.nodes.list()) == ["n1", "n2"]
        assert back.accounts.authenticate("ann@example.com", "correct horse battery") == account
    at = restore_root_from_replica(target, str(tmp_path / "at"), at_ns=first_ns)
    assert sorted(at.tenants) == sorted(keys)  # user:new was created after that time
    with shardlite.Router(tmp_path / "at", schema=SCHEMA, create=False) as back:
        assert _dump(back, keys) == first


def test_the_cli_restores_a_root_and_refuses_what_it_cannot(tmp_path: Path,
                                                            make_replica_target: TargetFactory) -> None:
    url = make_replica_target.url()
    env = child_env()
    root = str(tmp_path / "root")
    with shardlite.Router(root, schema=SCHEMA, replicate=url) as router:
        _write(router, "user:a", "one")
        expected = _dump(router, ["user:a"])
    ran = run_script("--root", root, "replicate", "run", "--once", "--json", env=env)
    assert ran.returncode == 0, ran.stderr
    new = str(tmp_path / "new")
    ran = run_script("--root", new, "restore", "--from", url, "--json", env=env)
    assert ran.returncode == 0, ran.stderr
    with shardlite.Router(new, schema=SCHEMA, create=False) as back:
        assert _dump(back, ["user:a"]) == expected
    ran = run_script("--root", new, "restore", "--from", url, env=env)  # a live root: needs --key
    assert ran.returncode == 2 and "--key" in ran.stderr
    ran = run_script("--root", str(tmp_path / "other"), "restore", "--from", url, "--key", "user:a", env=env)
    assert ran.returncode == 2 and "whole root first" in ran.stderr
    ran = run_script("--root", new, "restore", "--from", url, "--key", "user:a", "--as", "user:copy",
                     "--at", "2026-01-01T00:00:00", env=env)
    assert ran.returncode == 2 and "time zone" in ran.stderr
    ran = run_script("--root", new, "restore", "--from", url, "--key", "user:a", "--as", "user:copy", "--json",
                     env=env)
    assert ran.returncode == 0, ran.stderr
    with shardlite.Router(new, schema=SCHEMA, create=False) as back:
        assert _dump(back, ["user:copy"]) == {"user:copy": expected["user:a"]}


def test_no_or_damaged_metadata_snapshot_is_refused(tmp_path: Path, make_replica_target: TargetFactory) -> None:
    target = make_replica_target()
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(shardlite.ConfigurationError, match="no metadata snapshot"):
        materialize(target, str(dest))
    target.put(metasnap.object_name(5), metasnap.encode(5, "/r", b"x" * 10, b"y")[:-1] + b"z")
    with pytest.raises(shardlite.ConfigurationError, match="damaged"):
        materialize(target, str(dest))
    assert format_time(5_000) == "1970-01-01T00:00:00.000005Z"
    assert os.listdir(dest) == []  # nothing written
