"""What one tenant creation costs the PostgreSQL metadata: statements, round trips, commits and WAL flushes.

Usage::

    .venv/bin/python benchmarks/create_trips.py [--count 200]

Starts a throwaway server (``shardlite.testing.postgres``) with ``log_statement=all``, opens a ``Router``
with its metadata there (``benchmarks/workloads.py``'s six-table schema), creates one untimed tenant, then
``--count`` new tenants with their first write, and reports per creation:

* the statements the router's own connections sent (the server log, ``application_name=shardlite``; psycopg's
  ``BEGIN``/``COMMIT`` of a ``conn.transaction()`` are statements there, so each is one round trip), by text;
* the WAL flushes (``pg_stat_wal.wal_sync``, server-wide, read after the router's connections closed, since
  a backend reports its statistics when it exits): a commit that waits for its flush is one; commits made
  without waiting are flushed later by the WAL writer, many at a time. ``xact_commit`` is no help: it counts
  read-only transactions too.

A benchmark tool, not a test: the numbers are counts, not times.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import workloads as w  # noqa: E402

from shardlite import Router  # noqa: E402
from shardlite.testing.postgres import postgres  # noqa: E402

_LINE = re.compile(r"^\[(?P<app>[^\]]*)\] ?LOG:  (?:statement|execute [^:]*): (?P<sql>.*)$")


def _wal(dsn: str) -> tuple[int, int]:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT wal_sync, wal_records FROM pg_stat_wal").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _shape(sql: str) -> str:
    sql = " ".join(sql.split())
    return sql[:110] + ("..." if len(sql) > 110 else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args(argv)
    settings = {"log_statement": "all", "log_line_prefix": "[%a] ", "track_wal_io_timing": "on"}
    with postgres(settings=settings) as server, tempfile.TemporaryDirectory() as tmp:
        dsn = server.create_database("trips")
        root = os.path.join(tmp, "root")
        with Router(root, schema=w.SIX_TABLES, meta=dsn) as router:  # creates the root
            with router.transaction("warm:0") as tx:
                tx.execute(w.FIRST_INSERT, w.FIRST_PARAMS)
        time.sleep(1.0)  # a backend reports its WAL statistics when it exits (or at most once a second)
        router = Router(root, schema=w.SIX_TABLES, meta=dsn, max_open=4096)
        try:
            with open(server.logfile, "rb") as f:
                start = f.seek(0, os.SEEK_END)
            wal_before = _wal(server.dsn())
            for i in range(args.count):
                with router.transaction(f"org:{i}") as tx:
                    tx.execute(w.FIRST_INSERT, w.FIRST_PARAMS)
        finally:
            router.close()
        time.sleep(1.0)
        wal_after = _wal(server.dsn())
        with open(server.logfile, "rb") as f:
            f.seek(start)
            lines = f.read().decode("utf-8", "replace").splitlines()
    shapes: collections.Counter[str] = collections.Counter()
    for line in lines:
        found = _LINE.match(line)
        if found and found["app"] == "shardlite":
            shapes[_shape(re.sub(r"'[^']*'|\b\d+(\.\d+)?\b", "?", found["sql"]))] += 1
    n = args.count
    total = sum(shapes.values())
    print(f"{n} creations on PostgreSQL metadata (the router's pooled connections):")
    print(f"  statements (round trips) per creation: {total / n:.2f}")
    for sql, count in shapes.most_common():
        print(f"    {count / n:5.2f}  {sql}")
    print(f"  WAL flushes (durable commits) per creation: {(wal_after[0] - wal_before[0]) / n:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
