"""The node registry's contract: :class:`NodeRegistry` (the storage nodes of a data root).

A node is a directory, possibly on its own disk: a name, a path (recorded relative to the root when it
lies inside it, so the root can move, else absolute), a weight for the ring (1 and up) and a state,
``active`` (the ring proposes it for new tenants) or ``draining`` (it is being emptied).

Rules every backend keeps (each has a test in ``tests/test_meta_nodes.py``):

* Every method is one atomic unit; a refused call writes nothing.
* **Scope.** A registry is one root's: :meth:`~NodeRegistry.list` returns this root's nodes (paths resolved
  against this root), and :meth:`~NodeRegistry.set_state`, :meth:`~NodeRegistry.remove` and
  :meth:`~NodeRegistry.replace_all` touch only them. Several roots may share one store (a PostgreSQL
  database) only with distinct node names: a name is unique across the store, and :meth:`~NodeRegistry.add`
  refuses a name another root owns (:class:`~shardlite.ConfigurationError` saying so). A recorded path is
  unique per root (a relative path is a directory inside each root). With one root per store (SQLite) both
  are the same thing.
* Names are ordered by code point. Names and recorded paths are unique: a duplicate raises
  :class:`~shardlite.ConfigurationError`, never a backend's constraint error.
* **Tombstones and removal** (gap F1): a dropped tenant's row (its tombstone) keeps its generation and
  epoch for ever, but its node names no file any more (the drop deleted it) and routes nothing. So a
  tombstone never blocks removing its node: :meth:`NodeRegistry.remove` moves the tombstones of the
  removed node onto a remaining node (the first active one by name, else the first by name) in the same
  transaction, keeping their generation, epoch and state. Live tenants (``active``, ``moving``) and a
  drop under way (``dropping``) do block it.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Sequence
from typing import Final, Protocol

from ..errors import ConfigurationError
from ..files.catalog import Node

__all__ = ["NodeRegistry", "Node", "NODE_STATES", "NODE_NAME_RE", "check_node_name", "check_node_row"]

#: A node's name (``\Z``, not ``$``: ``$`` would let a final newline pass).
NODE_NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


def check_node_name(name: object) -> str:
    """``name`` if it is a valid node name, else :class:`ConfigurationError` saying what one looks like."""
    if not isinstance(name, str) or not NODE_NAME_RE.fullmatch(name):
        raise ConfigurationError(f"invalid node name {name!r}: use 1 to 64 letters, digits, '_', '.' or '-', "
                                 "starting with a letter or digit")
    return name

#: The states a node may have.
NODE_STATES: Final = ("active", "draining")


class NodeRegistry(Protocol):
    """The node list of one data root (``meta.nodes``). Thread-safe, and safe across processes."""

    def list(self) -> builtins.list[Node]:
        """Every node of this root, by name (code-point order), with its path made absolute (a recorded
        relative path is joined to this root)."""
        ...

    def add(self, name: str, path: str, weight: int) -> None:
        """Register an ``active`` node; ``path`` as it is to be recorded (relative to the root or absolute).

        An existing name (this root's, or another root's in a shared store) or an existing recorded path
        of this root (compared as text: the caller compares real paths for overlaps) raises
        :class:`~shardlite.ConfigurationError` naming it; nothing is written. A weight below 1 raises
        :class:`~shardlite.ConfigurationError`."""
        ...

    def set_state(self, name: str, state: str) -> None:
        """Set the state of this root's node ``name`` (``active`` or ``draining``; idempotent).

        An unknown name (another root's node is unknown here), an unknown state, or draining the last
        ``active`` node of this root (decided in the same
        transaction, so two concurrent drains cannot leave none) raise
        :class:`~shardlite.ConfigurationError`; nothing is written."""
        ...

    def remove(self, name: str) -> bool:
        """Delete this root's node ``name``; True when it was there, False when this root has no such node
        (a no-op, so two processes completing one rebalance both succeed; another root's node is never
        touched).

        Atomic check-and-delete: when a live tenant (``active``, ``moving``) or a drop under way
        (``dropping``) is on it, :class:`~shardlite.ConfigurationError` says what to do (drain and
        rebalance, or finish the drop) and nothing is written. Tombstones on it move to a remaining node
        (module doc); when no other node remains to hold them, :class:`~shardlite.ConfigurationError`."""
        ...

    def replace_all(self, nodes: Sequence[Node], *, only_if_pristine: bool,
                    expect: Sequence[Sequence[Node]] | None = None) -> None:
        """Make this root's node list exactly ``nodes`` (each ``path`` as recorded: relative to the root or
        absolute, not made absolute), in one transaction: nodes not named are deleted, named ones get the
        given path, weight and state, new ones are inserted.

        Compare-and-set, checked in that transaction: with ``only_if_pristine``, no tenant row may exist
        (tombstones included) on this root's nodes; with ``expect``, the node list as recorded (by name)
        must equal one of ``expect``. Otherwise :class:`~shardlite.MetaConflict` and nothing is written.
        Invalid ``nodes`` (a duplicate name or path, a weight below 1, an unknown state, no active node, a
        name another root owns) and a node still holding tenant rows that ``nodes`` leaves out raise
        :class:`~shardlite.ConfigurationError`; nothing is written."""
        ...

    def forget_all(self) -> int:
        """Delete every tenant row on this root's nodes (tombstones included) and then the nodes themselves,
        in one transaction, and return how many tenant rows went; a backend that records the root itself
        (PostgreSQL's ``roots``) deletes that record too, with the root's named values and rebalance plans.
        Generations stay never reused; accounts and sessions (shared by the roots of a database) are not
        touched; another root's rows never are.

        For taking back a restore into a new root before its directory is removed (the directory holds
        the tenant files these rows describe). Afterwards this root has no node: it must not be used again."""
        ...


def check_node_row(name: str, path: str, weight: int, state: str) -> None:
    """:class:`~shardlite.ConfigurationError` unless a node row is storable (the checks every backend makes
    before writing; the name's syntax is :func:`check_node_name`'s business)."""
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"invalid node name {name!r}")
    if not isinstance(path, str) or not path or "\0" in path:
        raise ConfigurationError(f"invalid path {path!r} for node {name!r}")
    if type(weight) is not int or weight < 1:
        raise ConfigurationError(f"node {name!r}: a weight is an integer of at least 1, not {weight!r}")
    if state not in NODE_STATES:
        raise ConfigurationError(f"node {name!r}: state {state!r} is not one of {', '.join(NODE_STATES)}")
