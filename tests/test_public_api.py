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
                                "StorageError", "StorageFull", "StorageReadOnly"]:
        cls = getattr(shardlite, name)
        assert inspect.isclass(cls) and issubclass(cls, base), name
    # a refusal is also what APSW code already catches for "not authorized"
    assert issubclass(shardlite.StatementNotAllowed, apsw.AuthError)
    assert issubclass(shardlite.UnknownTenant, LookupError)
    assert issubclass(shardlite.InvalidKey, ValueError)
    assert issubclass(shardlite.ManifestInvalid, shardlite.ConfigurationError)
    assert issubclass(shardlite.DirectoryModeWarning, UserWarning)


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


def test_async_router_has_the_same_names_awaitable(root: str) -> None:
    cls = shardlite.AsyncRouter
    for name in ("query", "run", "locate", "exists", "drop", "migrate_all", "aclose", "__aenter__", "__aexit__"):
        assert inspect.iscoroutinefunction(getattr(cls, name)), name
    for name in ("transaction", "handler"):
        assert callable(getattr(cls, name)), name
    assert callable(cls.tenants)

    async def main() -> tuple[Any, ...]:
        async with shardlite.AsyncRouter(root, schema=["CREATE TABLE t(x)"]) as ar:
            assert hasattr(ar, "accounts") and hasattr(ar, "sessions") and hasattr(ar, "relay")
            async with ar.transaction("user:1") as tx:
                await tx.execute("INSERT INTO t VALUES (?)", (1,))
            rows = await ar.query("user:1", "SELECT x FROM t")
            keys = [k async for k in ar.tenants()]
            return rows, keys

    assert asyncio.run(main()) == ([(1,)], ["user:1"])


def test_cli_entry_point_exists() -> None:
    from shardlite.cli import main

    assert callable(main)
