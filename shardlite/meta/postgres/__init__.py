"""The PostgreSQL metadata backend (psycopg 3): shardlite's tables in the schema ``shardlite`` of one
database, shared by every process of a root (and, with distinct node names, by several roots).

* :mod:`.schema`: the versioned tables, upgraded on open under an advisory lock;
* :mod:`.connect`: the connection pool and the one translation of "cannot reach the server" into
  :class:`~shardlite.MetaUnavailable`;
* :mod:`.meta`: :class:`PgMeta`, the :class:`~shardlite.meta.store.MetaStore`;
* :mod:`.pending`, :mod:`.kv`: the relay's pending-work flags and dead letters, the named values.

psycopg 3 rather than asyncpg: it has one API for threads and asyncio, its own pool, and shardlite's core is
synchronous (the async front end runs it on worker threads), so one sync pool serves both front ends.
"""

from __future__ import annotations

from .meta import PgMeta

__all__ = ["PgMeta"]
