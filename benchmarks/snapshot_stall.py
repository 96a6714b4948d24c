"""How long a writer waits while the replicator takes the first snapshot of a large tenant: the image copied
under the write lock (``capture_locked`` without a reader, as before) against read after the lock is let go
(with a reader, what the replicator does from ``UNLOCKED_SNAPSHOT_BYTES`` on).

Usage::

    .venv/bin/python benchmarks/snapshot_stall.py              # 256 MB and 1 GB tenants
    .venv/bin/python benchmarks/snapshot_stall.py --mb 64

For each size and mode it builds a tenant file of that many MB (checkpointed, plus one commit in its log),
starts a writer process committing one-row updates without pause, takes the snapshot after a second, and
prints the writer's slowest commit while it ran and the snapshot's wall time. The ratio is the slowest commit
with the reader against without it (lower is better). Run it under ``uptime`` to read it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import apsw

from shardlite.files import walcapture as wc

WRITER = r"""
import json, sys, time, apsw
conn = apsw.Connection(sys.argv[1])
conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
conn.execute("PRAGMA wal_autocheckpoint=0")
conn.set_busy_timeout(60000)
stop, worst, n = time.monotonic() + float(sys.argv[2]), 0.0, 0
while time.monotonic() < stop:
    t = time.perf_counter()
    conn.execute("UPDATE c SET n = n + 1")
    worst, n = max(worst, time.perf_counter() - t), n + 1
print(json.dumps({"worst": worst, "commits": n}))
"""


def _wal(path: str) -> apsw.Connection:
    conn = apsw.Connection(path)
    conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
    conn.execute("PRAGMA journal_mode=WAL").fetchall()
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.set_busy_timeout(60000)
    return conn


def measure(folder: str, mb: int, with_reader: bool, seconds: float) -> dict[str, float]:
    path = os.path.join(folder, f"t-{mb}-{int(with_reader)}.db")
    conn = _wal(path)
    conn.execute("CREATE TABLE t(v BLOB)")
    conn.execute("CREATE TABLE c(n INTEGER)")
    conn.execute("INSERT INTO c VALUES (0)")
    for _ in range(mb):
        with conn:
            conn.executemany("INSERT INTO t VALUES (randomblob(4000))", [()] * 250)
    conn.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_TRUNCATE)
    conn.execute("UPDATE c SET n = 1")  # one commit in the log, not in the database file
    lock = _wal(path)
    lock.execute("SELECT 1 FROM sqlite_master").fetchall()
    files = wc.LogFiles(path)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, path, str(seconds)], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # the writer is committing
        started = time.perf_counter()
        reader = _wal(path) if with_reader else None
        try:
            got = wc.capture_locked(lock, files, wc.NO_CURSOR, reader=reader)
        finally:
            if reader is not None:
                reader.close()
        took = time.perf_counter() - started
        out = json.loads(writer.communicate(timeout=seconds + 120)[0])
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        conn.close()
        lock.close()
        files.close()
        for suffix in ("", "-wal", "-shm"):
            os.remove(path + suffix)
    assert got.snapshot is not None
    return {"snapshot_s": took, "worst_commit_s": out["worst"], "commits": out["commits"],
            "image_mb": len(got.snapshot) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, nargs="+", default=[256, 1024], help="tenant sizes in MB")
    parser.add_argument("--seconds", type=float, default=6.0, help="how long the writer commits")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="snapstall-") as folder:
        for mb in args.mb:
            rows = {mode: measure(folder, mb, mode, args.seconds) for mode in (False, True)}
            for mode, row in rows.items():
                print(f"{mb:5d} MB  {'read after the lock' if mode else 'copied under the lock':22s}  "
                      f"slowest commit {row['worst_commit_s'] * 1000:8.1f} ms  snapshot {row['snapshot_s']:6.2f} s  "
                      f"commits {row['commits']}")
            ratio = rows[True]["worst_commit_s"] / max(rows[False]["worst_commit_s"], 1e-9)
            print(f"{mb:5d} MB  slowest commit, read after the lock / copied under it: {ratio:.3f}x")


if __name__ == "__main__":
    main()
