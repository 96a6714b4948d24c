"""Storage failures are shardlite errors that name the tenant and the file and say what to do; the pool
recovers by itself; new tenants are not placed on a full node (issue 13, item 14).

Before: a full disk or a read-only file surfaced as a bare apsw.FullError / apsw.ReadOnlyError / OSError
naming neither; a tenant first opened read-only kept its read-only connection after the permissions were
fixed (writes failed until a restart). Real small file systems (tmpfs) throughout.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers_fs import fill, remount, tmpfs

from shardlite import Router, StorageError, StorageFull, StorageReadOnly
from shardlite.core.ring import Ring

SCHEMA = ["CREATE TABLE t(id INTEGER PRIMARY KEY, pad BLOB)"]


def _small_node_router(make_router: Callable[..., Router], mount: Path, **kwargs: object) -> Router:
    """A router whose only active node is on the small file system."""
    router = make_router(schema=SCHEMA, **kwargs)
    router.nodes.add("small", path=os.fspath(mount / "node"))
    router.nodes.drain("n1")
    return router


def test_a_full_disk_names_the_tenant_and_the_file_and_writes_resume_after(
        make_router: Callable[..., Router], tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "4m") as mount:
        router = _small_node_router(make_router, mount)
        with router.transaction("org:1") as tx:
            tx.execute("INSERT INTO t(pad) VALUES (randomblob(1000))")
        path = router.locate("org:1").path
        assert path is not None and path.startswith(os.fspath(mount))
        filler = fill(mount, 200_000)
        with pytest.raises(StorageFull) as caught:
            for _ in range(100):
                with router.transaction("org:1") as tx:
                    tx.execute("INSERT INTO t(pad) VALUES (randomblob(50000))")
        message = str(caught.value)
        assert "'org:1'" in message and path in message and "nothing of this transaction was committed" in message
        assert "\n" not in message
        rows = router.query("org:1", "SELECT count(*) FROM t")[0][0]
        filler.unlink()  # space again: the same router writes again
        with router.transaction("org:1") as tx:
            tx.execute("INSERT INTO t(pad) VALUES (randomblob(1000))")
        assert router.query("org:1", "SELECT count(*) FROM t") == [(rows + 1,)]
        router.close()


def test_new_tenants_are_not_placed_on_a_full_node(make_router: Callable[..., Router], tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "4m") as mount:
        router = make_router(schema=SCHEMA)
        router.nodes.add("small", path=os.fspath(mount / "node"))
        ring = Ring({"n1": 1, "small": 1})
        keys = [f"org:{i}" for i in range(40)]
        proposed_small = [k for k in keys if ring.node_for(k) == "small"]
        assert proposed_small, "the ring proposes the small node for some of these keys"
        filler = fill(mount, 64 * 1024)
        for key in keys:
            with router.transaction(key) as tx:
                tx.execute("INSERT INTO t(pad) VALUES (x'00')")
        assert {router.locate(k).node for k in keys} == {"n1"}
        filler.unlink()
        later = [f"org:later:{i}" for i in range(40)]
        for key in later:
            with router.transaction(key) as tx:
                tx.execute("INSERT INTO t(pad) VALUES (x'00')")
        assert "small" in {router.locate(k).node for k in later}  # room again: the ring's choice stands
        router.close()


def test_every_node_full_is_a_clear_error(make_router: Callable[..., Router], tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "4m") as mount:
        router = _small_node_router(make_router, mount)
        fill(mount, 16 * 1024)
        with pytest.raises(StorageFull, match="every active node's disk is full"):
            with router.transaction("org:new") as tx:
                tx.execute("INSERT INTO t(pad) VALUES (x'00')")
        assert not router.exists("org:new")
        router.close()


def test_a_tenant_first_opened_read_only_is_written_again_once_its_disk_is(
        make_router: Callable[..., Router], tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "4m") as mount:
        first = _small_node_router(make_router, mount)
        with first.transaction("org:1") as tx:
            tx.execute("INSERT INTO t(pad) VALUES (x'01')")
        path = first.locate("org:1").path
        first.close()
        remount(mount, "ro")
        try:
            router = make_router(schema=SCHEMA)
            with pytest.raises(StorageError) as caught:
                with router.transaction("org:1") as tx:
                    tx.execute("INSERT INTO t(pad) VALUES (x'02')")
            assert isinstance(caught.value, (StorageReadOnly, StorageError))
            assert "'org:1'" in str(caught.value) and path is not None and path in str(caught.value)
        finally:
            remount(mount, "rw")
        with router.transaction("org:1") as tx:  # the same router: no read-only connection was kept
            tx.execute("INSERT INTO t(pad) VALUES (x'03')")
        assert router.query("org:1", "SELECT count(*) FROM t") == [(2,)]
        router.close()
