"""``relay.status()`` counts pending work per node from the routes the store already holds: with the metadata
on PostgreSQL a catalog read is a round trip, and a status of N pending sources must not pay N of them (found
by ``benchmarks/meta.py``: the chat workload's drain polls ``status()``, issue 15's figures)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from shardlite import Router

SOURCES = 12


@pytest.mark.parametrize("backend", ["embedded", "postgresql"])
def test_status_reads_no_catalog_row_per_pending_source_it_has_routed(
        backend: str, request: pytest.FixtureRequest, make_router: Callable[..., Router],
        monkeypatch: pytest.MonkeyPatch) -> None:
    options = {"meta": request.getfixturevalue("pg_dsn")} if backend == "postgresql" else {}
    router = make_router(schema=["CREATE TABLE t(x)"], **options)
    if backend == "postgresql":  # the route hints' first connect drops every cached route: let it happen first
        listener = router._store.meta._hints  # type: ignore[attr-defined]
        assert listener is not None and listener.wait_connected(30)
    for k in range(SOURCES):
        with router.transaction(f"src:{k}") as tx:
            tx.emit("dst:0", "ev", {"k": k})
    catalog = router._store.meta.tenants
    looked_up: list[str] = []
    lookup = catalog.lookup

    def counting(key: str) -> object:
        looked_up.append(key)
        return lookup(key)

    monkeypatch.setattr(catalog, "lookup", counting)
    status = router.relay.status()
    assert status["pending"] == SOURCES
    assert sum(entry["sources"] for entry in status["nodes"].values()) == SOURCES
    placed = {router.locate(f"src:{k}").node for k in range(SOURCES)}  # counted after: these read the catalog
    assert {name for name, entry in status["nodes"].items() if entry["sources"]} == placed
    assert looked_up[:-SOURCES] == []  # only the locate() calls above read the catalog
