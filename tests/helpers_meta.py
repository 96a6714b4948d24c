"""The metadata backends of the conformance suite (``tests/test_meta_*.py``) and how to open each."""

from __future__ import annotations

from collections.abc import Sequence

from shardlite import Settings
from shardlite.meta import MetaStore
from shardlite.meta.sqlite import SqliteMeta

#: The metadata backends every conformance test runs over (a PostgreSQL one joins when it exists).
META_BACKENDS = ["sqlite"]


def open_meta(backend: str, root: str, *, create: bool = True,
              default_nodes: Sequence[tuple[str, str, int]] = (("n1", "n1", 1),)) -> MetaStore:
    """A :class:`~shardlite.meta.store.MetaStore` of ``backend`` on ``root``, opened."""
    if backend != "sqlite":
        raise ValueError(f"unknown metadata backend {backend!r}")
    store = SqliteMeta(root, Settings())
    store.open(create=create, default_nodes=default_nodes)
    return store
