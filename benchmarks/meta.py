"""Issue 15's figures: shardlite with its metadata on PostgreSQL vs the embedded SQLite metadata, in one run.

Usage::

    .venv/bin/python benchmarks/meta.py            # full run (a few minutes)
    .venv/bin/python benchmarks/meta.py --quick    # short run (about two minutes)
    .venv/bin/python benchmarks/meta.py --json     # JSON on stdout instead of the table
    .venv/bin/python benchmarks/meta.py --only m1,m5

How it measures: the paired-rounds method of ``benchmarks/compare.py``, whose helpers (``Side``,
``interleave``, ``row``) are imported, not copied. Each side runs ``n`` operations and returns the time
around them; sides are calibrated, warmed up, then run alternately (A B, B A, ...) for ``--rounds`` rounds; a
ratio is the median of the per-round ratios (PostgreSQL side ÷ embedded side, as throughput: higher is
better; row m3 is a time ratio: lower is better), the range after it the lowest and highest round.

PostgreSQL is a throwaway server from ``shardlite.testing.postgres.postgres()`` (Debian's package, loopback,
``fsync=on``, ``synchronous_commit=on``); every root gets a database of its own. The embedded sides are
the same code with ``meta`` left out (``<root>/global.db``, ``synchronous=NORMAL``). Rows (issue 15,
"Figures"):

* m1 / m2: routed sync point read / single-row write transaction of a warm tenant (target ≥ 0.95×);
* m3: first write to a new tenant (create + six tables + first insert; ``benchmarks/workloads.py``'s
  ``ShardliteCreator``), PostgreSQL time ≤ 2× the embedded time;
* m4: ``sessions.resolve`` of warm tokens (≥ 0.8×);
* m5: a ``revoke`` in this process seen by ``resolve`` in 2 reader processes (their own ``Router(root)``,
  warm cache): p99 of the delay from just before the revoke to the reader's first ``None`` (≤ 1 s);
* m6a / m6b: write transactions that emit one event, sync (one thread) and async (64 tasks), each on a
  source tenant whose outbox is empty (untimed, the relay drains after each block, which parks each source's
  pending-work flag), so every transaction emits the first event of an empty outbox: the metadata work of an
  emit (with a parked flag: a marker read in the tenant, and a wake-up of the flag after the commit, off the
  caller's thread; without one: the flag written before the commit) (≥ 0.7×); m6r: the same when the outbox
  already holds events (neither; reference);
* m7: the chat workload of ``benchmarks/chat_workload.py`` (its worker processes: one ``--meta`` row, the
  embedded row, the asyncpg rows), rounds of the same operations paired like the others: ≥ 0.8× the
  embedded row and ≥ 2× PostgreSQL alone through asyncpg (``synchronous_commit=on``, the default, and
  ``off``);
* m7d / m7e (``m7r``): the same chat workload with the relay in a process of its own (``shardlite relay run
  --app examples.chat.relay:router``, what ``python -m examples.chat --relay-process`` runs; PostgreSQL
  metadata; a round ends when that process has delivered every feed entry) vs the two asyncpg rows (≥ 2×,
  the same target): a deployment, not a redefinition of m7b/m7c, which keep the relay in the app process.

Results go to ``benchmarks/last_meta_results.json``. This process never imports the stdlib ``sqlite3``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from itertools import cycle, islice
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import chat_workload as chat  # noqa: E402
import workloads as w  # noqa: E402
from compare import Side, fmt_time, interleave, loadavg, log, print_markdown_rows, row  # noqa: E402

import shardlite  # noqa: E402
from shardlite import AsyncRouter, Router  # noqa: E402
from shardlite.testing.postgres import PgServer, PgUnavailable, postgres  # noqa: E402

RESULTS_PATH = os.path.join(HERE, "last_meta_results.json")
#: Source tenants of the emit rows: a block never uses one twice, so every timed transaction flags.
SOURCES = 2048
DESTS = 16
READERS = 2


class Context:
    """The server, the scratch directory and what the rows produce."""

    def __init__(self, args: argparse.Namespace, tmp: str, server: PgServer) -> None:
        self.args, self.tmp, self.server = args, tmp, server
        self.rounds, self.round_s = args.rounds, args.round_time
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.extra: dict[str, Any] = {}
        self.loop = asyncio.new_event_loop()
        self.chat_rounds: int = args.chat_rounds
        self._dbs = 0

    def root(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    def dsn(self) -> str:
        """A fresh database on the server (one per root)."""
        self._dbs += 1
        return self.server.create_database(f"meta{self._dbs}")

    def pair(self, name: str, make: Callable[..., Any]) -> tuple[Any, Any]:
        """``make(root)`` and ``make(root, meta=dsn)``: the embedded and the PostgreSQL twin."""
        return make(self.root(f"{name}-embedded")), make(self.root(f"{name}-pg"), meta=self.dsn())


def wait_listening(router: Router | AsyncRouter) -> None:
    """Until the PostgreSQL session cache hears revocations (it caches nothing before): a benchmark may look
    at the store behind the public ``Sessions``; the embedded store has no cache (nothing to wait for)."""
    store = router.sessions._store if isinstance(router, Router) else router.sessions.sync._store
    wait = getattr(store, "wait_listening", None)
    if wait is not None and not wait(30):
        raise RuntimeError("the session cache's listener did not connect within 30 s")


# -- m1, m2: warm tenants ---------------------------------------------------------------------------------------


def row_m1_m2(ctx: Context) -> None:
    """Routed sync point read and write transaction of warm tenants."""
    emb, pg = ctx.pair("warm", w.make_router)
    try:
        params = w.point_params()
        reads = [Side("PostgreSQL metadata", w.routed_reads(pg, params)),
                 Side("embedded metadata", w.routed_reads(emb, params))]
        interleave(reads, ctx.rounds, ctx.round_s)
        ctx.rows.append(row("m1", "routed sync point read of a warm tenant, PostgreSQL vs embedded metadata",
                            *reads, target=0.95))
        writes = [Side("PostgreSQL metadata", w.routed_writes(pg)), Side("embedded metadata", w.routed_writes(emb))]
        interleave(writes, ctx.rounds, ctx.round_s)
        ctx.rows.append(row("m2", "routed sync single-row write tx of a warm tenant (NORMAL), PostgreSQL vs "
                                  "embedded metadata", *writes, target=0.95))
    finally:
        emb.close()
        pg.close()


# -- m3: new tenants -------------------------------------------------------------------------------------------


def row_m3(ctx: Context) -> None:
    """First write to a new tenant (create, six tables, first insert)."""
    emb = w.ShardliteCreator(ctx.root("create-embedded"))
    pg = w.ShardliteCreator(ctx.root("create-pg"), meta=ctx.dsn())
    try:
        sides = [Side("PostgreSQL metadata", pg.run, max_n=150), Side("embedded metadata", emb.run, max_n=150)]
        interleave(sides, ctx.rounds, ctx.round_s)
    finally:
        emb.close()
        pg.close()
    ctx.rows.append(row("m3", "first write to a new tenant (create + 6 tables + 6 indexes + insert), PostgreSQL vs "
                              "embedded metadata", *sides, target=2.0, time_ratio=True))


# -- m4, m5: sessions -------------------------------------------------------------------------------------------


def resolves(router: Router, tokens: list[str]) -> w.Run:
    resolve = router.sessions.resolve

    def run(n: int) -> float:
        todo = list(islice(cycle(tokens), n))
        t0 = time.perf_counter()
        for token in todo:
            resolve(token)
        return time.perf_counter() - t0
    return run


def make_sessions(router: Router, count: int) -> list[str]:
    uids = [router.accounts.register(f"user{i}@example.com", name=f"User {i}") for i in range(100)]
    tokens = [router.sessions.create(uids[i % len(uids)]) for i in range(count)]
    wait_listening(router)
    assert all(router.sessions.resolve(t) is not None for t in tokens)  # warm
    return tokens


def row_m4(ctx: Context) -> None:
    """sessions.resolve of warm tokens."""
    count = 2_000 if ctx.args.quick else 10_000
    emb, pg = ctx.pair("sessions", Router)
    try:
        tokens = {id(r): make_sessions(r, count) for r in (emb, pg)}
        sides = [Side("PostgreSQL metadata", resolves(pg, tokens[id(pg)])),
                 Side("embedded metadata", resolves(emb, tokens[id(emb)]))]
        interleave(sides, ctx.rounds, ctx.round_s)
    finally:
        emb.close()
        pg.close()
    ctx.rows.append(row("m4", f"sessions.resolve of warm tokens ({count:,} sessions), PostgreSQL vs embedded metadata",
                        *sides, target=0.8))


READER = """
import sys, time
from shardlite import Router
router = Router(sys.argv[1])
tokens = sys.stdin.readline().split()
store = router.sessions._store  # the PostgreSQL session cache: warm only once it listens
assert store.wait_listening(30), "the session cache's listener did not connect"
assert all(router.sessions.resolve(t) is not None for t in tokens)
print("warm", flush=True)
for n, token in enumerate(tokens):
    while router.sessions.resolve(token) is not None:
        time.sleep(0.0005)  # spin politely: the revoker and the server share the machine
    print(n, repr(time.time()), flush=True)
