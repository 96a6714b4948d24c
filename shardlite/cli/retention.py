"""`shardlite replicate retention [--default 7d] [--prefix P 30d]... [--remove-prefix P]...` and
`shardlite replicate compact` (wired into `replicate` in cli/replicate.py)."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from dataclasses import asdict

from ..core import retention
from ..errors import ConfigurationError
from ..meta.replica_record import record_windows, recorded_windows
from ..replica.target import ReplicaTarget, open_target
from ..services import replica_retention
from ..services.replica_restore import format_time
from .common import CliError, echo, emit_json, literal, open_router, print_table


@contextlib.contextmanager
def replica_of(root: str, replicate: str | None) -> Iterator[ReplicaTarget]:
    """The replica target of a root that replicates to ``replicate`` (closed after the block):
    :class:`CliError` when it does not replicate, and for a :class:`ConfigurationError` raised in the block
    (the location is another root's: services/replica_owners.py)."""
    if replicate is None:
        raise CliError(f"{root} does not replicate (shardlite init --replicate URL)")
    target = open_target(replicate)
    try:
        yield target
    except ConfigurationError as exc:
        raise CliError(str(exc)) from exc
    finally:
        target.close()


def _show(windows: retention.Windows) -> dict[str, object]:
    return {"default": retention.format_duration(windows.default),
            "prefixes": {p: retention.format_duration(v) for p, v in sorted(windows.prefixes.items())}}


def cmd_retention(args: argparse.Namespace) -> int:
    with open_router(args) as router:
        store = router._store
        if store.replicate is None:
            raise CliError(f"{router.root} does not replicate (shardlite init --replicate URL)")
        try:
            windows = recorded_windows(store.meta.kv)
            changed = args.default is not None or args.prefix or args.remove_prefix
            default = retention.parse_duration(args.default) if args.default is not None else windows.default
            prefixes = dict(windows.prefixes)
            for prefix in args.remove_prefix or []:
                if prefixes.pop(prefix, None) is None:
                    raise CliError(f"no window is set for the prefix {literal(prefix)}")
            for prefix, text in args.prefix or []:
                prefixes[prefix] = retention.parse_duration(text)
            windows = retention.Windows(default, prefixes)
            if changed:
                windows = record_windows(store.meta.kv, windows)
        except (retention.RetentionError, ConfigurationError) as exc:
            raise CliError(str(exc)) from exc
    shown = _show(windows)
    if args.json:
        emit_json(shown)
        return 0
    echo(f"retention: {shown['default']} for every key no prefix matches" + (" (recorded)" if changed else ""))
    if windows.prefixes:
        print_table("prefix windows", ["prefix (longest match wins)", "window"],
                    [[p, retention.format_duration(w)] for p, w in sorted(windows.prefixes.items())])
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    with open_router(args) as router:
        store = router._store
        with replica_of(router.root, store.replicate) as target:
            fd = replica_retention.compact_lock(store)
            if fd is None:
                raise CliError(f"a compaction of {router.root}'s replica is running (a replicator or another "
                               "`replicate compact`): wait for it")
            try:
                report = replica_retention.compact(store, target)
            finally:
                os.close(fd)
    if args.json:
        emit_json(asdict(report))
        return 0
    echo(f"compacted {literal(store.replicate)} at {format_time(report.compacted_ns)}: deleted {report.deleted_packs} "
         f"of {report.packs} packs ({report.deleted_bytes} bytes), wrote {report.snapshots} base snapshots "
         f"({report.snapshot_bytes} bytes) in {len(report.written)} packs, joined {report.rolled_packs} packs older "
         f"than an hour into {len(report.rollup_parts)}, deleted {report.meta_deleted} metadata snapshots "
         f"({report.seconds:.2f} s)")
    if report.pinned:
        echo(f"kept whole (their history could not be compacted): {', '.join(literal(k) for k in report.pinned)}")
    for first, why in report.rollups_skipped.items():
        echo(f"not joined (left as they are): the run from {literal(first)}: {literal(why)}")
    for name, why in report.damaged.items():
        echo(f"damaged, kept (no tenant's history expires while it is there; restores that need it stop and "
             f"name it, or leave it out with --skip-damaged): {literal(name)}: {literal(why)}")
    return 0


def register(actions: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    ret = actions.add_parser(
        "retention", help="show or set how long the replica keeps history (default 7d; per key prefix)",
        description="Every acknowledged commit of a tenant stays restorable for its window: the default, or the "
                    "window of the longest key prefix its key begins with. Durations: a number and s, m, h, d "
                    "or w (1m to 3650d). Without options: show the windows.")
    ret.add_argument("--default", metavar="DURATION", help="the window of every key no prefix matches (e.g. 7d)")
    ret.add_argument("--prefix", nargs=2, action="append", metavar=("PREFIX", "DURATION"),
                     help="the window of keys beginning with PREFIX (repeatable), e.g. --prefix dm: 30d")
    ret.add_argument("--remove-prefix", action="append", metavar="PREFIX", help="forget PREFIX's window")
    ret.set_defaults(func=cmd_retention)
    comp = actions.add_parser(
        "compact", help="compact the replica now: base snapshots at each tenant's window start, older packs "
                        "and metadata snapshots deleted, packs older than an hour joined into a few larger "
                        "ones (a replicator does it every hour)")
    comp.set_defaults(func=cmd_compact)
