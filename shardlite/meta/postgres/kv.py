"""Named values in ``shardlite.kv``: the PostgreSQL side of :mod:`shardlite.meta.kv`.

Each root has its own names (the rows carry its id, as its nodes do): roots sharing a database never see
each other's values. ``put`` is one upsert (``INSERT ... ON CONFLICT (root_id, name) DO UPDATE``):
concurrent writers serialise on the row and the last one wins; ``get`` one ``SELECT`` (committed data).
Deadlocks and serialization failures are retried (:mod:`.txn`). ``put_if_absent`` is an insert that does
nothing on a conflict and, when it did nothing, a read of the row that won (see ``_INSERT_NEW``). NUL is
refused before it reaches the server; a name with NUL was never put.
"""

from __future__ import annotations

from ..kv import MetaKV
from ..sqlite.failures import refuse_nul
from .connect import Pool
from .txn import has_nul, statement

__all__ = ["PgKV"]

_PUT = ("INSERT INTO shardlite.kv(root_id, name, value) VALUES (%s, %s, %s) "
        "ON CONFLICT (root_id, name) DO UPDATE SET value = excluded.value")


# ON CONFLICT DO NOTHING waits for a concurrent inserter of the same name to commit, but the statement's
# own snapshot (taken before) does not show that row: the value is read back in a second statement, whose
# snapshot (READ COMMITTED) does.
_INSERT_NEW = ("INSERT INTO shardlite.kv(root_id, name, value) VALUES (%s, %s, %s) ON CONFLICT (root_id, name) "
               "DO NOTHING RETURNING value")
_READ = "SELECT value FROM shardlite.kv WHERE root_id = %s AND name = %s"


class PgKV:
    """:class:`~shardlite.meta.kv.MetaKV` in ``shardlite.kv``."""

    def __init__(self, pool: Pool, root_id: str) -> None:
        self.pool, self.root_id = pool, root_id

    def get(self, name: str) -> str | None:
        if has_nul(name):
            return None
        found = statement(self.pool, lambda conn: conn.execute(_READ, (self.root_id, name)).fetchone())
        return str(found[0]) if found else None

    def put(self, name: str, value: str) -> None:
        refuse_nul(name, value)
        statement(self.pool, lambda conn: conn.execute(_PUT, (self.root_id, name, value)))

    def put_if_absent(self, name: str, value: str) -> str:
        refuse_nul(name, value)
        inserted = statement(self.pool, lambda conn: conn.execute(_INSERT_NEW, (self.root_id, name, value)).fetchone())
        if inserted is not None:
            return value
        found = statement(self.pool, lambda conn: conn.execute(_READ, (self.root_id, name)).fetchone())
        if found is None:  # never deleted in practice; a vanished row is put again
            return self.put_if_absent(name, value)
        return str(found[0])


def _conforms(kv: PgKV) -> MetaKV:
    return kv  # mypy checks here that PgKV satisfies the MetaKV contract
