"""Named values in the global DB's ``_shardlite_catalog_meta``: the SQLite side of :mod:`shardlite.meta.kv`."""

from __future__ import annotations

from ...files.authorizer import INTERNAL_SQL as _I
from ...files.globaldb import GlobalDB
from ..kv import MetaKV
from .failures import UNAVAILABLE, refuse_nul, unavailable

__all__ = ["SqliteKV"]


class SqliteKV:
    """:class:`~shardlite.meta.kv.MetaKV` in the global DB."""

    def __init__(self, db: GlobalDB) -> None:
        self.db = db

    def get(self, name: str) -> str | None:
        try:
            rows = self.db.read("SELECT value FROM _shardlite_catalog_meta WHERE name = ?", (name,))
        except UNAVAILABLE as exc:
            raise unavailable(exc, self.db.path, f"reading {name!r}") from exc
        return str(rows[0][0]) if rows else None

    def put(self, name: str, value: str) -> None:
        refuse_nul(name, value)
        try:
            with self.db.write() as conn:
                conn.execute(_I + "INSERT INTO _shardlite_catalog_meta(name, value) VALUES (?, ?) "
                             "ON CONFLICT(name) DO UPDATE SET value = excluded.value", (name, value))
        except UNAVAILABLE as exc:
            raise unavailable(exc, self.db.path, f"writing {name!r}") from exc

    def put_if_absent(self, name: str, value: str) -> str:
        refuse_nul(name, value)
        try:
            with self.db.write() as conn:  # BEGIN IMMEDIATE: the insert and the read see one state
                conn.execute(_I + "INSERT INTO _shardlite_catalog_meta(name, value) VALUES (?, ?) "
                             "ON CONFLICT(name) DO NOTHING", (name, value))
                rows = conn.execute(_I + "SELECT value FROM _shardlite_catalog_meta WHERE name = ?",
                                    (name,)).fetchall()
        except UNAVAILABLE as exc:
            raise unavailable(exc, self.db.path, f"writing {name!r}") from exc
        return str(rows[0][0])


def _conforms(kv: SqliteKV) -> MetaKV:
    return kv  # mypy checks here that SqliteKV satisfies the MetaKV contract
