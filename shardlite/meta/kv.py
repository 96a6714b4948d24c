"""Small named values of the root's metadata: the contract :class:`MetaKV` (the SQLite backend:
:mod:`shardlite.meta.sqlite.kv`, the global DB's ``_shardlite_catalog_meta``).

For rare, small values that every process of the root must see: last-writer-wins ones such as the last error
a relay logged (``relay_last_error``, :mod:`shardlite.services.relay_ops`), and first-writer-wins ones such as
the root's replica location (``replicate``, recorded once by :meth:`MetaKV.put_if_absent`). Not for anything
hot, and not for anything that needs a general compare-and-set.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["MetaKV"]


class MetaKV(Protocol):
    """Named text values. Each call is one atomic unit; several threads and processes may call at once.
    Names and values are text without NUL (U+0000: :class:`ValueError`, nothing written). A store that cannot
    be reached raises :class:`~shardlite.MetaUnavailable` (nothing written; retryable)."""

    def get(self, name: str) -> str | None:
        """The committed value of ``name``, or None if it was never put."""
        ...

    def put(self, name: str, value: str) -> None:
        """Set ``name`` to ``value``, creating or replacing it: the last writer wins."""
        ...

    def put_if_absent(self, name: str, value: str) -> str:
        """Set ``name`` to ``value`` only if it was never put, atomically: of several writers racing on one
        name in any threads and processes, exactly one value is stored and every one of them gets it back.
        Returns the value stored now (``value`` when this call stored it or an equal one was there; the
        earlier value, left as it was, otherwise)."""
        ...
