""":class:`PgNodes`: the :class:`~shardlite.meta.nodes.NodeRegistry` in PostgreSQL (``shardlite.nodes``).

Each node row belongs to a root (``root_id``); this registry reads and changes only its root's rows. A node
name is the table's primary key, so it is unique across the database: several roots share one database only
with distinct node names (each root, later each host, owns its nodes). A recorded path is unique per root
(``nodes_path_key``): a relative path means a directory inside each root, so two roots may record the same.

How each write is atomic at READ COMMITTED:

* :meth:`~PgNodes.add`: one ``INSERT``; a duplicate name or path is the unique violation of ``nodes_pkey`` or
  ``nodes_path_key``, translated by constraint name into :class:`~shardlite.ConfigurationError`;
* :meth:`~PgNodes.set_state`: locks every node row of the root ``FOR UPDATE`` (in name order, so two callers
  never deadlock) before the last-active check, so two concurrent drains cannot leave no active node;
* :meth:`~PgNodes.remove`: locks the node row ``FOR UPDATE`` first. A registration or flip onto that node
  takes ``FOR KEY SHARE`` on it for its foreign-key check, which conflicts: either the tenant row committed
  before the lock (and the check that follows sees it) or its foreign-key check waits and then fails;
* :meth:`~PgNodes.replace_all`: locks the root's node rows ``FOR UPDATE`` before its compare-and-set checks.

Deadlocks and serialization failures are retried whole (:mod:`.txn`).
"""

from __future__ import annotations

import builtins
import os
import time
from collections.abc import Sequence
from typing import Any

from psycopg import Connection, errors

from ...errors import ConfigurationError, MetaConflict
from ...files.catalog import Node
from ..nodes import NODE_STATES, NodeRegistry, check_node_row
from .connect import Pool
from .txn import constraint_of, has_nul, in_transaction, statement

__all__ = ["PgNodes"]

_ROWS = "SELECT name, path, weight, state FROM shardlite.nodes WHERE root_id = %s ORDER BY name"
_INSERT = "INSERT INTO shardlite.nodes(name, root_id, path, weight, state, added) VALUES (%s, %s, %s, %s, %s, %s)"


def _stored(rows: Sequence[Sequence[Any]]) -> builtins.list[Node]:
    return [Node(str(n), str(p), int(w), str(s)) for n, p, w, s in rows]


