"""shardlite: one SQLite file per tenant, routed by consistent hashing.

Public surface (pinned by tests/test_public_api.py)::

    from shardlite import Router, AsyncRouter, pair_key
"""

from __future__ import annotations

from .aio import AsyncRouter
from .catalog import Location
from .engine import Settings
from .errors import (
    AuthenticationFailed,
    BackupFailed,
    Busy,
    ConfigurationError,
    DirectoryModeWarning,
    EmailTaken,
    IdentityMismatch,
    InvalidEmail,
    InvalidKey,
    InvalidPassword,
    ManifestInvalid,
    MetaConflict,
    MetaUnavailable,
    MoveFailed,
    NodeFull,
    PayloadTooLarge,
    QueryTimeout,
    ResultTooLarge,
    ShardliteError,
    StatementNotAllowed,
    StorageError,
    StorageFull,
    StorageReadOnly,
    TenantMoving,
    UnknownAccount,
    UnknownTenant,
    UnsupportedSQLite,
)
from .keys import MAX_KEY_BYTES, canonical, pair_key
from .router import Router
from .transaction import AsyncTransaction, Transaction, TransactionClosed

__version__ = "0.1.0"

__all__ = [
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
    "__version__",
]