router.close()
"""


def row_m5(ctx: Context) -> None:
    """A revoke seen by resolve in 2 other processes: delay p99."""
    count = 48 if ctx.args.quick else 200
    root, dsn = ctx.root("revoke-pg"), ctx.dsn()
    router = Router(root, meta=dsn)
    procs: list[subprocess.Popen[str]] = []
    delays: list[float] = []
    try:
        uid = router.accounts.register("revoke@example.com", name="Revoke")
        tokens = [router.sessions.create(uid) for _ in range(count)]
        env = dict(os.environ, SHARDLITE_META=dsn)  # the root records the database, never its password
        for _ in range(READERS):
            proc = subprocess.Popen([sys.executable, "-c", READER, root], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True, env=env)
            assert proc.stdin is not None
            proc.stdin.write(" ".join(tokens) + "\n")
            proc.stdin.flush()
            procs.append(proc)
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if line != "warm":
                raise RuntimeError(f"a reader process said {line!r}")
        for n, token in enumerate(tokens):
            started = time.time()
            router.sessions.revoke(token)
            for proc in procs:
                assert proc.stdout is not None
                seen, at = proc.stdout.readline().split()
                if int(seen) != n:
                    raise RuntimeError(f"a reader saw revocation {seen} for {n}")
                delays.append(float(at) - started)
        for proc in procs:
            if proc.wait(60) != 0:
                raise RuntimeError(f"a reader process exited with {proc.returncode}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        router.close()
    p50, p99 = statistics.median(delays), statistics.quantiles(delays, n=100, method="inclusive")[98]
    ctx.rows.append({
        "id": "m5", "what": f"a revoke seen by resolve in {READERS} other processes (warm caches), {count} revocations",
        "shardlite": f"p99 {fmt_time(p99)} (p50 {fmt_time(p50)}, max {fmt_time(max(delays))})",
        "baseline": "-", "ratio": f"{p99:.3f} s", "target": "p99 ≤ 1 s", "result": "PASS" if p99 <= 1.0 else "FAIL",
        "data": {"p50_s": p50, "p99_s": p99, "max_s": max(delays), "samples": len(delays), "readers": READERS},
    })


# -- m6: emitting transactions ----------------------------------------------------------------------------------


def emit_router(root: str, **kwargs: Any) -> Router:
    router = Router(root, schema=w.BASE_SCHEMA, max_open=4 * SOURCES, **kwargs)

    @router.handler("ev")
    def on_event(tx: Any, event: Any) -> None:
        pass

    for k in range(SOURCES):  # every source and destination exists and is open before timing
        with router.transaction(f"src:{k}") as tx:
            tx.execute(w.WRITE_SQL, w.WRITE_PARAMS)
    for d in range(DESTS):
        with router.transaction(f"dst:{d}") as tx:
            tx.execute(w.WRITE_SQL, w.WRITE_PARAMS)
    return router


def sync_emits(router: Router, *, steady: bool = False) -> w.Run:
    """``n`` (≤ SOURCES) transactions, an insert and one event each, on distinct drained sources; with
    ``steady`` all on one source whose outbox keeps the block's events (one flag per block at most)."""
    transaction = router.transaction
    counter = 0

    def run(n: int) -> float:
        nonlocal counter
        keys = ["steady:0"] * n if steady else [f"src:{k}" for k in range(n)]
        dests = [f"dst:{(counter + i) % DESTS}" for i in range(n)]
        counter += n
        t0 = time.perf_counter()
        for key, dest in zip(keys, dests, strict=True):
            with transaction(key) as tx:
                tx.execute(w.WRITE_SQL, w.WRITE_PARAMS)
                tx.emit(dest, "ev", {"n": 1})
        elapsed = time.perf_counter() - t0
        if not steady:
            router.relay.drain(timeout=600)  # untimed: every source's outbox empty for the next block
        return elapsed
    return run