class PgNodes:
    """The nodes of root ``root_id`` (directory ``root``) in the database of ``pool`` (see the module doc);
    ``where`` is the database's printable location, for messages."""

    def __init__(self, pool: Pool, root: str, root_id: str, where: str) -> None:
        self.pool = pool
        self.root = root
        self.root_id = root_id
        self.where = where

    def _abs(self, path: str) -> str:
        return path if os.path.isabs(path) else os.path.join(self.root, path)

    def seed(self, conn: Connection[Any], default_nodes: Sequence[tuple[str, str, int]]) -> None:
        """Register ``default_nodes`` for this root when it has none, inside the caller's transaction on
        ``conn`` (part of :meth:`PgMeta.open <shardlite.meta.postgres.PgMeta.open>`): under a lock on the
        root's row, so several openers of a new root seed it once. A name another root owns is refused."""
        conn.execute("SELECT 1 FROM shardlite.roots WHERE id = %s FOR UPDATE", (self.root_id,))
        if not default_nodes or conn.execute("SELECT 1 FROM shardlite.nodes WHERE root_id = %s LIMIT 1",
                                             (self.root_id,)).fetchone():
            return
        now = time.time()
        for name, path, weight in default_nodes:
            check_node_row(name, path, weight, "active")
            self._refuse_nul_name(name)
            taken = conn.execute(_INSERT + " ON CONFLICT (name) DO NOTHING RETURNING name",
                                 (name, self.root_id, path, weight, "active", now)).fetchone()
            if taken is None:
                raise ConfigurationError(
                    f"node {name!r} belongs to another root in the metadata at {self.where}: roots that "
                    "share one database need distinct node names (give this root its own, e.g. "
                    "shardlite init --root ROOT --meta URL --nodes NAME...)")

    def list(self) -> builtins.list[Node]:
        with self.pool.connection() as conn:
            rows = conn.execute(_ROWS, (self.root_id,)).fetchall()
        return [Node(n.name, self._abs(n.path), n.weight, n.state) for n in _stored(rows)]

    @staticmethod
    def _refuse_nul_name(name: str) -> None:
        if has_nul(name):
            raise ConfigurationError(f"invalid node name {name!r}")

    def add(self, name: str, path: str, weight: int) -> None:
        check_node_row(name, path, weight, "active")
        self._refuse_nul_name(name)
        node = Node(name, path, weight, "active")
        statement(self.pool, lambda conn: self._insert(conn, node, time.time()))

    def _insert(self, conn: Connection[Any], node: Node, now: float) -> None:
        """Insert ``node`` for this root; a name or path already taken is a :class:`ConfigurationError`
        naming who holds it (never the backend's constraint error)."""
        try:
            # a savepoint inside a caller's transaction, so the lookup below can run after a violation
            with conn.transaction():
                conn.execute(_INSERT, (node.name, self.root_id, node.path, node.weight, node.state, now))
        except errors.UniqueViolation as exc:
            raise self._taken(conn, exc, node) from None

    def _taken(self, conn: Connection[Any], exc: errors.UniqueViolation, node: Node) -> Exception:
        constraint = constraint_of(exc)
        if constraint == "nodes_pkey":
            row = conn.execute("SELECT root_id FROM shardlite.nodes WHERE name = %s", (node.name,)).fetchone()
            if row is not None and row[0] != self.root_id:
                return ConfigurationError(
                    f"node {node.name!r} belongs to another root in the metadata at {self.where}: roots that "
                    "share one database need distinct node names; nothing was changed")
            return ConfigurationError(f"node {node.name!r} already exists; nothing was changed")
        if constraint == "nodes_path_key":
            row = conn.execute("SELECT name FROM shardlite.nodes WHERE root_id = %s AND path = %s",
                               (self.root_id, node.path)).fetchone()
            holder = repr(str(row[0])) if row is not None else "another node"
            return ConfigurationError(f"node {holder} already has the path {node.path!r}; nothing was changed")
        return exc

    def _lock_all(self, conn: Connection[Any]) -> builtins.list[Node]:
        """This root's node rows as recorded, locked ``FOR UPDATE`` in name order (one lock order for every
        method that locks more than one)."""
        return _stored(conn.execute(_ROWS + " FOR UPDATE", (self.root_id,)).fetchall())

    def set_state(self, name: str, state: str) -> None:
        if state not in NODE_STATES:
            raise ConfigurationError(f"node {name!r}: state {state!r} is not one of {', '.join(NODE_STATES)}")
        if has_nul(name):
            raise ConfigurationError(f"unknown node {name!r}")

        def body(conn: Connection[Any]) -> None:
            nodes = {node.name: node for node in self._lock_all(conn)}
            if name not in nodes:
                raise ConfigurationError(f"unknown node {name!r}")
            if nodes[name].state == state:
                return
            if state == "draining" and not any(n.state == "active" and n.name != name for n in nodes.values()):
                raise ConfigurationError(f"{name!r} is the last active node; add another before draining it")
            conn.execute("UPDATE shardlite.nodes SET state = %s WHERE name = %s AND root_id = %s",
                         (state, name, self.root_id))

        in_transaction(self.pool, body)

    def remove(self, name: str) -> bool:
        if has_nul(name):
            return False

        def body(conn: Connection[Any]) -> bool:
            if conn.execute("SELECT 1 FROM shardlite.nodes WHERE name = %s AND root_id = %s FOR UPDATE",
                            (name, self.root_id)).fetchone() is None:
                return False
            self._delete(conn, name)
            return True

        return in_transaction(self.pool, body)

    def _delete(self, conn: Connection[Any], name: str) -> None:
        """Delete node ``name`` (locked by the caller): refused while a tenant that is not a tombstone is on
        it; its tombstones move to a remaining node of this root first (gap F1, see shardlite.meta.nodes)."""
        held = conn.execute("SELECT key, state FROM shardlite.tenants WHERE node = %s AND state <> 'dropped' "
                            "ORDER BY state = 'dropping' DESC, key LIMIT 1", (name,)).fetchone()
        if held is not None:
            key, state = held
            if state == "dropping":
                raise ConfigurationError(f"node {name!r} still holds tenant {key!r}, whose drop did not finish: run "
                                         f"`shardlite tenants drop {key}` again, then remove the node")
            raise ConfigurationError(f"node {name!r} still holds tenants (such as {key!r}); drain it first "
                                     "(`shardlite nodes remove` drains it; `shardlite rebalance apply` moves them)")
        if conn.execute("SELECT 1 FROM shardlite.tenants WHERE node = %s LIMIT 1", (name,)).fetchone():
            heir = conn.execute("SELECT name FROM shardlite.nodes WHERE root_id = %s AND name <> %s "
                                "ORDER BY state <> 'active', name LIMIT 1", (self.root_id, name)).fetchone()
            if heir is None:
                raise ConfigurationError(f"node {name!r} is the last node and holds tombstones of dropped tenants; "
                                         "add another node first")
            conn.execute("UPDATE shardlite.tenants SET node = %s WHERE node = %s AND state = 'dropped'",
                         (heir[0], name))
        try:
            conn.execute("DELETE FROM shardlite.nodes WHERE name = %s AND root_id = %s", (name, self.root_id))
        except errors.ForeignKeyViolation:
            # a tombstone re-created onto this node meanwhile is live now: say so as the check above would
            raise ConfigurationError(f"node {name!r} still holds tenants; drain it first") from None

    def replace_all(self, nodes: Sequence[Node], *, only_if_pristine: bool,
                    expect: Sequence[Sequence[Node]] | None = None) -> None:
        wanted = builtins.list(nodes)
        for node in wanted:
            check_node_row(node.name, node.path, node.weight, node.state)
            self._refuse_nul_name(node.name)
        for column in ("name", "path"):
            values = [getattr(node, column) for node in wanted]
            if len(set(values)) != len(values):
                raise ConfigurationError(f"the new node list names a {column} twice; nothing was changed")
        if not any(node.state == "active" for node in wanted):
            raise ConfigurationError("the new node list has no active node; nothing was changed")

        def body(conn: Connection[Any]) -> None:
            current = self._lock_all(conn)  # first: a registration onto them waits (or committed before)
            if only_if_pristine and conn.execute(
                    "SELECT 1 FROM shardlite.tenants t JOIN shardlite.nodes n ON n.name = t.node "
                    "WHERE n.root_id = %s LIMIT 1", (self.root_id,)).fetchone():
                raise MetaConflict("the root holds tenants (or tombstones) now; its node list was not replaced")
            if expect is not None and all(current != builtins.list(option) for option in expect):
                raise MetaConflict("the root's node list changed meanwhile; it was not replaced")
            names = {node.name for node in wanted}
            for node in current:
                if node.name not in names:
                    if conn.execute("SELECT 1 FROM shardlite.tenants WHERE node = %s LIMIT 1",
                                    (node.name,)).fetchone():
                        raise ConfigurationError(f"node {node.name!r} holds tenant rows: it must stay in the list")
                    conn.execute("DELETE FROM shardlite.nodes WHERE name = %s AND root_id = %s",
                                 (node.name, self.root_id))
            # a new path may be another kept node's old one (unique per row): park the kept nodes on
            # placeholder paths no directory can have, then set the new ones
            conn.execute("UPDATE shardlite.nodes SET path = '/dev/null/' || name WHERE root_id = %s",
                         (self.root_id,))
            now = time.time()
            for node in wanted:
                if conn.execute("UPDATE shardlite.nodes SET path = %s, weight = %s, state = %s "
                                "WHERE name = %s AND root_id = %s RETURNING 1",
                                (node.path, node.weight, node.state, node.name, self.root_id)).fetchone() is None:
                    self._insert(conn, node, now)

        in_transaction(self.pool, body)

    def forget_all(self) -> int:
        def body(conn: Connection[Any]) -> int:
            self._lock_all(conn)  # a registration onto them waits (or committed before)
            cur = conn.execute("DELETE FROM shardlite.tenants t USING shardlite.nodes n "
                               "WHERE n.name = t.node AND n.root_id = %s", (self.root_id,))
            gone = cur.rowcount
            conn.execute("DELETE FROM shardlite.moves WHERE plan_id IN (SELECT id FROM shardlite.plans "
                         "WHERE root_id = %s)", (self.root_id,))
            conn.execute("DELETE FROM shardlite.plans WHERE root_id = %s", (self.root_id,))
            conn.execute("DELETE FROM shardlite.nodes WHERE root_id = %s", (self.root_id,))
            conn.execute("DELETE FROM shardlite.roots WHERE id = %s", (self.root_id,))  # and its kv (cascade)
            return gone

        return in_transaction(self.pool, body)


def _conforms(nodes: PgNodes) -> NodeRegistry:
    return nodes  # mypy checks here that PgNodes satisfies the NodeRegistry contract
