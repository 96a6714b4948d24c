"""`shardlite replicate run [--once]`, `replicate status`, and restoring from a replica
(`shardlite restore --from URL --key K [--as K2] [--at TIME]`, wired into `restore` in cli/ops.py)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from dataclasses import asdict
from typing import Any

from ..errors import ConfigurationError
from ..replica.target import open_target, parse_target
from ..services import replica_owners, replica_restore
from ..services.replication import INTERVAL, Replication
from ..services.replication import status as replication_status
from ..services.replicator_child import set_parent_death_signal
from ..services.restore_layout import root_state
from .common import CliError, echo, emit_json, literal, log_to_stderr, open_router, print_table, root_of
from .ops import parse_node_paths
from .retention import register as register_retention
from .retention import replica_of


def _watch_parent(parent: int, stop: threading.Event) -> bool:
    """``--parent PID`` (a replicator started by an app's router, services/replicator_child.py): SIGINT is the app's
    to handle and ignored here, SIGTERM stops, and the kernel's parent-death signal (Linux) stops once
    ``os.getppid()`` is no longer ``parent``. False when the parent is gone already."""
    def parent_died(*_: object) -> None:  # also sent when the parent's starting *thread* ends: check the process
        if os.getppid() != parent:
            stop.set()

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGUSR1, parent_died)
    set_parent_death_signal(signal.SIGUSR1)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # the router blocked it until now
    return os.getppid() == parent


def cmd_run(args: argparse.Namespace) -> int:
    log_to_stderr()
    stop = threading.Event()
    if args.parent is not None and not _watch_parent(args.parent, stop):
        return 0
    with open_router(args) as router:
        try:
            replication = Replication(router._store)
        except ConfigurationError as exc:
            raise CliError(str(exc)) from exc
        try:
            return _run(args, router, replication, stop)
        except ConfigurationError as exc:  # the replica is another root's (services/replica_owners.py)
            raise CliError(str(exc)) from exc
        finally:
            replication.close()


def _run(args: argparse.Namespace, router: Any, replication: Replication, stop: threading.Event) -> int:
    """``replicate run`` once the replication service is made: one round (``--once``), or rounds until stopped."""
    if args.once:
        rounds = replication.run_round()
        report = {node: asdict(stats) for node, stats in rounds.items()}
        if args.json:
            emit_json({"nodes": report, "standby": sorted(replication.standby)})
        else:
            for node, stats in rounds.items():
                echo(f"node {literal(node)}: captured {stats.captured} ({stats.snapshots} snapshots), "
                     f"checkpoints {stats.checkpoints} ({stats.deferred} deferred, {stats.refreshed} snapshots "
                     f"refreshed), busy {stats.busy}, "
                     f"failed {stats.failed}, "
                     f"packs uploaded {stats.uploaded_packs} ({stats.uploaded_bytes} bytes)"
                     + (f", upload failed: {literal(stats.upload_error)}" if stats.upload_error else ""))
            for node in sorted(replication.standby):
                echo(f"node {literal(node)}: replicated by another process (standby)")
        return 0
    if args.parent is None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    if not args.json:
        echo(f"replicating {router.root} to {literal(router._store.replicate)} every {args.interval:g} s; "
             "Ctrl-C stops it")
    replication.run(stop, interval=args.interval, parent=args.parent)
    if args.parent is not None:  # the app closed its router: ship what it committed before that
        try:
            replication.run_round()
        except Exception as exc:  # noqa: BLE001 - the next replicator resumes from the staging
            logging.getLogger("shardlite.replicate").warning(
                "replicate: the last round failed (%s: %s)", type(exc).__name__, exc)
    return 0


def cmd_adopt(args: argparse.Namespace) -> int:
    with open_router(args) as router:
        store = router._store
        with replica_of(router.root, store.replicate) as target:
            adopted = replica_owners.adopt(target, store.meta.kv)
    if args.json:
        emit_json({"replica": store.replicate, "adopted": adopted})
    elif adopted is None:
        echo(f"{literal(store.replicate)} has no owner but this root: nothing to adopt")
    else:
        echo(f"{router.root} continues the root that owns {literal(store.replicate)} (owner {adopted}): its next "
             "`replicate run` takes the replica over, and that root's replicator, if it still runs, stops within "
             "30 s (or is refused at its next start)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with open_router(args) as router:
        if router._store.replicate is None:
            raise CliError(f"{router.root} does not replicate (shardlite init --replicate URL)")
        report: dict[str, Any] = replication_status(router._store)
    if args.json:
        emit_json(report)
        return 0
    total = report["total"]
    echo(f"replica: {literal(report['target'])}; tenants {total['tenants']}, max lag {total['max_lag_s']:.1f} s, "
         f"staged captures {total['staged']}, staged drops {total['drops_staged']}, packs {total['packs']}")
    meta = report["metadata"]
    if meta is None:
        echo("metadata: not uploaded yet (a replicator uploads it in its first round)")
    else:
        since = {True: f", changed since: up to {meta['lag_s']:.1f} s behind", False: ", unchanged since",
                 None: ""}[meta["changed_since"]]
        echo(f"metadata: {literal(meta['object'])}, as of {replica_restore.format_time(meta['as_of_ns'])} "
             f"({meta['age_s']:.1f} s ago){since}")
    print_table("nodes", ["node", "staged", "staged bytes", "staged drops", "packs", "pack bytes", "last pack"],
                [[name, n["staged"], n["staged_bytes"], n["drops_staged"], n["packs"], n["pack_bytes"],
                  n["last_pack"] or "-"] for name, n in sorted(report["nodes"].items())])
    print_table("tenants", ["key", "node", "last commit", "shipped", "lag (s)"],
                [[key, t["node"], replica_restore.format_time(t["last_commit_ns"]) if t["last_commit_ns"] else "-",
                  "yes" if t["shipped"] else "no", f"{t['lag_s']:.1f}"]
                 for key, t in sorted(report["tenants"].items())])
    return 0


def _warn_damaged(damaged: list[dict[str, str]]) -> None:
    for bad in damaged:
        echo(f"warning: left out {literal(bad['object'])}, which failed its checks ({literal(bad['error'])}): "
             "commits only it held are missing from what was restored", err=True)


def restore_from_replica(args: argparse.Namespace) -> int:
    """`shardlite restore --from URL [--key K [--as K2]] [--at TIME] [--force] [--node-path NAME=DIR]`: a
    whole root into a new or empty root, or one tenant into a live one."""
    try:
        parse_target(args.from_url)
        at_ns = replica_restore.parse_time(args.at) if args.at else None
    except ConfigurationError as exc:
        raise CliError(str(exc)) from exc
    root = root_of(args)
    target = open_target(args.from_url)
    try:
        if root_state(root) != "live":
            if args.as_key:
                raise CliError(f"--as restores into a live root; {root} is new or empty: restore without --as first")
            if args.key:
                raise CliError(f"{root} is new or empty: restore the whole root first (without --key), then "
                               "single tenants into it")
            done = replica_restore.restore_root_from_replica(target, root, at_ns=at_ns,
                                                             node_paths=parse_node_paths(args.node_path or []),
                                                             skip_damaged=args.skip_damaged)
            _warn_damaged(done.damaged)
            for skipped in done.left_out:
                echo(f"warning: left out tenant {literal(skipped['key'])}: {literal(skipped['error'])}; restore it "
                     "alone (--key, with --at before the gap)", err=True)
            if args.json:
                emit_json({"root": done.root, "created": done.created, "restored": done.tenants,
                           "at": replica_restore.format_time(at_ns) if at_ns is not None else None,
                           "damaged": done.damaged, "left_out": done.left_out})
            else:
                echo(f"restored {len(done.tenants)} tenants and the global data from {literal(target.url)} "
                     f"into {literal(done.root)} (each tenant with a new generation and incarnation)")
            return 0
        if not args.key:
            raise CliError(f"{root} is a live root: a whole root restores into a new or empty directory "
                           "(--root NEW); name one tenant with --key to restore it here")
        with open_router(args) as router:
            done_one = replica_restore.restore_tenant(router._store, target, args.key, as_key=args.as_key,
                                                      at_ns=at_ns, force=args.force, skip_damaged=args.skip_damaged)
    finally:
        target.close()
    _warn_damaged(done_one["damaged"])
    if args.json:
        emit_json(done_one)
    else:
        echo(f"restored {literal(done_one['key'])} from the replica at its commit of {done_one['commit_time']} "
             "(with a new generation and incarnation)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("replicate", help="replicate every tenant to the root's replica (s3:// or file://)")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = actions.add_parser("run", help="capture and upload every tenant's commits until stopped (one process "
                                         "per root; another one waits as a standby)")
    run.add_argument("--once", action="store_true", help="run one round (capture, upload), then exit")
    run.add_argument("--interval", type=float, default=INTERVAL,
                     help=f"seconds between uploads (default {INTERVAL:g}; noted tenants are captured four times "
                          "per interval): about the lag of a commit; a writer "
                          "with durability=\"replicated\" starts a round at once (it waits on "
                          "<node>/.replica/replicator.sock for its commit to be uploaded)")
    run.add_argument("--parent", type=int, metavar="PID",
                     help="exit when process PID is no longer this one's parent (set by Router(replicator=True), "
                          "which starts and stops this command itself)")
    run.set_defaults(func=cmd_run)
    status = actions.add_parser("status", help="per tenant and in total: last captured commit, lag, staged "
                                               "captures and drops, packs uploaded")
    status.set_defaults(func=cmd_status)
    adopt = actions.add_parser(
        "adopt", help="this root continues the root that owns its replica location (restored from that root's "
                      "backup, or copied from it): its replicator takes the location over",
        description="A replica location belongs to one root; another root's replicator is refused there. Run "
                    "this once on a root that continues the owner (a restore from the replica records it by "
                    "itself). The owner's own replicator, if it still runs, stops within 30 s once this root's "
                    "replicator took the location over (stop it first).")
    adopt.set_defaults(func=cmd_adopt)
    register_retention(actions)
