"""The public surface (brief §4, §9): ``shardlite.__all__`` is pinned, and the contract's names exist."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from typing import Any

import apsw

import shardlite

# Pinned from the package as it is: adding or removing a public name must be a deliberate change here.
EXPECTED_ALL = [
    "Router",
    "AsyncRouter",
    "Transaction",
    "AsyncTransaction",
    "TransactionClosed",
    "Location",
    "Settings",
    "pair_key",
    "canonical",
    "MAX_KEY_BYTES",
    "ShardliteError",
    "ConfigurationError",
    "InvalidKey",
    "UnknownTenant",
    "TenantMoving",
    "Busy",
    "PayloadTooLarge",
    "EmailTaken",
    "InvalidEmail",
    "AuthenticationFailed",
    "InvalidPassword",
    "UnknownAccount",
    "StatementNotAllowed",
    "IdentityMismatch",
    "UnsupportedSQLite",
    "ManifestInvalid",
    "BackupFailed",
    "DirectoryModeWarning",
    "QueryTimeout",
    "ResultTooLarge",
    "MoveFailed",
    "NodeFull",
    "StorageError",
    "StorageFull",
    "StorageReadOnly",
    "MetaConflict",
    "MetaUnavailable",
    "ReplicaError",
    "ReplicaDamaged",
    "ReplicaUnavailable",
    "ReplicationUnavailable",
    "TenantErased",
    "__version__",
]

BRIEF_ERRORS = ["ConfigurationError", "InvalidKey", "UnknownTenant", "TenantMoving", "Busy", "PayloadTooLarge",
                "EmailTaken", "InvalidEmail", "AuthenticationFailed"]


def test_all_is_pinned() -> None:
    assert shardlite.__all__ == EXPECTED_ALL
    assert len(set(shardlite.__all__)) == len(shardlite.__all__)


def test_every_name_in_all_exists() -> None:
    for name in shardlite.__all__:
        assert hasattr(shardlite, name), name
    assert isinstance(shardlite.__version__, str) and shardlite.__version__


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, Any] = {}
    exec("from shardlite import *", namespace)
    assert {k for k in namespace if k != "__builtins__"} == set(EXPECTED_ALL)


def test_brief_contract_imports() -> None:
    from shardlite import AsyncRouter, Router, pair_key  # noqa: F401  (the brief's first line)

    assert pair_key("dm", "bob", "alice") == "dm:alice:bob"


def test_error_tree() -> None:
    base = shardlite.ShardliteError
    assert issubclass(base, Exception)
    for name in BRIEF_ERRORS + ["StatementNotAllowed", "IdentityMismatch", "UnsupportedSQLite", "TransactionClosed",
                                "InvalidPassword", "UnknownAccount", "ManifestInvalid", "BackupFailed",
                                "QueryTimeout", "ResultTooLarge", "MoveFailed", "NodeFull",
                                "StorageError", "StorageFull", "StorageReadOnly", "ReplicaError",
                                "ReplicaUnavailable", "ReplicationUnavailable", "TenantErased"]:
        cls = getattr(shardlite, name)
        assert inspect.isclass(cls) and issubclass(cls, base), name
    # a refusal is also what APSW code already catches for "not authorized"
    assert issubclass(shardlite.StatementNotAllowed, apsw.AuthError)
    assert issubclass(shardlite.UnknownTenant, LookupError)
    assert issubclass(shardlite.InvalidKey, ValueError)
    assert issubclass(shardlite.ManifestInvalid, shardlite.ConfigurationError)
    assert issubclass(shardlite.DirectoryModeWarning, UserWarning)
    assert issubclass(shardlite.ReplicaUnavailable, shardlite.ReplicaError)
    # committed locally, only not confirmed: never one of the errors Router.run retries (shardlite.core.retrying)
    assert not issubclass(shardlite.ReplicationUnavailable, (shardlite.Busy, shardlite.TenantMoving))
    # erased on purpose: final, neither retried nor taken for "not confirmed yet"
    assert not issubclass(shardlite.TenantErased, (shardlite.Busy, shardlite.TenantMoving,
                                                   shardlite.ReplicationUnavailable))


def test_location_fields() -> None:
    names = {f.name for f in dataclasses.fields(shardlite.Location)}
    assert {"node", "path", "epoch", "state"} <= names


def test_router_contract_names(make_router: Any) -> None:
    router = make_router()
    for name in ("transaction", "query", "locate", "tenants", "handler", "run", "drop", "exists", "migrate_all",
                 "status", "close"):
        assert callable(getattr(router, name)), name
    for name in ("start", "stop"):
        assert callable(getattr(router.relay, name)), f"relay.{name}"
    assert callable(router.accounts.register)
    for name in ("create", "resolve", "revoke"):
        assert callable(getattr(router.sessions, name)), f"sessions.{name}"
    assert hasattr(router, "__enter__") and hasattr(router, "__exit__")
    params = inspect.signature(shardlite.Router).parameters
    for name in ("root", "nodes", "schema", "synchronous", "busy_timeout_ms", "max_open", "relay"):
        assert name in params, name


def test_transaction_contract_names() -> None:
    for name in ("execute", "executemany", "emit", "lastrowid", "changes"):
        assert hasattr(shardlite.Transaction, name), name
    for name in ("execute", "emit"):
        assert inspect.iscoroutinefunction(getattr(shardlite.AsyncTransaction, name)), name


def _public(obj: object) -> set[str]:
    return {name for name in dir(obj) if not name.startswith("_")}


def _is_data(owner: object, name: str) -> bool:
    """A setting (an instance attribute, a function such as ``clock`` included) or a property, not a method."""
    if name in vars(owner):
        return True
    attr = inspect.getattr_static(owner, name)
    return isinstance(attr, property) or not callable(getattr(owner, name))


def _awaitable(fn: object) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)


def _params(fn: Any) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self" and not p.startswith("_")]


def _parity_gaps(sync: object, twin: object, prefix: str, *, signatures: bool) -> list[str]:
    """What ``twin`` lacks of ``sync``'s public names: a method must be a coroutine (or async generator)
    function of the same parameters unless NOT_AWAITABLE lists it; a setting must be on ``twin`` or on
    its ``sync`` object."""
    from shardlite.front.aio import NOT_AWAITABLE

    gaps = []
    for name in sorted(_public(sync)):
        label = prefix + name
        if _is_data(sync, name):
            if not hasattr(twin, name) and type(getattr(twin, "sync", None)) is not type(sync):
                gaps.append(f"{label}: setting neither on the twin nor on its .sync")
            continue
        if label in NOT_AWAITABLE:
            continue
        mine = getattr(twin, name, None)
        if mine is None or not _awaitable(mine):
            gaps.append(f"{label}: missing or not awaitable")
        elif signatures and _params(mine) != _params(getattr(sync, name)):
            gaps.append(f"{label}: parameters {_params(mine)} != {_params(getattr(sync, name))}")
    return gaps


def test_async_router_has_every_public_name_of_router(root: str) -> None:
    """Derived from Router itself: every public method of Router and of each of its parts (accounts,
    sessions, globals, relay, nodes, rebalance) is awaitable on AsyncRouter under the same name and
    parameters, or NOT_AWAITABLE says why not; and NOT_AWAITABLE names nothing that does not exist."""
    from shardlite.front.aio import NOT_AWAITABLE

    router = shardlite.Router(root)

    async def gaps() -> list[str]:
        async with shardlite.AsyncRouter(root) as ar:
            found = _parity_gaps(router, ar, "", signatures=True)
            parts = sorted(name for name in vars(router) if not name.startswith("_"))
            assert {"accounts", "sessions", "globals", "relay", "nodes", "rebalance"} <= set(parts)
            for part in parts:
                twin = getattr(ar, part, None)
                if twin is None:
                    found.append(f"{part}: missing")
                    continue
                assert getattr(twin, "sync", None) is not None, f"ar.{part} has no .sync"
                # The relay's operator surface (start/stop/run_once/drain/status/retry_dead) has its own
                # parameters: stop() on a task, not a thread, takes no timeout.
                found += _parity_gaps(getattr(router, part), twin, part + ".", signatures=part != "relay")
            return found

    try:
        assert asyncio.run(gaps()) == []
        for label in NOT_AWAITABLE:
            part, _, name = label.rpartition(".")
            owner = getattr(router, part) if part else router
            assert name in _public(owner), f"NOT_AWAITABLE lists {label}, which Router does not have"
            assert NOT_AWAITABLE[label].strip(), label
    finally:
        router.close()


def test_parity_check_notices_a_missing_or_sync_method() -> None:
    """The derived check is not vacuous: a twin lacking a method, or with a plain method, is reported."""

    class Sync:
        limit = 3

        def fetch(self, key: str) -> int:
            return 1

        def store(self, key: str, *, value: int) -> None:
            pass

    class Twin:
        def __init__(self) -> None:
            self.sync = sync

        def fetch(self, key: str) -> int:  # not awaitable
            return 1

        async def store(self, key: str, *, other: int) -> None:  # different parameters
            pass

    sync = Sync()
    assert _parity_gaps(sync, Twin(), "x.", signatures=True) == [
        "x.fetch: missing or not awaitable", "x.store: parameters ['key', 'other'] != ['key', 'value']"]
    assert _parity_gaps(sync, object(), "x.", signatures=False) == [
        "x.fetch: missing or not awaitable", "x.limit: setting neither on the twin nor on its .sync",
        "x.store: missing or not awaitable"]


def test_async_router_contract_in_use(root: str) -> None:
    async def main() -> tuple[Any, ...]:
        async with shardlite.AsyncRouter(root, schema=["CREATE TABLE t(x)"]) as ar:
            async with ar.transaction("user:1") as tx:
                await tx.execute("INSERT INTO t VALUES (?)", (1,))
            rows = await ar.query("user:1", "SELECT x FROM t")
            keys = [k async for k in ar.tenants()]
            return rows, keys

    assert asyncio.run(main()) == ([(1,)], ["user:1"])


def test_cli_entry_point_exists() -> None:
    from shardlite.cli import main

    assert callable(main)
