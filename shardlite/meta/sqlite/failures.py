"""How the SQLite backend reports a metadata store it cannot use: :class:`~shardlite.MetaUnavailable`."""

from __future__ import annotations

import apsw

from ...errors import MetaUnavailable

__all__ = ["UNAVAILABLE", "unavailable", "refuse_nul"]

#: APSW errors that mean the global DB cannot be read or written now (not a bug in a statement, not a
#: constraint): the file is read-only, its disk full or failing, it cannot be opened.
UNAVAILABLE: tuple[type[BaseException], ...] = (apsw.ReadOnlyError, apsw.FullError, apsw.IOError,
                                                apsw.CantOpenError, apsw.CorruptError, apsw.NotADBError)


def unavailable(exc: BaseException, path: str, doing: str) -> MetaUnavailable:
    """The :class:`~shardlite.MetaUnavailable` to raise from ``exc`` (one of :data:`UNAVAILABLE`)."""
    return MetaUnavailable(f"the metadata store {path} could not be used while {doing} "
                           f"({type(exc).__name__}: {exc}); nothing of it was written: fix the file or its disk, "
                           "then retry (shardlite goes on by itself)")


def refuse_nul(*texts: str) -> None:
    """:class:`ValueError` when a text holds NUL (U+0000), which the contracts refuse on every backend (PostgreSQL
    cannot store it)."""
    for text in texts:
        if "\x00" in text:
            raise ValueError("metadata text may not contain NUL (U+0000); nothing was written")
