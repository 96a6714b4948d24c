"""The tenant catalog's contract: :class:`TenantCatalog` (where every tenant lives, its generations and states).

The ring *proposes* a node for a new tenant; the catalog *decides* (README: How it works): the first registrant of a key
wins and every other process adopts its record. Every create, move, restore and import gets a new
generation, never reused (so no tenant path is ever reused), and a dropped tenant keeps
its row as a tombstone.

Rules every backend keeps (each has a test in ``tests/test_meta_tenants.py``):

* Every method is one atomic unit (one SQLite ``BEGIN IMMEDIATE``, one PostgreSQL transaction); reads
  return committed data only.
* States: ``active`` and ``moving`` are live; ``dropping`` (a drop under way: routes nowhere) and
  ``dropped`` (the tombstone). Keys are canonical (:func:`shardlite.core.keys.canonical`); they are compared
  and ordered by code point (SQLite's BINARY on UTF-8; PostgreSQL needs ``COLLATE "C"``).
* A compare-and-set that lost raises :class:`~shardlite.MetaConflict` and writes nothing.
* **Scope.** The key space is the store's: one per SQLite root, one per PostgreSQL database (shared by
  every root that uses it, each with its own nodes). :meth:`~TenantCatalog.lookup`,
  :meth:`~TenantCatalog.allocate_generation`, :meth:`~TenantCatalog.register`,
  :meth:`~TenantCatalog.set_state`, :meth:`~TenantCatalog.flip` and :meth:`~TenantCatalog.note_schema_version`
  act by key. The enumerations (:meth:`~TenantCatalog.iter_tenants`, :meth:`~TenantCatalog.count_by_node`,
  :meth:`~TenantCatalog.schema_versions`, :meth:`~TenantCatalog.max_schema_version`,
  :meth:`~TenantCatalog.has_rows`) cover the tenants on this root's nodes. With one root per store (SQLite,
  or a PostgreSQL database with one root) both are the same thing.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from typing import Any, Final, Protocol

from ..files.catalog import TenantRecord

__all__ = ["TenantCatalog", "TenantRecord", "GenerationTaken", "LIVE", "STATES", "check_states", "record_of"]

class GenerationTaken(ValueError):
    """:meth:`TenantCatalog.register` was given a generation another tenant row holds (nothing written)."""


#: The states of a tenant that routes somewhere.
LIVE: Final = ("active", "moving")
#: Every state a tenant row may have.
STATES: Final = ("active", "moving", "dropping", "dropped")


class TenantCatalog(Protocol):
    """The tenant rows of one data root (``meta.tenants``). Thread-safe, and safe across processes."""

    def lookup(self, key: str) -> TenantRecord | None:
        """The row of ``key`` in any state (a tombstone included), or None when the key was never registered.

        HOT on a route-cache miss: one statement, no transaction of its own beyond that read."""
        ...

    def allocate_generation(self, key: str, node: str, purpose: str) -> int:
        """A new generation for a file of ``key`` on ``node`` (``purpose``: ``create``, ``move``,
        ``restore``, ``import``; recorded with the key and node for history).

        Never reused: unique across all keys, greater than every generation an earlier completed call
        returned (in any process) and than every generation any row holds, also after a crash, a rolled
        back caller, a dropped tenant or a restore. Nothing else changes (the key's row is untouched).

        One exception, for ``purpose="create"`` only: after a crash of the store itself (its server or its
        machine; not of the caller), a generation whose allocation no later durable write of the store
        followed may be handed out again (PostgreSQL commits a creation's allocation without waiting for
        its flush; an embedded ``global.db`` at ``synchronous=NORMAL`` loses its last commits on power
        loss). No row holds such a generation, since a row's durable write would have made the allocation
        durable too; at most an unregistered file at its path does. A creator therefore treats a file
        already at its new path, and a :meth:`register` refused with :class:`GenerationTaken`, as "allocate
        again" (:mod:`shardlite.front.tenant_create`)."""
        ...

    def lookup_or_allocate(self, key: str, node: str, *, revive: bool = True) -> tuple[TenantRecord | None, int | None]:
        """``(lookup(key), generation)``: the row of ``key`` in any state, and, when there is none, or a
        tombstone and ``revive`` (``key`` is to be created), a new generation as ``allocate_generation(key,
        node, "create")`` gives; otherwise None and nothing allocated. A creator's first two calls in one
        unit (PostgreSQL: one round trip instead of two); the two parts are as if called one after the
        other."""
        ...

    def register(self, key: str, node: str, generation: int, incarnation: str,
                 schema_version: int) -> TenantRecord:
        """Record a freshly created tenant unless another registrant won; returns the row that holds.

        Atomic insert-or-adopt: when ``key`` has a row that is not a tombstone (``active``, ``moving`` or
        ``dropping``), that row is returned unchanged and nothing is written (the caller compares
        generations: it lost when the returned generation is not its own; losing never raises). When
        ``key`` has no row, one is inserted: epoch 1, ``active``. Over a tombstone the row is re-created:
        ``epoch + 1``, ``active``, the new node, generation, incarnation and schema version.

        ``generation`` must come from :meth:`allocate_generation` for this key; one another row holds
        raises :class:`GenerationTaken` (nothing written). ``node`` must be registered (in the store, by
        any root using it): an unknown node raises :class:`~shardlite.ConfigurationError` (nothing
        written)."""
        ...

    def set_state(self, key: str, state: str, *, expect_generation: int, expect_states: Collection[str]) -> None:
        """Set the state of ``key``: compare-and-set on its generation AND its current state.

        Writes only when the row exists, is at ``expect_generation`` and its state is one of
        ``expect_states``; otherwise raises :class:`~shardlite.MetaConflict` naming what it found, and
        writes nothing (so a drop's ``active -> dropping`` cannot interleave with a mover's
        ``active -> moving`` decided on a stale lookup: one of them loses). ``state`` (and every expected
        state) is one of :data:`STATES`, else :class:`ValueError`."""
        ...

    def flip(self, key: str, *, from_generation: int, node: str, generation: int, expect_states: Collection[str],
             incarnation: str | None = None) -> TenantRecord:
        """Point ``key`` at its new file: the commit point of a move, or of a restore over a live tenant
        (which brings a new ``incarnation``; None keeps the current one). Returns the new row.

        Compare-and-set: writes only when the row is at ``from_generation`` and in one of
        ``expect_states`` (never ``dropped``: a tombstone is re-created by :meth:`register`); otherwise
        :class:`~shardlite.MetaConflict`, nothing written. The row becomes ``node``, ``generation``,
        ``epoch + 1``, ``active``. An unknown ``node`` raises :class:`~shardlite.ConfigurationError`."""
        ...

    def note_schema_version(self, key: str, version: int) -> None:
        """Record that ``key``'s file is at app schema ``version``: a monotonic maximum (a lower or equal
        version changes nothing; an unknown key is a no-op). Never raises a conflict."""
        ...

    def iter_tenants(self, *, states: Collection[str] = LIVE, batch: int = 1000,
                     after: str = "") -> Iterator[TenantRecord]:
        """The rows in ``states`` on this root's nodes whose key sorts after ``after``, in key order (code
        points), read in pages of ``batch`` rows (never all in memory). Each page is one read: the whole is
        not a snapshot (a row changed between pages is seen as it is when its page is read; none is seen
        twice)."""
        ...

    def count_by_node(self) -> dict[str, int]:
        """Live tenants (``active``, ``moving``) per node of this root; a node holding none is absent (the caller joins
        :meth:`shardlite.meta.nodes.NodeRegistry.list`)."""
        ...

    def schema_versions(self) -> dict[int, int]:
        """Live tenants on this root's nodes per recorded app schema version, in ascending version order."""
        ...

    def max_schema_version(self, prefix: str) -> int | None:
        """The newest app schema version recorded for a live tenant on this root's nodes whose key is
        ``prefix:...``; None when there is none."""
        ...

    def has_rows(self) -> bool:
        """True when any tenant row exists on this root's nodes, tombstones included (the root was used)."""
        ...


def check_states(state: str | None, expected: Sequence[str] | Collection[str]) -> None:
    """:class:`ValueError` unless ``state`` (when given) and every expected state are tenant states."""
    for found in ((state,) if state is not None else ()) + tuple(expected):
        if found not in STATES:
            raise ValueError(f"{found!r} is not a tenant state (one of {', '.join(STATES)})")
    if not expected:
        raise ValueError("expect_states is empty: nothing could match")


def record_of(row: Sequence[Any]) -> TenantRecord:
    """A catalog row ``(key, node, generation, epoch, state, incarnation, schema_version, created)`` as a
    :class:`TenantRecord`, whichever backend read it."""
    key, node, generation, epoch, state, incarnation, schema_version, created = row
    return TenantRecord(str(key), str(node), int(generation), int(epoch), str(state),
                        str(incarnation), int(schema_version), float(created))
