"""The metadata layer: everything shardlite keeps outside the tenant files, behind contracts.

Each concept has a module here holding its contract, a :class:`typing.Protocol` whose docstrings are the
contract (what every backend must guarantee: atomicity, compare-and-set rules, the error on conflict); one
folder per backend implements them:

* :mod:`shardlite.meta.sqlite`: the embedded default, ``<root>/global.db`` and ``<root>/app_global.db``;
* a PostgreSQL backend (planned: issue 15).

A :class:`~shardlite.front.store.Store` holds one :class:`~shardlite.meta.store.MetaStore` (``store.meta``); the
router, the relay, the rebalancer, backup, restore and the CLI reach metadata through it. Every backend passes
the same conformance suite (``tests/test_meta_*.py``, run over each backend by the ``meta`` fixture).

Errors: :class:`~shardlite.MetaConflict` when a compare-and-set lost (nothing written), and
:class:`~shardlite.MetaUnavailable` when the store cannot be reached (retryable).
"""

from __future__ import annotations

from .journal import MoveJournal
from .store import MetaStore

__all__ = ["MetaStore", "MoveJournal"]
