"""Rebalance planning, pure (no I/O): which tenants move where when the node set changes (brief rule 2).

The target of every tenant is what the ring over the *active* nodes proposes (draining nodes take no
tenants). A tenant moves when the catalog places it elsewhere. With consistent hashing, adding one node to
N equally weighted ones moves about 1/(N+1) of the tenants, all of them onto the new node, and draining a
node moves exactly its tenants, spread over the others.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .ring import Ring

__all__ = ["Placement", "Move", "Plan", "plan_moves", "fingerprint"]


@dataclass(frozen=True, slots=True)
class Placement:
    """A live tenant as the catalog places it."""

    key: str
    node: str
    generation: int
    size: int = 0


@dataclass(frozen=True, slots=True)
class Move:
    key: str
    source: str
    target: str
    generation: int
    size: int


@dataclass
class Plan:
    moves: list[Move]
    before: dict[str, tuple[int, int]] = field(default_factory=dict)  # node -> (tenants, bytes)
    after: dict[str, tuple[int, int]] = field(default_factory=dict)
    fingerprint: str = ""

    @property
    def bytes(self) -> int:
        return sum(m.size for m in self.moves)


def fingerprint(weights: Mapping[str, int], draining: Iterable[str], placements: Iterable[Placement]) -> str:
    """A digest of what a plan depends on: the node set and the placements of the tenants it moves. A plan
    whose fingerprint no longer matches is stale; tenants created meanwhile do not make it stale (the ring
    already places them over the same nodes)."""
    h = hashlib.sha256()
    for name, weight in sorted(weights.items()):
        h.update(f"n\0{name}\0{weight}\n".encode())
    for name in sorted(draining):
        h.update(f"d\0{name}\n".encode())
    for p in sorted(placements, key=lambda p: p.key):
        h.update(f"t\0{p.key}\0{p.node}\0{p.generation}\n".encode())
    return h.hexdigest()


def plan_moves(placements: Iterable[Placement], weights: Mapping[str, int],
               draining: Iterable[str] = ()) -> Plan:
    """Moves that bring every tenant to the node the ring over the active nodes (``weights``) proposes.

    ``draining`` nodes are not in ``weights`` and keep no tenants. Raises ValueError without active nodes.
    """
    placements = list(placements)
    draining = set(draining)
    ring = Ring(dict(weights))
    nodes = set(weights) | draining | {p.node for p in placements}
    before = {n: [0, 0] for n in nodes}
    after = {n: [0, 0] for n in nodes}
    moves = []
    for p in placements:
        target = ring.node_for(p.key)
        before[p.node][0] += 1
        before[p.node][1] += p.size
        after[target][0] += 1
        after[target][1] += p.size
        if target != p.node:
            moves.append(Move(p.key, p.node, target, p.generation, p.size))
    moves.sort(key=lambda m: (m.source, m.key))
    moved = {m.key for m in moves}
    return Plan(moves, {n: (v[0], v[1]) for n, v in sorted(before.items())},
                {n: (v[0], v[1]) for n, v in sorted(after.items())},
                fingerprint(weights, draining, [p for p in placements if p.key in moved]))
