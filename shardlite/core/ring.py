"""Consistent hashing ring: uhashring with an xxhash hash function (rules: stable routing, the same key maps to the
same node in every process).

Python's built-in string hashing is salted per process (PYTHONHASHSEED); xxh3-64 of the UTF-8 text is
not, so every process proposes the same node for the same key. Adding a node to N equally weighted nodes
moves about 1/(N+1) of the keys, all of them onto the new node: a property of consistent hashing that the
tests pin.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping

import xxhash
from uhashring import HashRing

__all__ = ["Ring", "DEFAULT_VNODES"]

#: Virtual nodes per unit of weight.
DEFAULT_VNODES = 160


def _xxh3(text: object) -> int:
    return xxhash.xxh3_64_intdigest(str(text).encode("utf-8"))


class Ring:
    """Maps canonical keys to node names.

    ``weights`` maps node name to a positive integer weight; a node of weight 2 owns about twice the keys.
    """

    def __init__(self, weights: Mapping[str, int], *, vnodes: int = DEFAULT_VNODES) -> None:
        if not weights:
            raise ValueError("a ring needs at least one node")
        for name, weight in weights.items():
            if not isinstance(weight, int) or weight < 1:
                raise ValueError(f"node {name!r}: weight must be a positive integer")
        self.weights = dict(sorted(weights.items()))
        self.vnodes = vnodes
        self._ring = HashRing(
            {name: {"weight": weight, "vnodes": vnodes} for name, weight in self.weights.items()},
            hash_fn=_xxh3,
        )

    def node_for(self, key: str) -> str:
        """The node this ring proposes for ``key`` (a canonical key)."""
        node = self._ring.get_node(key)
        assert isinstance(node, str)
        return node

    def __repr__(self) -> str:
        return f"Ring({self.weights!r})"
