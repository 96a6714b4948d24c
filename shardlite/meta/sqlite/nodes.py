""":class:`SqliteNodes`: the :class:`~shardlite.meta.nodes.NodeRegistry` in ``global.db`` (``_shardlite_nodes``).

Each write is one ``BEGIN IMMEDIATE`` on the global writer (:class:`~shardlite.files.globaldb.GlobalDB`), so
every check below and the write it guards are one unit. ``_shardlite_tenants.node`` references a node by
name (a foreign key, ``PRAGMA foreign_keys=ON``): a node is deleted only after its tombstones moved away.
"""

from __future__ import annotations

import builtins
import os
import time
from collections.abc import Sequence
from typing import Any

import apsw

from ...errors import ConfigurationError, MetaConflict
from ...files.authorizer import INTERNAL_SQL as _I
from ...files.catalog import Node
from ...files.globaldb import GlobalDB
from ..nodes import NODE_STATES, NodeRegistry, check_node_row

__all__ = ["SqliteNodes"]

_ROWS = "SELECT name, path, weight, state FROM _shardlite_nodes ORDER BY name"
_INSERT = _I + "INSERT INTO _shardlite_nodes(name, path, weight, state, added) VALUES (?, ?, ?, ?, ?)"


def _stored(rows: Sequence[Sequence[Any]]) -> builtins.list[Node]:
    return [Node(str(n), str(p), int(w), str(s)) for n, p, w, s in rows]


