"""Row 6 (memory), run as separate processes so the figure is the peak RSS of a process that only reads.

Subcommands (every one takes the data root first):

``init ROOT``                     create the root (one node, a one-table schema).
``create ROOT START STOP``        create the real tenants ``mem:START`` .. ``mem:STOP-1`` through the Router
                                  (create + schema + ten rows each); several of these run in parallel.
``fill ROOT REAL TOTAL``          add catalog rows ``mem:REAL`` .. ``mem:TOTAL-1`` directly into the global DB's
                                  ``_shardlite_tenants`` table (with their ``_shardlite_generations`` rows)
                                  through APSW, with no Router open: catalog entries without files, so the
                                  catalog holds TOTAL tenants without creating TOTAL files. They are never read.
``measure ROOT REAL READS MAX_OPEN``
                                  a fresh process: open a Router with ``max_open``, read at random across the
                                  REAL tenants (a shuffled pass over all of them first, then random picks) and
                                  print a JSON object with the peak RSS (``ru_maxrss``) in MB.

Why ``measure`` starts a grandchild: on Linux, ``ru_maxrss`` survives ``execve`` and a forked child starts from
its parent's resident size, so a worker started straight from a big benchmark process would report the
parent's RSS. ``measure`` therefore re-launches itself (``measure-child``) from this small process, and the
grandchild's ``ru_maxrss`` is its own (at least the few MB of this launcher). ``VmHWM`` from ``/proc`` (the
peak of the current address space only) is reported alongside as a cross-check where available.
"""

from __future__ import annotations

import json
import os
import random
import resource
import secrets
import sys
import time

SCHEMA = ["CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL)"]
ROWS_PER_TENANT = 10


def key(i: int) -> str:
    return f"mem:{i}"


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def proc_status_mb(field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process from ``/proc/self/status`` (Linux), in MB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def init(root: str) -> None:
    from shardlite import Router

    Router(root, schema=SCHEMA).close()


def create(root: str, start: int, stop: int) -> None:
    from shardlite import Router

    with Router(root, schema=SCHEMA, max_open=2048) as router:
        for i in range(start, stop):
            with router.transaction(key(i)) as tx:
                for j in range(ROWS_PER_TENANT):
                    tx.execute("INSERT INTO t(id, v) VALUES (?, ?)", (j, f"tenant {i} row {j}"))


def fill(root: str, real: int, total: int) -> None:
    import apsw

    conn = apsw.Connection(os.path.join(root, "global.db"))
    try:
        conn.setbusytimeout(5000)
        node = conn.execute("SELECT name FROM _shardlite_nodes ORDER BY name LIMIT 1").fetchall()[0][0]
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        for i in range(real, total):
            k = key(i)
            conn.execute("INSERT INTO _shardlite_generations(key, node, purpose, at) VALUES (?, ?, 'create', ?)",
                         (k, node, now))
            generation = conn.last_insert_rowid()
            conn.execute(
                "INSERT INTO _shardlite_tenants(key, node, generation, epoch, state, incarnation, schema_version, "
                "created, updated) VALUES (?, ?, ?, 1, 'active', ?, ?, ?, ?)",
                (k, node, generation, secrets.token_hex(16), len(SCHEMA), now, now))
        conn.execute("COMMIT")
    finally:
        conn.close()


def measure(root: str, real: int, reads: int, max_open: int) -> None:
    start_rss = peak_rss_mb()
    from shardlite import Router

    import_rss = peak_rss_mb()
    rng = random.Random(7)
    order = list(range(real))
    rng.shuffle(order)
    picks = order + [rng.randrange(real) for _ in range(max(0, reads - real))]
    ids = [(rng.randrange(ROWS_PER_TENANT),) for _ in range(len(picks))]
    keys = [key(i) for i in picks]
    router = Router(root, schema=SCHEMA, max_open=max_open)
    try:
        before = peak_rss_mb()
        start = {"rss_at_start_mb": start_rss, "rss_after_import_mb": import_rss}
        t0 = time.perf_counter()
        for k, p in zip(keys, ids, strict=True):
            rows = router.query(k, "SELECT v FROM t WHERE id=?", p)
            if not rows:
                raise SystemExit(f"tenant {k} returned no row")
        elapsed = time.perf_counter() - t0
        status = router.status()
        result = {
            **start,
            "peak_rss_mb": peak_rss_mb(),
            "rss_before_reads_mb": before,
            "rss_now_mb": proc_status_mb("VmRSS"),
            "vm_hwm_mb": proc_status_mb("VmHWM"),
            "reads": len(keys),
            "distinct_tenants_read": len(set(picks)),
            "catalog_tenants": sum(status["tenants_per_node"].values()),
            "open_connections": status["open_connections"],
            "max_open": max_open,
            "read_us": elapsed / len(keys) * 1e6,
        }
    finally:
        router.close()
    print(json.dumps(result))


def main() -> None:
    command, root, *args = sys.argv[1:]
    if command == "init":
        init(root)
    elif command == "create":
        create(root, int(args[0]), int(args[1]))
    elif command == "fill":
        fill(root, int(args[0]), int(args[1]))
    elif command == "measure":
        import subprocess

        done = subprocess.run([sys.executable, os.path.abspath(__file__), "measure-child", root, *args],
                              stdout=subprocess.PIPE, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["launcher_peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
    elif command == "measure-child":
        measure(root, int(args[0]), int(args[1]), int(args[2]))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main()