def async_emits(loop: asyncio.AbstractEventLoop, ar: AsyncRouter, tasks: int = w.TASKS) -> w.Run:
    """``n`` (a multiple of ``tasks``, ≤ SOURCES) emitting transactions from ``tasks`` tasks, each on its own
    drained sources."""
    transaction = ar.transaction

    async def one(keys: list[str]) -> None:
        for i, key in enumerate(keys):
            async with transaction(key) as tx:
                await tx.execute(w.WRITE_SQL, w.WRITE_PARAMS)
                await tx.emit(f"dst:{i % DESTS}", "ev", {"n": 1})

    async def many(n: int) -> float:
        per = n // tasks
        chunks = [[f"src:{t * per + j}" for j in range(per)] for t in range(tasks)]
        t0 = time.perf_counter()
        await asyncio.gather(*(one(c) for c in chunks))
        elapsed = time.perf_counter() - t0
        await ar.relay.drain(timeout=600)  # untimed
        return elapsed

    def run(n: int) -> float:
        return loop.run_until_complete(many(n))
    return run


def row_m6(ctx: Context) -> None:
    """Write transactions that emit one event, sync and async."""
    dsn = ctx.dsn()
    emb, pg = emit_router(ctx.root("emit-embedded")), emit_router(ctx.root("emit-pg"), meta=dsn)
    try:
        sides = [Side("PostgreSQL metadata", sync_emits(pg), max_n=SOURCES),
                 Side("embedded metadata", sync_emits(emb), max_n=SOURCES)]
        steady = [Side("PostgreSQL metadata", sync_emits(pg, steady=True), max_n=SOURCES),
                  Side("embedded metadata", sync_emits(emb, steady=True), max_n=SOURCES)]
        interleave([*sides, *steady], ctx.rounds, ctx.round_s)
    finally:
        emb.close()
        pg.close()
    ctx.rows.append(row("m6a", "sync write tx emitting one event, each on a drained source (its pending-work flag "
                               "parked: woken after the commit), PostgreSQL vs embedded metadata", *sides, target=0.7))
    ctx.rows.append(row("m6r", "sync write tx emitting one event to a source whose outbox holds events (no flag "
                               "write), PostgreSQL vs embedded metadata", *steady, target=None))
    # async: the same sources, 64 tasks; AsyncRouter opened on the roots the sync routers made
    loop = ctx.loop
    roots = {"embedded": ctx.root("emit-embedded"), "pg": ctx.root("emit-pg")}
    ars = {name: AsyncRouter(root, schema=w.BASE_SCHEMA, max_open=4 * SOURCES,
                             **({"meta": dsn} if name == "pg" else {})) for name, root in roots.items()}
    try:
        for ar in ars.values():
            ar.handler("ev")(lambda tx, event: None)
        sides = [Side("PostgreSQL metadata", async_emits(loop, ars["pg"]), unit=w.TASKS, max_n=SOURCES),
                 Side("embedded metadata", async_emits(loop, ars["embedded"]), unit=w.TASKS, max_n=SOURCES)]
        interleave(sides, ctx.rounds, ctx.round_s)
    finally:
        for ar in ars.values():
            loop.run_until_complete(ar.aclose())
    ctx.rows.append(row("m6b", "async write tx emitting one event, 64 tasks, each on a drained source, PostgreSQL "
                               "vs embedded metadata", *sides, target=0.7))


