"""The contract of a metadata backend as a whole: :class:`MetaStore`, one per data root."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from .kv import MetaKV
from .pending import DeadLetters, PendingWork

__all__ = ["MetaStore"]


class MetaStore(Protocol):
    """One data root's metadata. Thread-safe: every method may be called from any thread.

    Its parts (one attribute per concept, each with its own contract module in :mod:`shardlite.meta`) are
    usable between :meth:`open` and :meth:`close`.
    """

    @property
    def location(self) -> str:
        """Where the metadata lives, printable as it is: never a password or any other secret."""
        ...

    @property
    def exists(self) -> bool:
        """True when the store was created already (by any process), whether or not this object is open."""
        ...

    @property
    def closed(self) -> bool:
        ...

    @property
    def pending(self) -> PendingWork:
        """The relay's pending-work index (:mod:`shardlite.meta.pending`)."""
        ...

    @property
    def dead_letters(self) -> DeadLetters:
        """The relay's dead letters (:mod:`shardlite.meta.pending`)."""
        ...

    @property
    def kv(self) -> MetaKV:
        """Small named values (:mod:`shardlite.meta.kv`)."""
        ...

    def open(self, *, create: bool, default_nodes: Sequence[tuple[str, str, int]] = ()) -> None:
        """Open the store, creating it when ``create`` (else :class:`~shardlite.ConfigurationError` when it
        does not exist), and bring shardlite's schema to the current version (several processes may open a
        new root at once: exactly one creates it). ``default_nodes`` (``(name, path, weight)``, the path
        relative to the root or absolute) are registered when the store has no node yet."""
        ...

    def close(self) -> None:
        """Release every connection (idempotent). A closed store raises
        :class:`~shardlite.ConfigurationError` ("the router is closed") on use."""
        ...
