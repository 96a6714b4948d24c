"""The roots a PostgreSQL metadata database holds, and forgetting one whose directory is lost
(``shardlite meta roots`` / ``shardlite meta forget``).

Several roots may share one database (distinct node names). When a root's machine is lost, its rows stay:
its tenants' keys and its node names are taken until they go, so a restore of its backup (or replica)
into a new root on the same database is refused with "node ... belongs to another root". Forgetting the
lost root removes exactly what :meth:`~shardlite.meta.nodes.NodeRegistry.forget_all` removes (its tenant
rows, nodes, named values, rebalance plans and its record) and nothing of another root; accounts and
sessions are the database's and stay.

A root is forgotten only when it looks lost from here: :func:`forget_root` refuses when the directory its
record names (the label, where it was created) holds a ``meta.json`` naming this root's id: that root is
alive on this machine, and removing its rows would orphan its files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ...errors import ConfigurationError
from ..location import MetaLocation
from ..record import read_record
from .connect import Pool
from .nodes import PgNodes
from .schema import upgrade

__all__ = ["RootRow", "list_roots", "forget_root"]

#: Seconds to wait for the server before giving up (the CLI's own commands: one connection each).
CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class RootRow:
    """One root of the database: its id, its label (the directory it was created in, as recorded), when
    it was created (epoch seconds), its node names and how many tenant rows (tombstones included) it has."""

    id: str
    label: str
    created: float
    nodes: list[str]
    tenants: int


def _pool(location: MetaLocation) -> Pool:
    if location.embedded:
        raise ConfigurationError("this needs PostgreSQL metadata: pass --meta postgresql://... (or set "
                                 "SHARDLITE_META); an embedded root's metadata is its own global.db")
    pool = Pool(location.dsn, location.printable, size=1, timeout=CONNECT_TIMEOUT, statement_timeout=None)
    pool.open()
    return pool


def list_roots(location: MetaLocation) -> list[RootRow]:
    """Every root of the database at ``location``, oldest first (its schema is upgraded first, as any
    opener does)."""
    pool = _pool(location)
    try:
        with pool.connection() as conn:
            upgrade(conn)
            rows = conn.execute(
                "SELECT r.id, r.label, r.created, "
                "coalesce(array_agg(n.name ORDER BY n.name) FILTER (WHERE n.name IS NOT NULL), '{}'), "
                "(SELECT count(*) FROM shardlite.tenants t JOIN shardlite.nodes m ON m.name = t.node "
                " WHERE m.root_id = r.id) "
                "FROM shardlite.roots r LEFT JOIN shardlite.nodes n ON n.root_id = r.id "
                "GROUP BY r.id ORDER BY r.created, r.id").fetchall()
    finally:
        pool.close()
    return [RootRow(str(i), str(label), float(created), [str(n) for n in nodes], int(count))
            for i, label, created, nodes, count in rows]


def forget_root(location: MetaLocation, root_id: str) -> RootRow:
    """Remove the rows of root ``root_id`` from the database at ``location`` (module doc) and return what
    it was. :class:`~shardlite.ConfigurationError` when no root has that id, or when the root is alive on
    this machine (its directory's ``meta.json`` names it)."""
    found = {row.id: row for row in list_roots(location)}.get(root_id)
    if found is None:
        raise ConfigurationError(f"the database at {location.printable} holds no root {root_id!r}: "
                                 "`shardlite meta roots --meta URL` lists them")
    if os.path.isabs(found.label) and os.path.isdir(found.label):
        try:
            alive = (record := read_record(found.label)) is not None and record.root_id == root_id
        except ConfigurationError:  # a damaged record: it may be this root's; refuse rather than guess
            alive = True
        if alive:
            raise ConfigurationError(f"root {root_id!r} looks alive at {found.label} (its meta.json names it or "
                                     "cannot be read): only a lost root is forgotten; if it is lost, move that "
                                     "directory away first")
    pool = _pool(location)
    try:
        PgNodes(pool, found.label, root_id, location.printable).forget_all()
    finally:
        pool.close()
    return found