# -- m7: the chat workload ----------------------------------------------------------------------------------------


def chat_side(wk: chat.Worker, label: str) -> Side:
    seed = 2000

    def run(n: int) -> float:
        nonlocal seed
        seed += 1  # every side runs the same sequence of blocks, so paired rounds run the same operations
        wk.send(f"round {seed} {n}")
        result = wk.expect("result")
        if result["errors"]:
            raise RuntimeError(f"{wk.label}: errors {result['errors']}")
        return float(n / result["ops_per_s"])
    ops = wk.ops
    return Side(label, run, unit=w.TASKS, max_n=ops, min_blocks=ops // w.TASKS)


def asyncpg_specs(ctx: Context, tag: str) -> list[tuple[str, list[str], dict[str, str]]]:
    """The two PostgreSQL-alone workers (a database each, named after ``tag``)."""
    server = ctx.server
    return [
        ("asyncpg (synchronous_commit=on)", ["--worker", "postgres", "--dsn", server.create_database(f"{tag}_on"),
                                             "--synchronous-commit", "on", "--pool", "16"], {}),
        ("asyncpg (synchronous_commit=off)", ["--worker", "postgres", "--dsn", server.create_database(f"{tag}_off"),
                                              "--synchronous-commit", "off", "--pool", "16"], {}),
    ]


def chat_rounds(ctx: Context, specs: list[tuple[str, list[str], dict[str, str]]]) -> tuple[list[Side], dict[str, Any]]:
    """Start one chat worker per spec (label, argv, environment), pair their rounds; the sides and the rows
    each holds afterwards (messages / feed entries)."""
    ops = 2048 if ctx.args.quick else 6144
    warmup = "1000" if ctx.args.quick else "4000"
    common = ["--users", "200", "--tasks", str(w.TASKS), "--warmup", warmup]
    workers = [chat.Worker(label, [*argv, *common], "", env) for label, argv, env in specs]
    try:
        for wk in workers:  # set up in parallel (untimed)
            wk.info = wk.expect("ready")
            wk.ops = ops
            log(f"  {wk.label}: ready (setup and warm-up {wk.info['setup_s']:.1f} s)")
        sides = [chat_side(wk, wk.label) for wk in workers]
        interleave(sides, ctx.chat_rounds, 1.0)
        totals = {}
        for wk in workers:
            wk.send("totals 0 0")
            totals[wk.label] = wk.expect("totals")
        for wk in workers:
            wk.finish()
    finally:
        for wk in workers:
            if wk.proc.poll() is None:
                wk.proc.kill()
                wk.proc.wait()
    return sides, totals


def totals_note(row_id: str, n: int, totals: dict[str, Any]) -> str:
    agree = len({json.dumps(t, sort_keys=True) for t in totals.values()}) == 1
    return (f"{row_id}: {n:,} operations per round; messages / feed entries held afterwards "
            f"{'agree' if agree else 'DIFFER'}: " + ", ".join(f"{k} {v['messages']}/{v['feed']}"
                                                            for k, v in totals.items()))


def row_m7(ctx: Context) -> None:
    """The chat workload: PostgreSQL metadata vs embedded, and vs PostgreSQL alone (asyncpg)."""
    sized = json.dumps({"max_open": chat.MAX_OPEN})
    specs = [
        ("shardlite, PostgreSQL metadata", ["--worker", "shardlite", "--path", ctx.root("chat-pg"),
                                            "--router-options", sized], {"SHARDLITE_META": ctx.dsn()}),
        ("shardlite, embedded metadata", ["--worker", "shardlite", "--path", ctx.root("chat-embedded"),
                                          "--router-options", sized], {}),
        *asyncpg_specs(ctx, "chat"),
    ]
    sides, totals = chat_rounds(ctx, specs)
    pg, emb, on, off = sides
    ctx.rows.append(row("m7a", "chat workload (200 users, 64 tasks, 40% DM / 30% history / 20% feed / 10% room), "
                               "PostgreSQL vs embedded metadata", pg, emb, target=0.8))
    ctx.rows.append(row("m7b", "chat workload, shardlite with PostgreSQL metadata vs PostgreSQL alone through "
                               "asyncpg (synchronous_commit=on)", pg, on, target=2.0))
    ctx.rows.append(row("m7c", "chat workload, shardlite with PostgreSQL metadata vs PostgreSQL alone through "
                               "asyncpg (synchronous_commit=off)", pg, off, target=2.0))
    ctx.extra["chat_totals"] = totals
    ctx.notes.append(totals_note("m7", pg.n, totals))


def row_m7r(ctx: Context) -> None:
    """The chat workload with the relay in a process of its own (PostgreSQL metadata) vs asyncpg."""
    options = json.dumps({"max_open": chat.MAX_OPEN, "relay_process": True})
    specs = [
        ("shardlite, PostgreSQL metadata, relay process", ["--worker", "shardlite", "--path", ctx.root("chat-rp"),
                                                           "--router-options", options],
         {"SHARDLITE_META": ctx.dsn()}),
        *asyncpg_specs(ctx, "chat_rp"),
    ]
    sides, totals = chat_rounds(ctx, specs)
    rp, on, off = sides
    what = ("chat workload, the relay in a process of its own (`shardlite relay run --app "
            "examples.chat.relay:router`: the app process emits, that process delivers every feed entry; "
            "each round counts until it has delivered them), PostgreSQL metadata, vs PostgreSQL alone through "
            "asyncpg")
    ctx.rows.append(row("m7d", f"{what} (synchronous_commit=on)", rp, on, target=2.0))
    ctx.rows.append(row("m7e", f"{what} (synchronous_commit=off)", rp, off, target=2.0))
    ctx.extra["chat_relay_process_totals"] = totals
    ctx.notes.append(totals_note("m7d/m7e", rp.n, totals))


ROWS: dict[str, Callable[[Context], None]] = {"m1": row_m1_m2, "m3": row_m3, "m4": row_m4, "m5": row_m5,
                                              "m6": row_m6, "m7": row_m7, "m7r": row_m7r}


# -- output ---------------------------------------------------------------------------------------------------


def print_table(info: dict[str, Any], rows: list[dict[str, Any]], notes: list[str]) -> None:
    print(f"shardlite metadata on PostgreSQL vs embedded ({info['mode']}, {info['rounds']} paired rounds of "
          f"~{info['round_time_s']} s, chat {info['chat_rounds']} rounds; {info['elapsed_s']} s total) — "
          f"`{info['command']}`")
    print(f"{info['when']}; Python {info['python']}, PostgreSQL {info['postgres']} (fsync=on, "
          f"synchronous_commit=on, loopback), {info['cpus']} CPUs, {info['platform']}; load average "
          f"{info['loadavg_start']} at start, {info['loadavg_end']} at end")
    print_markdown_rows(rows, notes, id_column="id")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run (fewer, shorter rounds)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--rounds", type=int, default=None, help="paired rounds per row (default 15, quick 7)")
    parser.add_argument("--round-time", type=float, default=None,
                        help="seconds per side per round (default 0.15, quick 0.05)")
    parser.add_argument("--chat-rounds", type=int, default=None, help="chat rounds (default 5, quick 3)")
    parser.add_argument("--only", default=",".join(ROWS), help=f"comma-separated rows (default all: {', '.join(ROWS)})")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a target is missed")
    args = parser.parse_args(argv)
    args.only = [r.strip() for r in args.only.split(",") if r.strip()]
    unknown = [r for r in args.only if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; rows are {', '.join(ROWS)}")
    args.rounds = args.rounds or (7 if args.quick else 15)
    args.round_time = args.round_time or (0.05 if args.quick else 0.15)
    args.chat_rounds = args.chat_rounds or (3 if args.quick else 5)
    started, load_start = time.perf_counter(), loadavg()
    tmp = tempfile.mkdtemp(prefix="shardlite-meta-bench-")
    try:
        with contextlib.ExitStack() as stack:
            try:
                server = stack.enter_context(postgres())
            except PgUnavailable as exc:  # every row needs the server: say so, and fail only under --strict
                log(f"benchmarks/meta.py skipped: no PostgreSQL server ({exc})")
                return 1 if args.strict else 0
            ctx = Context(args, tmp, server)
            try:
                for rid in args.only:
                    log(f"row {rid}: {(ROWS[rid].__doc__ or '').strip()}")
                    ROWS[rid](ctx)
                    for r in ctx.rows:
                        if not r.get("logged"):
                            log(f"  {r['id']}: {r['shardlite']} | {r['baseline']} | {r['ratio']} | {r['result']}")
                            r["logged"] = True
            finally:
                ctx.loop.close()
            version = server.version
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [{k: v for k, v in r.items() if k != "logged"} for r in ctx.rows]
    info = {
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]) if argv is None else "main()",
        "when": time.strftime("%Y-%m-%d %H:%M:%S %z"), "mode": "quick" if args.quick else "full",
        "rounds": args.rounds, "round_time_s": args.round_time, "chat_rounds": args.chat_rounds,
        "elapsed_s": round(time.perf_counter() - started, 1), "loadavg_start": load_start, "loadavg_end": loadavg(),
        "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "shardlite": shardlite.__version__, "postgres": version,
    }
    doc = {"meta": info, "rows": rows, "notes": ctx.notes, "extra": ctx.extra}
    with open(RESULTS_PATH, "w") as f:
        json.dump(doc, f, indent=2, ensure_ascii=False)
        f.write("\n")
    if args.json:
        print(json.dumps(doc, indent=2, ensure_ascii=False))
    else:
        print_table(info, rows, ctx.notes)
    log(f"results written to {os.path.relpath(RESULTS_PATH)}")
    missed = [r["id"] for r in rows if r["result"] == "FAIL"]
    if missed:
        log(f"targets missed: rows {', '.join(missed)}")
    return 1 if missed and args.strict else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
