"""shardlite: one SQLite file per tenant, routed by consistent hashing.

Public surface (pinned by tests/test_public_api.py)::

    from shardlite import Router, AsyncRouter, pair_key
"""

from __future__ import annotations

from .core.keys import MAX_KEY_BYTES, canonical, pair_key
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
    ReplicaDamaged,
    ReplicaError,
    ReplicationUnavailable,
    ReplicaUnavailable,
    ResultTooLarge,
    ShardliteError,
    StatementNotAllowed,
    StorageError,
    StorageFull,
    StorageReadOnly,
    TenantErased,
    TenantMoving,
    UnknownAccount,
    UnknownTenant,
    UnsupportedSQLite,
)
from .files.catalog import Location
from .files.engine import Settings
from .front.aio import AsyncRouter
from .front.router import Router
from .front.transaction import AsyncTransaction, Transaction, TransactionClosed

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
    "ReplicaError",
    "ReplicaDamaged",
    "ReplicaUnavailable",
    "ReplicationUnavailable",
    "TenantErased",
    "__version__",
]