class SqliteNodes:
    """The node list of one root in its ``global.db`` (see the module doc)."""

    def __init__(self, db: GlobalDB) -> None:
        self.db = db
        self.root = db.root

    def _abs(self, path: str) -> str:
        return path if os.path.isabs(path) else os.path.join(self.root, path)

    def seed(self, default_nodes: Sequence[tuple[str, str, int]]) -> None:
        """Register ``default_nodes`` (``(name, path, weight)``) when the root has no node yet (part of
        :meth:`SqliteMeta.open`: several processes opening a new root at once seed it once)."""
        if not default_nodes:
            return
        with self.db.write() as conn:
            if not conn.execute("SELECT 1 FROM _shardlite_nodes LIMIT 1").fetchall():
                now = time.time()
                for name, path, weight in default_nodes:
                    conn.execute(_INSERT, (name, path, weight, "active", now))

    def list(self) -> builtins.list[Node]:
        return [Node(n.name, self._abs(n.path), n.weight, n.state) for n in _stored(self.db.read(_ROWS))]

    def add(self, name: str, path: str, weight: int) -> None:
        check_node_row(name, path, weight, "active")
        with self.db.write() as conn:
            self._insert(conn, Node(name, path, weight, "active"), time.time())

    @staticmethod
    def _insert(conn: apsw.Connection, node: Node, now: float) -> None:
        """Insert ``node``; an existing name or path is a :class:`ConfigurationError` (gap F5: never the
        raw ``apsw.ConstraintError``), checked first so the message names the other node."""
        for column, value in (("name", node.name), ("path", node.path)):
            found = conn.execute(f"SELECT name FROM _shardlite_nodes WHERE {column} = ?", (value,)).fetchall()
            if found:
                what = f"node {node.name!r} already exists" if column == "name" else \
                    f"node {found[0][0]!r} already has the path {node.path!r}"
                raise ConfigurationError(f"{what}; nothing was changed")
        conn.execute(_INSERT, (node.name, node.path, node.weight, node.state, now))

    def set_state(self, name: str, state: str) -> None:
        if state not in NODE_STATES:
            raise ConfigurationError(f"node {name!r}: state {state!r} is not one of {', '.join(NODE_STATES)}")
        with self.db.write() as conn:
            rows = conn.execute("SELECT state FROM _shardlite_nodes WHERE name = ?", (name,)).fetchall()
            if not rows:
                raise ConfigurationError(f"unknown node {name!r}")
            if rows[0][0] == state:
                return
            if state == "draining" and not conn.execute(
                    "SELECT 1 FROM _shardlite_nodes WHERE state = 'active' AND name != ? LIMIT 1", (name,)).fetchall():
                raise ConfigurationError(f"{name!r} is the last active node; add another before draining it")
            conn.execute(_I + "UPDATE _shardlite_nodes SET state = ? WHERE name = ?", (state, name))

    def remove(self, name: str) -> bool:
        with self.db.write() as conn:
            if not conn.execute("SELECT 1 FROM _shardlite_nodes WHERE name = ?", (name,)).fetchall():
                return False
            self._delete(conn, name)
            return True

    @staticmethod
    def _delete(conn: apsw.Connection, name: str) -> None:
        """Delete node ``name`` inside the caller's write: refused while a tenant that is not a tombstone
        is on it; its tombstones move to a remaining node first (gap F1, see shardlite.meta.nodes)."""
        held = conn.execute("SELECT key, state FROM _shardlite_tenants WHERE node = ? AND state != 'dropped' "
                            "ORDER BY state = 'dropping' DESC, key LIMIT 1", (name,)).fetchall()
        if held:
            key, state = held[0]
            if state == "dropping":
                raise ConfigurationError(f"node {name!r} still holds tenant {key!r}, whose drop did not finish: run "
                                         f"`shardlite tenants drop {key}` again, then remove the node")
            raise ConfigurationError(f"node {name!r} still holds tenants (such as {key!r}); drain it first "
                                     "(`shardlite nodes remove` drains it; `shardlite rebalance apply` moves them)")
        if conn.execute("SELECT 1 FROM _shardlite_tenants WHERE node = ? LIMIT 1", (name,)).fetchall():
            heir = conn.execute("SELECT name FROM _shardlite_nodes WHERE name != ? ORDER BY state != 'active', name "
                                "LIMIT 1", (name,)).fetchall()
            if not heir:
                raise ConfigurationError(f"node {name!r} is the last node and holds tombstones of dropped tenants; "
                                         "add another node first")
            conn.execute(_I + "UPDATE _shardlite_tenants SET node = ? WHERE node = ? AND state = 'dropped'",
                         (heir[0][0], name))
        conn.execute(_I + "DELETE FROM _shardlite_nodes WHERE name = ?", (name,))

    def replace_all(self, nodes: Sequence[Node], *, only_if_pristine: bool,
                    expect: Sequence[Sequence[Node]] | None = None) -> None:
        wanted = builtins.list(nodes)
        for node in wanted:
            check_node_row(node.name, node.path, node.weight, node.state)
        for column in ("name", "path"):
            values = [getattr(node, column) for node in wanted]
            if len(set(values)) != len(values):
                raise ConfigurationError(f"the new node list names a {column} twice; nothing was changed")
        if not any(node.state == "active" for node in wanted):
            raise ConfigurationError("the new node list has no active node; nothing was changed")
        with self.db.write() as conn:
            if only_if_pristine and conn.execute("SELECT 1 FROM _shardlite_tenants LIMIT 1").fetchall():
                raise MetaConflict("the root holds tenants (or tombstones) now; its node list was not replaced")
            current = _stored(conn.execute(_ROWS).fetchall())
            if expect is not None and all(current != builtins.list(option) for option in expect):
                raise MetaConflict("the root's node list changed meanwhile; it was not replaced")
            names = {node.name for node in wanted}
            for node in current:  # the new paths may be the old ones of other nodes: clear them first
                if node.name not in names:
                    if conn.execute("SELECT 1 FROM _shardlite_tenants WHERE node = ? LIMIT 1",
                                    (node.name,)).fetchall():
                        raise ConfigurationError(f"node {node.name!r} holds tenant rows: it must stay in the list")
                    conn.execute(_I + "DELETE FROM _shardlite_nodes WHERE name = ?", (node.name,))
            # a new path may be another kept node's old one (UNIQUE is checked per statement): park the kept
            # nodes on placeholder paths no directory can have, then set the new ones
            conn.execute(_I + "UPDATE _shardlite_nodes SET path = '/dev/null/' || name")
            now = time.time()
            for node in wanted:
                conn.execute(_I + "UPDATE _shardlite_nodes SET path = ?, weight = ?, state = ? WHERE name = ?",
                             (node.path, node.weight, node.state, node.name))
                if conn.changes() == 0:
                    conn.execute(_INSERT, (node.name, node.path, node.weight, node.state, now))

    def forget_all(self) -> int:
        with self.db.write() as conn:
            conn.execute(_I + "DELETE FROM _shardlite_tenants")
            gone = conn.changes()
            conn.execute(_I + "DELETE FROM _shardlite_nodes")
        return gone


def _conforms(nodes: SqliteNodes) -> NodeRegistry:
    return nodes  # mypy checks here that SqliteNodes satisfies the NodeRegistry contract
