"""The cost of replication on the write path (issue 16, "Cost on the write path"): the same writes with and
without ``replicate=``, side by side in one run.

Usage::

    .venv/bin/python benchmarks/replication_writer.py            # full run (about a minute)
    .venv/bin/python benchmarks/replication_writer.py --quick    # short run
    .venv/bin/python benchmarks/replication_writer.py --json     # JSON on stdout instead of the table

How it measures: the paired-rounds method of ``benchmarks/compare.py``, whose helpers (``Side``,
``interleave``, ``row``) are imported, not copied: each side is calibrated and warmed up, then the sides run
alternately (A B, B A, ...) for ``--rounds`` rounds; a ratio is the median of the per-round ratios
(throughput with replication ÷ throughput without: higher is better, target ≥ 0.85×), the range after it
the lowest and highest round.

Rows:

* r1: routed sync single-row write transactions on one warm tenant (``benchmarks/workloads.py``'s
  ``routed_writes``), ``synchronous=NORMAL``;
* r2: async single-row write transactions, 64 tasks on one tenant (``async_writes``: group commit).

What the replicated side pays: one change note per commit (one ``os.write`` of ~40 bytes to the process's
notes file, from the WAL hook), and it never checkpoints (the replicator does that, after capturing; no
replicator runs here, so its log keeps growing through the run, and the checkpoints the plain side runs are
work the replicated side hands to the replicator process instead). This process never imports the stdlib
``sqlite3``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import workloads as w  # noqa: E402
from compare import Side, interleave, loadavg, meta, print_markdown, row  # noqa: E402

from shardlite.files.noteswriter import NotesWriter  # noqa: E402

TARGET = 0.85


def run_all(args: argparse.Namespace, tmp: str, *, replica: Callable[[str], str] | None = None,
            replicator: Callable[[str], Callable[[], None]] | None = None,
            ids: tuple[str, str] = ("r1", "r2")) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows. ``replica(name)``: the location of the replicated side ``name`` (a location belongs to one
    root; default a ``file://`` directory under ``tmp``);
    ``replicator(root)``: when given, called once each replicated root exists (before its side is measured)
    to start a replicator on it, returning what stops it (``benchmarks/replication.py`` runs
    ``shardlite replicate run`` there); ``ids``: the two rows' ids."""
    rows: list[dict[str, Any]] = []
    extra_notes: list[str] = []
    location = replica or (lambda name: "file://" + os.path.join(tmp, f"replica-{name}"))
    running = "a replicator running" if replicator is not None else "no replicator"
    stops: list[Callable[[], None]] = []
    loop = asyncio.new_event_loop()
    try:
        plain = w.make_router(os.path.join(tmp, "plain"))
        replicated = w.make_router(os.path.join(tmp, "replicated"), replicate=location("sync"))
        if replicator is not None:
            stops.append(replicator(os.path.join(tmp, "replicated")))
        try:
            a, b = Side("replicated", w.routed_writes(replicated)), Side("plain", w.routed_writes(plain))
            note = Side("one change note", note_cost(os.path.join(tmp, "notes-only")))
            interleave([a, b, note], args.rounds, args.round_time)
            rows.append(row(ids[0], f"routed sync single-row write tx, replicate= ({running}) vs none (NORMAL)",
                            a, b, target=TARGET))
            alone = statistics.median(p / (p + n) for p, n in zip(b.per_op, note.per_op, strict=True))
            extra_notes.append(f"{ids[0]}n: one change note (the WAL hook's whole work, timed alone) takes "
                               f"{note.median * 1e6:.2f} µs; added to a plain routed write it would give "
                               f"{alone:.2f}× (the note's own cost, without the checkpoints a replicated writer "
                               "leaves to the replicator).")
        finally:
            while stops:
                stops.pop()()
            plain.close()
            replicated.close()
        plain_ar = w.make_async_router(os.path.join(tmp, "aplain"), loop)
        replicated_ar = w.make_async_router(os.path.join(tmp, "areplicated"), loop, replicate=location("async"))
        if replicator is not None:
            stops.append(replicator(os.path.join(tmp, "areplicated")))
        try:
            a = Side("replicated", w.async_writes(loop, replicated_ar), unit=w.TASKS)
            b = Side("plain", w.async_writes(loop, plain_ar), unit=w.TASKS)
            interleave([a, b], args.rounds, args.round_time)
            rows.append(row(ids[1], f"async single-row write tx, 64 tasks on one tenant, replicate= ({running}) "
                                    "vs none (NORMAL)", a, b, target=TARGET))
        finally:
            while stops:
                stops.pop()()
            loop.run_until_complete(plain_ar.aclose())
            loop.run_until_complete(replicated_ar.aclose())
    finally:
        while stops:
            stops.pop()()
        loop.close()
    if replicator is None:
        notes = ["The replicated sides note every commit and never checkpoint (no replicator runs in this benchmark: "
                 "their logs grow through the run; the plain sides pay their own checkpoints).", *extra_notes]
    else:
        notes = ["The replicated sides note every commit and never checkpoint; a replicator process on their root "
                 "captures, uploads and checkpoints meanwhile (on the same CPUs).", *extra_notes]
    return rows, notes


def note_cost(node: str) -> Callable[[int], float]:
    """``n`` calls of a replicated connection's WAL hook (what each commit adds), on a notes file of its own."""
    hook = NotesWriter().hook(node, w.WRITE_KEY)

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for i in range(n):
            hook(None, "main", i)  # type: ignore[arg-type]  # the hook does not use the connection
        return time.perf_counter() - t0
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run (fewer, shorter rounds)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per row (default 21, quick 7)")
    parser.add_argument("--round-time", type=float, default=None,
                        help="seconds per side per round (default 0.15, quick 0.05)")
    parser.add_argument("--dir", default=None, help="where to put the scratch files (default: the temp dir)")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (7 if args.quick else 21)
    args.round_time = args.round_time or (0.05 if args.quick else 0.15)
    started = time.perf_counter()
    extra: dict[str, Any] = {"loadavg_start": loadavg()}
    tmp = tempfile.mkdtemp(prefix="shardlite-replbench-", dir=args.dir)
    try:
        rows, notes = run_all(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info = meta(args, extra, time.perf_counter() - started)
    if args.json:
        print(json.dumps({"meta": info, "rows": rows, "notes": notes}, indent=2, ensure_ascii=False))
    else:
        print_markdown(info, rows, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
