"""``make bench``: shardlite against its baselines, side by side in one run (brief §6, rows of issue 2).

Usage::

    .venv/bin/python benchmarks/compare.py            # full run (about a minute or two)
    .venv/bin/python benchmarks/compare.py --quick    # short run (well under a minute)
    .venv/bin/python benchmarks/compare.py --json     # JSON on stdout instead of the table

How it measures: every row has a shardlite side and one or more baseline sides, each a callable that runs
``n`` operations and returns the ``time.perf_counter`` time around them. Each side is calibrated (which also
warms it up) so one block of operations takes about ``--round-time`` seconds, gets one more untimed warm-up
block, and then the sides run alternately (A B, B A, A B, ...) for ``--rounds`` rounds. A figure is the
median time per operation over the rounds; a ratio is the median of the per-round ratios of the two sides
(paired rounds, so a slow phase of the machine hits both sides); the range after it is the lowest and highest
per-round ratio, a rough sign of how noisy the machine was. Ratios read "higher is better" (throughput
of shardlite / throughput of the baseline), except row 5, which is time_shardlite / time_by_hand (lower is
better). Results also go to ``benchmarks/last_results.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import apsw

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import workloads as w  # noqa: E402

import shardlite  # noqa: E402

RESULTS_PATH = os.path.join(HERE, "last_results.json")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- measurement -------------------------------------------------------------------------------------------------


@dataclass
class Side:
    label: str
    run: Callable[[int], float]
    unit: int = 1  # n is always a multiple of this (the async sides: one op per task and round at least)
    max_n: int = 1_000_000
    min_blocks: int = 16  # a timed block has at least this many units
    n: int = 0
    per_op: list[float] = field(default_factory=list)

    def block(self, n: int) -> float:
        gc.collect()
        return self.run(n)

    def calibrate(self, round_s: float) -> None:
        """Grow n until one block is long enough to time (and at least ``min_blocks`` units), then size it
        to ``round_s``; this also warms the side up. The size never drops below ``min_blocks`` units, so one
        stalled operation on a busy machine cannot shrink every later block to a handful of operations."""
        n = self.unit
        floor = self.min_blocks * self.unit
        while True:
            elapsed = self.block(n)
            if (elapsed >= round_s / 4 and n >= floor) or n >= self.max_n:
                break
            n = min(self.max_n, n * 4)
        per_op = max(elapsed, 1e-9) / n
        n = int(round_s / per_op) // self.unit * self.unit
        self.n = max(min(floor, self.max_n), min(self.max_n // self.unit * self.unit, n))

    @property
    def median(self) -> float:
        return statistics.median(self.per_op)


def interleave(sides: list[Side], rounds: int, round_s: float) -> None:
    for side in sides:
        side.calibrate(round_s)
    for side in sides:  # one more untimed block each, at the final size
        side.block(side.n)
    for r in range(rounds):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            side.per_op.append(side.block(side.n) / side.n)


def paired_ratios(shard: Side, base: Side, *, time_ratio: bool = False) -> list[float]:
    if time_ratio:
        return [s / b for s, b in zip(shard.per_op, base.per_op, strict=True)]
    return [b / s for s, b in zip(shard.per_op, base.per_op, strict=True)]


def fmt_time(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.2f} µs"


def fmt_rate(seconds: float) -> str:
    rate = 1 / seconds
    if rate >= 1e6:
        return f"{rate / 1e6:.2f}M/s"
    if rate >= 1e3:
        return f"{rate / 1e3:.1f}k/s"
    return f"{rate:.0f}/s"


def figure(side: Side) -> str:
    return f"{fmt_time(side.median)}/op ({fmt_rate(side.median)})"


def fmt_ratio(ratio: float, target: float | None, time_ratio: bool) -> str:
    """Two decimals, or three when two would round a miss onto the target (0.797 shown as 0.80 but FAIL)."""
    text = f"{ratio:.2f}"
    if target is not None:
        shown, real = float(text), ratio

        def passes(x: float) -> bool:
            return x <= target if time_ratio else x >= target

        if passes(shown) != passes(real):
            text = f"{ratio:.3f}"
    return text


def row(rid: str, what: str, shard: Side, base: Side, *, target: float | None, time_ratio: bool = False,
        target_text: str | None = None) -> dict[str, Any]:
    ratios = paired_ratios(shard, base, time_ratio=time_ratio)
    ratio = statistics.median(ratios)
    if target is None:
        result = "info"
    elif time_ratio:
        result = "PASS" if ratio <= target else "FAIL"
    else:
        result = "PASS" if ratio >= target else "FAIL"
    if target_text is None:
        target_text = "reference only" if target is None else (
            f"≤ {target:g}× time (lower is better)" if time_ratio else f"≥ {target:g}×")
    return {
        "id": rid,
        "what": what,
        "shardlite": figure(shard),
        "baseline": f"{base.label}: {figure(base)}",
        "ratio": f"{fmt_ratio(ratio, target, time_ratio)}×" + (" time" if time_ratio else "")
                 + f" ({min(ratios):.2f}–{max(ratios):.2f})",
        "target": target_text,
        "result": result,
        "data": {
            "shardlite_s_per_op": shard.median,
            "baseline_s_per_op": base.median,
            "ratio": ratio,
            "ratio_kind": "time_shardlite/time_baseline" if time_ratio else "throughput_shardlite/throughput_baseline",
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "rounds": len(ratios),
            "ops_per_round": {"shardlite": shard.n, "baseline": base.n},
        },
    }


# -- the run ----------------------------------------------------------------------------------------------------


class Context:
    """What the rows share, set up lazily (so ``--only`` sets up just what its rows need) and closed once."""

    def __init__(self, args: argparse.Namespace, tmp: str) -> None:
        self.args, self.tmp = args, tmp
        self.rounds, self.round_s = args.rounds, args.round_time
        self.params = w.point_params()
        self.loop = asyncio.new_event_loop()
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.extra: dict[str, Any] = {}
        self._made: dict[str, Any] = {}
        self._closers: list[Callable[[], None]] = []

    def get(self, name: str) -> Any:
        if name not in self._made:
            self._made[name] = self._make(name)
        return self._made[name]

    def _make(self, name: str) -> Any:
        tmp, loop = self.tmp, self.loop
        if name == "router":
            router = w.make_router(os.path.join(tmp, "sync"))
            self._closers.append(router.close)
            return router
        if name in ("direct", "direct_full"):
            sync = "FULL" if name == "direct_full" else "NORMAL"
            conn = w.open_direct(os.path.join(tmp, f"direct-{sync.lower()}.db"), sync)
            self._closers.append(conn.close)
            return conn
        if name in ("ar", "ar_full"):
            sync = "FULL" if name == "ar_full" else "NORMAL"
            ar = w.make_async_router(os.path.join(tmp, f"async-{sync.lower()}"), loop, synchronous=sync)
            self._closers.append(lambda: loop.run_until_complete(ar.aclose()))
            return ar
        if name in ("stdlib", "aiosqlite"):
            os.makedirs(os.path.join(tmp, "stdlib"), exist_ok=True)
            mode = "sqlite3-read" if name == "stdlib" else "aiosqlite-read"
            remote = w.RemoteSide(mode, os.path.join(tmp, "stdlib", f"{name}.db"))
            self._closers.append(remote.close)
            self.extra["stdlib_sqlite_version"] = remote.sqlite_version
            return remote
        raise KeyError(name)

    def close(self) -> None:
        for close in reversed(self._closers):
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - report, keep closing
                log(f"close failed: {exc!r}")
        self._closers.clear()
        self.loop.close()


def row1(ctx: Context) -> None:
    """Routed sync point read vs direct APSW, plus the stdlib sqlite3 reference in its own process."""
    stdlib = ctx.get("stdlib")
    routed = Side("routed", w.routed_reads(ctx.get("router"), ctx.params))
    apsw_read = Side("APSW", w.direct_reads(ctx.get("direct"), ctx.params))
    std_read = Side(f"stdlib sqlite3 {stdlib.sqlite_version}", stdlib.run)
    interleave([routed, apsw_read, std_read], ctx.rounds, ctx.round_s)
    ctx.rows.append(row("1", "routed sync point read vs direct APSW point read (one open file)",
                        routed, apsw_read, target=0.8))
    ctx.rows.append(row("1r", "routed sync point read vs stdlib sqlite3 point read (own process, own file)",
                        routed, std_read, target=None))


def row2(ctx: Context) -> None:
    """Routed single-row write transaction vs direct BEGIN IMMEDIATE/INSERT/COMMIT, both NORMAL."""
    routed_w = Side("routed", w.routed_writes(ctx.get("router")))
    apsw_w = Side("APSW", w.direct_writes(ctx.get("direct")))
    interleave([routed_w, apsw_w], ctx.rounds, ctx.round_s)
    ctx.rows.append(row("2", "routed sync single-row write tx vs direct BEGIN IMMEDIATE/INSERT/COMMIT (NORMAL)",
                        routed_w, apsw_w, target=0.8))


def row3(ctx: Context) -> None:
    """Async point reads from 64 tasks vs direct sync reads and vs aiosqlite (64 tasks, one connection)."""
    async_r = Side("AsyncRouter", w.async_reads(ctx.loop, ctx.get("ar"), ctx.params), unit=w.TASKS)
    apsw_read = Side("APSW sync", w.direct_reads(ctx.get("direct"), ctx.params))
    aio_read = Side("aiosqlite", ctx.get("aiosqlite").run, unit=w.TASKS)
    interleave([async_r, apsw_read, aio_read], ctx.rounds, ctx.round_s)
    ctx.rows.append(row("3a", "async point reads, 64 tasks, vs direct sync APSW reads", async_r, apsw_read,
                        target=0.5))
    ctx.rows.append(row("3b", "async point reads, 64 tasks, vs aiosqlite (64 tasks, one shared connection)",
                        async_r, aio_read, target=10))


def row4(ctx: Context) -> None:
    """Async single-row write transactions, 64 tasks on one tenant, vs direct sync commits (NORMAL, FULL)."""
    for rid, sync, ar_name, conn_name, target in (("4a", "NORMAL", "ar", "direct", 2.0),
                                                  ("4b", "FULL", "ar_full", "direct_full", 10.0)):
        log(f"row {rid}: {sync}")
        async_w = Side("AsyncRouter", w.async_writes(ctx.loop, ctx.get(ar_name)), unit=w.TASKS)
        apsw_w = Side("APSW sync", w.direct_writes(ctx.get(conn_name)))
        interleave([async_w, apsw_w], ctx.rounds, ctx.round_s)
        ctx.rows.append(row(rid, f"async single-row write tx, 64 tasks on one tenant, vs direct sync commits "
                                 f"({sync})", async_w, apsw_w, target=target))


def row5(ctx: Context) -> None:
    """First write to a new tenant (create + six tables with indexes + first insert) vs the same by hand."""
    creator = w.ShardliteCreator(os.path.join(ctx.tmp, "create"))
    by_hand = w.ByHandCreator(os.path.join(ctx.tmp, "by-hand"))
    schema_first = w.ByHandCreator(os.path.join(ctx.tmp, "by-hand-schema-first"), schema_first=True)
    try:
        new_s = Side("shardlite", creator.run, max_n=150)
        new_h = Side("by hand (APSW)", by_hand.run, max_n=150)
        new_r = Side("by hand, schema before WAL", schema_first.run, max_n=150)
        interleave([new_s, new_h, new_r], ctx.rounds, ctx.round_s)
    finally:
        creator.close()
        by_hand.close()
        schema_first.close()
    ctx.rows.append(row("5", "first write to a new tenant, 6 tables + 6 indexes (create + schema + insert) vs "
                             "the same by hand with APSW (NORMAL)", new_s, new_h, target=0.5, time_ratio=True))
    ctx.rows.append(row("5r", "first write to a new tenant vs by hand with the schema committed before switching "
                              "to WAL (NORMAL)", new_s, new_r, target=None, time_ratio=True,
                        target_text="reference only (time; lower is better)"))
    ctx.extra["row5_tenants_created_per_side"] = creator.count
    ctx.notes.append(
        f"Row 5: {creator.count} tenants created per side, at most {new_s.max_n} per timed block; after each block, "
        "untimed, the by-hand side closes its connections and the shardlite side closes and reopens its Router and "
        "creates one warm-up tenant (schema template built, catalog warm), so no close/checkpoint lands in a timed "
        "block and open files do not pile up over the run. By hand sets synchronous=NORMAL before anything else "
        "(then WAL, schema, insert, commit); row 5r is a variant that commits the schema and the first row in "
        "rollback-journal mode and switches to WAL afterwards.")


def row6(ctx: Context) -> None:
    """Memory: 100,000 tenants in the catalog, max_open=256, random reads across 10,000 (own processes)."""
    real, total, reads = (1_000, 100_000, 2_000) if ctx.args.quick else (10_000, 100_000, 20_000)
    log(f"row 6: {real:,} real tenants, {total:,} in the catalog, {reads:,} reads")
    mem = w.memory_row(os.path.join(ctx.tmp, "memory"), real=real, total=total, reads=reads, max_open=256)
    ctx.extra["memory"] = mem
    limit = 200.0
    ctx.rows.append({
        "id": "6",
        "what": f"memory: {mem['catalog_tenants']:,} tenants in the catalog, max_open=256, "
                f"{mem['reads']:,} random reads across {mem['distinct_tenants_read']:,} of them",
        "shardlite": f"peak RSS {mem['peak_rss_mb']:.1f} MB",
        "baseline": f"same process before the reads: {mem['rss_before_reads_mb']:.1f} MB",
        "ratio": f"{mem['peak_rss_mb'] / limit:.2f}× of limit",
        "target": f"< {limit:g} MB peak RSS",
        "result": "PASS" if mem["peak_rss_mb"] < limit else "FAIL",
        "data": mem,
    })
    ctx.notes.append(
        f"Row 6: {mem['real_tenants']:,} real tenants created through the Router (10 rows each); the other "
        f"{mem['fake_catalog_rows']:,} catalog rows were inserted directly into global.db's _shardlite_tenants "
        "(with _shardlite_generations rows) through APSW: catalog entries without files, never read. Peak RSS is "
        "ru_maxrss of a fresh process that only opens the Router and reads, started through a small launcher so it "
        "does not inherit this process's RSS high-water mark (VmHWM cross-check: "
        f"{mem.get('vm_hwm_mb') or 0:.1f} MB; {mem['read_us']:.0f} µs per read, mostly cold opens; "
        f"{mem['open_connections']} connections open at the end; setup {mem['setup_s']:.1f} s)."
        + (" --quick uses fewer real tenants than the full run (10,000)." if ctx.args.quick else ""))


ROWS: dict[str, Callable[[Context], None]] = {"1": row1, "2": row2, "3": row3, "4": row4, "5": row5, "6": row6}


def run_all(args: argparse.Namespace, tmp: str) -> tuple[list[dict[str, Any]], list[str], dict[str, Any]]:
    ctx = Context(args, tmp)
    try:
        for rid in args.only:
            log(f"row {rid}: {(ROWS[rid].__doc__ or '').strip()}")
            ROWS[rid](ctx)
    finally:
        ctx.close()
    if {"1", "3"} & set(args.only):
        ctx.notes.insert(0, "Rows 1r and 3b: stdlib sqlite3 and aiosqlite run in a separate worker process on their "
                         "own file (never a shardlite file), driven in lockstep so their rounds alternate with the "
                         "others; the worker times its own operations (no pipe round trip counted).")
    return ctx.rows, ctx.notes, ctx.extra


# -- output -------------------------------------------------------------------------------------------------------

COLUMNS = ("what", "shardlite", "baseline", "ratio", "target", "result")
HEADERS = ("what", "shardlite", "baseline", "ratio", "target", "PASS/FAIL")


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def meta(args: argparse.Namespace, extra: dict[str, Any], elapsed: float) -> dict[str, Any]:
    return {
        "loadavg_start": extra.get("loadavg_start"),
        "loadavg_end": loadavg(),
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "mode": "quick" if args.quick else "full",
        "rounds": args.rounds,
        "round_time_s": args.round_time,
        "elapsed_s": round(elapsed, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "shardlite": shardlite.__version__,
        "apsw": apsw.apsw_version(),
        "sqlite_apsw": apsw.sqlite_lib_version(),
        "sqlite_stdlib_worker": extra.get("stdlib_sqlite_version", "n/a (not run)"),
        "data_dir": args.dir or tempfile.gettempdir(),
    }


def print_markdown(info: dict[str, Any], rows: list[dict[str, Any]], notes: list[str]) -> None:
    print(f"shardlite benchmarks ({info['mode']}, {info['rounds']} interleaved rounds of ~{info['round_time_s']} s, "
          f"{info['elapsed_s']} s total) — `{info['command']}`")
    print(f"Python {info['python']}, APSW {info['apsw']} (SQLite {info['sqlite_apsw']}), stdlib sqlite3 "
          f"{info['sqlite_stdlib_worker']}, {info['cpus']} CPUs, {info['platform']}, files under {info['data_dir']}; "
          f"load average {info['loadavg_start']} at start, {info['loadavg_end']} at end")
    print_markdown_rows(rows, notes)


def print_markdown_rows(rows: list[dict[str, Any]], notes: list[str], *, id_column: str | None = None) -> None:
    """The rows as a markdown table (``id_column``: a first column headed so, holding each row's ``id``), then
    the notes as a list; shared by the benchmark scripts."""
    first = f"| {id_column} " if id_column else ""
    print()
    print(first + "| " + " | ".join(HEADERS) + " |")
    print(("|---" if id_column else "") + "|" + "|".join("---" for _ in HEADERS) + "|")
    for r in rows:
        cells = " | ".join(str(r[c]).replace("|", "\\|") for c in COLUMNS)
        print((f"| {r['id']} " if id_column else "") + "| " + cells + " |")
    print()
    for note in notes:
        print(f"- {note}")


def print_rich(info: dict[str, Any], rows: list[dict[str, Any]], notes: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"shardlite benchmarks ({info['mode']}, {info['rounds']} interleaved rounds, "
                        f"{info['elapsed_s']} s)", show_lines=True)
    for header in HEADERS:
        table.add_column(header, overflow="fold")
    styles = {"PASS": "bold green", "FAIL": "bold red", "info": "dim"}
    for r in rows:
        cells = [str(r[c]) for c in COLUMNS]
        cells[-1] = f"[{styles[r['result']]}]{r['result']}[/]"
        table.add_row(*cells)
    console.print(f"[dim]{info['command']} — Python {info['python']}, APSW {info['apsw']} (SQLite "
                  f"{info['sqlite_apsw']}), stdlib sqlite3 {info['sqlite_stdlib_worker']}, {info['cpus']} CPUs, "
                  f"files under {info['data_dir']}; load average {info['loadavg_start']} at start, "
                  f"{info['loadavg_end']} at end[/]")
    console.print(table)
    for note in notes:
        console.print(f"• {note}", highlight=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run (fewer, shorter rounds; smaller row 6)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per row (default 21, quick 7)")
    parser.add_argument("--round-time", type=float, default=None,
                        help="seconds per side per round (default 0.15, quick 0.05)")
    parser.add_argument("--dir", default=None, help="where to put the scratch files (default: the temp dir)")
    parser.add_argument("--only", default=",".join(ROWS), help="comma-separated rows to run (default: all, 1-6)")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a target is missed")
    args = parser.parse_args(argv)
    args.only = [r.strip() for r in args.only.split(",") if r.strip()]
    unknown = [r for r in args.only if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; rows are {', '.join(ROWS)}")
    if args.rounds is None:
        args.rounds = 7 if args.quick else 21
    if args.round_time is None:
        args.round_time = 0.05 if args.quick else 0.15
    started = time.perf_counter()
    load_start = loadavg()
    tmp = tempfile.mkdtemp(prefix="shardlite-bench-", dir=args.dir)
    try:
        rows, notes, extra = run_all(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    extra["loadavg_start"] = load_start
    info = meta(args, extra, time.perf_counter() - started)
    doc = {"meta": info, "rows": rows, "notes": notes, "extra": extra}
    with open(RESULTS_PATH, "w") as f:
        json.dump(doc, f, indent=2, ensure_ascii=False)
        f.write("\n")
    if args.json:
        print(json.dumps(doc, indent=2, ensure_ascii=False))
    elif sys.stdout.isatty():
        print_rich(info, rows, notes)
    else:
        print_markdown(info, rows, notes)
    log(f"results written to {os.path.relpath(RESULTS_PATH)}")
    missed = [r["id"] for r in rows if r["result"] == "FAIL"]
    if missed:
        log(f"targets missed: rows {', '.join(missed)}")
    return 1 if missed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
