"""The one exception tree of shardlite.

Every error shardlite raises on its own account derives from :class:`ShardliteError`. Errors raised by the
caller's own SQL (syntax errors, constraint violations, ...) pass through unchanged as APSW's exceptions, so
code that already handles ``apsw.ConstraintError`` keeps working.
"""

from __future__ import annotations

import apsw

__all__ = [
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
    "ReplicaUnavailable",
    "ReplicationUnavailable",
    "TenantErased",
    "ReplicaObjectMissing",
    "ReplicaDamaged",
]


class ShardliteError(Exception):
    """Base class of every error shardlite raises itself."""


class ConfigurationError(ShardliteError):
    """The router's configuration disagrees with the data root or is malformed."""


class InvalidKey(ShardliteError, ValueError):
    """A partition key is empty, too long, not text, or contains characters that are not allowed."""


class UnknownTenant(ShardliteError, LookupError):
    """A read or an operation addressed a tenant that does not exist (nothing was created)."""

    @classmethod
    def for_key(cls, canon: str) -> UnknownTenant:
        """The error for the canonical key ``canon``, with what to do next."""
        return cls(f"tenant {canon!r} does not exist (check the key: `shardlite tenants` lists the live ones; "
                   "a write transaction creates a tenant)")


class TenantMoving(ShardliteError):
    """The tenant kept moving past the bounded wait; retry later (retryable)."""


class Busy(ShardliteError):
    """A lock was held past the busy timeout (retryable; nothing was committed)."""


class PayloadTooLarge(ShardliteError, ValueError):
    """An outbox payload exceeds the configured size limit."""


class EmailTaken(ShardliteError):
    """An account already uses an address with the same canonical key."""


class InvalidEmail(ShardliteError, ValueError):
    """An e-mail address is malformed."""


class AuthenticationFailed(ShardliteError):
    """Unknown address or wrong password (deliberately not saying which)."""


class InvalidPassword(ShardliteError, ValueError):
    """A password is empty, too short, too long or not text (nothing was changed)."""


class UnknownAccount(ShardliteError, LookupError):
    """No account has this id (nothing was changed)."""


class StatementNotAllowed(ShardliteError, apsw.AuthError):
    """User SQL tried something tenant connections refuse: transaction control, ATTACH, a pragma that
    changes the connection or the file, or a write to shardlite's own ``_shardlite_*`` tables."""


class IdentityMismatch(ShardliteError):
    """A tenant file's stored key or incarnation differs from what the catalog expects: the file was
    swapped, misplaced or restored by hand, and shardlite refuses to open it."""


class UnsupportedSQLite(ShardliteError, ImportError):
    """The SQLite library APSW links is affected by a known corruption bug (or too old)."""


class ManifestInvalid(ConfigurationError):
    """A backup's ``manifest.json`` is not what a backup writes (damaged, edited or crafted): refused whole,
    before anything is restored."""


class BackupFailed(ShardliteError):
    """A backup could not finish (a full destination, a tenant that could not be read): what it wrote was
    removed and the destination's previous backup is whole."""


class DirectoryModeWarning(UserWarning):
    """An existing directory shardlite uses (a data root, a node path, a backup destination) is open to
    other users. shardlite never changes the mode of a directory it did not create."""


class QueryTimeout(ShardliteError, TimeoutError):
    """A statement ran past ``statement_timeout`` and was interrupted (nothing of a write transaction it
    was part of was committed). Make the statement cheaper, or raise ``statement_timeout``."""


class ResultTooLarge(ShardliteError):
    """A read returned more rows than ``max_rows`` or more bytes than ``max_result_bytes``: nothing was
    returned. Page through the result (``LIMIT``/a cursor column), or raise the caps."""


class MoveFailed(ShardliteError):
    """A tenant move could not go on (its copy did not verify, the source stayed locked, ...): it was
    undone (the tenant stays where it was, unfenced) and ``rebalance resume`` tries it again."""


class NodeFull(MoveFailed):
    """A node has no room for a move: the message names the tenant, the node and the file."""


class StorageError(ShardliteError):
    """The storage under a tenant failed (a full disk, a read-only file, an I/O error): the message names
    the tenant and the file and says what to do; nothing of the transaction was committed."""


class StorageFull(StorageError):
    """The disk (or quota) holding a tenant's file or its node is full."""


class StorageReadOnly(StorageError):
    """A tenant's file (or its directory) cannot be written by this process: fix its permissions; the
    router opens it again by itself on the next write."""


class MetaConflict(ShardliteError):
    """A compare-and-set on the metadata lost: what it expected (a tenant's generation or state, a move's
    claim, a plan's state, a node list) changed meanwhile. Nothing of that call was written: read again and
    decide again."""


class MetaUnavailable(ShardliteError):
    """The metadata store cannot be reached (its server is down, the connection was cut). Retryable: nothing
    of that call was written, and shardlite reconnects by itself; what needs no metadata (reads and writes of
    tenants already open) keeps working meanwhile."""


class ReplicaError(ShardliteError):
    """A replica target (an S3 bucket or a directory that holds the tenants' replicas) refused an operation
    for a reason a retry does not fix: the message names the target (without credentials), the operation,
    the object and the server's error code."""


class ReplicaUnavailable(ReplicaError):
    """The replica target cannot be reached or is failing for now (connection refused, a timeout, a 5xx,
    throttling, an I/O error of the replica's disk). Retryable: repeat the operation later; a ``put`` that
    failed this way may or may not have landed, and repeating it is harmless."""


class ReplicationUnavailable(ShardliteError):
    """A write of a router with ``durability="replicated"`` could not be confirmed durable in the replica
    within the router's ``durability_timeout`` (the replica unreachable, its upload failing, no replicator
    running for the tenant's node). **The transaction is committed locally, not rolled back**: it ships when
    the replica is reachable and a replicator runs, and until then it is not confirmed. Retryable in the sense
    that waiting again is safe: ``router.wait_replicated(key)`` asks again; repeating the transaction itself
    would apply it twice unless it is idempotent. Check ``shardlite replicate status`` and the replicator's
    log."""


class TenantErased(ShardliteError):
    """A write of a router with ``durability="replicated"`` was committed, and its tenant was then dropped with
    ``erase`` (``Router.drop(key, erase=True)``, ``shardlite tenants drop KEY --erase``) before the write was
    confirmed: the write was removed from the replica **on purpose**, with the tenant's whole history (and its
    file from the node). Not retryable: nothing of the tenant is kept anywhere, by design; a caller that still
    needs the data writes it again, to a new tenant."""


class ReplicaDamaged(ReplicaError):
    """Objects of the replica are not what shardlite wrote (damaged, truncated or crafted: a pack whose header
    or bytes fail their checks), and a restore would have needed them. Nothing was restored. ``objects``
    lists (object name, what is wrong). The message says what to do: restore with ``skip_damaged=True``
    (``--skip-damaged``) from every other object, whose report lists the skipped ones (commits only they held
    are missing then), or restore from a backup."""

    def __init__(self, message: str, objects: list[tuple[str, str]]) -> None:
        super().__init__(message)
        self.objects = objects


class ReplicaObjectMissing(ReplicaError, KeyError):
    """A replica object that was asked for does not exist (``get``, ``get_range``)."""

    def __str__(self) -> str:  # KeyError's own str() would quote the message
        return str(self.args[0]) if self.args else ""
