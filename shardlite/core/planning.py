"""Rebalance planning, pure (no I/O): which tenants move where when the node set changes (rules: stable routing, the
same key maps to the same node in every process).

The target of every tenant is what the ring over the *active* nodes proposes (draining nodes take no
tenants). A tenant moves when the catalog places it elsewhere. With consistent hashing, adding one node to
N equally weighted ones moves about 1/(N+1) of the tenants, all of them onto the new node, and draining a
node moves exactly its tenants, spread over the others.

Free space (rule: failures stay in their tenant and waits are bounded: a full node must not stop work elsewhere).
When the caller passes the free bytes
of the target nodes (``free``; the caller measures them, e.g. ``os.statvfs`` of each node directory), a
move is planned only if it fits: its :func:`space_needed` on top of what earlier moves of the plan put on
the same volume (nodes sharing a file system share one budget, ``volumes``) leaves ``reserve`` bytes free.
Moves are considered in the plan's order (source, key); one that does not fit is left out with its reason
(:class:`LeftOut`) and its tenant stays where it is, so ``after`` counts it on its source.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field

from .ring import Ring

__all__ = ["Placement", "Move", "LeftOut", "Plan", "plan_moves", "fingerprint", "space_needed",
           "DEFAULT_RESERVE", "SIZE_MARGIN"]

#: Bytes every target volume keeps free after the moves planned onto it (the tenants already there go on
#: growing; a file system filled to the last block fails every write on it).
DEFAULT_RESERVE = 64 * 1024 * 1024
#: Extra room a move needs over its tenant's current size: the copy's own WAL while it is checked and
#: unmarked, and what the application writes to the tenant while it moves.
SIZE_MARGIN = 0.10


def space_needed(size: int, margin: float = SIZE_MARGIN) -> int:
    """Bytes a move of a tenant of ``size`` bytes needs on its target (the size plus ``margin``)."""
    return math.ceil(size * (1 + margin))


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


@dataclass(frozen=True, slots=True)
class LeftOut:
    """A move the ring asks for that the plan leaves out, and why (the text names the target node)."""

    move: Move
    reason: str


@dataclass
class Plan:
    moves: list[Move]
    before: dict[str, tuple[int, int]] = field(default_factory=dict)  # node -> (tenants, bytes)
    after: dict[str, tuple[int, int]] = field(default_factory=dict)   # with the planned moves only
    fingerprint: str = ""
    left_out: list[LeftOut] = field(default_factory=list)

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
               draining: Iterable[str] = (), *, free: Mapping[str, int] | None = None,
               volumes: Mapping[str, Hashable] | None = None, reserve: int = DEFAULT_RESERVE,
               margin: float = SIZE_MARGIN) -> Plan:
    """Moves that bring every tenant to the node the ring over the active nodes (``weights``) proposes.

    ``draining`` nodes are not in ``weights`` and keep no tenants. Raises ValueError without active nodes.

    ``free``: free bytes per target node (a node missing from it is not limited); ``volumes``: the file
    system of each node (nodes mapped to the same value share their free bytes; by default every node is
    its own). A move is planned only when ``space_needed(size, margin)`` on top of the moves planned onto
    the same volume before it leaves ``reserve`` bytes free; the others are in ``Plan.left_out``.
    """
    placements = list(placements)
    draining = set(draining)
    ring = Ring(dict(weights))
    nodes = set(weights) | draining | {p.node for p in placements}
    wanted = [Move(p.key, p.node, target, p.generation, p.size)
              for p in placements if (target := ring.node_for(p.key)) != p.node]
    wanted.sort(key=lambda m: (m.source, m.key))
    moves: list[Move] = []
    left_out: list[LeftOut] = []
    used: dict[Hashable, int] = {}
    for move in wanted:
        budget = None if free is None else free.get(move.target)
        if budget is None:
            moves.append(move)
            continue
        volume = move.target if volumes is None else volumes.get(move.target, move.target)
        need = space_needed(move.size, margin)
        planned = used.get(volume, 0)
        if planned + need + reserve <= budget:
            used[volume] = planned + need
            moves.append(move)
        else:
            left_out.append(LeftOut(move, (
                f"does not fit on node {move.target!r}: needs {need} bytes, the node has {budget} free, "
                f"{planned} already planned onto its volume and {reserve} kept in reserve")))
    targets = {m.key: m.target for m in moves}
    before = {n: [0, 0] for n in nodes}
    after = {n: [0, 0] for n in nodes}
    for p in placements:
        home = targets.get(p.key, p.node)
        before[p.node][0] += 1
        before[p.node][1] += p.size
        after[home][0] += 1
        after[home][1] += p.size
    return Plan(moves, {n: (v[0], v[1]) for n, v in sorted(before.items())},
                {n: (v[0], v[1]) for n, v in sorted(after.items())},
                fingerprint(weights, draining, [p for p in placements if p.key in targets]), left_out)
