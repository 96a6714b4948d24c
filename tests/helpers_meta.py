"""The metadata backends of the conformance suite (``tests/test_meta_*.py``) and how to open each.

A conformance module names the parts of the store it exercises in a module-level ``META_PART`` (an
attribute name such as ``"journal"``, or a tuple of them); on a backend that does not have them yet its tests
are skipped with a loud reason (:func:`missing_parts`), so no test of a part runs against a backend that
lacks it, and every skip says what is left to build.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import cast

from shardlite import Settings
from shardlite.meta import MetaStore
from shardlite.meta.choose import ENV_VAR, locate_store
from shardlite.meta.sqlite import SqliteMeta

#: The metadata backends every conformance test runs over. For "postgresql", the ``meta_backend`` fixture
#: puts a fresh database's URL in ``SHARDLITE_META`` (inherited by child processes, so they reopen the
#: same store through the root's ``meta.json``).
META_BACKENDS = ["sqlite", "postgresql"]


def open_meta(backend: str, root: str, *, create: bool = True,
              default_nodes: Sequence[tuple[str, str, int]] = (("n1", "n1", 1),)) -> MetaStore:
    """A :class:`~shardlite.meta.store.MetaStore` of ``backend`` on ``root``, opened."""
    if backend == "sqlite":
        store: object = SqliteMeta(root, Settings())
    elif backend == "postgresql":
        store = locate_store(root, Settings(), create=create)
        if getattr(store, "root_id", None) is None:
            raise ValueError(f"{ENV_VAR} names no PostgreSQL database: use the meta_backend fixture")
    else:
        raise ValueError(f"unknown metadata backend {backend!r}")
    opened = cast(MetaStore, store)
    opened.open(create=create, default_nodes=default_nodes)
    return opened


def missing_parts(backend: str, module: types.ModuleType) -> list[str]:
    """The parts ``module`` needs (its ``META_PART``) that ``backend``'s store does not have yet."""
    wanted = getattr(module, "META_PART", ())
    parts = (wanted,) if isinstance(wanted, str) else tuple(wanted)
    if backend != "postgresql" or not parts:
        return []
    from shardlite.meta.location import parse_location
    from shardlite.meta.postgres import PgMeta

    probe = PgMeta("/nonexistent", parse_location("postgresql://probe@127.0.0.1/probe"), "0" * 32, Settings())
    return [part for part in parts if not hasattr(probe, part)]
