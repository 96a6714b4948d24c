"""The contract of a metadata backend as a whole: :class:`MetaStore`, one per data root."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .accounts import AccountStore, CredentialStore
    from .app_globals import AppGlobals
    from .journal import MoveJournal
    from .kv import MetaKV
    from .nodes import NodeRegistry
    from .pending import DeadLetters, PendingWork
    from .sessions import SessionStore
    from .tenants import TenantCatalog

__all__ = ["MetaBase", "MetaStore", "PARTS"]

#: The parts of a :class:`MetaStore` (its attributes beyond :class:`MetaBase`), one contract each.
PARTS = ("tenants", "nodes", "journal", "pending", "dead_letters", "kv", "accounts", "credentials", "sessions",
         "app_globals")


class MetaBase(Protocol):
    """What every metadata backend object does as a whole, before its parts: open, close, say where it is.
    Thread-safe: every method may be called from any thread."""

    @property
    def location(self) -> str:
        """Where the metadata lives, printable as it is: never a password or any other secret."""
        ...

    @property
    def exists(self) -> bool:
        """True when the store was created already (by any process), whether or not this object is open."""
        ...

    @property
    def closed(self) -> bool:
        ...

    @property
    def app_global_path(self) -> str:
        """The root's ``app_global.db``: the app's own global tables stay in the root with every backend."""
        ...

    def open(self, *, create: bool, default_nodes: Sequence[tuple[str, str, int]] = ()) -> None:
        """Open the store, creating it when ``create`` (else :class:`~shardlite.ConfigurationError` when it
        does not exist), and bring shardlite's schema to the current version (several processes may open a
        new root at once: exactly one creates it). ``default_nodes`` (``(name, path, weight)``, the path
        relative to the root or absolute) are registered when the store has no node yet."""
        ...

    def close(self) -> None:
        """Release every connection (idempotent). A closed store raises
        :class:`~shardlite.ConfigurationError` ("the router is closed") on use."""
        ...

    @property
    def local(self) -> bool:
        """True when the metadata is in local files (a read takes microseconds: the async front end may read
        it on its event loop); False when a read is a network round trip."""
        ...

    def watch_tenants(self, callback: Callable[[str | None], None]) -> None:
        """Call ``callback(key)`` when a tenant's catalog row changed in another process, and
        ``callback(None)`` when anything may have changed (drop every cached route): the route cache's
        invalidation across processes. A backend may call it late or never (SQLite: never): a cached route
        is a hint, and the in-file fence stops a stale owner. The callback runs on any thread and must be
        quick."""
        ...

    def node_list_token(self) -> object | None:
        """A value that changes whenever this root's node list may have changed, in any process; None while
        the backend cannot promise that (SQLite: always, its list is a local read; PostgreSQL: while its
        change hints are not connected). A caller may keep a :meth:`nodes.list <shardlite.meta.nodes.
        NodeRegistry.list>` result for as long as the token it read *before* that call is still the one
        returned; a change made by another process shows within the hint's delivery (milliseconds)."""
        ...

    def export_global(self, directory: str) -> AbstractContextManager[str]:
        """For the block, the path of a SQLite file in ``global.db``'s own schema holding this root's
        metadata as of one moment (what a backup copies, whichever backend made it); any scratch file is
        made under ``directory`` and removed afterwards."""
        ...


class MetaStore(MetaBase, Protocol):
    """One data root's metadata. Thread-safe: every method may be called from any thread.

    Its parts (one attribute per concept, each with its own contract module in :mod:`shardlite.meta`) are
    usable between :meth:`open` and :meth:`close`.
    """

    @property
    def pending(self) -> PendingWork:
        """The relay's pending-work index (:mod:`shardlite.meta.pending`)."""
        ...

    @property
    def dead_letters(self) -> DeadLetters:
        """The relay's dead letters (:mod:`shardlite.meta.pending`)."""
        ...

    @property
    def kv(self) -> MetaKV:
        """Small named values (:mod:`shardlite.meta.kv`)."""
        ...

    @property
    def tenants(self) -> TenantCatalog:
        """The tenant catalog (:mod:`shardlite.meta.tenants`)."""
        ...

    @property
    def nodes(self) -> NodeRegistry:
        """The node registry (:mod:`shardlite.meta.nodes`)."""
        ...

    @property
    def journal(self) -> MoveJournal:
        """Rebalance plans and claim-checked move steps (:mod:`shardlite.meta.journal`)."""
        ...

    @property
    def accounts(self) -> AccountStore:
        """Account rows (:mod:`shardlite.meta.accounts`)."""
        ...

    @property
    def credentials(self) -> CredentialStore:
        """Password credentials (:mod:`shardlite.meta.accounts`)."""
        ...

    @property
    def sessions(self) -> SessionStore:
        """Session rows (:mod:`shardlite.meta.sessions`)."""
        ...

    @property
    def app_globals(self) -> AppGlobals:
        """The app's global tables (:mod:`shardlite.meta.app_globals`)."""
        ...
