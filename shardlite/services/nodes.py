"""Storage nodes: list, add, drain and remove (``shardlite nodes ...`` and ``router.nodes``).

A node is a directory, possibly on its own disk. Adding one changes what the ring *proposes* for new
tenants and what ``rebalance plan`` moves; existing tenants stay where the catalog says until moved.
Removing one first drains it: it is marked ``draining`` (no new tenant lands there), its tenants are moved
away by a rebalance, and the node row goes once it holds nothing.
"""

from __future__ import annotations

import builtins
import os
from dataclasses import asdict
from typing import Any

from ..errors import ConfigurationError
from ..files.catalog import Node
from ..files.engine import ensure_private_dir
from ..front.store import Store
from ..meta.nodes import check_node_name

__all__ = ["Nodes"]


def _inside(path: str, other: str) -> bool:
    path, other = os.path.realpath(path), os.path.realpath(other)
    return path == other or path.startswith(other.rstrip(os.sep) + os.sep)


class Nodes:
    """``router.nodes``: the catalog's node list."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def list(self) -> list[Node]:
        return self._store.meta.nodes.list()

    def counts(self) -> builtins.list[dict[str, Any]]:
        per_node = self._store.meta.tenants.count_by_node()
        return [asdict(n) | {"tenants": per_node.get(n.name, 0)} for n in self.list()]

    def add(self, name: str, *, path: str | None = None, weight: int = 1) -> Node:
        """Register a node (its directory is created 0700). ``path`` defaults to ``<root>/<name>``."""
        store = self._store
        check_node_name(name)
        if not isinstance(weight, int) or isinstance(weight, bool) or not 1 <= weight <= 1000:
            raise ConfigurationError("a node's weight is an integer from 1 to 1000")
        nodes = self.list()
        if any(n.name == name for n in nodes):
            raise ConfigurationError(f"node {name!r} already exists")
        target = os.path.abspath(path) if path else os.path.join(store.root, name)
        for node in nodes:
            if _inside(target, node.path) or _inside(node.path, target):
                raise ConfigurationError(f"node path {target} overlaps node {node.name!r} at {node.path}")
        if os.path.exists(target) and not os.path.isdir(target):
            raise ConfigurationError(f"node path {target} exists and is not a directory")
        try:
            ensure_private_dir(target)
        except OSError as exc:
            raise ConfigurationError(f"cannot create node directory {target}: {exc}") from exc
        if not os.access(target, os.W_OK | os.X_OK):
            raise ConfigurationError(f"node directory {target} is not writable")
        stored = os.path.relpath(target, store.root) if _inside(target, store.root) else target
        store.meta.nodes.add(name, stored, weight)
        store._refresh_nodes()
        return next(n for n in self.list() if n.name == name)

    def drain(self, name: str) -> Node:
        """Mark ``name`` draining: the ring stops proposing it; ``rebalance plan`` moves its tenants."""
        nodes = {n.name: n for n in self.list()}
        if name not in nodes:
            raise ConfigurationError(f"unknown node {name!r} (nodes: {', '.join(sorted(nodes))})")
        active = [n for n in nodes.values() if n.state == "active"]
        if nodes[name].state == "active" and len(active) == 1:
            raise ConfigurationError(f"{name!r} is the last active node; add another before removing it")
        self._store.meta.nodes.set_state(name, "draining")
        self._store._refresh_nodes()
        return next(n for n in self.list() if n.name == name)

    def remove(self, name: str) -> None:
        """Delete a drained node that holds no tenant (``ConfigurationError`` otherwise)."""
        nodes = {n.name: n for n in self.list()}
        if name not in nodes:
            raise ConfigurationError(f"unknown node {name!r} (nodes: {', '.join(sorted(nodes))})")
        if nodes[name].state != "draining":
            raise ConfigurationError(f"drain node {name!r} first (`shardlite nodes remove` does both)")
        self._store.meta.nodes.remove(name)  # F1: tombstones on it move to a remaining node
        self._store._refresh_nodes()
