"""A replica object that fails its checks (a pack whose header or bytes were damaged, truncated or crafted)
never makes a restore fail for tenants it does not hold without saying which object and what to do: by
default a restore that read it restores nothing and raises ReplicaDamaged naming it; with skip_damaged
(``--skip-damaged``) the restore uses every other object and lists the one it left out."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from helpers_routers import run_cli
from helpers_s3 import TargetFactory

import shardlite
from shardlite.replica.target import ReplicaTarget
from shardlite.services import replica_index, replica_meta, replica_read, replica_retention
from shardlite.services.replica_restore import restore_root_from_replica, restore_tenant
from shardlite.services.replication import Replication

SCHEMA = {"user": ["CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)"]}


def _write(router: shardlite.Router, key: str, body: str) -> None:
    with router.transaction(key) as tx:
        tx.execute("INSERT INTO notes(body) VALUES (?)", (body,))


def _rows(router: shardlite.Router, key: str) -> list[tuple[object, ...]]:
    return [tuple(r) for r in router.query(key, "SELECT id, body FROM notes ORDER BY id")]


def _damage(target: ReplicaTarget, name: str, at: int) -> None:
    data = bytearray(target.get(name))
    data[at % len(data)] ^= 0xFF
    target.put(name, bytes(data))


@pytest.fixture
def replicated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_replica_target: TargetFactory) -> tuple[
        str, dict[str, list[tuple[object, ...]]], str]:
    """A root replicated in three rounds: user:a and user:c in the first and third, user:b in all three; the
    second pack, holding only user:b's commit, is damaged afterwards. Returns (URL, the tenants' rows, that
    pack)."""
    monkeypatch.setattr(replica_meta, "DELTA_SHARE", 1e9)
    url = make_replica_target.url()
    with shardlite.Router(tmp_path / "root", schema=SCHEMA, replicate=url) as router:
        replication = Replication(router._store)
        try:
            for round_ in range(3):
                for key in ("user:a", "user:b", "user:c"):
                    if key == "user:b" or round_ != 1:
                        _write(router, key, f"{key} {round_}")
                replication.run_round()
        finally:
            replication.close()
        rows = {key: _rows(router, key) for key in ("user:a", "user:b", "user:c")}
    target = make_replica_target()
    packs = [name for name, _size in replica_read.list_packs(target)]
    assert len(packs) == 3
    header = replica_read.read_header(target, packs[1], target.head(packs[1]) or 0).header
    assert {e.key for e in header.entries} == {"user:b"}
    return url, rows, packs[1]


def test_a_one_tenant_restore_names_a_damaged_header_and_skips_it_when_asked(
        tmp_path: Path, replicated: tuple[str, dict[str, list[tuple[object, ...]]], str],
        make_replica_target: TargetFactory) -> None:
    url, rows, bad = replicated
    target = make_replica_target()
    _damage(target, bad, 30)
    with shardlite.Router(tmp_path / "live", schema=SCHEMA) as live:
        # user:a's captures are all in other packs, but no key index says so yet: every header is read
        with pytest.raises(shardlite.ReplicaDamaged, match="--skip-damaged") as caught:
            restore_tenant(live._store, target, "user:a")
        assert [name for name, _reason in caught.value.objects] == [bad]
        assert repr(bad) in str(caught.value) and "Nothing was restored" in str(caught.value)
        assert "user:a" not in live.tenants()
        done = restore_tenant(live._store, target, "user:a", skip_damaged=True)
        assert _rows(live, "user:a") == rows["user:a"]
        assert [d["object"] for d in done["damaged"]] == [bad] and "header" in done["damaged"][0]["error"]
        # user:b's second commit was only in it: its history has a hole, refused as such
        with pytest.raises(shardlite.ShardliteError, match="cannot be replayed"):
            restore_tenant(live._store, target, "user:b", skip_damaged=True)


def test_damaged_bytes_of_a_capture_fail_only_the_restore_of_its_tenant(
        tmp_path: Path, replicated: tuple[str, dict[str, list[tuple[object, ...]]], str],
        make_replica_target: TargetFactory) -> None:
    url, rows, bad = replicated
    target = make_replica_target()
    info = replica_read.read_header(target, bad, target.head(bad) or 0)
    _damage(target, bad, info.payload_at + 5)  # user:b's capture
    with shardlite.Router(tmp_path / "live", schema=SCHEMA) as live:
        done = restore_tenant(live._store, target, "user:a")  # reads only the header of that pack
        assert _rows(live, "user:a") == rows["user:a"] and done["damaged"] == []
        with pytest.raises(shardlite.ReplicaDamaged) as caught:
            restore_tenant(live._store, target, "user:b")
        assert [name for name, _reason in caught.value.objects] == [bad]
        assert "user:b" not in live.tenants()
        with pytest.raises(shardlite.ShardliteError, match="cannot be replayed"):
            restore_tenant(live._store, target, "user:b", skip_damaged=True)


def test_a_whole_root_restore_refuses_before_writing_then_restores_every_other_object(
        tmp_path: Path, replicated: tuple[str, dict[str, list[tuple[object, ...]]], str],
        make_replica_target: TargetFactory) -> None:
    url, rows, bad = replicated
    target = make_replica_target()
    _damage(target, bad, 30)
    with pytest.raises(shardlite.ReplicaDamaged) as caught:
        restore_root_from_replica(target, str(tmp_path / "back"))
    assert [name for name, _reason in caught.value.objects] == [bad]
    assert not os.path.exists(tmp_path / "back") or not os.listdir(tmp_path / "back")
    done = restore_root_from_replica(target, str(tmp_path / "back"), skip_damaged=True)
    assert [d["object"] for d in done.damaged] == [bad]
    # user:b's second commit was only in it: its history has a hole, so it is left out and said so
    assert [d["key"] for d in done.left_out] == ["user:b"] and "cannot be replayed" in done.left_out[0]["error"]
    assert sorted(done.tenants) == ["user:a", "user:c"]
    first = replica_read.list_packs(target)[0]
    [entry] = [e for e in replica_read.read_header(target, *first).header.entries if e.key == "user:b"]
    with shardlite.Router(tmp_path / "back", schema=SCHEMA, create=False) as back:
        assert _rows(back, "user:a") == rows["user:a"]
        # the way forward the warning names: that tenant alone, at a time before the hole
        restore_tenant(back._store, target, "user:b", at_ns=entry.commits[-1][1], skip_damaged=True)
        assert _rows(back, "user:b") == rows["user:b"][:1]


def test_the_cli_says_what_to_do_and_warns_for_what_it_left_out(
        tmp_path: Path, replicated: tuple[str, dict[str, list[tuple[object, ...]]], str],
        make_replica_target: TargetFactory, capsys: pytest.CaptureFixture[str]) -> None:
    url, rows, bad = replicated
    _damage(make_replica_target(), bad, 30)
    code, _out, err = run_cli(capsys, "restore", "--from", url, "--root", str(tmp_path / "back"))
    assert code != 0 and "--skip-damaged" in err and bad in err
    code, _out, err = run_cli(capsys, "restore", "--from", url, "--root", str(tmp_path / "back"), "--skip-damaged")
    assert code == 0, err
    assert f"warning: left out {bad}" in err and "commits only it held are missing" in err
    assert "warning: left out tenant user:b" in err
    with shardlite.Router(tmp_path / "back", schema=SCHEMA, create=False) as back:
        assert _rows(back, "user:a") == rows["user:a"]
    code, _out, err = run_cli(capsys, "restore", str(tmp_path / "nothing"), "--root", str(tmp_path / "r2"),
                              "--skip-damaged")
    assert code != 0 and "applies to a replica" in err


def test_a_compaction_keeps_a_damaged_pack_and_goes_on_without_expiring_anything(
        tmp_path: Path, replicated: tuple[str, dict[str, list[tuple[object, ...]]], str],
        make_replica_target: TargetFactory) -> None:
    """A damaged header used to stop every compaction of the root. Now the pack is kept and reported, the
    rest is compacted, and no history expires while it is there (it may hold any key's drop record or
    captures): a tenant dropped more than its window ago stays restorable."""
    url, rows, bad = replicated
    target = make_replica_target()
    with shardlite.Router(tmp_path / "root", schema=SCHEMA, create=False) as router:
        router.drop("user:a")
        replication = Replication(router._store)
        try:
            replication.run_round()  # ships the drop record
        finally:
            replication.close()
        _damage(target, bad, 30)
        later = time.time_ns() + 8 * 86_400 * 10**9  # past the 7-day window: user:a's drop is older than it
        report = replica_retention.compact(router._store, target, now_ns=later)
    assert list(report.damaged) == [bad] and "header" in report.damaged[bad]
    # the compaction went through (user:b's history has a hole: kept whole, said so; nothing expired)
    assert report.pinned == ["user:b"] and report.index
    horizon = replica_index.read_horizon(target)
    assert horizon is not None and horizon.expired == []
    assert bad in [name for name, _size in replica_read.list_packs(target)]
    with shardlite.Router(tmp_path / "live", schema=SCHEMA) as live:
        with pytest.raises(shardlite.ReplicaDamaged):  # the key index lists it as unreadable: every restore reads it
            restore_tenant(live._store, target, "user:a")
        done = restore_tenant(live._store, target, "user:a", skip_damaged=True)  # not expired
        assert _rows(live, "user:a") == rows["user:a"] and [d["object"] for d in done["damaged"]] == [bad]
        restore_tenant(live._store, target, "user:c", skip_damaged=True)
        assert _rows(live, "user:c") == rows["user:c"]
